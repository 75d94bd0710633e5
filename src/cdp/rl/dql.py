r"""Diffusion-QL (Wang, Hunt, Zhou — "Diffusion Policies as an Expressive Policy Class for Offline RL", ICLR 2023),
and CDP on top of it.

Components (facts from the paper and its public code, ``Zhendong-Wang/Diffusion-Policies-for-Offline-RL``:
``agents/ql_diffusion.py``, ``agents/diffusion.py``, ``main.py``; code written here):

* **Actor** π_θ(a | s): a conditional diffusion policy (:class:`cdp.policy.DiffusionPolicy`), MLP denoiser 3×256
  Mish, the ``vp`` noise schedule with **T = 5** steps (discrete betas
  :math:`\beta_k = 1 - \exp(-\beta_{min}/T - (\beta_{max}-\beta_{min})(2k-1)/(2T^2))`, 0.1 / 10), ε-prediction,
  actions min-max normalised to [-1, 1], x̂0 clipped to [-1, 1] at every reverse step.
* **Sampling** is the DDPM ancestral chain over all T steps (Ho et al. 2020, Eqs. 6–7): from
  :math:`a_T \sim \mathcal N(0, I)`,

  .. math:: a_{k-1} = \tilde\mu_k(a_k, \hat a_0) + \tilde\sigma_k z_k, \qquad
            \hat a_0 = \operatorname{clip}\big((a_k - \sigma_k\varepsilon_\theta(a_k, k, s))/\alpha_k\big),\quad
            z_k\sim\mathcal N(0, I),\ z_1 = 0,

  with the posterior mean :math:`\tilde\mu_k = \frac{\sqrt{\bar\alpha_{k-1}}\beta_k}{1-\bar\alpha_k}\hat a_0
  + \frac{\sqrt{1-\beta_k}(1-\bar\alpha_{k-1})}{1-\bar\alpha_k} a_k` and variance
  :math:`\tilde\sigma_k^2 = \beta_k(1-\bar\alpha_{k-1})/(1-\bar\alpha_k)` (:class:`cdp.samplers.DDPMSampler`).
* **Actor loss** (paper §3, code ``Diffusion_QL.train``):

  .. math:: L_\pi(\theta) = L_d(\theta) + \eta\,\Big(-\frac{\mathbb E_s\,Q_{\phi_i}(s, a_0^\theta)}
            {\operatorname{sg}\,\mathbb E_s\,|Q_{\phi_j}(s, a_0^\theta)|}\Big)\;[+\;\gamma L_c],
            \qquad a_0^\theta \sim \pi_\theta(\cdot\mid s)

  where :math:`a_0^\theta` is drawn by running the **whole reverse chain with gradients** (back-propagation through
  all T denoiser calls — no action approximation; that is what EDP changes), (i, j) = (1, 2) or (2, 1) with
  probability ½ each (``q_alternate``; the code's coin flip), and :math:`L_d` is the ε-prediction loss on the dataset
  actions. **CDP-DQL** adds the policy's contraction regulariser γ L_c (:class:`cdp.contraction.ContractionRegularizer`)
  exactly as :class:`cdp.rl.edp.EDP` does (``contraction=None``: plain Diffusion-QL).
* **Critics**: twin Q with Polyak targets (τ = 0.005), clipped double-Q TD with a' from the **EMA actor**:

  .. math:: y = r + \gamma(1-d)\min_{j} Q_{\phi'_j}(s', a'),\qquad a' \sim \pi_{\bar\theta}(\cdot\mid s'),

  and with ``max_q_backup`` (AntMaze in the paper) the code's variant
  :math:`y = r + \gamma(1-d)\min_j \max_{m\le M} Q_{\phi'_j}(s', a'_m)`, M = ``backup_samples`` (10).
* **Evaluation**: N = 50 candidate actions per state from the actor, one drawn from softmax(min(Q'_1, Q'_2))
  (``sample_action`` in the code; ``selection="argmax"`` takes the best).

Deviations (documented, not hidden): evaluation and TD targets use this project's EMA actor (warm-up
(1+k)/(10+k) capped at 0.995, updated every step) — the code updates its EMA every 5 steps from step 1000 and
evaluates the *online* actor; the learning rate is constant (the code's ``--lr_decay`` cosine schedule is not
implemented); the denoiser is :class:`cdp.nets.mlp.MLPDenoiser` fed t = k/T (the code embeds the integer step).

Per-dataset settings of the paper's D4RL runs are in :data:`DQL_HPARAMS` (use :func:`dql_overrides`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..policy import DiffusionPolicyConfig
from ..samplers import sample as run_sampler
from .edp import EDP, EDPConfig

#: Diffusion-QL's per-dataset hyper-parameters, copied as facts from the ``hyperparameters`` dict in ``main.py`` of
#: the public code (Zhendong-Wang/Diffusion-Policies-for-Offline-RL). Keys are D4RL names without the version
#: suffix (``-v2`` locomotion/kitchen, ``-v0`` AntMaze, ``-v1`` Adroit). Fields: ``lr`` (actor lr; the code's critic
#: always uses 3e-4), ``eta`` (η), ``max_q_backup``, ``grad_clip`` (the code's ``gn``, max grad norm of actor and
#: critic), ``num_epochs`` (× 1000 gradient steps, batch 256), ``reward_tune`` (``"cql_antmaze"``: r − 1;
#: ``"normalize"``: reward standardisation; not applied by this module) and ``top_k`` (the code's offline model
#: selection by the k-th lowest BC loss; not used here).
DQL_HPARAMS: dict[str, dict[str, Any]] = {
    "halfcheetah-medium":        {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 9.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 1},
    "hopper-medium":             {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 9.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 2},
    "walker2d-medium":           {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 1.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 1},
    "halfcheetah-medium-replay": {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 2.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 0},
    "hopper-medium-replay":      {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 4.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 2},
    "walker2d-medium-replay":    {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 4.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 1},
    "halfcheetah-medium-expert": {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 7.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 0},
    "hopper-medium-expert":      {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 5.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 2},
    "walker2d-medium-expert":    {"lr": 3e-4, "eta": 1.0,   "max_q_backup": False, "grad_clip": 5.0,  "num_epochs": 2000, "reward_tune": "no",          "top_k": 1},
    "antmaze-umaze":             {"lr": 3e-4, "eta": 0.5,   "max_q_backup": False, "grad_clip": 2.0,  "num_epochs": 1000, "reward_tune": "cql_antmaze", "top_k": 2},
    "antmaze-umaze-diverse":     {"lr": 3e-4, "eta": 2.0,   "max_q_backup": True,  "grad_clip": 3.0,  "num_epochs": 1000, "reward_tune": "cql_antmaze", "top_k": 2},
    "antmaze-medium-play":       {"lr": 1e-3, "eta": 2.0,   "max_q_backup": True,  "grad_clip": 2.0,  "num_epochs": 1000, "reward_tune": "cql_antmaze", "top_k": 1},
    "antmaze-medium-diverse":    {"lr": 3e-4, "eta": 3.0,   "max_q_backup": True,  "grad_clip": 1.0,  "num_epochs": 1000, "reward_tune": "cql_antmaze", "top_k": 1},
    "antmaze-large-play":        {"lr": 3e-4, "eta": 4.5,   "max_q_backup": True,  "grad_clip": 10.0, "num_epochs": 1000, "reward_tune": "cql_antmaze", "top_k": 2},
    "antmaze-large-diverse":     {"lr": 3e-4, "eta": 3.5,   "max_q_backup": True,  "grad_clip": 7.0,  "num_epochs": 1000, "reward_tune": "cql_antmaze", "top_k": 1},
    "pen-human":                 {"lr": 3e-5, "eta": 0.15,  "max_q_backup": False, "grad_clip": 7.0,  "num_epochs": 1000, "reward_tune": "normalize",   "top_k": 2},
    "pen-cloned":                {"lr": 3e-5, "eta": 0.1,   "max_q_backup": False, "grad_clip": 8.0,  "num_epochs": 1000, "reward_tune": "normalize",   "top_k": 2},
    "kitchen-complete":          {"lr": 3e-4, "eta": 0.005, "max_q_backup": False, "grad_clip": 9.0,  "num_epochs": 250,  "reward_tune": "no",          "top_k": 2},
    "kitchen-partial":           {"lr": 3e-4, "eta": 0.005, "max_q_backup": False, "grad_clip": 10.0, "num_epochs": 1000, "reward_tune": "no",          "top_k": 2},
    "kitchen-mixed":             {"lr": 3e-4, "eta": 0.005, "max_q_backup": False, "grad_clip": 10.0, "num_epochs": 1000, "reward_tune": "no",          "top_k": 0},
}


def dql_overrides(dataset: str) -> dict[str, Any]:
    """:class:`DQLConfig` overrides (``actor_lr``, ``eta``, ``max_q_backup``, ``grad_clip``) for a D4RL dataset name.

    Args:
        dataset: e.g. ``"hopper-medium-replay"`` or ``"hopper-medium-replay-v2"`` (a ``-vN`` suffix is dropped).
    Raises:
        ValueError: the dataset is not in :data:`DQL_HPARAMS`.
    """
    name = dataset.lower()
    parts = name.rsplit("-v", 1)
    if len(parts) == 2 and parts[1].isdigit():
        name = parts[0]
    if name not in DQL_HPARAMS:
        raise ValueError(f"no Diffusion-QL hyper-parameters for {dataset!r}; known: {sorted(DQL_HPARAMS)}")
    h = DQL_HPARAMS[name]
    return {"actor_lr": h["lr"], "eta": h["eta"], "max_q_backup": h["max_q_backup"], "grad_clip": h["grad_clip"]}


@dataclass
class DQLConfig(EDPConfig):
    """Settings of :class:`DQL` (the fields of :class:`cdp.rl.edp.EDPConfig`, Diffusion-QL's defaults).

    Attributes (besides EDPConfig's):
        num_diffusion_steps: T = 5 (Diffusion-QL). num_inference_steps / target_inference_steps: DDPM steps at
            evaluation / for the TD targets; None (default) = all T, as in Diffusion-QL.
        num_candidates: N = 50 at evaluation (``sample_action``). backup_samples: M of ``max_q_backup`` (10).
        q_alternate: the code's fair coin choosing which critic is maximised and which normalises (else Q_1 / |Q_2|).
    Raises:
        ValueError: on any out-of-range value (see EDPConfig) or ``backup_samples < 1``.
    """

    num_diffusion_steps: int = 5
    num_inference_steps: int | None = None  # type: ignore[assignment]
    target_inference_steps: int | None = None  # type: ignore[assignment]
    num_candidates: int = 50
    backup_samples: int = 10
    q_alternate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_diffusion_steps, int) or self.num_diffusion_steps < 1:
            raise ValueError(f"num_diffusion_steps must be a positive integer, got {self.num_diffusion_steps!r}")
        if self.num_inference_steps is None:
            self.num_inference_steps = self.num_diffusion_steps
        if self.target_inference_steps is None:
            self.target_inference_steps = self.num_diffusion_steps
        if self.backup_samples < 1:
            raise ValueError(f"backup_samples must be >= 1, got {self.backup_samples}")
        super().__post_init__()

    def policy_config(self, obs_dim: int, action_dim: int) -> DiffusionPolicyConfig:
        """EDP's policy settings with the DDPM sampler (Diffusion-QL samples by the ancestral chain)."""
        return dataclasses.replace(super().policy_config(obs_dim, action_dim), sampler="ddpm")


class DQL(EDP):
    """Diffusion-QL; CDP-DQL when ``config.contraction`` is set. Same protocol and state as :class:`EDP`.

    Args:
        obs_dim, action_dim: Do, Da. config: :class:`DQLConfig`. seed: seeds initialisation and :attr:`generator`.
    """

    name = "dql"

    def __init__(self, obs_dim: int, action_dim: int, config: DQLConfig | None = None, seed: int = 0) -> None:
        super().__init__(obs_dim, action_dim, config or DQLConfig(), seed)

    @property
    def name_full(self) -> str:
        return "cdp_dql" if self.config.contraction is not None else "dql"

    # -------------------------------------------------------------------------------------------- sampling
    def sample_chain(self, cond: torch.Tensor, noise: torch.Tensor | None = None,
                     noises: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The full T-step DDPM reverse chain of the *online* actor, differentiable w.r.t. its parameters.

        Args:
            cond: (B, Do) normalised observations (``policy.condition(obs)``).
            noise: (B, Da) a_T (default: drawn from :attr:`generator`).
            noises: T tensors (B, Da), the per-step z_k (the last is unused: the final step returns x̂0); default:
                drawn from :attr:`generator` inside the sampler.
        Returns:
            (B, Da) normalised actions a_0 in [-1, 1], with a graph through every denoiser call.
        """
        p = self.policy
        if noise is None:
            noise = torch.randn((cond.shape[0], self.action_dim), generator=self.generator, dtype=cond.dtype,
                                device=self.generator.device).to(cond.device)
        a = run_sampler(p.net, p.get_sampler("ddpm", None), noise, cond, generator=self.generator, noises=noises)
        return a.clamp(-1.0, 1.0)

    # -------------------------------------------------------------------------------------------- losses
    def critic_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ_i E(Q_i(s, a) − y)², y from the EMA actor's DDPM samples (see the module docstring)."""
        c = self.config
        if not c.max_q_backup:
            return super().critic_loss(batch)
        B, M = batch["observations"].shape[0], c.backup_samples
        with torch.no_grad():
            nobs, na = self._sample(self.ema.model, batch["next_observations"], M, c.target_inference_steps)
            tq1, tq2 = self.critic_target(self._obs(nobs), na)
            q_next = torch.minimum(tq1.view(B, M).max(1).values, tq2.view(B, M).max(1).values)
            target = batch["rewards"] + c.discount * (1 - batch["terminals"].float()) * q_next
        q1, q2 = self.critic(self._obs(batch["observations"]), batch["actions"])
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        return loss, {"critic_loss": float(loss.detach()), "q_mean": float(q1.detach().mean()),
                      "target_q_mean": float(target.mean())}

    def q_term(self, cond: torch.Tensor) -> torch.Tensor:
        """−E Q_i(s, a_0^θ) / sg E|Q_j(s, a_0^θ)| with a_0^θ from :meth:`sample_chain` (scalar, differentiable).

        Draws a_T, the chain's noise and (``q_alternate``) the critic coin from :attr:`generator`, in that order.
        """
        a = self.sample_chain(cond)
        q1, q2 = self.critic(cond, self.policy.action_normalizer.unnormalize(a))
        if self.config.q_alternate and float(torch.rand((), generator=self.generator, device=self.generator.device)) < 0.5:
            q1, q2 = q2, q1
        return -q1.mean() / q2.abs().mean().detach()

    def actor_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_d + η·(−Q/|Q|) through the full reverse chain (+ γ L_c). Uses :attr:`generator`."""
        d = self.diffusion_terms(batch)
        return self._finish_actor_loss(d, self.q_term(d["cond"]))
