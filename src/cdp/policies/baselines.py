"""Behaviour-cloning baselines: Gaussian MLP policy and BC-GMM.

* :class:`GaussianMLPPolicy` -- BC with a diagonal Gaussian head, optionally
  tanh-squashed (SAC-style change of variables, Haarnoja et al. 2018, App. C),
  trained by maximum likelihood.
* :class:`GMMPolicy` -- BC-GMM as in robomimic (Mandlekar et al., "What Matters
  in Learning from Offline Human Demonstrations for Robot Manipulation",
  CoRL 2021; reference code ARISE-Initiative/robomimic,
  ``robomimic/models/policy_nets.py::GMMActorNetwork`` and
  ``robomimic/config/bc_config.py``): 5 modes, means squashed by ``tanh``,
  ``std = softplus(raw) + min_std`` with ``min_std = 1e-4``, mixture of
  ``Independent(Normal)`` components via ``torch.distributions.MixtureSameFamily``,
  negative log-likelihood loss.

Both expose ``loss(obs, action) -> scalar`` and ``act(obs, deterministic=True)
-> (B, Da)`` with ``obs (B, Do)`` and ``action (B, Da)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from ..nets.activations import Mish

__all__ = ["GaussianPolicyConfig", "GaussianMLPPolicy", "GMMPolicyConfig", "GMMPolicy"]

_ACTIVATIONS = {"relu": nn.ReLU, "mish": Mish, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _validate_common(name: str, obs_dim: int, action_dim: int, hidden_dims: tuple[int, ...], activation: str) -> None:
    if obs_dim < 1:
        raise ValueError(f"{name}: obs_dim must be >= 1, got {obs_dim}")
    if action_dim < 1:
        raise ValueError(f"{name}: action_dim must be >= 1, got {action_dim}")
    if any(h < 1 for h in hidden_dims):
        raise ValueError(f"{name}: hidden_dims entries must be >= 1, got {hidden_dims}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")


def _mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), _ACTIVATIONS[activation]()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def _check_batch(name: str, obs: torch.Tensor, obs_dim: int, action: torch.Tensor | None = None, action_dim: int = 0):
    if obs.dim() != 2 or obs.shape[-1] != obs_dim:
        raise ValueError(f"{name}: obs must have shape (B, {obs_dim}), got {tuple(obs.shape)}")
    if action is not None and (action.dim() != 2 or action.shape != (obs.shape[0], action_dim)):
        raise ValueError(f"{name}: action must have shape ({obs.shape[0]}, {action_dim}), got {tuple(action.shape)}")


# --------------------------------------------------------------------------- Gaussian


@dataclass
class GaussianPolicyConfig:
    """Configuration of :class:`GaussianMLPPolicy`.

    Attributes:
        obs_dim, action_dim: ``Do``, ``Da``.
        hidden_dims: MLP trunk widths.
        activation: one of ``relu, mish, silu, tanh, gelu``.
        squash: ``"tanh"`` (actions in ``(-1, 1)``, log-likelihood with the tanh
            Jacobian correction) or ``"none"`` (plain Gaussian).
        state_dependent_std: predict ``log_std`` from obs (else a free parameter).
        log_std_min, log_std_max: clamp range of ``log_std``.
        action_eps: for ``squash="tanh"`` target actions are clipped to
            ``[-1 + eps, 1 - eps]`` before ``atanh``.
    """

    obs_dim: int
    action_dim: int
    hidden_dims: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    squash: str = "tanh"
    state_dependent_std: bool = True
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    action_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        _validate_common("GaussianPolicyConfig", self.obs_dim, self.action_dim, self.hidden_dims, self.activation)
        if self.squash not in ("tanh", "none"):
            raise ValueError(f"GaussianPolicyConfig: squash must be 'tanh' or 'none', got {self.squash!r}")
        if not self.log_std_min < self.log_std_max:
            raise ValueError(
                f"GaussianPolicyConfig: need log_std_min < log_std_max, got {self.log_std_min}, {self.log_std_max}"
            )
        if not 0.0 < self.action_eps < 0.1:
            raise ValueError(f"GaussianPolicyConfig: action_eps must be in (0, 0.1), got {self.action_eps}")


class GaussianMLPPolicy(nn.Module):
    """BC policy with a diagonal Gaussian head (optionally tanh-squashed).

    Shapes: ``obs (B, Do)``, ``action (B, Da)``; :meth:`loss` returns a scalar
    (mean negative log-likelihood), :meth:`act` returns ``(B, Da)``.
    """

    def __init__(self, config: GaussianPolicyConfig) -> None:
        super().__init__()
        self.config = c = config
        out = 2 * c.action_dim if c.state_dependent_std else c.action_dim
        self.net = _mlp(c.obs_dim, c.hidden_dims, out, c.activation)
        self.log_std = None if c.state_dependent_std else nn.Parameter(torch.zeros(c.action_dim))

    def _mean_log_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(obs)
        if self.log_std is None:
            mean, log_std = h.chunk(2, dim=-1)
        else:
            mean, log_std = h, self.log_std.expand_as(h)
        return mean, log_std.clamp(self.config.log_std_min, self.config.log_std_max)

    def distribution(self, obs: torch.Tensor) -> D.Independent:
        """Pre-squash Gaussian ``N(mean(obs), diag(std(obs)^2))`` over ``(B, Da)``."""
        _check_batch("GaussianMLPPolicy", obs, self.config.obs_dim)
        mean, log_std = self._mean_log_std(obs)
        return D.Independent(D.Normal(mean, log_std.exp()), 1)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Log-density of ``action`` under the policy; returns ``(B,)``."""
        c = self.config
        _check_batch("GaussianMLPPolicy", obs, c.obs_dim, action, c.action_dim)
        dist = self.distribution(obs)
        if c.squash == "none":
            return dist.log_prob(action)
        a = action.clamp(-1.0 + c.action_eps, 1.0 - c.action_eps)
        u = torch.atanh(a)
        # log|d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        log_det = (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return dist.log_prob(u) - log_det

    def loss(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the demonstrated actions (scalar)."""
        return -self.log_prob(obs, action).mean()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Action ``(B, Da)``: the (squashed) mean if ``deterministic`` else a sample."""
        dist = self.distribution(obs)
        u = dist.mean if deterministic else dist.sample()
        return torch.tanh(u) if self.config.squash == "tanh" else u


# --------------------------------------------------------------------------- GMM


@dataclass
class GMMPolicyConfig:
    """Configuration of :class:`GMMPolicy` (defaults follow robomimic's BC-GMM).

    Attributes:
        obs_dim, action_dim: ``Do``, ``Da``.
        hidden_dims: MLP trunk widths (robomimic BC-RNN-GMM uses an RNN; the
            low-dim BC-GMM uses an MLP such as ``(1024, 1024)``).
        activation: trunk nonlinearity.
        num_modes: mixture components (5).
        min_std: added to ``softplus(raw_std)`` (1e-4).
        tanh_means: squash component means with ``tanh`` (robomimic does this
            when the distribution itself is not tanh-wrapped).
    """

    obs_dim: int
    action_dim: int
    hidden_dims: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    num_modes: int = 5
    min_std: float = 1e-4
    tanh_means: bool = True

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        _validate_common("GMMPolicyConfig", self.obs_dim, self.action_dim, self.hidden_dims, self.activation)
        if self.num_modes < 1:
            raise ValueError(f"GMMPolicyConfig: num_modes must be >= 1, got {self.num_modes}")
        if not self.min_std > 0.0:
            raise ValueError(f"GMMPolicyConfig: min_std must be > 0, got {self.min_std}")


class GMMPolicy(nn.Module):
    """BC-GMM policy (robomimic ``GMMActorNetwork`` semantics).

    The trunk maps ``obs (B, Do)`` to ``K`` means ``(B, K, Da)``, ``K`` stds
    ``(B, K, Da)`` and mixture logits ``(B, K)``.
    """

    def __init__(self, config: GMMPolicyConfig) -> None:
        super().__init__()
        self.config = c = config
        k, da = c.num_modes, c.action_dim
        self.net = _mlp(c.obs_dim, c.hidden_dims, k * (2 * da + 1), c.activation)

    def _params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        _check_batch("GMMPolicy", obs, c.obs_dim)
        k, da = c.num_modes, c.action_dim
        h = self.net(obs)
        means = h[:, : k * da].reshape(-1, k, da)
        raw_std = h[:, k * da : 2 * k * da].reshape(-1, k, da)
        logits = h[:, 2 * k * da :]
        if c.tanh_means:
            means = torch.tanh(means)
        stds = F.softplus(raw_std) + c.min_std
        return means, stds, logits

    def distribution(self, obs: torch.Tensor) -> D.MixtureSameFamily:
        """``MixtureSameFamily(Categorical(logits), Independent(Normal(means, stds), 1))`` over ``(B, Da)``."""
        means, stds, logits = self._params(obs)
        return D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(means, stds), 1))

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Log-density ``(B,)`` of ``action (B, Da)``."""
        _check_batch("GMMPolicy", obs, self.config.obs_dim, action, self.config.action_dim)
        return self.distribution(obs).log_prob(action)

    def loss(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (scalar)."""
        return -self.log_prob(obs, action).mean()

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """Action ``(B, Da)``.

        ``deterministic=True`` returns the mean of the highest-weight mode
        (robomimic instead samples with ``low_noise_eval``, i.e. a random mode's
        mean; this variant is reproducible).  ``deterministic=False`` samples
        from the full mixture.
        """
        means, stds, logits = self._params(obs)
        if not deterministic:
            return D.MixtureSameFamily(
                D.Categorical(logits=logits), D.Independent(D.Normal(means, stds), 1)
            ).sample()
        idx = logits.argmax(dim=-1)  # (B,)
        return means[torch.arange(means.shape[0], device=means.device), idx]
