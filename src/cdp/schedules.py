r"""Variance-preserving noise schedules, discrete and in continuous time, and the sampling-ODE coefficients.

Conventions (used everywhere in ``cdp``)
---------------------------------------
*Diffusion time* ``t`` runs from 0 (data) to 1 (noise). The forward (noising) process is

.. math::  a_t = \alpha_t a_0 + \sigma_t \varepsilon,\qquad \alpha_t^2 + \sigma_t^2 = 1,\qquad \varepsilon\sim\mathcal N(0, I),

with :math:`\beta(t) = -2\,\mathrm d\log\alpha_t/\mathrm dt` (Song et al., ICLR 2021, VP-SDE). A discrete schedule of
``T`` steps is the continuous one read at :math:`t_k = k/T`, :math:`k = 1..T` (``alphas_cumprod[k-1] = \alpha_{t_k}^2``),
except for the cosine schedule whose per-step betas are clipped at 0.999 exactly as DDPM-improved / diffusers'
``squaredcos_cap_v2`` do. Networks are fed ``t`` (a float in [0, 1]); a discrete step ``k`` is fed as ``k / T``.
A *tabulated* schedule (``name="tabulated"``, e.g. :meth:`NoiseSchedule.from_diffusers`) is given by its
``alphas_cumprod`` alone; its continuous time interpolates :math:`\log\bar\alpha` linearly between the grid points
``k / T`` (with :math:`\bar\alpha = 1` at t = 0), so α_t and σ_t at ``t = k / T`` are the discrete chain's.

*Sampling time* :math:`\tau = 1 - t` runs from 0 (noise) to 1 (action): it is the direction in which a policy
integrates. The probability-flow ODE written in sampling time is

.. math::  \frac{\mathrm d a}{\mathrm d\tau} = F(a,\tau) = c_a(t)\, a + c_n(t)\, N_\theta(a, t, s),

where :math:`N_\theta` is the network output. With :math:`\varepsilon_\theta \approx -\sigma_t\nabla_a\log p_t`:

================  =========================  ==========================  =====================
prediction        :math:`c_a(t)`             :math:`c_n(t)`              sign of :math:`c_n`
================  =========================  ==========================  =====================
``epsilon``       :math:`\beta/2`            :math:`-\beta/(2\sigma)`    negative
``sample`` (x0)   :math:`-\beta\alpha^2/(2\sigma^2)`   :math:`\beta\alpha/(2\sigma^2)`   positive
``score``         :math:`\beta/2`            :math:`\beta/2`             positive
================  =========================  ==========================  =====================

Derivation: in diffusion time the PF-ODE is :math:`\dot a = f a - \tfrac12 g^2\nabla\log p_t` with
:math:`f = -\beta/2`, :math:`g^2 = \beta`; reversing time flips both signs, and substituting
:math:`\nabla\log p_t = -\varepsilon/\sigma` or :math:`\varepsilon = (a - \alpha \hat a_0)/\sigma` gives the table.
The *project's* :math:`f(t), h(t)` of the paper's :math:`F = f a + h\,\varepsilon_\theta` are :math:`c_a, c_n` of the
``epsilon`` row: **h(t) < 0 in sampling time**, which is why :mod:`cdp.contraction` penalises
:math:`\lambda_{\min}` of :math:`J_\varepsilon^{sym}` (see there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine", "vp", "tabulated"]
SCHEDULE_NAMES = ("linear", "cosine", "vp", "tabulated")
PredictionType = Literal["epsilon", "sample", "score"]
PREDICTION_TYPES = ("epsilon", "sample", "score")


@dataclass(frozen=True)
class ScheduleConfig:
    """Settings of a VP noise schedule.

    Attributes:
        name: ``"linear"`` (Song et al. VP, :math:`\\beta(t)=\\beta_{min}+t(\\beta_{max}-\\beta_{min})` with
            0.1 / 20, the continuous limit of DDPM's ``linspace(1e-4, 0.02, 1000)``), ``"vp"`` (the Diffusion-QL
            schedule: same form with 0.1 / 10, whose discrete betas are
            ``1 - exp(-b_min/T - (b_max-b_min)(2k-1)/(2T^2))``; Wang et al. 2023, ``diffusion.py``), or ``"cosine"``
            (Nichol & Dhariwal 2021, offset s = 0.008, betas clipped at 0.999), or ``"tabulated"`` (the discrete
            chain given by ``alphas_cumprod``; see :meth:`NoiseSchedule.from_diffusers`).
        num_steps: T, the number of discrete diffusion steps used for training (≥ 1).
        beta_min, beta_max: override the linear/vp end points (continuous-time units).
        cosine_s: the cosine schedule's offset.
        alphas_cumprod: only for ``"tabulated"``: ᾱ_k for k = 1..T (T values, non-increasing, in (0, 1)).
    """

    name: ScheduleName = "vp"
    num_steps: int = 5
    beta_min: float | None = None
    beta_max: float | None = None
    cosine_s: float = 0.008
    alphas_cumprod: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {', '.join(map(repr, SCHEDULE_NAMES))}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        if (self.name == "tabulated") != (self.alphas_cumprod is not None):
            raise ValueError("alphas_cumprod is given exactly for the 'tabulated' schedule")
        if self.name == "tabulated":
            ac = tuple(float(x) for x in self.alphas_cumprod)
            object.__setattr__(self, "alphas_cumprod", ac)  # a JSON list → a tuple
            if len(ac) != self.num_steps:
                raise ValueError(f"alphas_cumprod has {len(ac)} values, num_steps is {self.num_steps}")
            if not all(0 < x < 1 for x in ac) or any(b > a for a, b in zip(ac, ac[1:])):
                raise ValueError("alphas_cumprod must be non-increasing and lie in (0, 1)")
            if self.beta_min is not None or self.beta_max is not None:
                raise ValueError("beta_min/beta_max do not apply to the tabulated schedule")
            return
        if self.name == "cosine" and (self.beta_min is not None or self.beta_max is not None):
            raise ValueError("beta_min/beta_max do not apply to the cosine schedule")
        bmin, bmax = self.betas_range()
        if self.name != "cosine" and not (0 < bmin <= bmax):
            raise ValueError(f"need 0 < beta_min <= beta_max, got {bmin}, {bmax}")
        if not (0 <= self.cosine_s < 1):
            raise ValueError(f"cosine_s must be in [0, 1), got {self.cosine_s}")

    def betas_range(self) -> tuple[float, float]:
        nan = (float("nan"), float("nan"))
        defaults = {"linear": (0.1, 20.0), "vp": (0.1, 10.0), "cosine": nan, "tabulated": nan}[self.name]
        return (
            defaults[0] if self.beta_min is None else float(self.beta_min),
            defaults[1] if self.beta_max is None else float(self.beta_max),
        )


class NoiseSchedule:
    """A VP schedule in continuous time with its ``T``-step discretisation.

    All methods take ``t`` as a float tensor of any shape (diffusion time in [0, 1]) and return a tensor of the
    same shape and dtype. Source: Song et al. 2021 (VP-SDE), Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (cosine),
    Wang et al. 2023 (Diffusion-QL "vp").

    Raises:
        ValueError: for invalid settings (via :class:`ScheduleConfig`).
    """

    #: the largest diffusion time of the continuous cosine schedule is clipped so that alpha > 0
    COSINE_T_MAX = 0.9946

    def __init__(self, config: ScheduleConfig | None = None, **kwargs) -> None:
        self.config = config if config is not None else ScheduleConfig(**kwargs)
        c = self.config
        self.num_steps = c.num_steps
        self.beta_min, self.beta_max = c.betas_range()
        T = c.num_steps
        k = torch.arange(1, T + 1, dtype=torch.float64)
        if c.name == "cosine":
            def abar(x: torch.Tensor) -> torch.Tensor:
                return torch.cos((x + c.cosine_s) / (1 + c.cosine_s) * math.pi / 2) ** 2
            betas = torch.clamp(1 - abar(k / T) / abar((k - 1) / T), max=0.999)
            self._alphas_cumprod = torch.cumprod(1 - betas, 0)
        elif c.name == "tabulated":
            self._alphas_cumprod = torch.tensor(c.alphas_cumprod, dtype=torch.float64)
            #: (T + 1,) log ᾱ at t = 0, 1/T, ..., 1 (the knots of the continuous-time interpolation)
            self._log_abar_knots = torch.cat([torch.zeros(1, dtype=torch.float64), self._alphas_cumprod.log()])
        else:
            self._alphas_cumprod = torch.exp(2 * self._log_alpha_linear(k / T))
        #: (T,) float64, ᾱ_k for k = 1..T
        self.alphas_cumprod = self._alphas_cumprod
        #: (T,) float64, per-step betas of the discrete chain
        self.betas = 1 - self.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        r"""The discrete chain of a diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``,
        ``DPMSolverMultistepScheduler``, or any with ``alphas_cumprod`` and ``config.num_train_timesteps``), as a
        ``"tabulated"`` schedule.

        ``alphas_cumprod`` is the scheduler's own tensor (converted to float64, so the values are equal exactly),
        whatever its ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, trained betas).

        **Timestep mapping**: cdp's discrete step ``k`` (1..T, network time input ``t = k / T``) is diffusers'
        timestep ``k - 1`` (0..T-1): ``schedule.alphas_cumprod[k - 1] == scheduler.alphas_cumprod[k - 1]`` and
        ``schedule.add_noise(a0, eps, k)`` equals ``scheduler.add_noise(a0, eps, k - 1)``. A network trained in
        diffusers on integer timesteps ``t_d`` is called from cdp as ``net(x, t_d = round(t * T) - 1, cond)``; the
        sampler timesteps of a diffusers scheduler are cdp's ``scheduler.timesteps + 1``
        (``sampler.set_timesteps(timesteps=(scheduler.timesteps + 1).tolist())``).

        The prediction type is not part of the schedule: pass ``scheduler.config.prediction_type`` (``"epsilon"``
        or ``"sample"``; cdp has no ``v_prediction``) to the regulariser and the samplers.

        Raises:
            ValueError: the scheduler has no ``alphas_cumprod`` of ``num_train_timesteps`` values, or ᾱ_T is 0
                (``rescale_betas_zero_snr``: α_T = 0 has no ε → x̂0 conversion).
        """
        ac = getattr(scheduler, "alphas_cumprod", None)
        cfg = getattr(scheduler, "config", None)
        T = getattr(cfg, "num_train_timesteps", None) if cfg is not None else None
        if ac is None or T is None:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod / config.num_train_timesteps; "
                             "expected a diffusers DDPM / DDIM / DPMSolverMultistep scheduler")
        ac = torch.as_tensor(ac).detach().cpu().to(torch.float64)
        if ac.shape != (int(T),):
            raise ValueError(f"alphas_cumprod has shape {tuple(ac.shape)}, expected ({T},)")
        if cfg.get("rescale_betas_zero_snr", False):
            raise ValueError("rescale_betas_zero_snr=True makes alpha_T = 0 (zero terminal SNR), which the epsilon "
                             "parametrisation of cdp cannot invert; use a scheduler without it")
        return cls(ScheduleConfig(name="tabulated", num_steps=int(T), alphas_cumprod=tuple(ac.tolist())))

    # ----------------------------------------------------------------------------------------------- continuous time
    def _tab_segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(j, u) with t·T = j - 1 + u, j in 1..T, u in [0, 1] (t clipped to [0, 1]): t lies on the segment ending at k = j."""
        T = self.num_steps
        x = torch.clamp(t.to(torch.float64), 0.0, 1.0) * T
        j = torch.clamp(torch.ceil(x - 1e-9), 1, T)  # k / T · T may round to k + ulp: still segment k
        return j.long(), x - (j - 1)

    def _log_alpha_tabulated(self, t: torch.Tensor) -> torch.Tensor:
        j, u = self._tab_segment(t)
        knots = self._log_abar_knots.to(t.device)
        lo, hi = knots[j - 1], knots[j]
        return (0.5 * torch.where(u >= 1, hi, lo + u * (hi - lo))).to(t.dtype)

    def _log_alpha_linear(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def _cosine_phi(self, t: torch.Tensor) -> torch.Tensor:
        """φ(t) = (t + s)/(1 + s)·π/2 of the cosine schedule, t clipped at :attr:`COSINE_T_MAX`."""
        s = self.config.cosine_s
        return (torch.clamp(t, max=self.COSINE_T_MAX) + s) / (1 + s) * math.pi / 2

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log α_t (α_t = sqrt(ᾱ)), shape of ``t``."""
        t = torch.as_tensor(t)
        if self.config.name == "cosine":
            s = self.config.cosine_s
            return torch.log(torch.cos(self._cosine_phi(t))) - math.log(math.cos(s / (1 + s) * math.pi / 2))
        if self.config.name == "tabulated":
            return self._log_alpha_tabulated(t)
        return self._log_alpha_linear(t)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α_t = sqrt(ᾱ_t), the signal scale, shape of ``t``."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t = sqrt(1 - α_t²), the noise scale, shape of ``t``."""
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR λ_t = log(α_t / σ_t) (used by DPM-Solver)."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """β(t) = -2 d log α_t / dt (continuous-time units, 1/time), shape of ``t``. For a tabulated schedule it is
        constant on each segment ((k-1)/T, k/T]: -T log(1 - β_k)."""
        t = torch.as_tensor(t)
        if self.config.name == "tabulated":
            j, _ = self._tab_segment(t)
            knots = self._log_abar_knots.to(t.device)
            return (-self.num_steps * (knots[j] - knots[j - 1])).to(t.dtype)
        if self.config.name == "cosine":
            return torch.tan(self._cosine_phi(t)) * math.pi / (1 + self.config.cosine_s)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def ode_coefficients(self, t: torch.Tensor, prediction: PredictionType = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
        r"""Coefficients :math:`(c_a, c_n)` of the sampling-time PF-ODE :math:`\mathrm da/\mathrm d\tau = c_a a + c_n N_\theta`.

        Args:
            t: diffusion time(s) in (0, 1], any shape.
            prediction: what the network outputs: ``"epsilon"``, ``"sample"`` (x0) or ``"score"``.

        Returns:
            ``(c_a, c_n)``, each the shape of ``t`` (units 1/time). For ε-prediction these are the paper's
            ``f(t)`` and ``h(t)`` in sampling time; ``h < 0``. See the module docstring for the table.

        Raises:
            ValueError: unknown prediction type.
        """
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
        t = torch.as_tensor(t)
        b, a, s = self.beta(t), self.alpha(t), self.sigma(t)
        if prediction == "epsilon":
            return b / 2, -b / (2 * s)
        if prediction == "score":
            return b / 2, b / 2
        return -b * a**2 / (2 * s**2), b * a / (2 * s**2)

    # ------------------------------------------------------------------------------------------------ discrete time
    def timesteps(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(T,) diffusion times t_k = k / T, k = 1..T."""
        return torch.arange(1, self.num_steps + 1, dtype=dtype) / self.num_steps

    def discrete_alpha_sigma(self, k: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_k, σ_k) of the discrete chain for integer steps ``k`` in 1..T (any shape); ``k = 0`` gives (1, 0)."""
        k = torch.as_tensor(k, dtype=torch.long)
        if (k < 0).any() or (k > self.num_steps).any():
            raise ValueError(f"discrete steps must lie in 0..{self.num_steps}")
        abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(k.device)[k]
        return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)

    def add_noise(self, a0: torch.Tensor, noise: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Forward process at discrete step ``k``: a_k = α_k a0 + σ_k ε.

        Args:
            a0: (B, ...) clean actions. noise: same shape. k: (B,) integer steps in 1..T.
        Returns:
            (B, ...) noisy actions.
        """
        if a0.shape != noise.shape:
            raise ValueError(f"a0 {tuple(a0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        al, si = self.discrete_alpha_sigma(k, a0.dtype)
        shape = (-1,) + (1,) * (a0.dim() - 1)
        return al.to(a0.device).view(shape) * a0 + si.to(a0.device).view(shape) * noise

    def __repr__(self) -> str:
        c = self.config
        if c.name == "tabulated":
            return f"NoiseSchedule(tabulated, num_steps={c.num_steps}, alphas_cumprod[-1]={c.alphas_cumprod[-1]:.6g})"
        return f"NoiseSchedule({c})"
