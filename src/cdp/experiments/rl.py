"""``cdp rl``: offline RL on a D4RL-layout dataset — BC, EDP, Diffusion-QL, IDQL, or CDP (contraction) on EDP /
Diffusion-QL / IDQL — trained by :func:`cdp.training.trainer.fit` and evaluated in MuJoCo (D4RL normalized score).

One run: the dataset (a D4RL-layout hdf5 at ``data.path``, or a PointMaze dataset generated with D4RL's maze2d
recipe and cached in the run folder), checked against the evaluation env before training; ``data.fraction`` of its
trajectories (drawn with ``train.seed``); the agent built from the tree (:func:`agent_config`); the loop with
periodic evaluation; a final evaluation, contraction diagnostics of diffusion actors (λ_max of the normalised
sampling-drift Jacobian along DDIM trajectories from dataset states; < 0 = contracting) and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig, RL_FIELD_KEYS, base_config, flatten, to_plain, used_keys
from ..devices import make_generator, resolve_device
from ..diagnostics import dataset_state_diagnostics, loss_scale_diagnostics
from ..rl import algo_config_class, make_agent
from ..runs import RunDir, load_checkpoint, load_module_state, median_call_ms
from ..training.trainer import check_resume, fit, resumable_identity, run_identity

DEFAULT_ENV = "PointMaze_UMaze-v3"
#: settings that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE = ("out", "train.steps", "train.log_every", "train.ckpt_every", "train.progress", "train.device",
             "train.threads", "train.compile", "eval.", "log.")


def agent_config(cfg: ExperimentConfig):
    """The algorithm's config dataclass (:mod:`cdp.rl`) with the values of the tree (:data:`RL_FIELD_KEYS`)."""
    algo = cfg.algo.name
    cls = algo_config_class(algo)
    flat = flatten(cfg.to_dict())
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "hidden_dims":
            kw["hidden_dims"] = [cfg.policy.network.hidden] * cfg.policy.network.layers
        elif f.name == "contraction":
            kw["contraction"] = ({k: v for k, v in to_plain(cfg.policy.contraction).items() if k != "prediction"}
                                 if algo.startswith("cdp") else None)
        elif f.name in RL_FIELD_KEYS:
            kw[f.name] = flat[RL_FIELD_KEYS[f.name]]
    try:
        return cls(**kw)
    except ValueError as e:
        named = [f"{f} is --{k}" for f, k in RL_FIELD_KEYS.items() if f in str(e)]
        raise ValueError(f"algo.name {algo}: {e}" + (f" ({'; '.join(named)})" if named else "")) from None


def dataset_tensors(ds) -> dict[str, torch.Tensor]:
    """An :class:`~cdp.data.rl.OfflineDataset` as float32 tensors (CPU)."""
    return {"observations": torch.as_tensor(ds.observations, dtype=torch.float32),
            "actions": torch.as_tensor(ds.actions, dtype=torch.float32),
            "rewards": torch.as_tensor(ds.rewards, dtype=torch.float32),
            "next_observations": torch.as_tensor(ds.next_observations, dtype=torch.float32),
            "terminals": torch.as_tensor(np.asarray(ds.terminals), dtype=torch.float32)}


def load_dataset(cfg: ExperimentConfig, out: Path, progress: bool = True):
    """The run's :class:`~cdp.data.rl.OfflineDataset` (fraction applied), checked against its evaluation env.

    Raises:
        FileNotFoundError: ``data.path`` missing. ValueError: no env, no reference scores, observation / action
            dimensions that do not match the env, ``data.fraction`` outside (0, 1].
    """
    from ..data.rl import check_matches_env, load_d4rl_hdf5, subsample_trajectories
    from ..datagen.maze import generate_maze_dataset

    d = cfg.data
    if not (0.0 < d.fraction <= 1.0):
        raise ValueError(f"data.fraction must be in (0, 1], got {d.fraction}")
    if d.path:
        if not Path(d.path).is_file():
            raise FileNotFoundError(f"dataset not found: {d.path} (make one with `cdp data mujoco` or `cdp data maze`)")
        ds = load_d4rl_hdf5(d.path)
        if d.env is not None and ds.env_id is not None and ds.env_id != d.env:
            raise ValueError(f"{d.path} holds {ds.env_id} data (its env_id attribute), not {d.env}: its reference scores "
                             f"and dimensions are {ds.env_id}'s; drop --data.env or pass the matching file")
        if ds.env_id is None:
            if d.env is None:
                raise ValueError(f"{d.path} names no env (no env_id attribute); pass --data.env, e.g. --data.env Hopper-v5")
            ds = load_d4rl_hdf5(d.path, env_id=d.env)
    else:
        env = d.env or DEFAULT_ENV
        path = out / f"dataset_{env}_n{d.size}_noise{d.action_noise:g}_seed{d.seed}.hdf5"
        if path.exists():
            ds = load_d4rl_hdf5(path)
        else:
            out.mkdir(parents=True, exist_ok=True)
            ds = generate_maze_dataset(env, n_steps=d.size, seed=d.seed, action_noise=d.action_noise, path=path,
                                       ref_episodes=0, progress=progress)
        if ds.env_id is None:
            ds.env_id = env
    if ds.ref_min_score is None or ds.ref_max_score is None:
        raise ValueError(f"dataset has no reference scores for the D4RL normalized score (env {ds.env_id}); "
                         f"--data.env must name the env the data was collected in")
    check_env(ds, check_matches_env)
    if d.fraction < 1.0:
        ds = subsample_trajectories(ds, d.fraction, cfg.train.seed)
    return ds


def check_env(ds, check_matches_env) -> None:
    """Dimensions and action bounds of ``ds`` against its env (``ds.env_id``), before any training.

    Raises:
        ValueError: ``dataset (Do, Da) do not match env``, naming both; an env id gymnasium does not know.
    """
    from ..envs.mujoco import is_locomotion

    try:
        if is_locomotion(ds.env_id):
            import gymnasium as gym
            env = gym.make(ds.env_id)
        else:
            from ..envs.maze import make_maze_env
            env = make_maze_env(ds.env_id)
    except ImportError:
        return  # no simulator installed: nothing to evaluate in either
    except Exception as e:  # gymnasium's NameNotFound / KeyError for an unknown id
        raise ValueError(f"cannot make env {ds.env_id!r} for this dataset ({type(e).__name__}: {e}); "
                         f"--data.env must name a registered env") from None
    try:
        check_matches_env(ds, env)
    except ValueError as e:
        raise ValueError(f"dataset does not match env {ds.env_id}: {e}; pass the env it was collected in "
                         f"(--data.env)") from None
    finally:
        env.close()


def evaluate_agent(agent, ds, n_episodes: int = 10, seed: int = 1000, device: torch.device | str = "cpu"
                   ) -> dict[str, Any]:
    """Roll the agent out in the dataset's env → D4RL normalized score (mean / std over episodes) and returns.

    PointMaze datasets: :func:`cdp.envs.maze.evaluate`; Hopper / Walker2d / HalfCheetah:
    :func:`cdp.envs.mujoco.evaluate` (vectorised episodes, the dataset's reference scores). Episode i
    uses env seed ``seed + i`` and its own generator on ``device``, seeded from (``seed``, ``seed + i``)
    (:class:`cdp.envs.seeding.EpisodeGenerators`; the agent acts row by row, candidates and their selection included),
    so an episode's return does not depend on how many episodes are run.
    """
    from ..envs import maze, mujoco
    from ..envs.seeding import EpisodeGenerators

    device = torch.device(device)
    gens = EpisodeGenerators(seed, device)

    def policy_fn(obs: np.ndarray, seeds: list[int]) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return torch.cat([agent.act(x[i:i + 1], generator=gens(s)) for i, s in enumerate(seeds)]).cpu().numpy()

    if mujoco.is_locomotion(ds.env_id):
        return mujoco.evaluate(policy_fn, ds.env_id, n_episodes=n_episodes, seed=seed,
                               ref_min=ds.ref_min_score, ref_max=ds.ref_max_score)
    return maze.evaluate(policy_fn, ds.env_id or DEFAULT_ENV, n_episodes=n_episodes, seed=seed,
                         reward_type=ds.meta.get("reward_type"), ref_min=ds.ref_min_score, ref_max=ds.ref_max_score)


def load_agent(directory: str | Path, device: torch.device | str = "cpu"):
    """Rebuild an agent from a ``cdp rl`` checkpoint folder (weights only) → (agent, meta)."""
    tensors, meta, _ = load_checkpoint(directory, with_state=False)
    agent = make_agent(meta["algo"], meta["obs_dim"], meta["action_dim"], meta["config"])
    for name, m in agent.modules().items():
        p = name + "."
        load_module_state(m, {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}, directory, name)
    place(agent, device, 0)
    return agent, meta


def place(agent, device: torch.device | str, seed: int) -> None:
    """Move every module of ``agent`` to ``device``; off the CPU its generator is re-made there with ``seed``."""
    device = torch.device(device)
    for m in agent.modules().values():
        m.to(device)
    if device.type != "cpu":
        agent.generator = make_generator(seed, device)


def identity_of(cfg: ExperimentConfig, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The resume identity of a ``cdp rl`` run (:func:`~cdp.training.trainer.run_identity`)."""
    return run_identity(flatten(cfg.to_dict()), used_keys("rl", cfg.algo.name), RESUMABLE, data)


def check_ranges(cfg: ExperimentConfig) -> None:
    """Range checks of the eval section of an RL run, before anything is read or written (the train ranges are
    :func:`cdp.config.resolve`'s, ``data.fraction`` :func:`load_dataset`'s).

    Raises:
        ValueError: naming the key.
    """
    for name in ("episodes", "every", "diag_obs"):
        v = getattr(cfg.eval, name)
        if v is not None and v < 0:
            raise ValueError(f"eval.{name} must be >= 0, got {v}")


def run_rl(cfg: ExperimentConfig, log=print) -> dict[str, Any]:
    """Train, evaluate and diagnose one offline-RL run into ``cfg.out``; returns the results dict.

    ``eval.episodes`` 0 skips the evaluations (the scores are then None); ``eval.diag_obs`` sets the dataset states
    of the contraction diagnostics (None: 64; 0: skip).
    """
    check_ranges(cfg)
    out = Path(cfg.out)
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    ds = load_dataset(cfg, out, progress=cfg.train.progress)
    t_data = time.perf_counter() - t0
    acfg = agent_config(cfg)
    data = dataset_tensors(ds)
    identity = resumable_identity(out, identity_of(cfg, data), flatten(base_config("rl", cfg.algo.name).to_dict()))
    check_resume(out, identity)  # before anything is written
    agent = make_agent(cfg.algo.name, ds.obs_dim, ds.act_dim, acfg, seed=cfg.train.seed)
    place(agent, device, cfg.train.seed)
    run = RunDir(out, config=cfg.to_dict(), tensorboard=cfg.log.tensorboard, lock=True,
                 wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, wandb_mode=cfg.log.wandb_mode)
    log(f"cdp rl: {cfg.algo.name} on {ds.env_id}: {len(ds)} transitions in {ds.n_trajectories} trajectories "
        f"(fraction {cfg.data.fraction:g}), {cfg.train.steps} steps on {device}")

    def evaluate(a, step):
        return evaluate_agent(a, ds, cfg.eval.episodes, cfg.eval.seed_start, device)

    if cfg.eval.episodes == 0:
        evaluate = None
    res = fit(agent, data, steps=cfg.train.steps, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
              device=device, precision=cfg.train.precision, log_every=cfg.train.log_every,
              ckpt_every=cfg.train.ckpt_every, eval_every=cfg.eval.every, evaluate=evaluate, run=run,
              identity=identity, progress=cfg.train.progress, desc=cfg.algo.name)
    t2 = time.perf_counter()
    if evaluate is None:
        ev = {"normalized_score_mean": None, "normalized_score_std": None, "mean_return": None}
    elif res["evals"] and res["evals"][-1]["step"] == res["step"]:
        ev = res["evals"][-1]
    else:
        ev = evaluate(agent, res["step"])
        ev = {k: v for k, v in ev.items() if k != "returns"}
        run.log(res["step"], {k: v for k, v in ev.items() if isinstance(v, (int, float))}, prefix="eval/")
    t_eval = time.perf_counter() - t2 + res["eval_s"]
    diag = loss_scale = None
    n_diag = 64 if cfg.eval.diag_obs is None else cfg.eval.diag_obs
    if cfg.algo.name != "bc" and n_diag > 0:
        diag = dataset_state_diagnostics(agent.ema.model, data["observations"], n_states=n_diag, seed=cfg.train.seed)
        run.log(res["step"], diag, prefix="diagnostics/")
        # the size of γ·L_c next to the actor's diffusion loss L_d, λ̂ per noise level (dataset actions)
        loss_scale = loss_scale_diagnostics(agent.ema.model, data["observations"], data["actions"], n_points=64,
                                            seed=cfg.train.seed)
        run.log(res["step"], {k: v for k, v in loss_scale.items() if isinstance(v, float) and math.isfinite(v)},
                prefix="loss_scale/")
    obs1 = data["observations"][:1].to(device)
    g_lat = make_generator(cfg.train.seed, device)
    timing = {"data_s": round(t_data, 1), "train_s": round(res["train_s"], 1), "eval_s": round(t_eval, 1),
              "total_s": round(time.perf_counter() - t0, 1),
              "act_ms_batch1": round(median_call_ms(lambda: agent.act(obs1, generator=g_lat)), 3)}
    results = {"algo": cfg.algo.name, "env": ds.env_id, "fraction": cfg.data.fraction, "seed": cfg.train.seed,
               "steps": res["step"], "device": str(device),
               "normalized_score_mean": ev["normalized_score_mean"], "normalized_score_std": ev["normalized_score_std"],
               "mean_return": ev["mean_return"], "success_rate": ev.get("success_rate"), "episodes": cfg.eval.episodes,
               "n_transitions": len(ds), "n_trajectories": ds.n_trajectories,
               "ref_scores": [ds.ref_min_score, ds.ref_max_score],
               "evals": res["evals"], "contraction_diagnostics": diag,
               "loss_scale": loss_scale, "timing": timing}
    run.summary(res["step"], {k: results[k] for k in ("normalized_score_mean", "normalized_score_std", "mean_return",
                                                     "success_rate") if results[k] is not None})
    run.summary(res["step"], {k: v for k, v in (diag or {}).items() if isinstance(v, float)}, prefix="diagnostics/")
    run.write_json("results.json", results)
    run.close()
    succ = "" if ev.get("success_rate") is None else f", success {ev['success_rate']:.2f}"
    if evaluate is None:
        log("evaluation skipped (eval.episodes 0)")
    else:
        log(f"normalized score: {ev['normalized_score_mean']:.1f} ± {ev['normalized_score_std']:.1f} "
            f"(return {ev['mean_return']:.1f}{succ}, {cfg.eval.episodes} episodes)")
    if diag is not None:
        log(f"contraction: mean λ̂ {diag['lambda_hat_mean']:+.3f}, max λ̂ {diag['lambda_hat_max']:+.3f}, "
            f"{100 * diag['frac_points_contractive']:.0f}% of trajectory points and "
            f"{100 * diag['frac_trajectories_contractive']:.0f}% of trajectories contracting "
            f"({diag['n_states']} dataset states, {diag['n_steps']} DDIM steps)")
    log(f"time: data {timing['data_s']} s, train {timing['train_s']} s, eval {timing['eval_s']} s, "
        f"total {timing['total_s']} s; one batch-1 action {timing['act_ms_batch1']:.2f} ms; wrote {out}/results.json")
    return results
