"""Pieces shared by the offline-RL algorithms: batch validation, twin Q critics, Polyak averaging.

Every algorithm in :mod:`cdp.rl` follows the agent protocol of :func:`cdp.training.trainer.fit`:

* ``agent.fit_normalizers(observations, actions)`` on the whole dataset (tensors) before training;
* ``agent.update(batch) -> dict[str, float]`` one gradient step on a batch, a dict of tensors
  ``observations (B, Do)``, ``actions (B, Da)``, ``rewards (B,)``, ``next_observations (B, Do)``, ``terminals (B,)``;
* ``agent.act(obs (B, Do)) -> (B, Da)`` the evaluation action (no gradients);
* ``agent.modules()`` / ``agent.optimizers()`` name → ``nn.Module`` / optimiser, and
  ``agent.extra_state()`` / ``agent.load_extra_state(state)`` (RNG, EMA counters) for checkpoints;
* ``agent.checkpoint_meta()``: class, algorithm, dimensions and config for the checkpoint's ``policy.json``;
* ``agent.generator``: the ``torch.Generator`` behind all of the update's randomness (so resuming is exact).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nets.activations import Mish

BATCH_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


def check_batch(batch: dict[str, torch.Tensor], obs_dim: int, action_dim: int) -> None:
    """Raise ``ValueError`` with a clear message on a missing key, a wrong shape, or NaN/inf values."""
    for key in BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; expected keys {BATCH_KEYS}")
    B = batch["observations"].shape[0]
    want = {"observations": (B, obs_dim), "next_observations": (B, obs_dim), "actions": (B, action_dim),
            "rewards": (B,), "terminals": (B,)}
    for key, shape in want.items():
        v = batch[key]
        if tuple(v.shape) != shape:
            raise ValueError(f"batch[{key!r}] must have shape {shape}, got {tuple(v.shape)}")
        if not torch.isfinite(v.float()).all():
            raise ValueError(f"batch[{key!r}] contains NaN or inf (bad dataset row?); refusing to train on it")


def mlp(in_dim: int, out_dim: int, hidden: int = 256, n_layers: int = 3, act: type[nn.Module] = Mish) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class TwinQ(nn.Module):
    """Two independent critics Q_1, Q_2(s, a) (Fujimoto et al. 2018), each an MLP (Diffusion-QL: 3×256 Mish;
    IDQL: 2×256 ReLU, ``act=nn.ReLU``).

    ``forward(obs (B, Do), action (B, Da)) -> (q1 (B,), q2 (B,))``; ``q_min`` gives min(q1, q2).
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 256, n_layers: int = 3,
                 act: type[nn.Module] = Mish) -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, 1, hidden, n_layers, act)
        self.q2 = mlp(obs_dim + action_dim, 1, hidden, n_layers, act)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q_min(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        q1, q2 = self(obs, action)
        return torch.minimum(q1, q2)


def agent_meta(agent) -> dict:
    """``policy.json`` metadata of an RL agent: what :func:`cdp.experiments.rl.load_agent` rebuilds it from."""
    return {"class": type(agent).__name__, "algo": getattr(agent, "name_full", agent.name), "obs_dim": agent.obs_dim,
            "action_dim": agent.action_dim, "config": agent.config.to_dict()}


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging θ' ← (1 − τ) θ' + τ θ."""
    for pt, p in zip(target.parameters(), source.parameters()):
        pt.mul_(1 - tau).add_(p.detach(), alpha=tau)


class DiffusionActorBase:
    """Plumbing shared by the diffusion-actor agents (EDP/CDP, Diffusion-QL, IDQL): the actor
    (:class:`cdp.policy.DiffusionPolicy`), its EMA, the agent's RNG, and the extra state the trainer checkpoints.
    The algorithms themselves (losses, updates, action selection) stay in their own files."""

    def _init_actor(self, obs_dim: int, action_dim: int, policy_config, ema_decay: float, seed: int) -> None:
        """Seed torch's global RNG (initialisation) and :attr:`generator` (sampling), then build policy and EMA —
        in this order; reordering would change every seed's initialisation (and the documented results)."""
        from ..policy import EMA, DiffusionPolicy

        self.obs_dim, self.action_dim = obs_dim, action_dim
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.policy = DiffusionPolicy(policy_config)
        self.ema = EMA(self.policy, ema_decay)

    def fit_normalizers(self, observations: torch.Tensor, actions: torch.Tensor) -> None:
        """Fit the actor's observation / action normalisers on the dataset and copy them into the EMA actor."""
        self.policy.fit_normalizers(observations, actions)
        self.ema.model.load_state_dict(self.policy.state_dict())

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state(), "ema_updates": self.ema.num_updates}

    def checkpoint_meta(self) -> dict:
        return agent_meta(self)

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.ema.num_updates = int(state["ema_updates"])


def mlp_actor_config(obs_dim: int, action_dim: int, hidden: int, n_layers: int, num_diffusion_steps: int,
                     sampler: str, num_inference_steps: int | None, ema_decay: float, contraction: dict | None,
                     compile: bool = False):
    """The Diffusion-QL-family actor: MLP denoiser (``n_layers`` × ``hidden`` Mish), ``vp`` schedule with T steps,
    ε-prediction, Gaussian-normalised observations, actions min-max normalised to [-1, 1] and clipped there."""
    from ..policy import DiffusionPolicyConfig

    return DiffusionPolicyConfig(
        obs_dim=obs_dim, action_dim=action_dim, network="mlp", network_kwargs={"hidden": hidden, "n_layers": n_layers},
        schedule={"name": "vp", "num_steps": num_diffusion_steps}, prediction="epsilon", sampler=sampler,
        num_inference_steps=num_inference_steps, clip_sample=1.0, obs_normalizer="gaussian",
        action_normalizer="minmax", ema_decay=ema_decay, contraction=contraction, compile=compile)
