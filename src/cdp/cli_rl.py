"""``cdp rl``: offline RL on a D4RL-layout dataset — BC, EDP, Diffusion-QL, IDQL, or CDP (contraction) on EDP /
Diffusion-QL / IDQL, evaluated in MuJoCo.

    cdp rl                                   # CDP on a generated PointMaze UMaze dataset (no download)
    cdp rl --algo edp --fraction 0.1         # EDP in the 10%-data regime
    cdp rl --algo idql --steps 200           # IDQL (cdp_idql: + contraction); dql / cdp_dql: Diffusion-QL
    cdp rl --algo bc --steps 2000 --out runs/rl_bc
    cdp rl --dataset maze.hdf5               # any D4RL-layout hdf5 for a PointMaze env
    cdp rl --dataset data/hopper/hopper-medium-replay-v5.hdf5   # from `cdp data mujoco` (or a D4RL file + --env)
    cdp rl --config rl.yaml --seed 1         # YAML of these flags; command-line flags override it

Writes into ``--out``: the cached dataset (``dataset_*.hdf5``), ``config.yaml``, ``metrics.jsonl`` + ``tb/``,
``checkpoints/last`` and ``results.json``; prints the normalised score ± std over the evaluation episodes and, for
diffusion actors, contraction diagnostics (λ_max of the normalised sampling-drift Jacobian along DDIM trajectories
from dataset states; < 0 = contracting). Re-running with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DEFAULT_ENV = "PointMaze_UMaze-v3"


def add_rl(sub) -> None:
    from .rl import ALGOS

    p = sub.add_parser("rl", help="offline RL (BC / EDP / DQL / IDQL / CDP) on PointMaze (generated) or a D4RL-layout "
                                  "dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=ALGOS, default="cdp",
                   help="cdp = EDP + contraction, cdp_dql / cdp_idql = Diffusion-QL / IDQL + contraction (default: cdp)")
    p.add_argument("--out", default="runs/rl", help="run folder; re-using it resumes (default: runs/rl)")
    p.add_argument("--config", default=None,
                   help="YAML mapping of these flags' names (e.g. algo: edp, steps: 20000, dataset: FILE); flags given "
                        "on the command line override it")
    p.add_argument("--env", default=None,
                   help=f"env id: the PointMaze env to generate for (default: {DEFAULT_ENV}), or the evaluation env of "
                        f"--dataset (default: the file's env_id attribute, e.g. Hopper-v5)")
    p.add_argument("--dataset", default=None,
                   help="D4RL-layout hdf5 (PointMaze, or Hopper/Walker2d/HalfCheetah-v5) to use instead of generating one")
    p.add_argument("--dataset-size", type=int, default=50_000, help="generated transitions (default: 50000)")
    p.add_argument("--action-noise", type=float, default=0.0,
                   help="std of Gaussian noise on the expert's actions when generating (default: 0)")
    p.add_argument("--dataset-seed", type=int, default=0,
                   help="seed of the generated dataset, fixed across training seeds as in D4RL (default: 0)")
    p.add_argument("--fraction", type=float, default=1.0, help="keep this fraction of trajectories (default: 1; 0.1 = 10%% regime)")
    p.add_argument("--seed", type=int, default=0, help="seeds data subsampling, initialisation and batches (default: 0)")
    p.add_argument("--steps", type=int, default=5000, help="gradient steps (default: 5000; the default cdp job took 4 min 3 s end to end on one shared CPU core, 45 ms/step)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: 0 = only at the end)")
    p.add_argument("--eval-episodes", type=int, default=10, help="simulator episodes per evaluation (default: 10)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="T of the vp schedule (diffusion algos; default: 100 for edp/cdp, 5 for dql/idql)")
    p.add_argument("--eta", type=float, default=None, help="weight η of the normalised Q term (edp/cdp/dql/cdp_dql; default: 1)")
    p.add_argument("--gamma", type=float, default=None, help="contraction weight γ (cdp, cdp_dql, cdp_idql; default: 0.1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the diffusion actor's training pass (same losses; measured 0-4%% faster RL steps on CPU "
                        "after ~10 s of compiling; needs a C++ compiler)")
    p.set_defaults(func=run_rl)
    # defaults are applied in run_rl after the --config file, so that only explicit flags override the file
    _RL_DEFAULTS.clear()
    for a in p._actions:  # noqa: SLF001
        if a.dest not in ("help", "func") and a.default is not argparse.SUPPRESS:
            _RL_DEFAULTS[a.dest] = a.default
            a.default = argparse.SUPPRESS


_RL_DEFAULTS: dict = {}


def resolve_config(args) -> None:
    """Fill ``args``: flag defaults < the ``--config`` YAML < flags given on the command line.

    Raises:
        FileNotFoundError: missing config file. ValueError: not a mapping, or keys that are not ``cdp rl`` flags.
    """
    given = dict(vars(args))
    from_file: dict = {}
    path = given.get("config")
    if path:
        import yaml

        if not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        from_file = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(from_file, dict):
            raise ValueError(f"{path}: must be a YAML mapping of cdp rl flags")
        from_file = {str(k).replace("-", "_"): v for k, v in from_file.items()}
        bad = sorted(set(from_file) - set(_RL_DEFAULTS) | ({"config"} & set(from_file)))
        if bad:
            raise ValueError(f"{path}: not cdp rl flags: {bad}; known: {sorted(k for k in _RL_DEFAULTS if k != 'config')}")
    for k, v in {**_RL_DEFAULTS, **from_file, **given}.items():
        setattr(args, k, v)


def _dataset(args, out: Path):
    from .data.maze import generate_maze_dataset
    from .data.rl import load_d4rl_hdf5, subsample_trajectories

    if args.dataset:
        ds = load_d4rl_hdf5(args.dataset, env_id=args.env)
        if ds.env_id is None:
            raise ValueError(f"{args.dataset} names no env (no env_id attribute); pass --env, e.g. --env Hopper-v5")
    else:
        args.env = args.env or DEFAULT_ENV
        path = out / f"dataset_{args.env}_n{args.dataset_size}_noise{args.action_noise:g}_seed{args.dataset_seed}.hdf5"
        if path.exists():
            ds = load_d4rl_hdf5(path)
        else:
            ds = generate_maze_dataset(args.env, n_steps=args.dataset_size, seed=args.dataset_seed, action_noise=args.action_noise,
                                       path=path, ref_episodes=0, progress=not args.no_progress)
    if ds.env_id is None:
        ds.env_id = args.env
    if ds.ref_min_score is None or ds.ref_max_score is None:
        raise ValueError(f"dataset has no reference scores for the normalised score (env {ds.env_id})")
    if args.fraction < 1.0:
        ds = subsample_trajectories(ds, args.fraction, args.seed)
    return ds


def contraction_diagnostics(policy, observations: torch.Tensor, n_states: int = 64, seed: int = 0) -> dict[str, float]:
    """λ_max(Ĵ) along DDIM trajectories from ``n_states`` dataset states (one trajectory each)."""
    from .diagnostics import lambda_along_trajectory

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(observations.shape[0], generator=g)[:n_states]
    d = lambda_along_trajectory(policy, observations[idx], n_samples=len(idx), generator=g)
    lam = d["lambda_hat"]  # (S, n)
    worst = lam.max(0).values  # per trajectory, the least contractive step
    return {"lambda_hat_mean": float(lam.mean()), "lambda_hat_max": float(lam.max()),
            "frac_points_contractive": float((lam < 0).double().mean()),
            "frac_trajectories_contractive": float((worst < 0).double().mean()),
            "log_bound_mean": float((d["lambda_F"] * d["dtau"][:, None]).sum(0).mean()),
            "n_states": int(len(idx)), "n_steps": int(lam.shape[0])}


def run_rl(args) -> int:
    resolve_config(args)
    from .cli import set_threads
    from .rl import make_config, make_agent
    from .rl.trainer import RLTrainConfig, dataset_tensors, evaluate_agent, train_offline
    from .runs import RunDir, median_call_ms

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = _dataset(args, out)
    t_data = time.perf_counter() - t0
    overrides = {}
    if args.algo != "bc":
        if args.diffusion_steps is not None:
            overrides["num_diffusion_steps"] = args.diffusion_steps
        if args.eta is not None:
            if args.algo in ("idql", "cdp_idql"):
                raise ValueError("--eta does not apply to idql/cdp_idql (IDQL has no Q term in the actor loss)")
            overrides["eta"] = args.eta
        if args.compile:
            overrides["compile"] = True
    elif args.diffusion_steps is not None or args.eta is not None or args.gamma is not None or args.compile:
        raise ValueError("--diffusion-steps/--eta/--gamma/--compile do not apply to --algo bc")
    acfg = make_config(args.algo, overrides)
    if args.gamma is not None:
        if not args.algo.startswith("cdp"):
            raise ValueError("--gamma applies to the contraction algos (cdp, cdp_dql, cdp_idql) only")
        acfg.contraction = {**acfg.contraction, "weight": args.gamma}
        acfg = type(acfg)(**acfg.to_dict())  # re-validate
    tcfg = RLTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                         eval_episodes=args.eval_episodes, ckpt_every=max(args.steps // 5, 1) if args.steps else 0,
                         progress=not args.no_progress)
    agent = make_agent(args.algo, ds.obs_dim, ds.act_dim, acfg, seed=args.seed)
    run = RunDir(out, config={"algo": args.algo, "env": ds.env_id, "fraction": args.fraction, "seed": args.seed,
                              "dataset": args.dataset, "dataset_seed": args.dataset_seed,
                              "n_transitions": len(ds), "n_trajectories": ds.n_trajectories,
                              "ref_scores": [ds.ref_min_score, ds.ref_max_score],
                              "agent": acfg.to_dict(), "train": tcfg.to_dict()})
    print(f"cdp rl: {args.algo} on {ds.env_id}: {len(ds)} transitions in {ds.n_trajectories} trajectories "
          f"(fraction {args.fraction:g}), {args.steps} steps")
    t1 = time.perf_counter()
    res = train_offline(agent, ds, tcfg, run, desc=args.algo)
    t_train = time.perf_counter() - t1
    t2 = time.perf_counter()
    if res["evals"] and res["evals"][-1]["step"] == res["step"]:
        ev = res["evals"][-1]
    else:
        ev = evaluate_agent(agent, ds, args.eval_episodes)
        ev = {k: v for k, v in ev.items() if k != "returns"}
        run.log(res["step"], {k: v for k, v in ev.items() if isinstance(v, (int, float))}, prefix="eval/")
    t_eval = time.perf_counter() - t2  # 0 when the last evaluation ran inside the loop (added below)
    diag = None
    if args.algo != "bc":
        diag = contraction_diagnostics(agent.ema.model, dataset_tensors(ds)["observations"], seed=args.seed)
        run.log(res["step"], diag, prefix="diagnostics/")
    t_train -= res.get("eval_s", 0.0)  # periodic evaluations are counted as evaluation, not training
    t_eval += res.get("eval_s", 0.0)
    obs1 = dataset_tensors(ds)["observations"][:1]
    g_lat = torch.Generator().manual_seed(args.seed)
    timing = {"data_s": round(t_data, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
              "total_s": round(time.perf_counter() - t0, 1),
              "act_ms_batch1": round(median_call_ms(lambda: agent.act(obs1, generator=g_lat)), 3)}
    results = {"algo": args.algo, "env": ds.env_id, "fraction": args.fraction, "seed": args.seed, "steps": res["step"],
               "normalized_score_mean": ev["normalized_score_mean"], "normalized_score_std": ev["normalized_score_std"],
               "mean_return": ev["mean_return"], "success_rate": ev.get("success_rate"), "episodes": args.eval_episodes,
               "evals": res["evals"], "contraction_diagnostics": diag, "timing": timing}
    run.write_json("results.json", results)
    run.close()
    succ = "" if ev.get("success_rate") is None else f", success {ev['success_rate']:.2f}"
    print(f"normalized score: {ev['normalized_score_mean']:.1f} ± {ev['normalized_score_std']:.1f} "
          f"(return {ev['mean_return']:.1f}{succ}, {args.eval_episodes} episodes)")
    if diag is not None:
        print(f"contraction: mean λ̂ {diag['lambda_hat_mean']:+.3f}, max λ̂ {diag['lambda_hat_max']:+.3f}, "
              f"{100 * diag['frac_points_contractive']:.0f}% of trajectory points and "
              f"{100 * diag['frac_trajectories_contractive']:.0f}% of trajectories contracting "
              f"({diag['n_states']} dataset states, {diag['n_steps']} DDIM steps)")
    print(f"time: data {timing['data_s']} s, train {timing['train_s']} s, eval {timing['eval_s']} s, "
          f"total {timing['total_s']} s; one batch-1 action {timing['act_ms_batch1']:.2f} ms; wrote {out}/results.json")
    return 0
