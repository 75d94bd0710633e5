"""``cdp train`` / ``cdp eval``: imitation learning on PushT and robosuite Lift / Can — DP-UNet vs CDP-UNet, DP-DiT vs
CDP-DiT, DBC vs CDP-DBC, BC-GMM.

Tasks (``data.task``): ``pusht`` (Diffusion Policy's replay buffer, evaluated with gym-pusht), ``lift`` / ``can``
(robomimic-layout hdf5, e.g. from ``cdp data lift``, with robomimic's low-dim keys
:data:`cdp.envs.robosuite_tasks.OBS_KEYS`, success rate in robosuite, :func:`cdp.envs.robosuite_tasks.evaluate`) and
``lerobot`` (any LeRobotDataset folder, :func:`cdp.data.lerobot.load_lerobot_dataset`: ``observation.state`` →
``action``, dims from the data, no evaluation environment, so only training and the contraction diagnostics run).
A ``data.path`` that is a LeRobotDataset folder (``meta/info.json``) is read with the LeRobot reader for every task;
for ``pusht`` / ``lift`` / ``can`` its dims must be the task's.

One run: load demonstrations (:func:`load_demos`), window them (:class:`cdp.data.il.SequenceWindows`), train the
preset policy (``algo.name``, :data:`cdp.config.IL_PRESETS`) with :class:`cdp.training.agents.DiffusionBC` in
:func:`cdp.training.trainer.fit`, evaluate the EMA policy closed loop, compute contraction diagnostics on a few
dataset observations and write ``results.json``.

Chunked presets (H > 1) are trained on ``SequenceWindows(align="dp")`` (the chunk starts at the oldest observed
step), so evaluation executes ``chunk[To-1 : To-1+Ta]`` (``action_offset = To-1``); H = 1 presets use
``align="current"`` (the action at the current step) and ``action_offset = 0``, see :func:`action_offset_for`.

Network sizes are reduced for CPU (DP uses UNet ``down_dims=(256, 512, 1024)``, ~65 M parameters): the default here
is ``down_dims=(64, 128, 256)``, time embedding 64, kernel 5 (~4 M parameters); DiT d_model 128, 4 layers, 4 heads;
MLP 3×256. Schedule as DP: cosine ("squaredcos_cap_v2") with T = 100, ε-prediction, DDPM training; evaluation
uses DDIM with 10 steps by default (``policy.sampler`` / ``policy.num_inference_steps``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..config import IL_PRESETS, ExperimentConfig, base_config, flatten, to_plain, used_keys
from ..data.il import (SequenceWindows, default_pusht_zarr_path, load_pusht_lowdim, load_robomimic_hdf5,
                       subsample_episodes)
from ..data.lerobot import is_lerobot_dataset, load_lerobot_dataset
from ..devices import make_generator, resolve_device
from ..diagnostics import flow_diagnostics, loss_scale_diagnostics
from ..policies.bc_gmm import BCGMMConfig, BCGMMPolicy
from ..policy import DiffusionPolicy, DiffusionPolicyConfig
from ..runs import RunDir, load_policy, median_call_ms
from ..training.agents import DiffusionBC
from ..training.trainer import (best_checkpoint_dir, check_resume, checkpoint_dir, fit, resumable_identity,
                                run_identity)

PRESETS = IL_PRESETS
#: tasks with an evaluation environment
ENV_TASKS = ("pusht", "lift", "can")
#: every ``data.task``: ``lerobot`` trains on a LeRobotDataset folder and has no evaluation environment
TASKS = ENV_TASKS + ("lerobot",)
#: task → (action dim, default evaluation length in env steps): PushT 300 (DP's max_steps), robomimic's horizon 400
TASK_SPECS: dict[str, tuple[int, int]] = {"pusht": (2, 300), "lift": (7, 400), "can": (7, 400)}
#: task → observation dim of its low-dim observations (PushT keypoints + agent, robomimic's low-dim keys)
TASK_OBS_DIMS: dict[str, int] = {"pusht": 20, "lift": 19, "can": 23}
#: task → robosuite env name expected in a robomimic file's ``env_args``
ROBOSUITE_ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan"}


#: settings that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE = ("out", "train.steps", "train.log_every", "train.ckpt_every", "train.progress", "train.device",
             "train.threads", "train.compile", "eval.", "log.", "policy.sampler", "policy.num_inference_steps")


def contractive(cfg: ExperimentConfig) -> bool:
    return PRESETS[cfg.algo.name][4]


def max_steps_of(cfg: ExperimentConfig) -> int:
    """Env steps per evaluation episode: ``eval.max_steps`` or the task's (PushT 300, Lift / Can 400; 1 for
    ``lerobot``, which is never evaluated)."""
    return cfg.eval.max_steps if cfg.eval.max_steps is not None else TASK_SPECS.get(cfg.data.task, (0, 1))[1]


def diag_sizes(cfg: ExperimentConfig, action_dim: int | None = None) -> tuple[int, int]:
    """(observations, samples per observation) of the contraction diagnostics: ``eval.diag_obs`` /
    ``eval.diag_samples``, or 2 × 4 when d = H·Da ≤ 8, else 1 × 1. They use exact d×d Jacobians at every one of the
    T DDIM steps, twice (λ and the divergence bound): ~100 s per observation·sample for the default UNet (d = 32,
    T = 100) on one CPU thread, ~10 s for 2 × 4 with the DBC MLP (d = 2). ``action_dim``: Da (default: the task's)."""
    da = action_dim if action_dim is not None else TASK_SPECS[cfg.data.task][0]
    small = cfg.policy.horizon * da <= 8
    return (cfg.eval.diag_obs if cfg.eval.diag_obs is not None else (2 if small else 1),
            cfg.eval.diag_samples if cfg.eval.diag_samples is not None else (4 if small else 1))


def validate(cfg: ExperimentConfig) -> None:
    """Range checks of an IL run that the sub-configs do not make. Raises ValueError naming the key."""
    if cfg.data.task not in TASKS:
        raise ValueError(f"unknown data.task {cfg.data.task!r}; expected one of {TASKS}")
    if cfg.algo.name not in PRESETS:
        raise ValueError(f"unknown algo.name {cfg.algo.name!r} for cdp train; expected one of {sorted(PRESETS)}")
    if not (0.0 < cfg.data.fraction <= 1.0):
        raise ValueError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    if cfg.data.max_episodes is not None and cfg.data.max_episodes < 1:
        raise ValueError(f"data.max_episodes must be >= 1, got {cfg.data.max_episodes}")
    for name in ("episodes", "diag_obs", "diag_samples"):
        v = getattr(cfg.eval, name)
        if v is not None and v < 0:
            raise ValueError(f"eval.{name} must be >= 0, got {v}")
    if max_steps_of(cfg) < 1:
        raise ValueError("eval.max_steps must be >= 1")
    n = cfg.policy.num_inference_steps
    if n is not None and not (1 <= n <= cfg.policy.schedule.num_steps):
        raise ValueError(f"policy.num_inference_steps ({n}) must be in 1..policy.schedule.num_steps "
                         f"({cfg.policy.schedule.num_steps})")
    if cfg.data.task == "lerobot" and cfg.eval.every:
        raise ValueError("eval.every needs an evaluation environment; task 'lerobot' has none (set --eval.every 0)")
    policy_config(cfg, obs_dim=20, action_dim=TASK_SPECS.get(cfg.data.task, (2, 0))[0])


def policy_config(cfg: ExperimentConfig, obs_dim: int, action_dim: int) -> "DiffusionPolicyConfig | BCGMMConfig":
    """The policy config of an IL run for observations of dim ``obs_dim`` (PushT: 20):
    :class:`DiffusionPolicyConfig`, or :class:`~cdp.policies.bc_gmm.BCGMMConfig` for ``bc_gmm``."""
    net = PRESETS[cfg.algo.name][0]
    p, n = cfg.policy, cfg.policy.network
    H, To, Ta = p.horizon, p.n_obs_steps, p.n_action_steps
    if net == "gmm":
        return BCGMMConfig(obs_dim=obs_dim, action_dim=action_dim, n_obs_steps=To, horizon=H, n_action_steps=Ta,
                           hidden_dims=(n.gmm_hidden,) * n.gmm_layers, num_modes=n.gmm_modes,
                           ema_decay=p.ema_decay, ema_power=p.ema_power)
    if net == "unet":
        kw: dict[str, Any] = {"down_dims": list(n.unet_down_dims), "time_embed_dim": n.unet_time_embed_dim,
                              "kernel_size": n.unet_kernel_size}
    elif net == "dit":
        kw = {"d_model": n.dit_d_model, "n_layers": n.dit_layers, "n_heads": n.dit_heads,
              "time_embed_dim": n.dit_d_model, "max_horizon": H}
    else:
        kw = {"hidden": n.hidden, "n_layers": n.layers}
    contraction = None
    if contractive(cfg):
        contraction = {k: v for k, v in to_plain(p.contraction).items() if k != "prediction"}
    return DiffusionPolicyConfig(
        obs_dim=obs_dim, action_dim=action_dim, horizon=H, n_obs_steps=To, n_action_steps=Ta, network=net,
        network_kwargs=kw, schedule={"name": p.schedule.name, "num_steps": p.schedule.num_steps},
        prediction=p.prediction, sampler=p.sampler, num_inference_steps=p.num_inference_steps,
        clip_sample=1.0, obs_normalizer="minmax", action_normalizer="minmax", ema_decay=p.ema_decay,
        ema_power=p.ema_power, contraction=contraction, compile=cfg.train.compile)


def action_offset_for(config: DiffusionPolicyConfig) -> int:
    """Index of the first executed action in a sampled chunk: To-1 for chunks trained with ``align="dp"``
    (H > 1), 0 for single actions (H = 1, ``align="current"``)."""
    return config.n_obs_steps - 1 if config.horizon > 1 else 0


def make_windows(ds, config: DiffusionPolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All training windows as tensors: obs (M, To, Do) and actions (M, H, Da), or (M, Da) when H = 1.

    Chunked policies use Diffusion Policy's windows (``align="dp"``, ``pad_after = Ta-1``); H = 1 uses
    ``align="current"`` (the action at the current step of a To-step history).
    """
    H, To = config.horizon, config.n_obs_steps
    if H > 1:
        w = SequenceWindows(ds, n_obs_steps=To, horizon=H, n_action_steps=config.n_action_steps, align="dp")
    else:
        w = SequenceWindows(ds, n_obs_steps=To, horizon=1, align="current")
    if len(w) == 0:
        raise ValueError(f"no training windows: every episode is shorter than the window of {w.seq_len} steps")
    idx = torch.from_numpy(w.indices)
    obs = w._obs[idx[:, :To]]
    act = w._act[idx[:, w.action_offset: w.action_offset + H]]
    if H == 1:
        act = act[:, 0]
    return obs.contiguous(), act.contiguous()


def resolve_zarr(path: str | os.PathLike | None) -> str:
    """The replay-buffer path to use; raises one clear FileNotFoundError naming the path and the env var."""
    p = os.fspath(path) if path is not None else default_pusht_zarr_path()
    if not os.path.exists(p):
        raise FileNotFoundError(f"PushT zarr not found: {p} (pass --data.path PATH or set CDP_PUSHT_ZARR)")
    return p


def resolve_hdf5(path: str | os.PathLike | None, task: str = "lift") -> str:
    """The robomimic hdf5 to use for a robosuite task; one clear FileNotFoundError when missing."""
    if path is None:
        raise FileNotFoundError(f"task {task!r} needs demonstrations: pass --data.path FILE "
                                f"(make one with: cdp data {task} --n-demos 200 --out FILE)")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{task} demonstrations not found: {p} (make them with: cdp data {task} --out {p})")
    return p


def resolve_lerobot(path: str | os.PathLike | None) -> str:
    """The LeRobotDataset folder of task ``lerobot``; one clear FileNotFoundError when none is given or it is missing."""
    if path is None:
        raise FileNotFoundError("task 'lerobot' needs a LeRobotDataset folder: pass --data.path DIR (the folder "
                                "holding meta/info.json and data/)")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"LeRobot dataset not found: {p}")
    return p


def resolve_data(cfg: ExperimentConfig) -> str:
    """The demonstration path of ``cfg``: the PushT zarr (:func:`resolve_zarr`), the hdf5 (:func:`resolve_hdf5`) or
    the LeRobotDataset folder (:func:`resolve_lerobot`)."""
    if cfg.data.task == "lerobot":
        return resolve_lerobot(cfg.data.path)
    return resolve_zarr(cfg.data.path) if cfg.data.task == "pusht" else resolve_hdf5(cfg.data.path, cfg.data.task)


def load_lerobot_demos(path: str | os.PathLike, task: str = "lerobot"):
    """Demos from a LeRobotDataset folder (``observation.state`` → ``action``, :func:`~cdp.data.lerobot.load_lerobot_dataset`);
    for an environment task its dims must be the task's (:data:`TASK_OBS_DIMS`, :data:`TASK_SPECS`).

    Raises:
        FileNotFoundError / ValueError: from the reader; ValueError: dims that do not fit ``task``.
    """
    ds = load_lerobot_dataset(path)
    if task in ENV_TASKS:
        want = (TASK_OBS_DIMS[task], TASK_SPECS[task][0])
        if (ds.obs_dim, ds.action_dim) != want:
            raise ValueError(f"{path}: LeRobot dataset with observation.state {ds.obs_dim}-D and action "
                             f"{ds.action_dim}-D, but --data.task {task} needs {want[0]}-D and {want[1]}-D; use "
                             "--data.task lerobot to train on it without an evaluation environment")
    return ds


def load_robosuite_demos(path: str | os.PathLike, task: str = "lift"):
    """Lift / Can demos from a robomimic hdf5 with the low-dim keys ``object, robot0_eef_pos, robot0_eef_quat,
    robot0_gripper_qpos`` (19-D for Lift, 23-D for Can) and 7-D actions.

    Raises:
        FileNotFoundError: missing file. ValueError: not a robomimic file / missing keys (from
            :func:`~cdp.data.il.load_robomimic_hdf5`), ``env_args`` naming another environment, actions not 7-D.
    """
    from ..envs.robosuite_tasks import OBS_KEYS

    ds = load_robomimic_hdf5(path, OBS_KEYS)
    env_name = (ds.meta.get("env_args") or {}).get("env_name")
    if env_name is not None and env_name != ROBOSUITE_ENV_NAMES[task]:
        raise ValueError(f"{path} holds {env_name!r} demos, but task {task!r} needs {ROBOSUITE_ENV_NAMES[task]!r}")
    if ds.action_dim != 7:
        raise ValueError(f"{path}: actions are {ds.action_dim}-D; robosuite OSC_POSE actions are 7-D")
    return ds


def load_demos(cfg: ExperimentConfig, path: str | os.PathLike | None = None):
    """The training demos of ``cfg``: first the pool of at most ``data.max_episodes`` episodes (DP: 90, random with
    ``train.seed``), then ``data.fraction`` of that pool (``max(1, round(fraction · pool))``, again with
    ``train.seed``), so fractions are nested for a fixed seed. PushT reads the zarr, Lift / Can the robomimic hdf5,
    a LeRobotDataset folder (task ``lerobot``, or any task's ``path`` holding ``meta/info.json``) the LeRobot reader
    (``path`` or ``data.path``)."""
    d, seed = cfg.data, cfg.train.seed
    src = path if path is not None else d.path
    if d.task == "lerobot" or is_lerobot_dataset(src):
        ds = load_lerobot_demos(resolve_lerobot(src), d.task)
        ds = subsample_episodes(ds, max_episodes=d.max_episodes, seed=seed)
    elif d.task == "pusht":
        ds = load_pusht_lowdim(resolve_zarr(src), max_episodes=d.max_episodes, seed=seed)
    else:
        ds = load_robosuite_demos(resolve_hdf5(src, d.task), d.task)
        ds = subsample_episodes(ds, max_episodes=d.max_episodes, seed=seed)
    if d.fraction < 1.0:
        ds = subsample_episodes(ds, fraction=d.fraction, seed=seed)
    return ds


def policy_fn_for(policy: DiffusionPolicy, seed: int, sampler: str | None = None,
                  num_inference_steps: int | None = None):
    """An evaluator callback: obs (B, To, Do) numpy (+ ``seeds``, the env seed of each row) → actions (B, H, Da)
    numpy, on the policy's device.

    With ``seeds`` (as :func:`cdp.envs.pusht.evaluate` and :func:`cdp.envs.robosuite_tasks.evaluate` pass them),
    row i's noise comes from a generator seeded from (``seed``, ``seeds[i]``) (:class:`cdp.envs.seeding.EpisodeGenerators`),
    so an episode's actions do not depend on the other episodes of the batch: the deterministic samplers (DDIM,
    DPM-Solver++) run the batch from per-row initial noise, DDPM and BC-GMM sample row by row. Without ``seeds``
    the batch is drawn from one generator seeded with ``seed``.
    """
    from ..envs.seeding import EpisodeGenerators

    dev = next(policy.parameters()).device
    gen = make_generator(seed, dev)
    gens = EpisodeGenerators(seed, dev)
    kw = {"sampler": sampler, "num_inference_steps": num_inference_steps}
    deterministic = isinstance(policy, DiffusionPolicy) and (sampler or policy.config.sampler) in ("ddim", "dpmsolver++")

    def fn(obs: np.ndarray, seeds: list[int] | None = None) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32, device=dev)
        with torch.inference_mode():
            if seeds is None:
                a = policy.sample(x, generator=gen, **kw)
            elif len(seeds) != x.shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for {x.shape[0]} observations")
            elif deterministic:
                noise = torch.stack([torch.randn(policy.action_shape, generator=g, device=g.device)
                                     for g in map(gens, seeds)]).to(dev)
                a = policy.sample(x, noise=noise, **kw)
            else:
                a = torch.cat([policy.sample(x[i:i + 1], generator=gens(s), **kw) for i, s in enumerate(seeds)])
        if a.dim() == 2:  # single action (B, Da) → chunk of one
            a = a.unsqueeze(1)
        return a.cpu().numpy()

    return fn


def evaluate_policy(policy: DiffusionPolicy, episodes: int, max_steps: int | None = 300, seed_start: int = 100000,
                    seed: int = 0, sampler: str | None = None, num_inference_steps: int | None = None,
                    task: str = "pusht", video_dir: str | os.PathLike | None = None,
                    video_episodes: int = 0) -> dict:
    """Closed-loop evaluation of ``policy`` (use the EMA model) on seeds ``seed_start, seed_start+1, ...``.

    PushT: :func:`cdp.envs.pusht.evaluate`'s dict (with ``video_episodes`` > 0: GIFs of the first episodes in ``video_dir``); Lift / Can: :func:`cdp.envs.robosuite_tasks.evaluate`'s dict
    (``success_rate`` = fraction of episodes where the env's ``_check_success()`` fired within ``max_steps``).
    Both plus ``seconds``. ``max_steps=None``: the task default (300 / 400). Raises ImportError without gym-pusht /
    robosuite, ValueError for an unknown task or one without an evaluation environment (``lerobot``).
    """
    if task == "lerobot":
        raise ValueError(f"task 'lerobot' has no evaluation environment; pass --data.task {'|'.join(ENV_TASKS)} "
                         "to evaluate a policy whose dims fit one")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if video_episodes and task != "pusht":
        raise ValueError(f"rollout videos are implemented for pusht only (robosuite needs an offscreen OpenGL "
                         f"renderer), not {task!r}")
    c = policy.config
    max_steps = TASK_SPECS[task][1] if max_steps is None else max_steps
    t0 = time.time()
    if task != "pusht":
        from ..envs import robosuite_tasks

        res = robosuite_tasks.evaluate(policy_fn_for(policy, seed, sampler, num_inference_steps), task=task,
                                       n_episodes=episodes, seed_start=seed_start, max_steps=max_steps,
                                       n_obs_steps=c.n_obs_steps, n_action_steps=c.n_action_steps,
                                       action_offset=action_offset_for(c))
        res["seconds"] = time.time() - t0
        return res
    from ..envs import pusht

    res = pusht.evaluate(policy_fn_for(policy, seed, sampler, num_inference_steps), n_episodes=episodes,
                         seed_start=seed_start, max_steps=max_steps, n_obs_steps=c.n_obs_steps,
                         n_action_steps=c.n_action_steps, action_offset=action_offset_for(c),
                         video_dir=video_dir, video_episodes=video_episodes)
    res["seconds"] = time.time() - t0
    return res


def main_metric_of(task: str) -> str:
    """The key of the main metric in a ``task``'s evaluation dict: PushT ``mean_max_coverage``, Lift / Can
    ``success_rate`` (higher is better; the one ``eval.every`` selects ``checkpoints/best`` by)."""
    return "mean_max_coverage" if task == "pusht" else "success_rate"


def summary_line(res: dict) -> str:
    """One printable line: PushT: mean max-coverage, success rate (coverage > 0.95), DP score; Lift / Can:
    success rate over the episodes."""
    if "mean_max_coverage" not in res:
        n = len(res["successes"])
        return f"success rate {res['success_rate']:.3f} ({int(sum(res['successes']))}/{n} episodes)"
    return (f"mean max-coverage {res['mean_max_coverage']:.3f}, success rate {res['success_rate']:.3f}, "
            f"DP score {res['mean_max_reward']:.3f} ({len(res['max_coverage'])} episodes)")


def identity_of(cfg: ExperimentConfig, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The resume identity of a ``cdp train`` run (:func:`~cdp.training.trainer.run_identity`)."""
    return run_identity(flatten(cfg.to_dict()), used_keys("il", cfg.algo.name), RESUMABLE, data)


def run_il(cfg: ExperimentConfig, log=print) -> dict:
    """Train, evaluate and diagnose one IL run into ``cfg.out``; returns (and writes to ``results.json``) the results.

    Re-running on the same folder resumes from ``checkpoints/last`` (``train.steps`` may grow; settings of
    :data:`RESUMABLE` may change; anything else, or other demonstrations, is refused before anything is written).

    Returns:
        dict with ``config``, ``policy_config``, ``data`` (episodes, steps, windows), ``n_params``,
        ``train`` (seconds, sec_per_1k_steps, final losses), ``eval`` (the task's evaluation dict, or
        ``{"skipped": reason}``) and ``diagnostics`` (or ``{"skipped": reason}``). With ``eval.every`` N > 0 (and
        ``eval.episodes`` > 0) the EMA policy is also evaluated every N steps (the same episodes as the final
        evaluation) and the checkpoint with the best main metric so far (:func:`main_metric_of`) is kept in
        ``checkpoints/best``; then also ``evals`` (the curve: step and the numbers of each evaluation) and
        ``eval_best`` (``step``, ``metric``, ``value``, ``checkpoint`` and that evaluation's numbers). ``eval``
        stays the evaluation of the final checkpoint (``checkpoints/last``).
    Raises:
        FileNotFoundError: missing replay buffer / hdf5. ValueError: bad config / resume mismatch / wrong file.
    """
    validate(cfg)
    out = Path(cfg.out)
    device = resolve_device(cfg.train.device)
    path = resolve_data(cfg)
    ds = load_demos(cfg, path)
    torch.manual_seed(cfg.train.seed)
    pc = policy_config(cfg, ds.obs_dim, ds.action_dim)
    pol = BCGMMPolicy(pc) if isinstance(pc, BCGMMConfig) else DiffusionPolicy(pc)
    obs, act = make_windows(ds, pol.config)
    data = {"observations": obs, "actions": act}
    defaults = flatten(base_config("il", cfg.algo.name).to_dict())
    identity = resumable_identity(out, identity_of(cfg, data), defaults)
    done_before = check_resume(out, identity)  # before anything is written
    pol.to(device)
    gen = make_generator(cfg.train.seed, device)
    t = cfg.train
    agent = DiffusionBC(pol, steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                        lr_schedule=t.lr_schedule, lr_warmup_steps=t.lr_warmup_steps, generator=gen)
    run = RunDir(out, config=cfg.to_dict(), tensorboard=cfg.log.tensorboard, lock=True,
                 wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, wandb_mode=cfg.log.wandb_mode)
    n_params = sum(p.numel() for p in pol.net.parameters())
    e = cfg.eval
    periodic: dict[int, dict] = {}  # step → full evaluation dict of this call's periodic evaluations

    def evaluate(agent_, step: int) -> dict:
        try:
            ev_ = evaluate_policy(agent_.eval_policy, e.episodes, max_steps_of(cfg), e.seed_start, t.seed,
                                  task=cfg.data.task)
        except ImportError as err:
            log(f"periodic evaluation skipped: {err}")
            return {}
        periodic[step] = ev_
        log(f"step {step}: {summary_line(ev_)}")
        return ev_

    has_env = cfg.data.task in ENV_TASKS
    every = e.every if e.episodes > 0 and has_env else 0
    res = fit(agent, data, steps=t.steps, batch_size=t.batch_size, seed=t.seed, device=device,
              precision=t.precision, log_every=t.log_every, ckpt_every=t.ckpt_every, run=run, identity=identity,
              generator=gen, progress=t.progress, desc=cfg.algo.name, eval_every=every,
              evaluate=evaluate if every else None, keep_best=main_metric_of(cfg.data.task) if every else None)
    train_s = res["train_s"]
    last = [r for r in run.read_metrics() if "train/loss" in r]
    new_steps = max(t.steps - done_before, 0)
    results: dict[str, Any] = {
        "config": cfg.to_dict(), "policy_config": pol.config.to_dict(), "data_path": path, "device": str(device),
        "data": {"episodes": ds.n_episodes, "steps": ds.n_steps, "windows": int(obs.shape[0]),
                 "episode_ids": None if ds.meta.get("episode_ids") is None else np.asarray(ds.meta["episode_ids"]).tolist()},
        "n_params": int(n_params),
        "train": {"seconds": train_s, "steps_run": new_steps,
                  "sec_per_1k_steps": 1000 * train_s / new_steps if new_steps else None,
                  "final_loss": last[-1]["train/loss"] if last else None,
                  "final_loss_d": last[-1].get("train/loss_d") if last else None},
        "checkpoint": str(checkpoint_dir(out)),
    }
    policy = agent.eval_policy
    g_lat = make_generator(t.seed, device)
    obs1 = obs[:1].to(device)
    results["timing"] = {"act_ms_batch1": median_call_ms(lambda: policy.sample(obs1, generator=g_lat))}
    if not has_env:
        results["eval"] = {"skipped": f"task {cfg.data.task} has no evaluation environment"}
    elif e.episodes > 0 and res["step"] in periodic:  # the periodic evaluation of the final step is the final one
        results["eval"] = periodic[res["step"]]
    elif e.episodes > 0:
        try:
            ev = evaluate_policy(policy, e.episodes, max_steps_of(cfg), e.seed_start, t.seed, task=cfg.data.task)
            results["eval"] = ev
            keys = ("mean_max_coverage", "success_rate", "mean_max_reward") if cfg.data.task == "pusht" else ("success_rate",)
            run.log(res["step"], {k: ev[k] for k in keys}, prefix="eval/")
        except ImportError as err:
            results["eval"] = {"skipped": str(err)}
    else:
        results["eval"] = {"skipped": "eval.episodes = 0"}
    if res["evals"]:
        results["evals"] = res["evals"]
    if res["best"] is not None:
        b = res["best"]
        rec = next((r for r in res["evals"] if r["step"] == b["step"]), {})
        results["eval_best"] = {**rec, **b, "checkpoint": str(best_checkpoint_dir(out))}
    n_obs, n_samples = diag_sizes(cfg, ds.action_dim)
    if not isinstance(policy, DiffusionPolicy):
        results["diagnostics"] = {"skipped": f"{cfg.algo.name} is not a diffusion policy (no sampling flow)"}
    elif n_obs > 0 and n_samples > 0:
        g = torch.Generator().manual_seed(t.seed + 7)
        pick = torch.randperm(obs.shape[0], generator=g)[:n_obs]
        diag = flow_diagnostics(policy, obs[pick].to(device), n_samples, seed=t.seed)
        results["diagnostics"] = diag
        run.log(res["step"], {k: v for k, v in diag.items() if isinstance(v, float) and math.isfinite(v)},
                prefix="diag/")
    else:
        results["diagnostics"] = {"skipped": "eval.diag_obs or eval.diag_samples = 0"}
    if isinstance(policy, DiffusionPolicy) and n_obs > 0:  # the size of γ·L_c next to L_d, λ̂ per noise level
        results["loss_scale"] = loss_scale_diagnostics(policy, obs, act, n_points=64, seed=t.seed)
        run.log(res["step"], {k: v for k, v in results["loss_scale"].items()
                              if isinstance(v, float) and math.isfinite(v)}, prefix="loss_scale/")
    ev = results.get("eval", {})
    run.summary(res["step"], {k: v for k, v in ev.items() if isinstance(v, float)}, prefix="eval/")
    run.summary(res["step"], {"final_loss": results["train"]["final_loss"] or float("nan")}, prefix="train/")
    diag = results["diagnostics"]
    run.summary(res["step"], {k: v for k, v in diag.items() if isinstance(v, float)}, prefix="diag/")
    run.write_json("results.json", results)
    run.close()
    tr = results["train"]
    spk = f"{tr['sec_per_1k_steps']:.0f} s/1k steps" if tr["sec_per_1k_steps"] else "no new steps"
    log(f"{cfg.algo.name}: {ds.n_episodes} episodes, {int(obs.shape[0])} windows, {n_params / 1e6:.2f} M params; "
        f"trained {tr['steps_run']} steps on {device} in {tr['seconds']:.1f} s ({spk}), final loss {tr['final_loss']}")
    ev = results["eval"]
    log("eval: " + (f"skipped ({ev['skipped']})" if "skipped" in ev else summary_line(ev)))
    if "eval_best" in results:
        b = results["eval_best"]
        log(f"best checkpoint: step {b['step']}, {b['metric']} {b['value']:.3f} ({b['checkpoint']})")
    dg = results["diagnostics"]
    if "skipped" not in dg:
        log(f"contraction: mean lambda_hat {dg['lambda_hat_mean']:.3f} (t<=0.1: {dg['lambda_hat_mean_low_noise']:.3f}), "
            f"frac contractive {dg['frac_contractive']:.2f}, divergence ratio {dg['div_ratio_median']:.3g} "
            f"(bound {dg['div_bound_median']:.3g})")
    ls = results.get("loss_scale")
    if ls and ls.get("loss_c_weighted"):
        log(f"loss scale: L_d {ls['loss_d']:.4f}, gamma*L_c {ls['loss_c_weighted']:.4f} (ratio {ls['loss_ratio']:.3f}), "
            f"hinge active at {ls['hinge_active_frac']:.2f} of the regularised points")
    log(f"wrote {out / 'results.json'}")
    return results


def task_of_checkpoint(checkpoint: str | os.PathLike) -> str:
    """The IL task recorded in the run folder of ``<run>/checkpoints/<name>`` (``config.yaml``, ``il.task``);
    ``"pusht"`` when there is no such file (older runs, bare checkpoints)."""
    p = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if p.exists():
        task = ((yaml.safe_load(p.read_text()) or {}).get("data") or {}).get("task")
        if task in TASKS:
            return task
    return "pusht"


def check_policy_fits_task(config, task: str, checkpoint: str | os.PathLike, trained: str | None = None) -> None:
    """A policy's observation / action dims against ``task``'s (:data:`TASK_OBS_DIMS`, :data:`TASK_SPECS`).

    Raises:
        ValueError: one line naming the checkpoint, both shapes and the fix.
    """
    if task == "lerobot":
        raise ValueError(f"checkpoint {checkpoint} is evaluated in task 'lerobot', which has no evaluation environment; "
                         f"pass --data.task {'|'.join(ENV_TASKS)} if the policy's dims fit one")
    if task not in TASKS:
        raise ValueError(f"unknown data.task {task!r}; expected one of {TASKS}")
    want = (TASK_OBS_DIMS[task], TASK_SPECS[task][0])
    have = (int(config.obs_dim), int(config.action_dim))
    if have != want:
        of = next((t for t in ENV_TASKS if (TASK_OBS_DIMS[t], TASK_SPECS[t][0]) == have), trained)
        raise ValueError(f"checkpoint {checkpoint} is a{'' if of is None else ' ' + of} policy (obs {have[0]}-D, actions "
                         f"{have[1]}-D) but --data.task {task} needs obs {want[0]}-D, actions {want[1]}-D; drop "
                         f"--data.task to evaluate it in its own task, or pass a {task} checkpoint")


def eval_checkpoint(checkpoint: str | os.PathLike, episodes: int = 50, max_steps: int | None = None,
                    seed_start: int = 100000, seed: int = 0, sampler: str | None = None,
                    num_inference_steps: int | None = None, task: str | None = None,
                    video_dir: str | os.PathLike | None = None, video_episodes: int = 0,
                    device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint folder (EMA weights) and evaluate it closed loop (``cdp eval``).

    ``video_dir`` / ``video_episodes``: GIFs of the first episodes (PushT only, see :func:`evaluate_policy`).
    ``task=None``: the task of the run the checkpoint belongs to (:func:`task_of_checkpoint`, PushT if unknown);
    ``max_steps=None``: the task's default (PushT 300, Lift / Can 400). Sampler settings default to the ones stored
    in the checkpoint's policy config. Raises FileNotFoundError for a missing / non-checkpoint folder, ImportError
    without gym-pusht / robosuite.
    """
    policy = load_policy(checkpoint, use_ema=True).to(torch.device(device))
    trained = task_of_checkpoint(checkpoint)
    task = trained if task is None else task
    check_policy_fits_task(policy.config, task, checkpoint, trained)
    res = evaluate_policy(policy, episodes, max_steps, seed_start, seed, sampler, num_inference_steps, task=task,
                          video_dir=video_dir, video_episodes=video_episodes)
    res["checkpoint"] = str(checkpoint)
    res["task"] = task
    return res
