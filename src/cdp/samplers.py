r"""Samplers for diffusion policies: DDPM (ancestral), DDIM (η = 0, the probability-flow ODE's exponential-integrator
step) and DPM-Solver++(2M), with a diffusers-style ``set_timesteps`` / ``step`` API, plus a continuous-time RK4
integrator of the probability-flow ODE used by the diagnostics.

Every sampler works on the discrete chain of a :class:`~cdp.schedules.NoiseSchedule` (training steps k = 1..T,
fed to the network as t = k/T). ``set_timesteps(n)`` picks n of them, evenly spaced and "trailing" (the first is
always T), and each ``step`` moves from ``timesteps[i]`` to ``timesteps[i+1]`` (0 after the last, i.e. the clean
action). ``set_timesteps(timesteps=[...])`` takes any descending steps instead. Noise is injectable: pass ``noise``
to ``step`` (DDPM) and the initial sample to :func:`sample`.

diffusers correspondence (``tests/test_diffusers_parity.py``): with ``NoiseSchedule.from_diffusers(scheduler)``, cdp
step k is diffusers timestep k − 1, and each ``step`` equals the scheduler's ``step()`` on the same sample, model
output and noise for ``DDPMScheduler`` (``variance_type="fixed_small"``), ``DDIMScheduler`` (η = 0,
``set_alpha_to_one=True``; with clipping, ``use_clipped_model_output=True``, because cdp re-derives ε̂ from the
clipped x̂0) and ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, ``midpoint``,
``final_sigmas_type="zero"``). ``set_timesteps(n)`` is ``timestep_spacing="trailing"``; other spacings are
``set_timesteps(timesteps=(scheduler.timesteps + 1).tolist())``. DDIMScheduler steps to t − T // n, not to the next
chosen timestep, so with "trailing" and n not dividing T the two differ.

Sources: Ho et al. 2020 (DDPM posterior), Song et al. 2021 (DDIM), Lu et al. 2022 "DPM-Solver++" (Alg. 2, 2M),
diffusers ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` (API shape only).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from .schedules import NoiseSchedule, PREDICTION_TYPES

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
SamplerName = Literal["ddpm", "ddim", "dpmsolver++"]
SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype).to(like.device).view((-1,) + (1,) * (like.dim() - 1)) if x.dim() else x.to(like)


def split_prediction(out: torch.Tensor, a: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output into (x̂0, ε̂) at noise level (alpha, sigma).

    Args:
        out: (B, ...) network output. a: (B, ...) noisy action. alpha, sigma: scalars or (B,) tensors, sigma > 0.
        prediction: ``"epsilon"``, ``"sample"`` (x0) or ``"score"`` (∇ log p_t).
    Returns:
        (x0_hat, eps_hat), each (B, ...).
    """
    al, si = _bcast(torch.as_tensor(alpha), a), _bcast(torch.as_tensor(sigma), a)
    if prediction == "epsilon":
        eps = out
        x0 = (a - si * eps) / al
    elif prediction == "sample":
        x0 = out
        eps = (a - al * x0) / si
    elif prediction == "score":
        eps = -si * out
        x0 = (a - si * eps) / al
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
    return x0, eps


class DiffusionSampler:
    """Base class: timestep selection and output conversion; subclasses implement :meth:`step`.

    Args:
        schedule: the training noise schedule.
        prediction: what the network predicts (``"epsilon"``, ``"sample"`` or ``"score"``).
        clip_sample: if set, x̂0 is clipped to [-clip_sample, clip_sample] at each step (Diffusion Policy and
            Diffusion-QL clip normalised actions to [-1, 1]).

    Raises:
        ValueError: unknown prediction type, non-positive clip, or an invalid number of inference steps.
    """

    name = "base"

    def __init__(self, schedule: NoiseSchedule, prediction: str = "epsilon", clip_sample: float | None = None):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
        if clip_sample is not None and clip_sample <= 0:
            raise ValueError(f"clip_sample must be positive or None, got {clip_sample}")
        self.schedule = schedule
        self.prediction = prediction
        self.clip_sample = clip_sample
        self.set_timesteps(schedule.num_steps)

    def set_timesteps(self, num_inference_steps: int | None = None, timesteps: "list[int] | None" = None) -> None:
        """Choose the sampling steps: ``num_inference_steps`` of the T training steps, evenly spaced, descending,
        always starting at T (diffusers' ``timestep_spacing="trailing"``), or the given descending ``timesteps``
        (distinct integers in 1..T). Each :meth:`step` goes to the next chosen step, 0 after the last.

        A diffusers scheduler's spacing ("leading", "linspace", a ``steps_offset``) is reproduced by
        ``timesteps=(scheduler.timesteps + 1).tolist()`` (cdp step k is diffusers timestep k − 1).

        Raises:
            ValueError: neither or both given, or values out of range / not strictly descending.
        """
        T = self.schedule.num_steps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None:
            ks = torch.as_tensor(timesteps).to(torch.long).reshape(-1)
            if len(ks) == 0 or (ks < 1).any() or (ks > T).any() or (ks[1:] >= ks[:-1]).any():
                raise ValueError(f"timesteps must be strictly descending integers in 1..{T}, got {ks.tolist()}")
        else:
            if not isinstance(num_inference_steps, int) or not (1 <= num_inference_steps <= T):
                raise ValueError(f"num_inference_steps must be an integer in 1..{T} (the training steps), "
                                 f"got {num_inference_steps!r}")
            n = num_inference_steps
            ks = torch.round(torch.arange(n, 0, -1, dtype=torch.float64) * T / n).long()
        self.timesteps = ks  # (n,) descending (first is T unless given)
        self.prev_timesteps = torch.cat([ks[1:], torch.zeros(1, dtype=torch.long)])
        self._history: list[torch.Tensor] = []
        # Per-step constants as Python floats, computed once here so that step() creates no tensors for them.
        al, si = self.schedule.discrete_alpha_sigma(self.timesteps, torch.float64)
        alp, sip = self.schedule.discrete_alpha_sigma(self.prev_timesteps, torch.float64)
        self._k: list[int] = self.timesteps.tolist()
        self._kp: list[int] = self.prev_timesteps.tolist()
        self._al, self._si = al.tolist(), si.tolist()
        self._alp, self._sip = alp.tolist(), sip.tolist()
        #: λ = log(α/σ) of each timestep and of its successor (inf for k = 0)
        self._lam = torch.log(al / si).tolist()
        self._lamp = [math.inf if kp == 0 else math.log(a / s) for kp, a, s in zip(self._kp, self._alp, self._sip)]

    def t_of(self, k: int | torch.Tensor) -> float:
        """Network time input of discrete step k (k / T)."""
        return float(k) / self.schedule.num_steps

    def _x0_eps(self, out: torch.Tensor, a: torch.Tensor, k: int, i: int | None = None,
                need_eps: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x̂0, ε̂) at step k; pass the step index ``i`` to use the precomputed floats (no tensor creation).
        ``need_eps=False`` skips recomputing ε̂ after clipping (returns None for it then)."""
        if i is not None and self._k[i] == k:
            al, si = self._al[i], self._si[i]
        else:
            a_, s_ = self.schedule.discrete_alpha_sigma(torch.tensor(k), torch.float64)
            al, si = a_.item(), s_.item()
        p = self.prediction
        if p == "epsilon":
            eps, x0 = out, (a - si * out) / al
        elif p == "sample":
            x0, eps = out, (a - al * out) / si
        else:
            x0, eps = split_prediction(out, a, al, si, p)
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            eps = (a - al * x0) / si if need_eps else None
        return x0, eps

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class DDPMSampler(DiffusionSampler):
    """Ancestral sampling from the DDPM posterior q(a_{k'} | a_k, x̂0) (with k' < k, steps may be skipped).

    For k' = 0 the step returns x̂0. Otherwise, with α_{k|k'} = α_k/α_{k'} and σ²_{k|k'} = σ_k² − α²_{k|k'} σ_{k'}²:
    mean = α_{k|k'} σ_{k'}²/σ_k² · a_k + α_{k'} σ²_{k|k'}/σ_k² · x̂0, var = σ²_{k|k'} σ_{k'}² / σ_k² (Ho et al. 2020, eq. 7).
    """

    name = "ddpm"

    def step(self, model_output, i, sample, noise=None, generator=None):
        k, kp = self._k[i], self._kp[i]
        x0, _ = self._x0_eps(model_output, sample, k, i, need_eps=False)
        if kp == 0:
            return x0
        al, si, alp, sip = self._al[i], self._si[i], self._alp[i], self._sip[i]
        a_kk = al / alp
        s2_kk = si**2 - a_kk**2 * sip**2
        mean = (a_kk * sip**2 / si**2) * sample + (alp * s2_kk / si**2) * x0
        std = (s2_kk * sip**2 / si**2) ** 0.5
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device)
        return mean + std * noise


class DDIMSampler(DiffusionSampler):
    """Deterministic DDIM (η = 0): a_{k'} = α_{k'} x̂0 + σ_{k'} ε̂ — the first-order exponential integrator of the PF-ODE."""

    name = "ddim"

    def step(self, model_output, i, sample, noise=None, generator=None):
        k, kp = self._k[i], self._kp[i]
        x0, eps = self._x0_eps(model_output, sample, k, i)
        if kp == 0:
            return x0
        return self._alp[i] * x0 + self._sip[i] * eps


class DPMSolverPP2MSampler(DiffusionSampler):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022, Alg. 2).

    With λ = log(α/σ), h_i = λ_{i+1} − λ_i and r_i = h_{i−1}/h_i:
    D_i = (1 + 1/(2 r_i)) x̂0_i − 1/(2 r_i) x̂0_{i−1} (D_i = x̂0_i on the first step), and
    a_{i+1} = (σ_{i+1}/σ_i) a_i − α_{i+1} (e^{−h_i} − 1) D_i. The last step (to k = 0) returns D_i
    (the limit σ → 0), which is first order ("lower_order_final" in diffusers) when it is also the only step.
    """

    name = "dpmsolver++"

    def step(self, model_output, i, sample, noise=None, generator=None):
        if i == 0:
            self._history = []
        k, kp = self._k[i], self._kp[i]
        x0, _ = self._x0_eps(model_output, sample, k, i, need_eps=False)
        if self._history and kp != 0:
            h = self._lamp[i] - self._lam[i]
            r = (self._lam[i] - self._lam[i - 1]) / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._history[-1]
        else:
            D = x0
        self._history = [x0]
        if kp == 0:
            return D
        h = self._lamp[i] - self._lam[i]
        return (self._sip[i] / self._si[i]) * sample - self._alp[i] * math.expm1(-h) * D


def make_sampler(name: str, schedule: NoiseSchedule, prediction: str = "epsilon",
                 clip_sample: float | None = None, num_inference_steps: int | None = None) -> DiffusionSampler:
    """Build a sampler by name (``"ddpm"``, ``"ddim"``, ``"dpmsolver++"``).

    Raises:
        ValueError: unknown sampler name or invalid settings.
    """
    classes = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmsolver++": DPMSolverPP2MSampler}
    if name not in classes:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    s = classes[name](schedule, prediction, clip_sample)
    if num_inference_steps is not None:
        s.set_timesteps(num_inference_steps)
    return s


def sample(denoiser: Denoiser, sampler: DiffusionSampler, a_init: torch.Tensor, cond: torch.Tensor | None = None,
           generator: torch.Generator | None = None, noises: list[torch.Tensor] | None = None,
           return_trajectory: bool = False):
    """Run a sampler from the initial noise ``a_init`` to an action.

    Args:
        denoiser: callable ``(noisy_action (B, ...), t (B,) in [0,1], cond (B, Dc) or None) -> (B, ...)``.
        sampler: a :class:`DiffusionSampler` with its timesteps set.
        a_init: (B, ...) starting noise (standard normal for a VP schedule).
        cond: (B, Dc) condition, or None.
        generator: RNG for the DDPM noise when ``noises`` is not given.
        noises: optional list of per-step noise tensors (DDPM), for exact reproducibility.
        return_trajectory: also return the list of intermediate samples [a_T, ..., a_0].

    Returns:
        (B, ...) actions, and the trajectory if asked.
    """
    a = a_init
    traj = [a]
    B = a.shape[0]
    # all network time inputs in one tensor, created once (row i is step i's t, broadcast over the batch)
    ts = (sampler.timesteps.to(torch.float64) / sampler.schedule.num_steps).to(a.dtype).to(a.device)
    ts = ts[:, None].expand(-1, B)
    for i in range(len(ts)):
        out = denoiser(a, ts[i], cond)
        a = sampler.step(out, i, a, noise=None if noises is None else noises[i], generator=generator)
        if return_trajectory:
            traj.append(a)
    return (a, traj) if return_trajectory else a


# ------------------------------------------------------------------------------------------ continuous-time PF-ODE
def ode_drift(denoiser: Denoiser, schedule: NoiseSchedule, prediction: str = "epsilon") -> Callable:
    r"""The sampling-time PF-ODE drift :math:`F(a, t) = c_a(t) a + c_n(t) N_\theta(a, t, s)`.

    Returns a callable ``F(a (B, ...), t: float, cond) -> (B, ...)``; integrate it with ``dτ = -dt``.
    """
    def F(a: torch.Tensor, t: float, cond: torch.Tensor | None) -> torch.Tensor:
        tt = torch.full((a.shape[0],), float(t), dtype=a.dtype, device=a.device)
        ca, cn = schedule.ode_coefficients(torch.tensor(float(t), dtype=torch.float64), prediction)
        return float(ca) * a + float(cn) * denoiser(a, tt, cond)
    return F


def integrate_ode(denoiser: Denoiser, schedule: NoiseSchedule, a_init: torch.Tensor, cond: torch.Tensor | None = None,
                  prediction: str = "epsilon", t_start: float = 1.0, t_end: float = 1e-3, n_steps: int = 200,
                  return_trajectory: bool = False):
    """Integrate the PF-ODE in sampling time from diffusion time ``t_start`` down to ``t_end`` with classical RK4.

    Used as a reference solution (checked against torchdiffeq in the tests). ``t_end`` > 0 avoids the σ → 0
    singularity of ε-parametrised drifts.

    Returns:
        (B, ...) the state at ``t_end`` (and the list of states and times if ``return_trajectory``).
    """
    if not (0 < t_end < t_start <= 1):
        raise ValueError(f"need 0 < t_end < t_start <= 1, got {t_end}, {t_start}")
    F = ode_drift(denoiser, schedule, prediction)
    ts = torch.linspace(t_start, t_end, n_steps + 1, dtype=torch.float64).tolist()
    a, traj = a_init, [a_init]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t0 - t1  # positive step in sampling time
        k1 = F(a, t0, cond)
        k2 = F(a + 0.5 * dt * k1, t0 - 0.5 * dt, cond)
        k3 = F(a + 0.5 * dt * k2, t0 - 0.5 * dt, cond)
        k4 = F(a + dt * k3, t1, cond)
        a = a + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        traj.append(a)
    return (a, traj, ts) if return_trajectory else a
