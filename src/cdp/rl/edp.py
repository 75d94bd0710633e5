r"""Efficient Diffusion Policies (EDP; Kang, Ma, Du, Pang, Yan — NeurIPS 2023), TD3-style, and CDP on top of it.

Components (facts from the EDP paper and the public Diffusion-QL / EDP code; code written here):

* **Actor** π_θ(a | s): a conditional diffusion policy (:class:`cdp.policy.DiffusionPolicy`, MLP denoiser 3×256
  Mish, the Diffusion-QL ``vp`` noise schedule with T steps, ε-prediction, actions min-max normalised to [-1, 1]).
* **Critics**: twin Q_{φ1}, Q_{φ2}(s, a) with Polyak target copies φ'_i (τ = 0.005), trained by clipped double-Q
  TD learning,

  .. math:: L_Q = \sum_{i=1,2} \mathbb E\,\big(Q_{\phi_i}(s,a) - r - \gamma(1-d)\min_j Q_{\phi'_j}(s', a')\big)^2,
            \qquad a' \sim \pi_{\bar\theta}(\cdot\mid s')

  with a' drawn by DPM-Solver++ (``target_inference_steps``) from the EMA actor θ̄ (``max_q_backup``: the max over N such samples, as
  Diffusion-QL does on AntMaze).
* **Action approximation** (EDP Eq. 9): instead of back-propagating through the whole reverse chain, corrupt a
  dataset action, a_k = α_k a_0 + σ_k ε with k ~ U{1..T}, and use the network's one-step reconstruction

  .. math:: \hat a_0 = (a_k - \sigma_k\,\varepsilon_\theta(a_k, k, s)) / \alpha_k   \quad(\text{clipped to } [-1, 1])

  in the policy-improvement term. The *same* forward pass gives the diffusion loss
  :math:`L_d = \mathbb E\,\|\varepsilon - \varepsilon_\theta(a_k,k,s)\|^2`.
* **Actor loss** (TD3 / Diffusion-QL form, Q normalised by the batch's mean |Q|):

  .. math:: L_\pi = L_d + \eta\,\Big(-\frac{\mathbb E\,Q_{\phi_1}(s,\hat a_0)}{\operatorname{sg}\,\mathbb E\,|Q_{\phi_2}(s,\hat a_0)|}\Big)
            \;[+\;\gamma L_c]

  where :math:`\gamma L_c` is the contraction regulariser of the policy (:class:`cdp.contraction.ContractionRegularizer`,
  γ = ``contraction["weight"]``, paper 0.1) — **CDP = EDP + γ L_c**; ``contraction=None`` is plain EDP.
* **Evaluation**: DPM-Solver++(2M) with ``num_inference_steps`` steps from the EMA actor; N candidate actions per
  state, then a draw from softmax(min(Q'_1, Q'_2)) (``selection="softmax"``, the default, Diffusion-QL's
  ``sample_action``) or the argmax (``"argmax"``). With an untrained critic (flat Q) softmax is a uniform pick among
  the candidates, whereas argmax picks by critic noise.

Defaults follow Diffusion-QL/EDP on Gym-MuJoCo where they apply (lr 3e-4, γ = 0.99, τ = 0.005, EMA 0.995,
batch 256, η = 1, grad-norm clipping); T = 100 here (EDP trains with large T — action approximation makes the
training cost independent of T — and samples with ~15 DPM-Solver steps).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..policy import DiffusionPolicy, DiffusionPolicyConfig
from .common import DiffusionActorBase, TwinQ, check_batch, mlp_actor_config, soft_update

SELECTIONS = ("argmax", "softmax")


def select_candidates(q: torch.Tensor, selection: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Index of the chosen candidate per state from their scores ``q`` (B, N) → (B,) long.

    ``"argmax"``: the best; ``"softmax"``: a draw from softmax(q) (Diffusion-QL's ``sample_action``).

    Raises:
        ValueError: unknown ``selection``.
    """
    if selection == "argmax":
        return q.argmax(1)
    if selection == "softmax":
        return torch.multinomial(F.softmax(q, 1), 1, generator=generator).squeeze(1)
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


@dataclass
class EDPConfig:
    """Settings of :class:`EDP`.

    Attributes:
        hidden / n_layers: width and depth of the denoiser and of each critic (3×256 in Diffusion-QL/EDP).
        num_diffusion_steps: T of the ``vp`` schedule. num_inference_steps: DPM-Solver++ steps at evaluation and
            for the TD targets (≤ T).
        eta: η, the weight of the normalised Q term. discount: γ_RL. tau: Polyak rate of the target critics.
        actor_lr / critic_lr: Adam learning rates. grad_clip: max gradient norm of actor and critics (None: off).
        ema_decay: EMA of the actor used for targets and evaluation.
        num_candidates: N actions sampled per state at evaluation (and for ``max_q_backup``).
        selection: ``"argmax"`` or ``"softmax"`` over the candidates' Q.
        max_q_backup: TD target max over N next actions of min(Q'_1, Q'_2) (AntMaze in Diffusion-QL).
        contraction: None (EDP) or :class:`cdp.contraction.ContractionConfig` fields (CDP).
        compile: ``torch.compile`` the actor's training pass (:class:`~cdp.policy.DiffusionPolicyConfig` ``compile``).
    """

    hidden: int = 256
    n_layers: int = 3
    num_diffusion_steps: int = 100
    num_inference_steps: int = 15
    target_inference_steps: int = 3
    eta: float = 1.0
    discount: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    grad_clip: float | None = 5.0
    ema_decay: float = 0.995
    num_candidates: int = 10
    selection: str = "softmax"
    max_q_backup: bool = False
    contraction: dict[str, Any] | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not (1 <= self.num_inference_steps <= self.num_diffusion_steps):
            raise ValueError(f"num_inference_steps must be in 1..{self.num_diffusion_steps}, got {self.num_inference_steps}")
        if not (1 <= self.target_inference_steps <= self.num_diffusion_steps):
            raise ValueError(f"target_inference_steps must be in 1..{self.num_diffusion_steps}")
        if not (0 <= self.discount <= 1 and 0 < self.tau <= 1 and self.eta >= 0):
            raise ValueError("need 0 <= discount <= 1, 0 < tau <= 1 and eta >= 0")
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")

    def to_dict(self) -> dict:
        return asdict(self)

    def policy_config(self, obs_dim: int, action_dim: int) -> DiffusionPolicyConfig:
        return mlp_actor_config(obs_dim, action_dim, self.hidden, self.n_layers, self.num_diffusion_steps,
                                "dpmsolver++", self.num_inference_steps, self.ema_decay, self.contraction,
                                self.compile)


class EDP(DiffusionActorBase):
    """EDP (TD3-style policy improvement with action approximation); CDP when ``config.contraction`` is set.

    Args:
        obs_dim, action_dim: Do, Da. config: :class:`EDPConfig`. seed: seeds initialisation and :attr:`generator`.
    """

    name = "edp"

    def __init__(self, obs_dim: int, action_dim: int, config: EDPConfig | None = None, seed: int = 0) -> None:
        self.config = c = config or EDPConfig()
        self._init_actor(obs_dim, action_dim, c.policy_config(obs_dim, action_dim), c.ema_decay, seed)
        self.critic = TwinQ(obs_dim, action_dim, c.hidden, c.n_layers)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.policy.net.parameters(), lr=c.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr)

    @property
    def name_full(self) -> str:
        return "cdp" if self.config.contraction is not None else "edp"

    # -------------------------------------------------------------------------------------------- pieces
    def _obs(self, obs: torch.Tensor) -> torch.Tensor:
        """Critic input: the actor's normalised observation."""
        return self.policy.obs_normalizer.normalize(obs)

    @torch.no_grad()
    def _sample(self, policy: DiffusionPolicy, obs: torch.Tensor, n: int, steps: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """n DPM-Solver++ samples per state → (obs repeated (B·n, Do), actions (B·n, Da)), state-major order."""
        rep = obs.repeat_interleave(n, 0)
        return rep, policy.sample(rep, generator=self.generator, num_inference_steps=steps)

    def critic_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        B = batch["observations"].shape[0]
        with torch.no_grad():
            n = c.num_candidates if c.max_q_backup else 1
            nobs, na = self._sample(self.ema.model, batch["next_observations"], n, c.target_inference_steps)
            q_next = self.critic_target.q_min(self._obs(nobs), na).view(B, n).max(1).values
            target = batch["rewards"] + c.discount * (1 - batch["terminals"].float()) * q_next
        q1, q2 = self.critic(self._obs(batch["observations"]), batch["actions"])
        loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        return loss, {"critic_loss": float(loss.detach()), "q_mean": float(q1.detach().mean()),
                      "target_q_mean": float(target.mean())}

    def diffusion_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The behaviour-cloning half of the actor loss, shared by EDP, CDP and Diffusion-QL.

        Draws k ~ U{1..T} and ε ~ N(0, I) from :attr:`generator` (in that order), forms a_k = α_k a_0 + σ_k ε from the
        normalised dataset actions and runs the network once (+ γ L_c when the policy has a contraction regulariser,
        sharing that forward pass). Returns a dict with ``cond`` (B, Do), ``a_k``, ``eps``, ``eps_hat`` (B, Da),
        ``alpha``, ``sigma`` (B, 1), ``loss_d`` (scalar L_d), ``loss_c`` (scalar γ L_c or None), ``metrics_c``.
        """
        d = self.policy.loss_terms(batch["observations"], batch["actions"], generator=self.generator)
        return {"cond": d["cond"], "a_k": d["a_t"], "eps": d["noise"], "eps_hat": d["output"], "alpha": d["alpha"],
                "sigma": d["sigma"], "loss_d": d["loss_d"], "loss_c": d["loss_c"], "metrics_c": d["metrics_c"]}

    def _finish_actor_loss(self, d: dict[str, Any], loss_q: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L_d + η·loss_q (+ γ L_c) and the metrics, from :meth:`diffusion_terms`' output."""
        loss = d["loss_d"] + self.config.eta * loss_q
        metrics = {"loss_d": float(d["loss_d"].detach()), "loss_q": float(loss_q.detach())}
        if d["loss_c"] is not None:
            loss = loss + d["loss_c"]
        metrics.update({f"contraction/{key}": v for key, v in d["metrics_c"].items()})
        metrics["actor_loss"] = float(loss.detach())
        return loss, metrics

    def actor_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_d + η·(−Q/|Q|) on the action approximation (+ γ L_c). Uses :attr:`generator`."""
        p = self.policy
        d = self.diffusion_terms(batch)
        cond, a_k, al, si = d["cond"], d["a_k"], d["alpha"], d["sigma"]
        a0_hat = ((a_k - si * d["eps_hat"]) / al).clamp(-1.0, 1.0)  # action approximation
        q1, q2 = self.critic(cond, p.action_normalizer.unnormalize(a0_hat))
        loss_q = -q1.mean() / q2.abs().mean().detach()
        return self._finish_actor_loss(d, loss_q)

    # -------------------------------------------------------------------------------------------- step
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One critic step, one actor step, Polyak update of the targets, EMA update. Returns metrics."""
        check_batch(batch, self.obs_dim, self.action_dim)
        c = self.config
        self.policy.train()
        lq, metrics = self.critic_loss(batch)
        self.critic_opt.zero_grad(set_to_none=True)
        lq.backward()
        if c.grad_clip is not None:
            metrics["critic_grad_norm"] = float(nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip))
        self.critic_opt.step()

        la, m = self.actor_loss(batch)
        metrics.update(m)
        self.actor_opt.zero_grad(set_to_none=True)
        la.backward()
        if c.grad_clip is not None:
            metrics["actor_grad_norm"] = float(nn.utils.clip_grad_norm_(self.policy.net.parameters(), c.grad_clip))
        self.actor_opt.step()
        soft_update(self.critic_target, self.critic, c.tau)
        self.ema.update(self.policy)
        metrics["loss"] = metrics["actor_loss"] + metrics["critic_loss"]
        return metrics

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, Do) → (B, Da): N EMA-actor samples per state, selected by the target critics' min Q."""
        c = self.config
        gen = generator if generator is not None else self.generator
        B, n = obs.shape[0], c.num_candidates
        rep = obs.repeat_interleave(n, 0)
        a = self.ema.model.sample(rep, generator=gen)
        if n == 1:
            return a
        q = self.critic_target.q_min(self._obs(rep), a).view(B, n)
        return a.view(B, n, -1)[torch.arange(B), select_candidates(q, c.selection, gen)]

    # -------------------------------------------------------------------------------------------- state
    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, "ema": self.ema.model, "critic": self.critic, "critic_target": self.critic_target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_opt, "critic": self.critic_opt}

