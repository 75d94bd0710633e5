r"""Contraction diagnostics of a trained :class:`~cdp.policy.DiffusionPolicy`.

* :func:`lambda_along_trajectory` — per sampling step, :math:`\lambda_{\max}(\hat J)` (normalised, sign-consistent; < 0
  means contracting) and :math:`\lambda_{\max}(J_F^{sym}) = |c_n|\,\lambda_{\max}(\hat J)` (units 1/time) at the
  points a DDIM trajectory visits.
* :func:`divergence_ratio` — ‖δa_final‖ / ‖δa_init‖ of two DDIM trajectories started ``eps`` apart, beside the
  Corollary 3.1.1 bound :math:`\exp\sum_k \lambda_{\max}(J_F^{sym}(t_k))\,\Delta\tau_k` evaluated on the reference
  trajectory (the bound is for the exact ODE flow; DDIM is its first-order exponential integrator).
* :func:`action_variance` — trace of the covariance of actions sampled at one state across sampling seeds.
* :func:`off_support_fraction` — fraction of samples whose nearest data point is farther than a threshold (by
  default the ``quantile`` of the data's own nearest-neighbour distances).

All functions work in the policy's normalised action space unless stated and use exact Jacobians
(:func:`cdp.contraction.symmetric_jacobian_eigvals`), so they are meant for small action dimensions.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .contraction import jacobian_fast, sign_and_ratio, symmetric_jacobian_eigvals
from .samplers import make_sampler


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal draws from ``generator`` (on its device), moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev).to(device)


def _cond_repeat(policy, obs: torch.Tensor, n: int) -> torch.Tensor:
    cond = policy.condition(obs)
    if cond.shape[0] == 1 and n > 1:
        cond = cond.expand(n, -1).contiguous()
    return cond


@torch.no_grad()
def _ddim_traj(policy, cond: torch.Tensor, a_init: torch.Tensor):
    s = make_sampler("ddim", policy.schedule, policy.config.prediction, policy.config.clip_sample)
    a, traj = a_init, []
    B = a.shape[0]
    for i, k in enumerate(s.timesteps.tolist()):
        traj.append((a, k))
        t = torch.full((B,), s.t_of(k), dtype=a.dtype)
        a = s.step(policy.net(a, t, cond), i, a)
    return a, traj, s


def lambda_along_trajectory(policy, obs: torch.Tensor, n_samples: int = 64,
                            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    r"""λ statistics at the points of DDIM sampling trajectories.

    Args:
        policy: a DiffusionPolicy. obs: (1, Do) / (1, To, Do) (repeated) or (n_samples, ...).
        n_samples: trajectories.
    Returns:
        dict with ``t`` (S,) diffusion times of the S steps (high noise first), ``lambda_hat`` (S, n) λ_max(Ĵ),
        ``lambda_F`` (S, n) λ_max(J_F^sym) in 1/time, ``dtau`` (S,) step lengths in sampling time.
    """
    cond = _cond_repeat(policy, obs, n_samples)
    a0 = _randn((cond.shape[0],) + policy.action_shape, generator, cond.device)
    return lambda_on_trajectory(policy, cond, a0, include_final=True)


def lambda_on_trajectory(policy, cond: torch.Tensor, a_init: torch.Tensor, include_final: bool = True
                         ) -> dict[str, torch.Tensor]:
    """As :func:`lambda_along_trajectory` from a normalised cond (n, Dc) and initial noise (n, ...).

    ``include_final=False`` drops the last step (to k = 0, x̂0 itself), which the ODE bound does not cover.
    """
    _, traj, s = _ddim_traj(policy, cond, a_init)
    pred = policy.config.prediction
    T = policy.schedule.num_steps
    n = a_init.shape[0]
    ts, lam_hat, lam_F, dtau = [], [], [], []
    for (a, k), kp in zip(traj, s.prev_timesteps.tolist()):
        if kp == 0 and not include_final:
            break
        t = torch.full((n,), k / T, dtype=a.dtype)
        sgn, r = sign_and_ratio(policy.schedule, t.double(), pred)
        ev = symmetric_jacobian_eigvals(policy.net, a, t, cond).detach().double()
        lh = r + (ev[:, -1] if sgn > 0 else -ev[:, 0])
        _, cn = policy.schedule.ode_coefficients(t.double(), pred)
        ts.append(k / T)
        lam_hat.append(lh)
        lam_F.append(cn.abs() * lh)
        dtau.append((k - kp) / T)
    if not ts:
        z = torch.zeros(0, n, dtype=torch.float64)
        return {"t": torch.zeros(0), "lambda_hat": z, "lambda_F": z, "dtau": torch.zeros(0, dtype=torch.float64)}
    return {"t": torch.tensor(ts), "lambda_hat": torch.stack(lam_hat), "lambda_F": torch.stack(lam_F),
            "dtau": torch.tensor(dtau, dtype=torch.float64)}


def divergence_ratio(policy, obs: torch.Tensor, n_pairs: int = 64, eps: float = 1e-3,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Divergence of neighbouring DDIM flows and the Corollary 3.1.1 bound.

    Args:
        obs: (1, ...) (repeated) or (n_pairs, ...). eps: initial separation (normalised units).
    Returns:
        dict with ``ratio`` (n,) = ‖δa_final‖/‖δa_init‖ at the action, ``ratio_t1`` (n,) the same at the last noise
        level t_1 (before the final x̂0 step), and ``bound`` (n,) = exp(Σ_k λ_max(J_F^sym(t_k)) Δτ_k) along the
        reference trajectory up to t_1 (a left Riemann sum). Compare ``bound`` with ``ratio_t1``: the bound is for the
        exact ODE and does not cover the last x̂0 map, which may expand or contract.
    """
    cond = _cond_repeat(policy, obs, n_pairs)
    n = cond.shape[0]
    a0 = _randn((n,) + policy.action_shape, generator, cond.device)
    d = _randn(a0.shape, generator, cond.device)
    d = eps * d / d.flatten(1).norm(dim=1).view((-1,) + (1,) * (d.dim() - 1))
    fa, ta, _ = _ddim_traj(policy, cond, a0)
    fb, tb, _ = _ddim_traj(policy, cond, a0 + d)
    ratio = (fa - fb).flatten(1).norm(dim=1) / eps
    ratio_t1 = (ta[-1][0] - tb[-1][0]).flatten(1).norm(dim=1) / eps  # state entering the final x̂0 step
    lam = lambda_on_trajectory(policy, cond, a0, include_final=False)
    bound = torch.exp((lam["lambda_F"] * lam["dtau"][:, None]).sum(0))
    return {"ratio": ratio.double(), "ratio_t1": ratio_t1.double(), "bound": bound}


@torch.no_grad()
def action_variance(policy, obs: torch.Tensor, n_samples: int = 256, generator: torch.Generator | None = None) -> float:
    """Trace of the covariance of ``n_samples`` unnormalised actions sampled at one observation ``obs`` (1, ...)."""
    if obs.shape[0] != 1:
        raise ValueError("action_variance takes a single observation (batch of 1)")
    rep = obs.expand((n_samples,) + tuple(obs.shape[1:]))
    acts = policy.sample(rep, generator=generator).flatten(1).double()
    return float(acts.var(0, unbiased=True).sum())


def off_support_fraction(samples: torch.Tensor, reference: torch.Tensor, threshold: float | None = None,
                         quantile: float = 0.99, max_reference: int = 5000) -> float:
    """Fraction of ``samples`` (N, D) whose nearest neighbour in ``reference`` (M, D) is farther than ``threshold``.

    With no threshold it is the ``quantile`` of the reference's own leave-one-out nearest-neighbour distances.
    """
    if samples.dim() != 2 or reference.dim() != 2 or samples.shape[1] != reference.shape[1]:
        raise ValueError(f"samples (N, D) and reference (M, D) must share D; got {tuple(samples.shape)}, {tuple(reference.shape)}")
    ref = reference.double()
    if ref.shape[0] > max_reference:
        ref = ref[torch.randperm(ref.shape[0], generator=torch.Generator().manual_seed(0))[:max_reference]]
    if threshold is None:
        dd = torch.cdist(ref, ref)
        dd.fill_diagonal_(math.inf)
        threshold = float(torch.quantile(dd.min(1).values, quantile))
    dist = torch.cdist(samples.double(), ref).min(1).values
    return float((dist > threshold).double().mean())


# ------------------------------------------------------------------------------------------------ run summaries
def _generator_on(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def dataset_state_diagnostics(policy, observations: torch.Tensor, n_states: int = 64, seed: int = 0) -> dict[str, float]:
    """λ_max(Ĵ) along DDIM trajectories from ``n_states`` dataset states drawn with ``seed``, one trajectory each
    (``cdp rl``'s ``contraction_diagnostics`` in results.json): mean and max λ̂, the fractions of contracting trajectory
    points and of trajectories contracting at every step, and the mean log of the Corollary 3.1.1 bound."""

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(observations.shape[0], generator=g)[:n_states]
    dev = next(policy.parameters()).device
    gd = g if dev.type == "cpu" else _generator_on(seed, dev)
    d = lambda_along_trajectory(policy, observations[idx].to(dev), n_samples=len(idx), generator=gd)
    lam = d["lambda_hat"]  # (S, n)
    worst = lam.max(0).values  # per trajectory, the least contractive step
    return {"lambda_hat_mean": float(lam.mean()), "lambda_hat_max": float(lam.max()),
            "frac_points_contractive": float((lam < 0).double().mean()),
            "frac_trajectories_contractive": float((worst < 0).double().mean()),
            "log_bound_mean": float((d["lambda_F"] * d["dtau"][:, None]).sum(0).mean()),
            "n_states": int(len(idx)), "n_steps": int(lam.shape[0])}


def flow_diagnostics(policy, obs: torch.Tensor, n_samples: int, seed: int = 0) -> dict:
    """λ_max(Ĵ) along DDIM trajectories and the divergence ratio at each of the observations ``obs`` (n, To, Do),
    ``n_samples`` trajectories (and pairs) per observation (``cdp train``'s ``diagnostics`` in results.json).

    Returns means over observations: ``lambda_hat_mean`` (< 0: contracting), ``lambda_hat_mean_low_noise``
    (t ≤ 0.1), ``frac_contractive``, ``div_ratio_median``, ``div_bound_median``, plus ``seconds``.
    """
    t0 = time.time()
    lam_all, low, frac, ratio, bound = [], [], [], [], []
    for i in range(obs.shape[0]):
        o = obs[i: i + 1]
        lam = lambda_along_trajectory(policy, o, n_samples=n_samples, generator=torch.Generator().manual_seed(seed + i))
        lh = lam["lambda_hat"]
        lam_all.append(float(lh.mean()))
        lo = lam["t"] <= 0.1 + 1e-9
        low.append(float(lh[lo].mean()) if lo.any() else float("nan"))
        frac.append(float((lh < 0).double().mean()))
        div = divergence_ratio(policy, o, n_pairs=n_samples, generator=torch.Generator().manual_seed(seed + 1000 + i))
        ratio.append(float(div["ratio"].median()))
        bound.append(float(div["bound"].median()))
    return {"lambda_hat_mean": float(np.mean(lam_all)), "lambda_hat_mean_low_noise": float(np.mean(low)),
            "frac_contractive": float(np.mean(frac)), "div_ratio_median": float(np.median(ratio)),
            "div_bound_median": float(np.median(bound)), "n_obs": int(obs.shape[0]), "n_samples": n_samples,
            "seconds": time.time() - t0}


def _lambda_hat(policy, x: torch.Tensor, t: torch.Tensor, cond, J: torch.Tensor | None = None) -> torch.Tensor:
    """λ_max(Ĵ) (n,) at points x (n, ...) from the exact Jacobian (:func:`cdp.contraction.jacobian_fast`, or ``J``)."""
    with torch.no_grad():
        J = jacobian_fast(policy.denoiser, x, t, cond) if J is None else J
        ev = torch.linalg.eigvalsh(0.5 * (J + J.transpose(1, 2)))
    s, r = sign_and_ratio(policy.schedule, t.to(torch.float64), policy.config.prediction)
    return r.to(ev.dtype) + (ev[:, -1] if s > 0 else -ev[:, 0])


#: diffusion-time bins (t = k/T, 0 = data, 1 = noise) of :func:`loss_scale_diagnostics`' λ̂ profile
T_BINS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def loss_scale_diagnostics(policy, observations: torch.Tensor, actions: torch.Tensor, n_points: int = 64,
                           seed: int = 0, bins: tuple[float, ...] = T_BINS) -> dict[str, float]:
    r"""How large the contraction term is next to the diffusion loss, and where along the noise levels it acts.

    On ``n_points`` (observation, action) pairs drawn with ``seed``: L_d (the ε- or x0-matching loss at uniformly
    drawn steps k ∈ 1..T), the regulariser's weighted term γ·L_c at the same points restricted to its own steps
    (``t_range``), their ratio, the fraction of those points where the hinge is active (λ̂ ≥ −β, so the term has a
    gradient), and the mean λ̂ = λ_max(Ĵ) of the exact Jacobian (:func:`cdp.contraction.symmetric_jacobian_eigvals`)
    per diffusion-time bin ``(lo, hi]`` over *all* steps — the profile the hinge shapes. A policy without a
    regulariser reports its λ̂ profile with γ·L_c = 0.

    Args:
        policy: :class:`~cdp.policy.DiffusionPolicy`. observations: (N, ...) unnormalised, as ``compute_loss`` takes.
        actions: (N, *action_shape) unnormalised. n_points: points used (≤ N). seed: draws of rows, steps and noise.
        bins: increasing edges in [0, 1].
    Returns:
        ``loss_d``, ``loss_c_weighted`` (γ·L_c), ``loss_ratio`` (γ·L_c / L_d), ``hinge_active_frac`` (nan without a
        hinge), ``lambda_hat_t{lo}-{hi}`` per bin (nan for a bin no step falls in), ``n_points``.
    Raises:
        ValueError: bins not increasing within [0, 1], or n_points < 1.
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    if any(b <= a for a, b in zip(bins[:-1], bins[1:])) or bins[0] < 0 or bins[-1] > 1:
        raise ValueError(f"bins must increase within [0, 1], got {bins}")
    dev = next(policy.parameters()).device
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(observations.shape[0], generator=g)[:n_points]
    obs, act = observations[idx].to(dev), actions[idx].to(dev)
    n = obs.shape[0]
    T = policy.schedule.num_steps
    was_training = policy.training
    policy.eval()
    out: dict[str, float] = {"n_points": int(n)}
    try:
        with torch.no_grad():
            cond = policy.condition(obs)
            a0 = policy.action_normalizer.normalize(act)
            k = torch.randint(1, T + 1, (n,), generator=g).to(dev)
            noise = torch.randn(a0.shape, generator=g).to(dev, a0.dtype)
            al, si = policy.schedule.discrete_alpha_sigma(k, a0.dtype)
            shape = (-1,) + (1,) * (a0.dim() - 1)
            al, si = al.to(dev).view(shape), si.to(dev).view(shape)
            a_t = al * a0 + si * noise
            t = k.to(a0.dtype) / T
            pred = policy.denoiser(a_t, t, cond)
            target = noise if policy.config.prediction == "epsilon" else a0
            out["loss_d"] = float(((pred - target) ** 2).mean())
        lam = _lambda_hat(policy, a_t, t, cond).double()
        for lo, hi in zip(bins[:-1], bins[1:]):
            sel = (t > lo + 1e-9) & (t <= hi + 1e-9)
            out[f"lambda_hat_t{lo:g}-{hi:g}"] = float(lam[sel].mean()) if bool(sel.any()) else float("nan")
        reg = policy.regularizer
        if reg is None or reg.config.weight <= 0:
            out.update(loss_c_weighted=0.0, loss_ratio=0.0, hinge_active_frac=float("nan"))
        elif reg.config.loss == "trajectory":  # its own points: DDIM trajectories from the rows' conditions
            with torch.no_grad():
                loss_c, mt = reg.trajectory_loss(policy.denoiser, a0, cond, generator=g)
            out["loss_c_weighted"] = float(loss_c)
            out["loss_ratio"] = float(loss_c) / out["loss_d"] if out["loss_d"] > 0 else float("nan")
            out["hinge_active_frac"] = mt["hinge_active_frac"]
        else:  # the regulariser's own steps: redraw k within them for the same rows
            steps = reg.steps.to(dev)
            kc = steps[torch.randint(0, len(steps), (n,), generator=g).to(dev)]
            alc, sic = policy.schedule.discrete_alpha_sigma(kc, a0.dtype)
            a_c = alc.to(dev).view(shape) * a0 + sic.to(dev).view(shape) * noise
            tc = kc.to(a0.dtype) / T
            with torch.no_grad():
                J = jacobian_fast(policy.denoiser, a_c, tc, cond)
                loss_c, _ = reg.loss_from_jacobian(J, tc)
            out["loss_c_weighted"] = float(loss_c)
            out["loss_ratio"] = float(loss_c) / out["loss_d"] if out["loss_d"] > 0 else float("nan")
            if reg.config.loss == "hinge":
                lam_c = _lambda_hat(policy, a_c, tc, cond, J)
                out["hinge_active_frac"] = float((lam_c >= -reg.config.margin).double().mean())
            else:
                out["hinge_active_frac"] = float("nan")
    finally:
        policy.train(was_training)
    return out
