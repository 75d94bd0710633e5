"""A generic, resumable training loop for diffusion policies (behaviour cloning with optional contraction).

One loop serves the toy study, diffusion BC and Diffusion Policy: each step draws a batch from an in-memory
dataset with a seeded ``torch.Generator``, computes :meth:`DiffusionPolicy.compute_loss`, steps AdamW, updates the
EMA, logs to the run folder, and checkpoints atomically. Resuming loads the last checkpoint (weights, EMA,
optimiser, generator state, step), so an interrupted run ends with the same parameters as an uninterrupted one
on CPU. A non-finite loss stops the run with a clear error (the last good checkpoint is kept).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .policy import EMA, DiffusionPolicy
from .runs import RunDir, load_checkpoint, save_policy


class DivergenceError(RuntimeError):
    """Raised when the training loss becomes NaN/inf."""


LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, config: "TrainConfig") -> float:
    """Learning rate for the update that follows ``step`` completed steps (0-based).

    warm-up: lr · (step + 1) / W for step < W (W = ``lr_warmup_steps``; the first update is not at rate 0);
    then ``constant``: lr; ``cosine``: lr · ½(1 + cos(π · (step − W) / (steps − W))).
    """
    w = config.lr_warmup_steps
    if step < w:
        return config.lr * (step + 1) / w
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.steps - w)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / span)))


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: gradient steps. batch_size: samples per step. lr / weight_decay: AdamW.
        grad_clip: max gradient norm (None: off). log_every / ckpt_every: in steps (ckpt_every 0: only at the end).
        seed: seeds the batch/noise generator. progress: show a tqdm bar.
        lr_schedule: ``"constant"`` or ``"cosine"`` (Diffusion Policy: linear warm-up over ``lr_warmup_steps``, then
            cosine decay to 0 at ``steps``, as diffusers' ``get_cosine_schedule_with_warmup``). The rate is a
            function of the step index only, so resuming needs no scheduler state. See :func:`lr_at`.
        lr_warmup_steps: linear warm-up steps (DP: 500); applies to both schedules.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    log_every: int = 100
    ckpt_every: int = 0
    seed: int = 0
    progress: bool = True
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.log_every < 1 or self.ckpt_every < 0:
            raise ValueError("steps >= 0, batch_size >= 1, log_every >= 1 and ckpt_every >= 0 are required")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; expected one of {LR_SCHEDULES}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


def train_policy(policy: DiffusionPolicy, obs: torch.Tensor, actions: torch.Tensor, config: TrainConfig,
                 run: RunDir | None = None, resume: bool = True,
                 callback: Callable[[int, DiffusionPolicy, EMA], None] | None = None,
                 desc: str = "train") -> tuple[DiffusionPolicy, EMA]:
    """Train ``policy`` on (obs, actions) pairs; normalisers must already be fitted.

    Args:
        obs: (N, Do) or (N, To, Do). actions: (N, *policy.action_shape).
        config: :class:`TrainConfig`. run: run folder for metrics and checkpoints (``checkpoints/last``).
        resume: continue from ``run/checkpoints/last`` when it exists.
        callback: called as ``callback(step, policy, ema)`` after each log step (for snapshots).
    Returns:
        (policy, ema). Use ``ema.model`` for evaluation.
    Raises:
        DivergenceError: the loss became non-finite.
        ValueError: obs/actions batch sizes differ.
    """
    if obs.shape[0] != actions.shape[0]:
        raise ValueError(f"obs has {obs.shape[0]} rows but actions {actions.shape[0]}")
    N = obs.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(policy.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(policy, policy.config.ema_decay if policy.config.ema_decay > 0 else 0.0, policy.config.ema_power)
    start = 0
    ckpt = run.path / "checkpoints" / "last" if run is not None else None
    if resume and ckpt is not None and ckpt.exists():
        tensors, meta, state = load_checkpoint(ckpt)
        policy.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            ema.num_updates = state["ema_updates"]
        start = int(meta["step"])

    def checkpoint(step: int) -> None:
        if ckpt is not None:
            save_policy(ckpt, policy, ema, step=step,
                        state={"optimizer": opt.state_dict(), "generator": gen.get_state(), "ema_updates": ema.num_updates})

    policy.train()
    bar = tqdm(range(start, config.steps), desc=desc, disable=not config.progress, initial=start, total=config.steps,
               leave=False, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, N, (config.batch_size,), generator=gen)
        loss, metrics = policy.compute_loss(obs[idx], actions[idx], generator=gen)
        if not torch.isfinite(loss):
            raise DivergenceError(f"loss became {float(loss)} at step {step}; last good checkpoint kept in {ckpt}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.lr_schedule != "constant" or config.lr_warmup_steps:
            lr = lr_at(step, config)
            for group in opt.param_groups:
                group["lr"] = lr
            metrics["lr"] = lr
        if config.grad_clip is not None:
            gn = torch.nn.utils.clip_grad_norm_(policy.net.parameters(), config.grad_clip)
            metrics["grad_norm"] = float(gn)
        opt.step()
        if policy.config.ema_decay > 0:
            ema.update(policy)
        else:
            ema.model.load_state_dict(policy.state_dict())
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            if run is not None:
                run.log(done, metrics, prefix="train/")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if callback is not None:
                callback(done, policy, ema)
        if config.ckpt_every and done % config.ckpt_every == 0:
            checkpoint(done)
    if config.steps > start or (ckpt is not None and not ckpt.exists()):
        checkpoint(config.steps)
    policy.eval()
    return policy, ema


def checkpoint_path(run_dir: str | Path) -> Path:
    """The final checkpoint folder of a run."""
    return Path(run_dir) / "checkpoints" / "last"
