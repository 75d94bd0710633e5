"""Imitation-learning jobs on PushT and robosuite Lift / Can: DP-UNet vs CDP-UNet, DBC vs CDP-DBC (and DiT variants).

Tasks: ``pusht`` (Diffusion Policy's replay buffer, evaluated with gym-pusht) and ``lift`` / ``can`` (robomimic-layout
hdf5, e.g. from ``cdp data lift``, with robomimic's low-dim keys :data:`cdp.envs.robosuite_tasks.OBS_KEYS`,
evaluated as success rate in robosuite, see :func:`cdp.envs.robosuite_tasks.evaluate_robosuite`).

One PushT job = load demonstrations (:func:`cdp.data.il.load_pusht_lowdim`, Diffusion Policy's 20-D low-dim layout),
window them (:class:`cdp.data.il.SequenceWindows`), fit the policy's normalisers, train with
:func:`cdp.train.train_policy` into a :class:`cdp.runs.RunDir`, evaluate the EMA policy closed loop with
:func:`cdp.envs.pusht.evaluate_pusht`, compute contraction diagnostics on a few dataset observations and write
``results.json``.

Presets (``ILConfig.policy``)
-----------------------------
============  =======  ===  ==  ==  ==========================================================
preset        network  H    To  Ta  source
============  =======  ===  ==  ==  ==========================================================
dp_unet       unet     16   2   8   Diffusion Policy (Chi et al., RSS 2023), low-dim PushT
cdp_unet      unet     16   2   8   same + contraction regulariser
dp_dit        dit      16   2   8   DiT denoiser (transformer variant)
cdp_dit       dit      16   2   8   same + contraction regulariser
dbc           mlp      1    2   1   Diffusion BC (Pearce et al., ICLR 2023): one action from two observations
cdp_dbc       mlp      1    2   1   same + contraction regulariser
bc_gmm        gmm      1    2   1   BC-GMM baseline (robomimic): 5-mode Gaussian mixture, MLP 2×1024, NLL
============  =======  ===  ==  ==  ==========================================================

Chunked presets (H > 1) are trained on ``SequenceWindows(align="dp")`` (the chunk starts at the oldest observed
step), so evaluation executes ``chunk[To-1 : To-1+Ta]`` (``action_offset = To-1``); H = 1 presets use
``align="current"`` (the action at the current step) and ``action_offset = 0``, see :func:`action_offset_for`.

Network sizes are reduced for CPU (DP uses UNet ``down_dims=(256, 512, 1024)``, ~65 M parameters): the default here
is ``down_dims=(64, 128, 256)``, time embedding 64, kernel 5 (~4 M parameters); DiT d_model 128, 4 layers, 4 heads;
MLP 3×256. Schedule as DP: cosine ("squaredcos_cap_v2") with T = 100, ε-prediction, DDPM training; evaluation
uses DDIM with 10 steps by default (``eval_sampler`` / ``eval_inference_steps``).
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

from .data.il import (SequenceWindows, default_pusht_zarr_path, load_pusht_lowdim, load_robomimic_hdf5,
                      subsample_episodes)
from .policies.bc_gmm import BCGMMConfig, BCGMMPolicy
from .policy import DiffusionPolicy, DiffusionPolicyConfig
from .runs import RunDir, _plain, load_policy, median_call_ms
from .samplers import SAMPLERS
from .train import TrainConfig, checkpoint_path, train_policy

#: preset → (network, horizon H, n_obs_steps To, n_action_steps Ta, contraction on?)
PRESETS: dict[str, tuple[str, int, int, int, bool]] = {
    "dp_unet": ("unet", 16, 2, 8, False),
    "cdp_unet": ("unet", 16, 2, 8, True),
    "dp_dit": ("dit", 16, 2, 8, False),
    "cdp_dit": ("dit", 16, 2, 8, True),
    "dbc": ("mlp", 1, 2, 1, False),
    "cdp_dbc": ("mlp", 1, 2, 1, True),
    "bc_gmm": ("gmm", 1, 2, 1, False),
}
TASKS = ("pusht", "lift", "can")
#: task → (action dim, default evaluation length in env steps): PushT 300 (DP's max_steps), robomimic's horizon 400
TASK_SPECS: dict[str, tuple[int, int]] = {"pusht": (2, 300), "lift": (7, 400), "can": (7, 400)}
#: task → robosuite env name expected in a robomimic file's ``env_args``
ROBOSUITE_ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan"}


@dataclass
class ILConfig:
    """Settings of one imitation-learning run (``cdp train``), validated on construction.

    Attributes:
        task: ``"pusht"``, ``"lift"`` or ``"can"`` (:data:`TASKS`). zarr: PushT replay buffer (None:
            ``$CDP_PUSHT_ZARR`` or ``<repo>/../shared/data/pusht/pusht_cchi_v7_replay.zarr``). hdf5: robomimic-layout
            demos for ``lift`` / ``can`` (required there, e.g. from ``cdp data lift``; unused for PushT).
        policy: preset, one of :data:`PRESETS`.
        fraction: fraction of the training pool kept (None: all). The pool is ``max_episodes`` episodes (DP: 90)
            drawn with ``seed``; the fraction is taken of that pool (so 0.1 → 9 of 90 demos, a subset of the
            fraction-1 run's demos for the same seed), see :func:`load_demos`. The cap of 90 applies to every
            task: pass ``max_episodes=None`` (``--max-episodes none``) to train on all demos of a Lift file.
        seed: seeds episode subsampling, initialisation, batches, evaluation sampling.
        steps / batch_size / lr / weight_decay / grad_clip / log_every / ckpt_every: optimisation
            (DP: AdamW lr 1e-4, weight decay 1e-6, batch 256).
        lr_schedule / lr_warmup_steps: ``"constant"`` (default) or DP's ``"cosine"`` with 500 warm-up steps
            (:func:`cdp.train.lr_at`).
        horizon / n_obs_steps / n_action_steps: override the preset's H / To / Ta (None: preset value).
        unet_down_dims / unet_time_embed_dim / unet_kernel_size: UNet size (CPU default (64, 128, 256), 64, 5).
        dit_d_model / dit_layers / dit_heads: DiT size. mlp_hidden / mlp_layers: MLP size (DBC).
        gmm_hidden / gmm_layers / gmm_modes: BC-GMM trunk (robomimic: 2 × 1024) and mixture components (5).
        schedule / num_diffusion_steps / prediction: noise schedule (DP: cosine, T = 100, ε).
        ema_decay: EMA of the evaluation weights (DP uses up to 0.9999 over much longer runs).
        ema_power: None (warm-up (1+k)/(10+k)) or DP's power schedule (0.75; ema_decay is then its maximum).
        eval_sampler / eval_inference_steps: sampler for evaluation and diagnostics' action samples.
        cdp_weight / cdp_margin / cdp_t_range / cdp_estimator / cdp_loss / cdp_max_samples: contraction settings
            of the ``cdp_*`` presets (γ = 0.1; ``auto`` = exact Jacobian for d ≤ 128, else power iteration;
            d = H·Da). ``cdp_max_samples`` = 16 as :class:`~cdp.contraction.ContractionConfig`
            (regularise 16 random samples per batch); ``None`` regularises the whole batch. It used to default to
            None here, which silently overrode the library's default of 16 with "all" (16× the cost at batch 256).
        eval_episodes / eval_max_steps / eval_seed_start: closed-loop evaluation (0 episodes: skip);
            ``eval_max_steps=None`` becomes the task's default on construction (PushT 300, Lift / Can 400).
        diag_obs / diag_samples: dataset observations and trajectories per observation for the contraction
            diagnostics (0: skip; None: 2 × 4 when d = H·Da ≤ 8, else 1 × 1). They use exact d×d Jacobians at every
            one of the T DDIM steps, twice (λ and the divergence bound): measured ~100 s per observation·sample for
            the default UNet (d = 32, T = 100) on one contended CPU thread, ~10 s for 2 × 4 with the DBC MLP (d = 2).
        compile: ``torch.compile`` the diffusion policies' training pass (:class:`~cdp.policy.DiffusionPolicyConfig`
            ``compile``; same losses, ~9-10% faster bare MLP steps on CPU after ~10 s of compiling).
    """

    task: str = "pusht"
    zarr: str | None = None
    hdf5: str | None = None
    policy: str = "cdp_unet"
    fraction: float | None = None
    max_episodes: int | None = 90
    seed: int = 0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    grad_clip: float | None = 1.0
    log_every: int = 50
    ckpt_every: int = 500
    horizon: int | None = None
    n_obs_steps: int | None = None
    n_action_steps: int | None = None
    unet_down_dims: tuple[int, ...] = (64, 128, 256)
    unet_time_embed_dim: int = 64
    unet_kernel_size: int = 5
    dit_d_model: int = 128
    dit_layers: int = 4
    dit_heads: int = 4
    mlp_hidden: int = 256
    mlp_layers: int = 3
    gmm_hidden: int = 1024
    gmm_layers: int = 2
    gmm_modes: int = 5
    schedule: str = "cosine"
    num_diffusion_steps: int = 100
    prediction: str = "epsilon"
    ema_decay: float = 0.995
    ema_power: float | None = None
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    eval_sampler: str = "ddim"
    eval_inference_steps: int = 10
    cdp_weight: float = 0.1
    cdp_margin: float = 0.0
    cdp_t_range: tuple[float, float] = (0.0, 1.0)
    cdp_estimator: str = "auto"
    cdp_loss: str = "hinge"
    cdp_max_samples: int | None = 16
    eval_episodes: int = 50
    eval_max_steps: int | None = None
    eval_seed_start: int = 100000
    diag_obs: int | None = None
    diag_samples: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.policy not in PRESETS:
            raise ValueError(f"unknown policy preset {self.policy!r}; expected one of {sorted(PRESETS)}")
        self.unet_down_dims = tuple(int(d) for d in self.unet_down_dims)
        self.cdp_t_range = tuple(float(t) for t in self.cdp_t_range)
        if len(self.cdp_t_range) != 2:
            raise ValueError(f"cdp_t_range must have two entries, got {self.cdp_t_range}")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ValueError(f"max_episodes must be >= 1, got {self.max_episodes}")
        for name in ("eval_episodes", "diag_obs", "diag_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_max_steps is None:
            self.eval_max_steps = TASK_SPECS[self.task][1]
        if self.eval_max_steps < 1 or self.eval_inference_steps < 1:
            raise ValueError("eval_max_steps and eval_inference_steps must be >= 1")
        if self.eval_sampler not in SAMPLERS:
            raise ValueError(f"unknown eval_sampler {self.eval_sampler!r}; expected one of {SAMPLERS}")
        if self.eval_inference_steps > self.num_diffusion_steps:
            raise ValueError(f"eval_inference_steps ({self.eval_inference_steps}) cannot exceed "
                             f"num_diffusion_steps ({self.num_diffusion_steps})")
        # the sub-configs validate the rest (network, schedule, contraction, optimiser) with their own messages
        self.train_config()
        self.policy_config(obs_dim=20, action_dim=2)

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def contractive(self) -> bool:
        return PRESETS[self.policy][4]

    def shape(self) -> tuple[str, int, int, int]:
        """(network, H, To, Ta) after overrides."""
        net, H, To, Ta, _ = PRESETS[self.policy]
        return (net, self.horizon or H, self.n_obs_steps or To, self.n_action_steps or Ta)

    def diag_sizes(self) -> tuple[int, int]:
        """(observations, samples per observation) of the contraction diagnostics after the ``None`` defaults."""
        _, H, _, _ = self.shape()
        small = H * TASK_SPECS[self.task][0] <= 8  # d = H·Da (PushT Da = 2, Lift/Can 7)
        return (self.diag_obs if self.diag_obs is not None else (2 if small else 1),
                self.diag_samples if self.diag_samples is not None else (4 if small else 1))

    def train_config(self, progress: bool = True) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, log_every=self.log_every, ckpt_every=self.ckpt_every,
                           seed=self.seed, progress=progress, lr_schedule=self.lr_schedule,
                           lr_warmup_steps=self.lr_warmup_steps)

    def policy_config(self, obs_dim: int, action_dim: int) -> "DiffusionPolicyConfig | BCGMMConfig":
        """The policy config of this run for observations of dim ``obs_dim`` (PushT: 20):
        :class:`DiffusionPolicyConfig`, or :class:`~cdp.policies.bc_gmm.BCGMMConfig` for ``bc_gmm``."""
        net, H, To, Ta = self.shape()
        if net == "gmm":
            return BCGMMConfig(obs_dim=obs_dim, action_dim=action_dim, n_obs_steps=To, horizon=H, n_action_steps=Ta,
                               hidden_dims=(self.gmm_hidden,) * self.gmm_layers, num_modes=self.gmm_modes,
                               ema_decay=self.ema_decay, ema_power=self.ema_power)
        if net == "unet":
            kw: dict[str, Any] = {"down_dims": list(self.unet_down_dims), "time_embed_dim": self.unet_time_embed_dim,
                                  "kernel_size": self.unet_kernel_size}
        elif net == "dit":
            kw = {"d_model": self.dit_d_model, "n_layers": self.dit_layers, "n_heads": self.dit_heads,
                  "time_embed_dim": self.dit_d_model, "max_horizon": H}
        else:
            kw = {"hidden": self.mlp_hidden, "n_layers": self.mlp_layers}
        contraction = None
        if self.contractive:
            contraction = {"loss": self.cdp_loss, "estimator": self.cdp_estimator, "weight": self.cdp_weight,
                           "margin": self.cdp_margin, "t_range": list(self.cdp_t_range),
                           "max_samples": self.cdp_max_samples}
        return DiffusionPolicyConfig(
            obs_dim=obs_dim, action_dim=action_dim, horizon=H, n_obs_steps=To, n_action_steps=Ta, network=net,
            network_kwargs=kw, schedule={"name": self.schedule, "num_steps": self.num_diffusion_steps},
            prediction=self.prediction, sampler=self.eval_sampler, num_inference_steps=self.eval_inference_steps,
            clip_sample=1.0, obs_normalizer="minmax", action_normalizer="minmax", ema_decay=self.ema_decay,
            ema_power=self.ema_power, contraction=contraction, compile=self.compile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ILConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown IL config keys: {sorted(unknown)}")
        return cls(**d)


#: ILConfig fields that may change when a run is resumed (everything else must match the saved config.yaml)
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "ckpt_every", "eval_episodes", "eval_max_steps",
                               "eval_seed_start", "eval_sampler", "eval_inference_steps", "diag_obs", "diag_samples",
                               "compile"})


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
        raise FileNotFoundError(f"PushT zarr not found: {p} (pass --zarr PATH or set CDP_PUSHT_ZARR)")
    return p


def resolve_hdf5(path: str | os.PathLike | None, task: str = "lift") -> str:
    """The robomimic hdf5 to use for a robosuite task; one clear FileNotFoundError when missing."""
    if path is None:
        raise FileNotFoundError(f"task {task!r} needs demonstrations: pass --hdf5 FILE "
                                f"(make one with: cdp data {task} --n-demos 200 --out FILE)")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{task} demonstrations not found: {p} (make them with: cdp data {task} --out {p})")
    return p


def resolve_data(cfg: ILConfig) -> str:
    """The demonstration path of ``cfg``: the PushT zarr (:func:`resolve_zarr`) or the hdf5 (:func:`resolve_hdf5`)."""
    return resolve_zarr(cfg.zarr) if cfg.task == "pusht" else resolve_hdf5(cfg.hdf5, cfg.task)


def load_robosuite_demos(path: str | os.PathLike, task: str = "lift"):
    """Lift / Can demos from a robomimic hdf5 with the low-dim keys ``object, robot0_eef_pos, robot0_eef_quat,
    robot0_gripper_qpos`` (19-D for Lift, 23-D for Can) and 7-D actions.

    Raises:
        FileNotFoundError: missing file. ValueError: not a robomimic file / missing keys (from
            :func:`~cdp.data.il.load_robomimic_hdf5`), ``env_args`` naming another environment, actions not 7-D.
    """
    from .envs.robosuite_tasks import OBS_KEYS

    ds = load_robomimic_hdf5(path, OBS_KEYS)
    env_name = (ds.meta.get("env_args") or {}).get("env_name")
    if env_name is not None and env_name != ROBOSUITE_ENV_NAMES[task]:
        raise ValueError(f"{path} holds {env_name!r} demos, but task {task!r} needs {ROBOSUITE_ENV_NAMES[task]!r}")
    if ds.action_dim != 7:
        raise ValueError(f"{path}: actions are {ds.action_dim}-D; robosuite OSC_POSE actions are 7-D")
    return ds


def load_demos(cfg: ILConfig, path: str | os.PathLike | None = None):
    """The training demos of ``cfg``: first the pool of at most ``max_episodes`` episodes (DP: 90, random with
    ``seed``), then ``fraction`` of that pool (``max(1, round(fraction · pool))``, again with ``seed``).
    PushT reads the zarr (``path`` or ``cfg.zarr``), Lift / Can the robomimic hdf5 (``path`` or ``cfg.hdf5``).

    Fractions are therefore nested for a fixed seed and never degenerate: before, the fraction was applied to all
    206 episodes and then capped at 90, so ``fraction=0.1`` gave 21 demos (23 % of the 90-demo run) and every
    fraction ≥ 0.44 gave the same 90.
    """
    if cfg.task == "pusht":
        ds = load_pusht_lowdim(resolve_zarr(path if path is not None else cfg.zarr), max_episodes=cfg.max_episodes,
                               seed=cfg.seed)
    else:
        ds = load_robosuite_demos(resolve_hdf5(path if path is not None else cfg.hdf5, cfg.task), cfg.task)
        ds = subsample_episodes(ds, max_episodes=cfg.max_episodes, seed=cfg.seed)
    if cfg.fraction is not None and cfg.fraction < 1.0:
        ds = subsample_episodes(ds, fraction=cfg.fraction, seed=cfg.seed)
    return ds


def policy_fn_for(policy: DiffusionPolicy, seed: int, sampler: str | None = None,
                  num_inference_steps: int | None = None):
    """An :func:`~cdp.envs.pusht.evaluate_pusht` callback: obs (B, To, Do) numpy → actions (B, H, Da) numpy.

    All running episodes are sampled in one batch with a seeded generator (reproducible for a given seed).
    """
    gen = torch.Generator().manual_seed(seed)

    def fn(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            a = policy.sample(torch.as_tensor(obs, dtype=torch.float32), generator=gen, sampler=sampler,
                              num_inference_steps=num_inference_steps)
        if a.dim() == 2:  # single action (B, Da) → chunk of one
            a = a.unsqueeze(1)
        return a.numpy()

    return fn


def evaluate_policy(policy: DiffusionPolicy, episodes: int, max_steps: int | None = 300, seed_start: int = 100000,
                    seed: int = 0, sampler: str | None = None, num_inference_steps: int | None = None,
                    task: str = "pusht", video_dir: str | os.PathLike | None = None,
                    video_episodes: int = 0) -> dict:
    """Closed-loop evaluation of ``policy`` (use the EMA model) on seeds ``seed_start, seed_start+1, ...``.

    PushT: evaluate_pusht's dict (with ``video_episodes`` > 0: GIFs of the first episodes in ``video_dir``); Lift / Can: :func:`~cdp.envs.robosuite_tasks.evaluate_robosuite`'s dict
    (``success_rate`` = fraction of episodes where the env's ``_check_success()`` fired within ``max_steps``).
    Both plus ``seconds``. ``max_steps=None``: the task default (300 / 400). Raises ImportError without gym-pusht /
    robosuite, ValueError for an unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if video_episodes and task != "pusht":
        raise ValueError(f"rollout videos are implemented for pusht only (robosuite needs an offscreen OpenGL "
                         f"renderer), not {task!r}")
    c = policy.config
    max_steps = TASK_SPECS[task][1] if max_steps is None else max_steps
    t0 = time.time()
    if task != "pusht":
        from .envs.robosuite_tasks import evaluate_robosuite

        res = evaluate_robosuite(policy_fn_for(policy, seed, sampler, num_inference_steps), task=task,
                                 n_episodes=episodes, seed_start=seed_start, max_steps=max_steps,
                                 n_obs_steps=c.n_obs_steps, n_action_steps=c.n_action_steps,
                                 action_offset=action_offset_for(c))
        res["seconds"] = time.time() - t0
        return res
    from .envs.pusht import evaluate_pusht

    res = evaluate_pusht(policy_fn_for(policy, seed, sampler, num_inference_steps), n_episodes=episodes,
                         seed_start=seed_start, max_steps=max_steps, n_obs_steps=c.n_obs_steps,
                         n_action_steps=c.n_action_steps, action_offset=action_offset_for(c),
                         video_dir=video_dir, video_episodes=video_episodes)
    res["seconds"] = time.time() - t0
    return res


def contraction_diagnostics(policy: DiffusionPolicy, obs: torch.Tensor, n_samples: int, seed: int = 0) -> dict:
    """λ_max(Ĵ) along DDIM trajectories and the divergence ratio at each of the observations ``obs`` (n, To, Do).

    Returns means over observations: ``lambda_hat_mean`` (< 0: contracting), ``lambda_hat_mean_low_noise``
    (t ≤ 0.1), ``frac_contractive``, ``div_ratio_median``, ``div_bound_median``, plus ``seconds``.
    """
    from .diagnostics import divergence_ratio, lambda_along_trajectory

    t0 = time.time()
    lam_all, low, frac, ratio, bound = [], [], [], [], []
    for i in range(obs.shape[0]):
        o = obs[i: i + 1]
        lam = lambda_along_trajectory(policy, o, n_samples=n_samples, generator=torch.Generator().manual_seed(seed + i))
        lh = lam["lambda_hat"]
        lam_all.append(float(lh.mean()))
        lo = lam["t"] <= 0.1 + 1e-9
        low.append(float(lh[lo].mean()) if lo.any() else float("nan"))
        frac.append(float((lh < 0).double().mean()))
        div = divergence_ratio(policy, o, n_pairs=n_samples, generator=torch.Generator().manual_seed(seed + 1000 + i))
        ratio.append(float(div["ratio"].median()))
        bound.append(float(div["bound"].median()))
    return {"lambda_hat_mean": float(np.mean(lam_all)), "lambda_hat_mean_low_noise": float(np.mean(low)),
            "frac_contractive": float(np.mean(frac)), "div_ratio_median": float(np.median(ratio)),
            "div_bound_median": float(np.median(bound)), "n_obs": int(obs.shape[0]), "n_samples": n_samples,
            "seconds": time.time() - t0}


def _check_resume(run_path: Path, cfg: ILConfig) -> None:
    p = run_path / "config.yaml"
    if not p.exists():
        return
    saved = (yaml.safe_load(p.read_text()) or {}).get("il", {})
    now = yaml.safe_load(yaml.safe_dump(_plain(cfg.to_dict())))
    # a field added after the run was made is absent from its config.yaml: it had the default then
    default = yaml.safe_load(yaml.safe_dump(_plain(ILConfig().to_dict())))
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, default.get(k)) != now[k])
    if diff:
        raise ValueError(f"cannot resume {run_path}: settings differ from its config.yaml: {diff}")


def summary_line(res: dict) -> str:
    """One printable line: PushT: mean max-coverage, success rate (coverage > 0.95), DP score; Lift / Can:
    success rate over the episodes."""
    if "mean_max_coverage" not in res:
        n = len(res["successes"])
        return f"success rate {res['success_rate']:.3f} ({int(sum(res['successes']))}/{n} episodes)"
    return (f"mean max-coverage {res['mean_max_coverage']:.3f}, success rate {res['success_rate']:.3f}, "
            f"DP score {res['mean_max_reward']:.3f} ({len(res['max_coverage'])} episodes)")


def run_il(cfg: ILConfig, out_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluate and diagnose one IL run; returns (and writes to ``results.json``) the results dict.

    Args:
        cfg: :class:`ILConfig`. out_dir: run folder (config.yaml, metrics.jsonl, tb/, checkpoints/last,
            results.json). resume: continue from ``checkpoints/last`` (the saved config must match except
            :data:`RESUMABLE_CHANGES`; ``steps`` may grow). progress: tqdm bar.
    Returns:
        dict with ``config``, ``policy_config``, ``data`` (episodes, steps, windows), ``n_params``,
        ``train`` (seconds, sec_per_1k_steps, final losses), ``eval`` (evaluate_pusht's dict, or
        ``{"skipped": reason}``) and ``diagnostics`` (or ``{"skipped": reason}``).
    Raises:
        FileNotFoundError: missing replay buffer / hdf5. ValueError: bad config / resume mismatch / wrong file.
    """
    out = Path(out_dir)
    path = resolve_data(cfg)
    src_key = "zarr" if cfg.task == "pusht" else "hdf5"
    if resume:
        _check_resume(out, cfg)
    ds = load_demos(cfg, path)
    torch.manual_seed(cfg.seed)
    pc = cfg.policy_config(ds.obs_dim, ds.action_dim)
    pol = BCGMMPolicy(pc) if isinstance(pc, BCGMMConfig) else DiffusionPolicy(pc)
    obs, act = make_windows(ds, pol.config)
    pol.fit_normalizers(obs, act)
    run = RunDir(out, config={"job": "il", "il": cfg.to_dict(), "policy": pol.config.to_dict(), src_key: path})
    n_params = sum(p.numel() for p in pol.net.parameters())
    ckpt_meta = checkpoint_path(out) / "policy.json"
    done_before = int(json.loads(ckpt_meta.read_text())["step"]) if resume and ckpt_meta.exists() else 0
    t0 = time.time()
    _, ema = train_policy(pol, obs, act, cfg.train_config(progress), run=run, resume=resume, desc=cfg.policy)
    train_s = time.time() - t0
    last = [r for r in run.read_metrics() if "train/loss" in r]
    new_steps = max(cfg.steps - done_before, 0)
    results: dict[str, Any] = {
        "config": cfg.to_dict(), "policy_config": pol.config.to_dict(), src_key: path,
        "data": {"episodes": ds.n_episodes, "steps": ds.n_steps, "windows": int(obs.shape[0]),
                 "episode_ids": None if ds.meta.get("episode_ids") is None else np.asarray(ds.meta["episode_ids"]).tolist()},
        "n_params": int(n_params),
        "train": {"seconds": train_s, "steps_run": new_steps,
                  "sec_per_1k_steps": 1000 * train_s / new_steps if new_steps else None,
                  "final_loss": last[-1]["train/loss"] if last else None,
                  "final_loss_d": last[-1].get("train/loss_d") if last else None},
        "checkpoint": str(checkpoint_path(out)),
    }
    policy = ema.model.eval()
    g_lat = torch.Generator().manual_seed(cfg.seed)
    results["timing"] = {"act_ms_batch1": median_call_ms(lambda: policy.sample(obs[:1], generator=g_lat))}
    if cfg.eval_episodes > 0:
        try:
            ev = evaluate_policy(policy, cfg.eval_episodes, cfg.eval_max_steps, cfg.eval_seed_start, cfg.seed,
                                 task=cfg.task)
            results["eval"] = ev
            keys = ("mean_max_coverage", "success_rate", "mean_max_reward") if cfg.task == "pusht" else ("success_rate",)
            run.log(cfg.steps, {k: ev[k] for k in keys}, prefix="eval/")
        except ImportError as e:
            results["eval"] = {"skipped": str(e)}
    else:
        results["eval"] = {"skipped": "eval_episodes = 0"}
    n_obs, n_samples = cfg.diag_sizes()
    if not isinstance(policy, DiffusionPolicy):
        results["diagnostics"] = {"skipped": f"{cfg.policy} is not a diffusion policy (no sampling flow)"}
    elif n_obs > 0 and n_samples > 0:
        g = torch.Generator().manual_seed(cfg.seed + 7)
        pick = torch.randperm(obs.shape[0], generator=g)[:n_obs]
        diag = contraction_diagnostics(policy, obs[pick], n_samples, seed=cfg.seed)
        results["diagnostics"] = diag
        run.log(cfg.steps, {k: v for k, v in diag.items() if isinstance(v, float) and math.isfinite(v)},
                prefix="diag/")
    else:
        results["diagnostics"] = {"skipped": "diag_obs or diag_samples = 0"}
    run.write_json("results.json", results)
    run.close()
    return results


def task_of_checkpoint(checkpoint: str | os.PathLike) -> str:
    """The IL task recorded in the run folder of ``<run>/checkpoints/<name>`` (``config.yaml``, ``il.task``);
    ``"pusht"`` when there is no such file (older runs, bare checkpoints)."""
    p = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if p.exists():
        task = ((yaml.safe_load(p.read_text()) or {}).get("il") or {}).get("task")
        if task in TASKS:
            return task
    return "pusht"


def eval_checkpoint(checkpoint: str | os.PathLike, episodes: int = 50, max_steps: int | None = None,
                    seed_start: int = 100000, seed: int = 0, sampler: str | None = None,
                    num_inference_steps: int | None = None, task: str | None = None,
                    video_dir: str | os.PathLike | None = None, video_episodes: int = 0) -> dict:
    """Load a checkpoint folder (EMA weights) and evaluate it closed loop (``cdp eval``).

    ``video_dir`` / ``video_episodes``: GIFs of the first episodes (PushT only, see :func:`evaluate_policy`).
    ``task=None``: the task of the run the checkpoint belongs to (:func:`task_of_checkpoint`, PushT if unknown);
    ``max_steps=None``: the task's default (PushT 300, Lift / Can 400). Sampler settings default to the ones stored
    in the checkpoint's policy config. Raises FileNotFoundError for a missing / non-checkpoint folder, ImportError
    without gym-pusht / robosuite.
    """
    policy = load_policy(checkpoint, use_ema=True)
    task = task_of_checkpoint(checkpoint) if task is None else task
    res = evaluate_policy(policy, episodes, max_steps, seed_start, seed, sampler, num_inference_steps, task=task,
                          video_dir=video_dir, video_episodes=video_episodes)
    res["checkpoint"] = str(checkpoint)
    res["task"] = task
    return res
