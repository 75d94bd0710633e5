"""Behaviour-cloning agents for :func:`cdp.training.trainer.fit`: a diffusion policy (toy, diffusion BC, Diffusion
Policy; CDP when its config has a contraction regulariser) or BC-GMM, trained on (observation, action) pairs.

One :meth:`DiffusionBC.update`: ``policy.compute_loss`` on the batch (L_d + γ·L_c), AdamW with an optional
warm-up / cosine learning-rate schedule (:func:`~cdp.training.trainer.lr_at`) and gradient clipping, then the EMA
of the evaluation weights. The checkpoint holds ``model.*`` and ``ema.*`` tensors and the policy config, so
:func:`cdp.runs.load_policy` rebuilds the policy without this module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..policy import EMA
from .trainer import DivergenceError, lr_at


class DiffusionBC:
    """Train a :class:`~cdp.policy.DiffusionPolicy` (or :class:`~cdp.policies.bc_gmm.BCGMMPolicy`) by behaviour cloning.

    Args:
        policy: the policy (normalisers are fitted by :meth:`fit_normalizers`).
        steps: the run's total steps (for the cosine schedule). lr / weight_decay: AdamW.
        grad_clip: max gradient norm (None: off). lr_schedule / lr_warmup_steps: see :func:`lr_at`.
        generator: the RNG of the loss's draws (diffusion step, noise, regularisation points); :func:`fit` may use the
            same generator for batch indices.
    Batch: ``observations`` (B, Do) or (B, To, Do), ``actions`` (B, *policy.action_shape).
    """

    name = "bc"

    def __init__(self, policy: nn.Module, *, steps: int, lr: float, weight_decay: float = 0.0,
                 grad_clip: float | None = 1.0, lr_schedule: str = "constant", lr_warmup_steps: int = 0,
                 generator: torch.Generator | None = None) -> None:
        if not (lr > 0):
            raise ValueError(f"train.lr must be > 0, got {lr}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule must be constant or cosine, got {lr_schedule!r}")
        self.policy = policy
        self.steps, self.lr, self.grad_clip = steps, lr, grad_clip
        self.lr_schedule, self.lr_warmup_steps = lr_schedule, lr_warmup_steps
        self.generator = generator if generator is not None else torch.Generator()
        c = policy.config
        self.ema = EMA(policy, c.ema_decay if c.ema_decay > 0 else 0.0, c.ema_power)
        self.opt = torch.optim.AdamW(policy.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.num_updates = 0

    def fit_normalizers(self, observations: torch.Tensor, actions: torch.Tensor) -> None:
        self.policy.fit_normalizers(observations, actions)
        self.ema.model.load_state_dict(self.policy.state_dict())

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.policy.train()
        step = self.num_updates
        loss, metrics = self.policy.compute_loss(batch["observations"], batch["actions"], generator=self.generator)
        if not torch.isfinite(loss):
            raise DivergenceError(f"loss became {float(loss)} at step {step + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.lr_schedule != "constant" or self.lr_warmup_steps:
            lr = lr_at(step, self.lr, self.steps, self.lr_schedule, self.lr_warmup_steps)
            for group in self.opt.param_groups:
                group["lr"] = lr
            metrics["lr"] = lr
        if self.grad_clip is not None:
            metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(self.policy.net.parameters(), self.grad_clip))
        self.opt.step()
        if self.policy.config.ema_decay > 0:
            self.ema.update(self.policy)
        else:
            self.ema.model.load_state_dict(self.policy.state_dict())
        self.num_updates += 1
        return metrics

    @property
    def eval_policy(self) -> nn.Module:
        """The EMA policy (evaluation weights)."""
        return self.ema.model.eval()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.policy, "ema": self.ema.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.opt}

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state(), "ema_updates": self.ema.num_updates,
                "num_updates": self.num_updates}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.ema.num_updates = int(state["ema_updates"])
        self.num_updates = int(state["num_updates"])

    def checkpoint_meta(self) -> dict:
        return {"class": type(self.policy).__name__, "config": self.policy.config.to_dict()}

    def to(self, device: torch.device) -> "DiffusionBC":
        self.policy.to(device)
        self.ema.model.to(device)
        return self
