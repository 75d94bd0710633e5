r"""IDQL — Implicit Diffusion Q-learning (Hansen-Estruch, Kostrikov, Janner, Kuba, Levine 2023, arXiv:2304.10573),
and CDP on top of it.

IDQL decouples the critic from the actor: the critic is IQL's (Kostrikov et al. 2022), trained only on dataset
actions, and the actor is a diffusion model of the *behaviour* policy μ(a | s), trained by plain behaviour cloning.
Policy improvement happens only at action selection, by re-weighting μ's samples with the critic.
Facts from the paper and its public code (``philippe-eecs/IDQL``, ``jaxrl5/agents/ddpm_iql/ddpm_iql_learner.py``);
code written here.

* **Value** V_ψ(s) by expectile regression on the target critics (IQL Eq. 5, IDQL's ``update_v``):

  .. math:: L_V(\psi) = \mathbb E_{(s,a)\sim\mathcal D}\,L_2^\tau\big(\min_j Q_{\phi'_j}(s,a) - V_\psi(s)\big),
            \qquad L_2^\tau(u) = |\tau - \mathbb 1(u < 0)|\,u^2,

  τ = ``expectile`` (0.7, the code's ``critic_hyperparam`` default; IQL uses 0.9 on AntMaze).
* **Critics** Q_{φ1}, Q_{φ2} by TD to the value of the next state (IQL Eq. 6, ``update_q``; the mean over both):

  .. math:: L_Q(\phi) = \tfrac12\sum_{i=1,2}\mathbb E\,\big(Q_{\phi_i}(s,a) - r - \gamma(1-d)V_\psi(s')\big)^2,

  with Polyak targets φ' (τ_polyak = 0.005). V is updated first, then Q with the updated V (the code's order).
* **Actor**: a diffusion model of μ (:class:`cdp.policy.DiffusionPolicy`, ``vp`` schedule, T = 5, ε-prediction,
  actions in [-1, 1]) trained by the plain diffusion loss :math:`L_d` — **CDP-IDQL** adds the contraction
  regulariser γ L_c of the policy (``contraction`` = :class:`cdp.contraction.ContractionConfig` fields), exactly
  as EDP → CDP does. An EMA of the actor (the code's ``actor_tau`` = 0.001, i.e. decay 0.999) samples at evaluation.
* **Action selection** (paper §4–5, the implicit policy :math:`\pi_{imp}(a\mid s) \propto \mu(a\mid s)\,w(s,a)`):
  draw N actions from μ by the T-step DDPM chain (code: N = 64; the paper uses 32–256), then

  - ``"expectile"`` (default): resample one with importance weights from the paper's implicit policy of the
    expectile critic, :math:`w(s,a) = |\tau - \mathbb 1(Q(s,a) < V(s))|\,/\,|Q(s,a) - V(s)|`, Q = min of the target
    critics; |Q − V| is floored at ``adv_floor`` (the weight is singular at Q = V);
  - ``"expectile_simple"``: weights :math:`|\tau - \mathbb 1(Q < V)|` only (the code's ``sample_implicit_policy``,
    which drops the 1/|Q − V| factor, "assuming log μ uniform");
  - ``"argmax"``: the candidate with the largest Q (the code's ``eval_actions``).

Deviations (documented): the actor is :class:`cdp.nets.mlp.MLPDenoiser` 3×256 Mish (the code's default 'mlp'
architecture is an MLP with a learned Fourier time embedding; its LN-ResNet variant is not reproduced); L_d is the
mean over action dimensions (the code sums them, a constant factor Da); learning rates are constant (the code decays
the actor's cosine-wise over 2M steps); returns are not rescaled (the code's optional ``normalize_returns``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..policy import DiffusionPolicyConfig
from .common import DiffusionActorBase, TwinQ, check_batch, mlp, mlp_actor_config, soft_update

SELECTIONS = ("expectile", "expectile_simple", "argmax")


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Mean of :math:`|\tau - \mathbb 1(u < 0)|\,u^2` over ``diff`` = u = Q − V (any shape) → scalar (IQL Eq. 5)."""
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff**2).mean()


def implicit_weights(adv: torch.Tensor, tau: float, kind: str = "expectile", adv_floor: float = 1e-6) -> torch.Tensor:
    r"""Unnormalised resampling weights of IDQL's implicit policy from advantages ``adv`` = Q − V (any shape).

    ``"expectile"``: :math:`|\tau - \mathbb 1(A < 0)| / \max(|A|, \text{adv\_floor})` (paper, expectile critic);
    ``"expectile_simple"``: :math:`|\tau - \mathbb 1(A < 0)|` (public code). Same shape as ``adv``, all > 0.

    Raises:
        ValueError: unknown ``kind`` or ``adv_floor <= 0``.
    """
    if adv_floor <= 0:
        raise ValueError(f"adv_floor must be > 0, got {adv_floor}")
    w = torch.where(adv < 0, 1.0 - tau, tau).to(adv.dtype)
    if kind == "expectile":
        return w / adv.abs().clamp_min(adv_floor)
    if kind == "expectile_simple":
        return w
    raise ValueError(f"kind must be 'expectile' or 'expectile_simple', got {kind!r}")


@dataclass
class IDQLConfig:
    """Settings of :class:`IDQL` (defaults: the public code's, see the module docstring).

    Attributes:
        hidden / n_layers: the denoiser MLP (3×256). critic_hidden / critic_layers: each Q and V MLP (2×256, ReLU).
        num_diffusion_steps: T of the ``vp`` schedule (5). expectile: τ of L_V (0.7).
        discount: γ_RL. tau: Polyak rate of the target critics.
        actor_lr / critic_lr / value_lr: Adam learning rates. grad_clip: max gradient norm of every net (None: off,
            as in IDQL). ema_decay: EMA of the actor used at evaluation (0.999).
        num_candidates: N actions sampled per state at evaluation. selection: ``"expectile"``, ``"expectile_simple"``
            or ``"argmax"``. adv_floor: floor of |Q − V| in the ``"expectile"`` weights.
        contraction: None (IDQL) or :class:`cdp.contraction.ContractionConfig` fields (CDP-IDQL).
        compile: ``torch.compile`` the actor's training pass (:class:`~cdp.policy.DiffusionPolicyConfig` ``compile``).
    Raises:
        ValueError: on any out-of-range value.
    """

    hidden: int = 256
    n_layers: int = 3
    critic_hidden: int = 256
    critic_layers: int = 2
    num_diffusion_steps: int = 5
    expectile: float = 0.7
    discount: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    grad_clip: float | None = None
    ema_decay: float = 0.999
    num_candidates: int = 64
    selection: str = "expectile"
    adv_floor: float = 1e-6
    contraction: dict[str, Any] | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not (0.0 < self.expectile < 1.0):
            raise ValueError(f"expectile must be in (0, 1), got {self.expectile}")
        if not (0 <= self.discount <= 1 and 0 < self.tau <= 1):
            raise ValueError("need 0 <= discount <= 1 and 0 < tau <= 1")
        if min(self.actor_lr, self.critic_lr, self.value_lr) <= 0:
            raise ValueError("learning rates must be > 0")
        if self.num_candidates < 1 or self.num_diffusion_steps < 1:
            raise ValueError("num_candidates and num_diffusion_steps must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.adv_floor <= 0:
            raise ValueError(f"adv_floor must be > 0, got {self.adv_floor}")

    def to_dict(self) -> dict:
        return asdict(self)

    def policy_config(self, obs_dim: int, action_dim: int) -> DiffusionPolicyConfig:
        return mlp_actor_config(obs_dim, action_dim, self.hidden, self.n_layers, self.num_diffusion_steps,
                                "ddpm", None, self.ema_decay, self.contraction,
                                self.compile)


class IDQL(DiffusionActorBase):
    """IDQL (IQL critic + diffusion behaviour policy + implicit-policy resampling); CDP-IDQL with ``contraction``.

    Protocol of :mod:`cdp.rl.common`. Critic and value nets see the actor's normalised observation and the raw action.

    Args:
        obs_dim, action_dim: Do, Da. config: :class:`IDQLConfig`. seed: seeds initialisation and :attr:`generator`.
    """

    name = "idql"

    def __init__(self, obs_dim: int, action_dim: int, config: IDQLConfig | None = None, seed: int = 0) -> None:
        self.config = c = config or IDQLConfig()
        self._init_actor(obs_dim, action_dim, c.policy_config(obs_dim, action_dim), c.ema_decay, seed)
        self.critic = TwinQ(obs_dim, action_dim, c.critic_hidden, c.critic_layers, act=nn.ReLU)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.value = mlp(obs_dim, 1, c.critic_hidden, c.critic_layers, act=nn.ReLU)
        self.actor_opt = torch.optim.Adam(self.policy.net.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=c.value_lr)

    @property
    def name_full(self) -> str:
        return "cdp_idql" if self.config.contraction is not None else "idql"

    def _obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Critic / value input: the actor's normalised observation."""
        return self.policy.obs_normalizer.normalize(obs)

    def v(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s): (B, Do) raw observations → (B,)."""
        return self.value(self._obs(obs)).squeeze(-1)

    # -------------------------------------------------------------------------------------------- losses
    def value_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_V: expectile regression of V(s) on min_j Q'_j(s, a) (no gradient into the critics)."""
        with torch.no_grad():
            q = self.critic_target.q_min(self._obs(batch["observations"]), batch["actions"])
        v = self.v(batch["observations"])
        loss = expectile_loss(q - v, self.config.expectile)
        return loss, {"value_loss": float(loss.detach()), "v_mean": float(v.detach().mean())}

    def q_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_Q: ½ Σ_i E(Q_i(s, a) − r − γ(1−d)V(s'))² (no gradient into V)."""
        c = self.config
        with torch.no_grad():
            target = batch["rewards"] + c.discount * (1 - batch["terminals"].float()) * self.v(batch["next_observations"])
        q1, q2 = self.critic(self._obs(batch["observations"]), batch["actions"])
        loss = 0.5 * (((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean())
        return loss, {"q_loss": float(loss.detach()), "q_mean": float(q1.detach().mean()),
                      "target_q_mean": float(target.mean())}

    def critic_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_V + L_Q with the current nets (diagnostics and tests; :meth:`update` steps them one after the other)."""
        lv, mv = self.value_loss(batch)
        lq, mq = self.q_loss(batch)
        loss = lv + lq
        return loss, {**mv, **mq, "critic_loss": float(loss.detach())}

    def actor_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_d (+ γ L_c) of the behaviour policy on the dataset actions. Uses :attr:`generator`."""
        loss, m = self.policy.compute_loss(batch["observations"], batch["actions"], generator=self.generator)
        m = dict(m)
        m["actor_loss"] = m.pop("loss")
        return loss, m

    # -------------------------------------------------------------------------------------------- step
    def _step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params, name: str, metrics: dict) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            metrics[f"{name}_grad_norm"] = float(nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        opt.step()

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """V step, Q step (with the new V), Polyak update of Q', actor step, EMA update. Returns metrics."""
        check_batch(batch, self.obs_dim, self.action_dim)
        self.policy.train()
        lv, metrics = self.value_loss(batch)
        self._step(lv, self.value_opt, self.value.parameters(), "value", metrics)
        lq, m = self.q_loss(batch)
        metrics.update(m)
        self._step(lq, self.critic_opt, self.critic.parameters(), "critic", metrics)
        soft_update(self.critic_target, self.critic, self.config.tau)
        la, m = self.actor_loss(batch)
        metrics.update(m)
        self._step(la, self.actor_opt, self.policy.net.parameters(), "actor", metrics)
        self.ema.update(self.policy)
        metrics["critic_loss"] = metrics["value_loss"] + metrics["q_loss"]
        metrics["loss"] = metrics["actor_loss"] + metrics["critic_loss"]
        return metrics

    # -------------------------------------------------------------------------------------------- acting
    @torch.no_grad()
    def candidate_weights(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Resampling weights of N candidates per state: obs (B, Do), actions (B, N, Da) → (B, N), unnormalised.

        Uses min_j Q'_j and V (see :func:`implicit_weights`); for ``selection="argmax"`` returns Q itself.
        """
        c = self.config
        B, n = actions.shape[:2]
        rep = obs.repeat_interleave(n, 0)
        q = self.critic_target.q_min(self._obs(rep), actions.reshape(B * n, -1)).view(B, n)
        if c.selection == "argmax":
            return q
        adv = q - self.v(obs)[:, None]
        return implicit_weights(adv, c.expectile, c.selection, c.adv_floor)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, Do) → (B, Da): N EMA-actor DDPM samples per state, one picked per ``config.selection``."""
        c = self.config
        gen = generator if generator is not None else self.generator
        B, n = obs.shape[0], c.num_candidates
        a = self.ema.model.sample(obs.repeat_interleave(n, 0), generator=gen).view(B, n, -1)
        if n == 1:
            return a[:, 0]
        w = self.candidate_weights(obs, a)
        if c.selection == "argmax":
            idx = w.argmax(1)
        else:
            idx = torch.multinomial(w / w.sum(1, keepdim=True), 1, generator=gen).squeeze(1)
        return a[torch.arange(B), idx]

    # -------------------------------------------------------------------------------------------- state
    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, "ema": self.ema.model, "critic": self.critic,
                "critic_target": self.critic_target, "value": self.value}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_opt, "critic": self.critic_opt, "value": self.value_opt}

