"""BC-GMM for the imitation-learning job: robomimic's Gaussian-mixture behaviour cloning as a ``cdp train`` policy.

:class:`BCGMMPolicy` wraps :class:`cdp.policies.baselines.GMMPolicy` (robomimic ``GMMActorNetwork`` semantics: 5
modes, tanh-squashed means, softplus std + 1e-4, NLL loss) with the pieces the IL job and its run folder expect of
a policy — min-max normalisers stored as buffers, ``compute_loss`` / ``sample`` / ``fit_normalizers``, a
``config`` with ``to_dict`` — so :class:`cdp.training.agents.DiffusionBC`, :func:`cdp.runs.save_policy` / ``load_policy`` and
the closed-loop evaluations serve it unchanged. Like DBC it maps the last ``To`` observations (flattened) to one
action (H = 1).

Source: Mandlekar et al., "What Matters in Learning from Offline Human Demonstrations for Robot Manipulation",
CoRL 2021 (robomimic ``bc_config.py``: GMM with 5 modes, min_std 1e-4, actor layers (1024, 1024), lr 1e-4); the
paper's IL table reports it as "BC-GMM".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..normalization import Normalizer
from .baselines import GMMPolicy, GMMPolicyConfig


@dataclass
class BCGMMConfig:
    """Settings of :class:`BCGMMPolicy`, validated on construction.

    Attributes:
        obs_dim / action_dim: Do / Da. n_obs_steps: To, observations fed (flattened) to the trunk.
        hidden_dims: trunk widths (robomimic low-dim: (1024, 1024)). activation: trunk nonlinearity.
        num_modes: mixture components (5). min_std: std floor (1e-4).
        ema_decay / ema_power: evaluation-weight EMA as the diffusion policies (0: none).
        horizon / n_action_steps: fixed at 1 (one action per decision); present so evaluation code reads them.
    Raises:
        ValueError: non-positive sizes, horizon / n_action_steps other than 1, or a bad GMM setting.
    """

    obs_dim: int
    action_dim: int
    n_obs_steps: int = 2
    hidden_dims: tuple[int, ...] = (1024, 1024)
    activation: str = "relu"
    num_modes: int = 5
    min_std: float = 1e-4
    ema_decay: float = 0.0
    ema_power: float | None = None
    horizon: int = 1
    n_action_steps: int = 1
    network: str = field(default="gmm", init=False)

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if self.n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {self.n_obs_steps}")
        if self.horizon != 1 or self.n_action_steps != 1:
            raise ValueError("BC-GMM predicts one action: horizon and n_action_steps must be 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        self.gmm_config()  # validates dims, widths, modes, min_std

    def gmm_config(self) -> GMMPolicyConfig:
        return GMMPolicyConfig(obs_dim=self.n_obs_steps * self.obs_dim, action_dim=self.action_dim,
                               hidden_dims=self.hidden_dims, activation=self.activation, num_modes=self.num_modes,
                               min_std=self.min_std, tanh_means=True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("network")
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BCGMMConfig":
        return cls(**{k: v for k, v in d.items() if k != "network"})


class BCGMMPolicy(nn.Module):
    """obs history (B, To, Do) → one action (B, Da) by a Gaussian mixture on min-max-normalised data.

    Training minimises the mixture NLL of the normalised action given the normalised, flattened history
    (actions normalised to [-1, 1], matching the tanh-squashed means). :meth:`sample` returns the mean of the
    highest-weight component (deterministic and reproducible; robomimic's ``low_noise_eval`` instead picks a
    component at random and takes its mean).
    """

    def __init__(self, config: BCGMMConfig) -> None:
        super().__init__()
        self.config = config
        self.net = GMMPolicy(config.gmm_config())
        self.obs_normalizer = Normalizer(config.obs_dim, "minmax")
        self.action_normalizer = Normalizer(config.action_dim, "minmax")

    @property
    def action_shape(self) -> tuple[int, ...]:
        return (self.config.action_dim,)

    def fit_normalizers(self, obs: torch.Tensor, actions: torch.Tensor) -> None:
        """Fit the normalisers on data (..., Do) and (..., Da)."""
        self.obs_normalizer.fit(obs)
        self.action_normalizer.fit(actions)

    def _trunk_input(self, obs: torch.Tensor) -> torch.Tensor:
        c = self.config
        if obs.dim() == 2 and c.n_obs_steps == 1:
            obs = obs.unsqueeze(1)
        if obs.dim() != 3 or obs.shape[1] != c.n_obs_steps or obs.shape[2] != c.obs_dim:
            raise ValueError(f"obs must have shape (B, {c.n_obs_steps}, {c.obs_dim}); got {tuple(obs.shape)}")
        if not torch.isfinite(obs).all():
            raise ValueError("obs contain NaN or inf")
        return self.obs_normalizer.normalize(obs).reshape(obs.shape[0], -1)

    def compute_loss(self, obs: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mixture NLL. obs (B, To, Do), actions (B, Da) unnormalised. ``generator`` is unused (the loss is
        deterministic); returns (scalar loss, {"loss", "nll"})."""
        if actions.dim() != 2 or actions.shape[1] != self.config.action_dim or actions.shape[0] != obs.shape[0]:
            raise ValueError(f"actions must have shape (B, {self.config.action_dim}); got {tuple(actions.shape)}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        a = self.action_normalizer.normalize(actions).clamp(-1 + 1e-6, 1 - 1e-6)
        loss = self.net.loss(self._trunk_input(obs), a)
        v = float(loss.detach())
        return loss, {"loss": v, "nll": v}

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None, sampler: str | None = None,
               num_inference_steps: int | None = None, **_: Any) -> torch.Tensor:
        """Actions (B, Da), unnormalised: the mean of each observation's highest-weight component.
        ``generator`` / ``sampler`` / ``num_inference_steps`` are accepted for interface parity and ignored."""
        return self.action_normalizer.unnormalize(self.net.act(self._trunk_input(obs), deterministic=True))
