r"""Behaviour cloning with a Gaussian MLP (the BC row of the D4RL tables).

Maximum likelihood of the dataset actions under a tanh-squashed diagonal Gaussian
(:class:`cdp.policies.baselines.GaussianMLPPolicy`):

.. math:: L_{BC}(\phi) = -\mathbb E_{(s,a)\sim\mathcal D}\,\log\pi_\phi(a \mid \bar s),
          \qquad \pi_\phi = \tanh_\# \mathcal N(\mu_\phi(\bar s), \operatorname{diag}\sigma^2_\phi(\bar s)),

with :math:`\bar s` the Gaussian-normalised observation. Actions are min-max normalised to [-1, 1] first (so the tanh
support covers the dataset's action box); evaluation takes the squashed mean :math:`\tanh\mu_\phi(\bar s)`.
Rewards and next states are ignored (validated only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..normalization import Normalizer
from ..policies.baselines import GaussianMLPPolicy, GaussianPolicyConfig
from .common import agent_meta, check_batch


@dataclass
class BCConfig:
    """Settings of :class:`BC`.

    Attributes:
        hidden_dims: MLP widths. activation: trunk nonlinearity.
        lr: Adam learning rate. grad_clip: max gradient norm (None: off).
    """

    hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    lr: float = 3e-4
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.hidden_dims = [int(h) for h in self.hidden_dims]

    def to_dict(self) -> dict:
        return asdict(self)


class BC:
    """Gaussian-MLP behaviour cloning; see the module docstring for the loss.

    Args:
        obs_dim, action_dim: Do, Da. config: :class:`BCConfig`. seed: seeds the initialisation and the generator.
    """

    name = "bc"

    def __init__(self, obs_dim: int, action_dim: int, config: BCConfig | None = None, seed: int = 0) -> None:
        self.config = config or BCConfig()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.policy = GaussianMLPPolicy(GaussianPolicyConfig(obs_dim, action_dim, tuple(self.config.hidden_dims),
                                                             self.config.activation, squash="tanh"))
        self.normalizers = nn.ModuleDict({"obs": Normalizer(obs_dim, "gaussian"), "action": Normalizer(action_dim, "minmax")})
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=self.config.lr)

    def fit_normalizers(self, observations: torch.Tensor, actions: torch.Tensor) -> None:
        self.normalizers["obs"].fit(observations)
        self.normalizers["action"].fit(actions)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_BC on a batch (no step)."""
        obs = self.normalizers["obs"].normalize(batch["observations"])
        a = self.normalizers["action"].normalize(batch["actions"]).clamp(-1, 1)
        return self.policy.loss(obs, a)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One Adam step on L_BC. Returns ``{"loss", "actor_loss"}``."""
        check_batch(batch, self.obs_dim, self.action_dim)
        loss = self.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.grad_clip)
        self.opt.step()
        v = float(loss.detach())
        return {"loss": v, "actor_loss": v}

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, Do) → (B, Da): the squashed mean, unnormalised."""
        a = self.policy.act(self.normalizers["obs"].normalize(obs), deterministic=True)
        return self.normalizers["action"].unnormalize(a)

    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, "normalizers": self.normalizers}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.opt}

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def checkpoint_meta(self) -> dict:
        return agent_meta(self)

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
