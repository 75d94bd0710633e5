r"""The contraction regulariser of Contractive Diffusion Policies (Abyaneh et al., ICLR 2026), algorithm-independent.

It takes any denoiser callable ``(noisy_action, t, condition) -> output`` and returns a scalar loss and metrics.

Theory (Theorem 3.1 in this project's convention)
-------------------------------------------------
A policy samples by integrating the probability-flow ODE in *sampling time* τ = 1 − t (noise → action):

.. math:: \dot a = F(a,\tau) = c_a(t)\,a + c_n(t)\,N_\theta(a,t,s),
          \qquad J_F^{sym} = c_a I + c_n J_N^{sym},\quad J^{sym} = \tfrac12(J + J^\top),

with :math:`N_\theta` the network output and :math:`(c_a, c_n)` from
:meth:`cdp.schedules.NoiseSchedule.ode_coefficients`. For two solutions, :math:`\tfrac{\mathrm d}{\mathrm d\tau}
\tfrac12\|\delta a\|^2 = \delta a^\top J_F^{sym}\delta a \le \lambda_{\max}(J_F^{sym})\|\delta a\|^2`, so
:math:`\|\delta a(\tau_1)\| \le \exp\!\int_{\tau_0}^{\tau_1}\lambda_{\max}(J_F^{sym})\,\mathrm d\tau\;\|\delta a(\tau_0)\|`
(Corollary 3.1.1): the flow **contracts where** :math:`\lambda_{\max}(J_F^{sym}) < 0`.

Because :math:`J_F^{sym}` is an affine function of :math:`J_N^{sym}`,

.. math:: \lambda_{\max}(J_F^{sym}) = c_a + c_n\,\lambda_{\max}(J_N^{sym}) \ \text{ if } c_n>0,\qquad
          c_a + c_n\,\lambda_{\min}(J_N^{sym}) \ \text{ if } c_n<0 .

Dividing by :math:`|c_n|` gives the *normalised* drift Jacobian used throughout this module,

.. math:: \hat J = r\,I + s\,J_N^{sym},\qquad s=\operatorname{sign}(c_n),\quad r = c_a/|c_n|,
          \qquad \lambda_{\max}(\hat J) = r + \lambda_{\max}(s\,J_N^{sym}),

and the flow contracts iff :math:`\lambda_{\max}(\hat J) < 0`. For a VP schedule the ratio ``r`` is free of β(t):

=============  =====  ==========  =========================================================================
prediction     s      r           contraction condition
=============  =====  ==========  =========================================================================
``epsilon``    −1     σ_t         :math:`\lambda_{\min}(J_\varepsilon^{sym}) > \sigma_t`
``sample``     +1     −α_t        :math:`\lambda_{\max}(J_{x_0}^{sym}) < \alpha_t`
``score``      +1     1           :math:`\lambda_{\max}(J_{s}^{sym}) < -1`
=============  =====  ==========  =========================================================================

So for the usual ε-network in sampling time, **h(t) = c_n < 0 and the binding eigenvalue is λ_min of**
:math:`J_\varepsilon^{sym}`; the paper's :math:`\lambda_{\max}(J_\varepsilon^{sym}) + f/h` is the same expression written for a
time direction in which h > 0. Check with Gaussian data :math:`a_0\sim\mathcal N(\mu, s^2 I)`: the exact
:math:`J_\varepsilon = \sigma/(\alpha^2 s^2+\sigma^2)\,I`, and :math:`\lambda_{\min} > \sigma \iff s < 1`: sampling contracts
exactly when the data are narrower than the prior (tested in ``tests/test_contraction.py``).

Losses (all on :math:`\hat J`, per sample, averaged over the regularised samples)
  * ``hinge`` (the paper): :math:`\max(-\beta, \lambda_{\max}(\hat J))`, total loss :math:`L_d + \gamma L_c`.
  * ``frobenius``: :math:`\|\hat J + \beta I\|_F^2 / d` — pulls the whole spectrum to −β; the exact form and its
    Hutchinson twin (:math:`\mathbb E_v\|(\hat J+\beta I)v\|^2/d`, Rademacher v) estimate the same quantity.
    (The paper writes :math:`\|J_\varepsilon^{sym}+\beta I\|_F`; taken literally for an ε-network in sampling time that
    would push the flow to *expand*; this is its sign-consistent form.)
  * ``trajectory`` (this project's variant, not in the paper): a hinge on the quantity Corollary 3.1.1 bounds
    instead of on each point. Along a sampling trajectory a(τ) the log of the bound is
    :math:`\Lambda = \int \lambda_{\max}(J_F^{sym})\,\mathrm d\tau = \int |c_n(t)|\,\lambda_{\max}(\hat J)\,\mathrm d\tau`,
    discretised on a DDIM grid :math:`k_1 > \dots > k_n` (``trajectory_steps`` steps, left Riemann sum, the network
    evaluated where the sampler evaluates it):
    :math:`\Lambda \approx \sum_i |c_n(t_i)|\,\hat\lambda_i\,\Delta\tau_i`, :math:`\Delta\tau_i = (k_i - k_{i+1})/T`,
    :math:`k_{n+1} = 0`, summed over the grid points with :math:`t_i` in ``t_range``. The loss is
    :math:`\max(-\beta, \Lambda)` per trajectory: the flow may expand at some noise levels (between modes at middle
    noise) as long as the whole flow contracts by at least :math:`e^{-\beta}`; the per-point hinge forbids any local
    expansion. The visited points are treated as constants (stop-gradient through the trajectory, as the per-point
    loss treats its noisy samples), so :math:`\partial\Lambda = \sum_i |c_n(t_i)|\Delta\tau_i\,\partial\hat\lambda_i`
    with :math:`\partial\hat\lambda_i = s\,v_i^\top \partial J\, v_i` (Hellmann–Feynman, exact eigenvectors).
    Trajectories start from N(0, I) noise at the conditions of ``max_samples`` rows of the batch.
  * ``authors``: the public code's variant, for reproduction: the Jacobian of the x0-prediction
    (:math:`J_{x_0} = (I - \sigma J_\varepsilon)/\alpha` for an ε-network) and ``mean((J_x0^sym + m I)**2)`` over matrix
    entries, ``m = authors_shift`` (0.1); the public code applies it at the lowest-noise 10% of steps
    (set ``t_range=(0, 0.1)``).

Estimators of :math:`\lambda_{\max}(\hat J)`, one interface (:func:`lambda_max`):
  * ``exact``: full Jacobian (:func:`jacobian_fast`: the network's closed-form ``input_jacobian`` if it has one,
    else d forward-mode passes batched over the tangents) and ``eigvalsh``.
  * ``power``: two-phase *shifted* power iteration with matrix-free products :math:`J^{sym}v = (Jv + J^\top v)/2`
    (one JVP + one VJP). Phase 1 finds the eigenvalue μ of largest magnitude; if μ < 0 (the dominant one is the
    most negative, as in a contractive field), phase 2 iterates on :math:`A - \mu I`, whose dominant eigenvalue is
    :math:`\lambda_{\max} - \mu`. Unshifted power iteration (``power_unshifted``, as in the public code) returns μ,
    which is *not* λ_max there.
  * ``lanczos``: K-step Lanczos with full re-orthogonalisation; the largest Ritz value.
  The eigenvector search runs without a graph to the parameters; the returned value is the Rayleigh quotient
  :math:`v^\top \hat J v` at the (detached) eigenvector, computed *with* a graph (:func:`quadratic_form`), whose
  gradient is the eigenvalue's gradient (Hellmann–Feynman: :math:`\partial\lambda = v^\top \partial A\, v` for a
  simple eigenvalue of a symmetric A) at convergence. ``exact`` does the same with the exact eigenvector by default
  (``ContractionConfig.exact_grad="rayleigh"``: the Jacobian is built without a graph, only one direction carries
  one), so value *and* gradient equal those of differentiating ``eigvalsh`` of the full Jacobian
  (``exact_grad="full"``), at a fraction of the backward cost (tested to 1e-7 relative in float64).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch.func import jacfwd, jvp, vjp, vmap

from .schedules import NoiseSchedule, PREDICTION_TYPES

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
ESTIMATORS = ("exact", "power", "lanczos", "power_unshifted", "hutchinson")
LOSSES = ("hinge", "frobenius", "authors", "trajectory")


# ------------------------------------------------------------------------------------------------ sign convention
def sign_and_ratio(schedule: NoiseSchedule, t: torch.Tensor, prediction: str = "epsilon") -> tuple[float, torch.Tensor]:
    r"""``(s, r)`` such that :math:`\hat J = r I + s J_N^{sym}` is the sampling drift's Jacobian divided by |c_n|.

    Args:
        t: (B,) diffusion times. prediction: ``"epsilon"``, ``"sample"`` or ``"score"``.
    Returns:
        s (±1, a float) and r, shape (B,), dtype of ``t``.
    Raises:
        ValueError: unknown prediction type.
    """
    s = prediction_sign(prediction)
    if prediction == "epsilon":
        return s, schedule.sigma(t)
    if prediction == "sample":
        return s, -schedule.alpha(t)
    return s, torch.ones_like(t)


def prediction_sign(prediction: str = "epsilon") -> float:
    """The s of :func:`sign_and_ratio` alone (−1 for ε-prediction, +1 for x0- and score-prediction).

    Raises:
        ValueError: unknown prediction type.
    """
    if prediction == "epsilon":
        return -1.0
    if prediction in ("sample", "score"):
        return 1.0
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")


# ------------------------------------------------------------------------------------------ Jacobian primitives
def _flat(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> Callable:
    shape = x.shape
    return lambda xf: fn(xf.reshape(shape), t, cond).reshape(shape[0], -1)


def jacobian(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Jacobians ∂fn(x)_i/∂x_i of a batched denoiser, by ``vmap(jacfwd)``.

    Args:
        fn: ``(x (B, ...), t (B,), cond (B, Dc) or None) -> (B, ...)``; samples must not interact (no batch norm).
        x: (B, ...) noisy actions; flattened to d = prod(...) internally. t: (B,). cond: (B, Dc) or None.
    Returns:
        (B, d, d) Jacobians, differentiable w.r.t. the parameters ``fn`` closes over.
    """
    shape = x.shape[1:]

    def single(xi, ti, ci):
        out = fn(xi.reshape((1,) + shape), ti.reshape(1), None if ci is None else ci.unsqueeze(0))
        return out.reshape(-1)

    xf = x.reshape(x.shape[0], -1)
    if cond is None:
        return vmap(jacfwd(lambda xi, ti: single(xi, ti, None)))(xf, t)
    return vmap(jacfwd(single))(xf, t, cond)


def jacobian_fast(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample Jacobians, same result as :func:`jacobian` (tested to 1e-10 in float64), computed faster.

    If ``fn`` has an ``input_jacobian(x, t, cond)`` method (e.g. :class:`cdp.nets.mlp.MLPDenoiser`), that closed
    form is used: plain ops, no functorch, ~3-5x cheaper with its parameter gradient on small batches. Otherwise one
    reverse-mode pass of the *batched* ``fn`` with the d basis cotangents vmapped (``vmap(vjp)``: the forward is
    computed once for the whole batch, then d batched backward passes give the rows of J). Measured on the UNet and
    DiT (d = 32, 4 samples, CPU, with the parameter gradient): 150 vs 271 ms (UNet) and 1.56 vs 1.84 s (DiT) for the
    forward-mode alternative (d vmapped JVP tangents), whose GroupNorm and Mish rules fall back to slow paths in
    PyTorch 2.13 (docs/speed.md). Works under ``torch.no_grad`` (no graph to the parameters is then built).

    Args / Returns: as :func:`jacobian`; ``fn`` must treat samples independently (no batch norm).
    """
    closed = getattr(fn, "input_jacobian", None)
    if callable(closed):
        return closed(x, t, cond)
    B = x.shape[0]
    d = x[0].numel()
    f = lambda z: fn(z.reshape(x.shape), t, cond).reshape(B, d)  # noqa: E731
    _, pullback = vjp(f, x.reshape(B, d))
    U = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1).expand(d, B, d)
    rows = vmap(lambda u: pullback(u)[0])(U)  # (d, B, d): rows[i, b] = e_iᵀ J_b
    return rows.transpose(0, 1)


def jvp_and_vjp(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, v: torch.Tensor):
    """Batched (J v, Jᵀ v) with v of shape (B, d): one forward-mode and one reverse-mode pass. Returns two (B, d)."""
    f = _flat(fn, x, t, cond)
    xf = x.reshape(x.shape[0], -1)
    _, jv = jvp(f, (xf,), (v,))
    _, pullback = vjp(f, xf)
    (jtv,) = pullback(v)
    return jv, jtv


def sym_matvec(fn: Denoiser, x, t, cond, v: torch.Tensor) -> torch.Tensor:
    """J^sym v = (J v + Jᵀ v)/2 per sample; v and result (B, d)."""
    jv, jtv = jvp_and_vjp(fn, x, t, cond, v)
    return 0.5 * (jv + jtv)


def quadratic_form(fn: Denoiser, x, t, cond, v: torch.Tensor) -> torch.Tensor:
    """vᵀ J v = vᵀ J^sym v per sample, differentiable w.r.t. the parameters ``fn`` closes over; v (B, d) → (B,).

    Computed as vᵀ ∇ₓ(vᵀ fn(x)) = vᵀ Jᵀ v by one backward pass with ``create_graph`` (a double backward when the
    caller differentiates it), which on the UNet (d = 32, 4 samples, CPU) took 63-98 ms against 138-215 ms for one
    functorch JVP with its backward (docs/speed.md). ``x`` itself is detached.
    """
    xx = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(xx, t, cond).reshape(x.shape[0], -1)
        (jtv,) = torch.autograd.grad((out * v).sum(), xx, create_graph=True)
    return (jtv.reshape(x.shape[0], -1) * v).sum(-1)


def central_difference_quadratic_form(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                                      v: torch.Tensor, h: float) -> torch.Tensor:
    r"""vᵀ J v per sample by a central difference of the network along v, differentiable w.r.t. the parameters.

    .. math:: q_h = \frac{v^\top\big(f(x + h v) - f(x - h v)\big)}{2h} = v^\top J v + \frac{h^2}{6}\,
              D^3 f(x)[v, v, v]^\top v + O(h^4),

    so q_h and its parameter gradient (the difference of the two rows' parameter gradients over 2h) differ from
    vᵀJv and ∇_θ vᵀJv by O(h²). It costs one forward and one first-order backward of the 2B rows
    ``[x + h v; x − h v]`` — no double backward — and the rows can ride in the batch of the training loss's own pass
    (:meth:`cdp.policy.DiffusionPolicy.denoise_and_regularize`). Accuracy against :func:`quadratic_form` is measured
    in docs/speed.md and tested in ``tests/test_contraction.py``.

    Args:
        fn: batched denoiser. x: (B, ...) points (detached here). t: (B,). cond: (B, Dc) or None.
        v: (B, d) directions (unit norm in the callers). h: the step, > 0, in units of x.
    Returns:
        (B,) q_h with a graph to the parameters of ``fn``.
    Raises:
        ValueError: h not finite and > 0.
    """
    if not (h > 0 and math.isfinite(h)):
        raise ValueError(f"central-difference step must be finite and > 0, got {h}")
    B = x.shape[0]
    dx = h * v.reshape(x.shape)
    xd = x.detach()
    tt = torch.cat([t, t])
    cc = None if cond is None else torch.cat([cond, cond])
    out = fn(torch.cat([xd + dx, xd - dx]), tt, cc).reshape(2 * B, -1)
    return central_difference_from_rows(out[:B], out[B:], v, h)


def central_difference_from_rows(f_plus: torch.Tensor, f_minus: torch.Tensor, v: torch.Tensor, h: float) -> torch.Tensor:
    """q_h = vᵀ(f(x + h v) − f(x − h v)) / (2h) from the two network outputs (B, ...) and v (B, d); (B,)."""
    B = v.shape[0]
    return ((f_plus.reshape(B, -1) - f_minus.reshape(B, -1)) * v).sum(-1) / (2.0 * h)


def sym_matvec_operator(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> Callable:
    """A function v ↦ J^sym v (both (B, d)) at fixed points x, by reverse mode only, for repeated products.

    One forward pass with a graph to ``x`` is built once; then each product costs two backward passes and no
    forward: Jᵀv = ∇ₓ(vᵀ out), and J v = ∇ᵤ(vᵀ g(u)) with g(u) = Jᵀu built once with ``create_graph`` (g is linear in
    u, so its vector-Jacobian product with v is J v — the "double-vjp" trick). Used by the power / Lanczos
    iterations on networks without a closed-form Jacobian, where it replaces one functorch JVP + one VJP (a forward-mode
    pass and a forward + backward) per product. Products carry no graph to the parameters.
    """
    B = x.shape[0]
    xx = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(xx, t, cond).reshape(B, -1)
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, xx, u, create_graph=True)
    g = g.reshape(B, -1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        (jtv,) = torch.autograd.grad(out, xx, v, retain_graph=True)
        (jv,) = torch.autograd.grad(g, u, v, retain_graph=True)
        return 0.5 * (jv + jtv.reshape(B, -1))
    return matvec


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _power(matvec: Callable, v: torch.Tensor, iters: int, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on (A + shift I) from a unit vector v; returns (Rayleigh quotient of A, unit vector).

    Where (A + shift I) v vanishes (relative to ‖A v‖ + |shift|), v is already an eigenvector of A (with eigenvalue
    −shift, e.g. A = −ρI under the shift ρ, or d = 1) and is kept: normalising the zero vector would give 0, whose
    Rayleigh quotient 0 is not an eigenvalue."""
    for _ in range(iters):
        av = matvec(v)
        w = av if shift is None else av + shift[:, None] * v
        n = w.norm(dim=-1, keepdim=True)
        scale = av.norm(dim=-1, keepdim=True) + (0.0 if shift is None else shift.abs()[:, None])
        collapsed = n <= 1e-6 * scale + 1e-30
        v = torch.where(collapsed, v, w / n.clamp_min(1e-30))
    return (v * matvec(v)).sum(-1), v


def _lanczos(matvec: Callable, v: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K-step Lanczos with full re-orthogonalisation, batched; returns (largest Ritz value, Ritz vector)."""
    B, d = v.shape
    K = min(iters, d)
    Q = [_normalize(v)]
    alphas, betas = [], []
    active = torch.ones(B, dtype=torch.bool, device=v.device)  # rows whose Krylov space is still growing
    scale = torch.zeros(B, dtype=v.dtype, device=v.device)
    for j in range(K):
        w = matvec(Q[j])
        a = (w * Q[j]).sum(-1)
        alphas.append(a)
        scale = torch.maximum(scale, w.norm(dim=-1))
        Qm = torch.stack(Q, -1)  # (B, d, j+1)
        for _ in range(2):  # full re-orthogonalisation, twice for stability
            w = w - (Qm @ (Qm.transpose(1, 2) @ w.unsqueeze(-1))).squeeze(-1)
        if j + 1 < K:
            b = w.norm(dim=-1)
            # breakdown: the Krylov space is invariant (e.g. A = −ρI, or repeated eigenvalues), so the Ritz values
            # found so far are exact; a vector normalised from round-off would add spurious ones
            active = active & (b > 1e-6 * scale + 1e-30)
            betas.append(torch.where(active, b, torch.zeros_like(b)))
            Q.append(torch.where(active[:, None], w / b.clamp_min(1e-30)[:, None], torch.zeros_like(w)))
    diag = torch.stack(alphas, -1)  # (B, K)
    used = torch.stack([torch.ones_like(active)] + [q.norm(dim=-1) > 0 for q in Q[1:]], -1)  # (B, K)
    Tm = torch.diag_embed(diag)
    if betas:
        off = torch.stack(betas, -1)
        Tm = Tm + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    # after a breakdown the remaining rows / columns are decoupled (β = 0): give them a value below every eigenvalue
    # of the valid block (Gershgorin) so that they never become the largest Ritz value
    floor = -(Tm.abs().sum((1, 2)) + 1.0)
    Tm = Tm + torch.diag_embed(torch.where(used, torch.zeros_like(diag), floor[:, None] - diag))
    evals, evecs = torch.linalg.eigh(Tm)
    y = evecs[..., -1]  # (B, K)
    vec = _normalize((torch.stack(Q, -1) @ y.unsqueeze(-1)).squeeze(-1))
    return evals[..., -1], vec


def lambda_max(fn: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, *,
               sign: float = 1.0, estimator: str = "power", iters: int = 4,
               generator: torch.Generator | None = None, v0: torch.Tensor | None = None,
               return_vector: bool = False):
    r"""Per-sample largest eigenvalue of :math:`A = s\,J^{sym}` with J the Jacobian of ``fn`` w.r.t. its first input.

    Args:
        fn: batched denoiser ``(x, t, cond) -> same shape as x``.
        x: (B, ...) points (flattened to d). t: (B,). cond: (B, Dc) or None.
        sign: s = ±1 (use −1 to get −λ_min(J^sym)).
        estimator: ``"exact"``, ``"power"`` (shifted, two phases of ``iters`` each), ``"lanczos"`` (``iters`` steps)
            or ``"power_unshifted"`` (largest-magnitude eigenvalue; for comparison only).
        iters: K, iterations per phase (power) or Krylov dimension (Lanczos).
        generator / v0: random start vector (B, d) or its RNG.
        return_vector: also return the (detached) eigenvector estimate, (B, d).

    Returns:
        (B,) estimates, differentiable w.r.t. the parameters of ``fn`` (see module docstring).

    Raises:
        ValueError: unknown estimator or iters < 1.
    """
    if estimator not in ("exact", "power", "lanczos", "power_unshifted"):
        raise ValueError(f"unknown eigenvalue estimator {estimator!r}; expected exact, power, lanczos or power_unshifted")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    B = x.shape[0]
    d = x[0].numel()
    if estimator == "exact":
        J = jacobian_fast(fn, x, t, cond)
        A = sign * 0.5 * (J + J.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(A)
        lam = evals[:, -1]
        return (lam, evecs[:, :, -1].detach()) if return_vector else lam

    xd = x.detach()
    closed = getattr(fn, "input_jacobian", None)
    if callable(closed):
        # Same matrix-free iteration, but the products use the closed-form Jacobian (computed once, no graph):
        # J v and Jᵀ v as batched mat-vecs instead of one functorch JVP + VJP per iteration.
        with torch.no_grad():
            Jd = closed(xd, t, cond).reshape(B, d, d)
            Ad = sign * 0.5 * (Jd + Jd.transpose(1, 2))

        def matvec(v):
            return torch.bmm(Ad, v.unsqueeze(-1)).squeeze(-1)
    else:
        sym_op = sym_matvec_operator(fn, xd, t, cond)

        def matvec(v):
            return sign * sym_op(v)

    if v0 is None:
        v0 = torch.randn(B, d, generator=generator, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        if estimator == "lanczos":
            _, v = _lanczos(matvec, v0.detach(), iters)
        else:
            mu, v = _power(matvec, _normalize(v0.detach()), iters)
            if estimator == "power":
                # Phase 2 on A + ρI with ρ = ‖A v‖ ≥ |μ| (→ spectral radius), so A + ρI is (nearly) PSD and its
                # dominant eigenvalue is λ_max + ρ. Every Rayleigh quotient is a lower bound of λ_max, so keep
                # whichever phase's vector gives the larger one.
                rho = matvec(v).norm(dim=-1)
                v_start = _normalize(torch.randn(B, d, generator=generator, dtype=x.dtype, device=x.device))
                mu2, v2 = _power(matvec, v_start, iters, shift=rho)
                v = torch.where((mu2 > mu)[:, None], v2, v)
    v = v.detach()
    if callable(closed):  # vᵀ J v with the graph to the parameters, by the closed form
        lam = sign * (v * torch.bmm(closed(xd, t, cond).reshape(B, d, d), v.unsqueeze(-1)).squeeze(-1)).sum(-1)
    else:
        lam = sign * quadratic_form(fn, xd, t, cond, v)
    return (lam, v) if return_vector else lam


def symmetric_jacobian_eigvals(fn: Denoiser, x, t, cond=None) -> torch.Tensor:
    """Exact eigenvalues (ascending) of J^sym per sample, (B, d). For diagnostics and tests."""
    J = jacobian(fn, x, t, cond)
    return torch.linalg.eigvalsh(0.5 * (J + J.transpose(1, 2)))


# ------------------------------------------------------------------------------------------------ the regulariser
@dataclass
class ContractionConfig:
    r"""Settings of the contraction regulariser.

    Attributes:
        loss: ``"hinge"`` (paper, default), ``"frobenius"``, ``"authors"`` (public-code variant) or ``"trajectory"``
            (the hinge on the integrated λ̂ along DDIM trajectories, see the module docstring).
        estimator: for ``hinge``: ``"exact"``, ``"power"``, ``"lanczos"``, ``"power_unshifted"``; for
            ``frobenius``: ``"exact"`` or ``"hutchinson"``; ``authors`` always uses the exact Jacobian.
            ``"auto"`` picks ``exact`` when the action dimension d ≤ ``auto_exact_max_dim`` (128) and ``power``
            otherwise (``hutchinson`` for frobenius). Measured on CPU in a full training step (docs/speed.md;
            4 regularised samples, batch 64, CDP/DP step ratio): exact vs power K = 4 is 2.46 vs 4.68 for the UNet
            and 1.99 vs 2.03 for the DiT at d = 32 (chunk 16 × 2), and 3.62 vs 10.2 (UNet), 2.45 vs 3.94 (MLP),
            4.64 vs 3.84 (DiT) at d = 112 (chunk 16 × 7, robomimic's action size) — while power iteration's
            λ_max (K = 4) is off by 2-100% (median relative error, d = 3-32) on trained networks and exact is exact.
            So exact is the default up to 128 everywhere (at d = 224 power is the cheaper one for the DiT).
        weight: γ, the loss weight (paper: 0.1).
        margin: β ≥ 0, the hinge floor / Frobenius target −β (stops over-contraction).
        iters: K, power iterations per phase or Lanczos steps (paper: 3–4).
        n_probes: Hutchinson probes.
        t_range: (lo, hi), the diffusion times t ∈ (lo, hi] (fractions of the schedule, 0 = data, 1 = noise) at which
            the regulariser is applied; the paper: every step (0, 1); the public code: lowest-noise 10% (0, 0.1).
            With a discrete schedule the steps k with k/T in the range are used (k = 1 if none falls inside).
        max_samples: regularise at most this many samples of each batch (None: all). Default 16: the loss is a
            per-sample mean, so a random subsample keeps it unbiased; measured 3-4x cheaper steps (docs/speed.md).
        prediction: what the network outputs (``"epsilon"``, ``"sample"``, ``"score"``).
        authors_shift: the ``0.1`` of the public code's mean((J_x0^sym + 0.1 I)²).
        auto_exact_max_dim: the d threshold of ``estimator="auto"``.
        share_forward: when the network has ``forward_and_jacobian`` (the MLP) and the loss is exact, compute the
            regularised points' Jacobians inside the diffusion loss's forward pass
            (:meth:`cdp.policy.DiffusionPolicy.compute_loss`); with the full ``t_range`` the points are the first
            ``max_samples`` rows of the L_d batch (the same distribution as :meth:`ContractionRegularizer.sample_points`),
            otherwise ``max_samples`` extra rows drawn by it. Same loss, fewer and larger matrix products.
        exact_grad: how the ``hinge`` loss with the ``exact`` estimator is differentiated. ``"rayleigh"`` (default):
            the Jacobian and its top eigenvector v are computed *without* a graph, and only the quadratic form
            :math:`v^\top s J v` (:func:`quadratic_form`, or one extra tangent in the MLP's forward pass) carries the graph to
            the parameters. By the Hellmann–Feynman theorem (∂λ = vᵀ ∂A v for a simple eigenvalue of a symmetric A)
            the value *and* the gradient equal those of differentiating ``eigvalsh`` (tested to 1e-7 in float64), but
            the backward pass runs through one tangent instead of d. ``"full"``: differentiate ``eigvalsh`` of the full
            Jacobian (its graph has d tangents). Other losses always use the full Jacobian.
        fd_step: how the parameter gradient of vᵀJv is computed under ``exact_grad="rayleigh"`` for networks without
            a closed-form Jacobian (UNet, DiT, any callable; the MLP always uses its closed form, which is exact).
            A float h (default 1e-2, in normalised action units along the unit vector v): by the central difference
            vᵀ(f(x + hv) − f(x − hv))/(2h) (:func:`central_difference_quadratic_form`), whose 2m rows ride in the
            training loss's forward pass when ``share_forward`` — one first-order backward instead of a double
            backward. Only the gradient is approximate (O(h²); measured relative error in docs/speed.md): the loss
            value and λ̂ come from the exact eigenvalue. ``None``: differentiate vᵀJv by autograd (double
            backward, :func:`quadratic_form`).
        trajectory_steps: DDIM steps of the ``trajectory`` loss's sampling trajectories (≤ the schedule's T).
        apply_prob: "lazy" regularisation (as StyleGAN2's lazy R1): :meth:`ContractionRegularizer.loss_from_clean`
            computes the term only with this probability per call (drawn from the caller's generator, so runs stay
            reproducible and resumable) and then divides it by the probability, so its expectation is unchanged
            while the average cost falls by that factor. 1.0 (default): every step.
    """

    loss: Literal["hinge", "frobenius", "authors", "trajectory"] = "hinge"
    estimator: str = "auto"
    weight: float = 0.1
    margin: float = 0.0
    iters: int = 4
    n_probes: int = 1
    t_range: tuple[float, float] = (0.0, 1.0)
    max_samples: int | None = 16
    prediction: str = "epsilon"
    authors_shift: float = 0.1
    auto_exact_max_dim: int = 128
    apply_prob: float = 1.0
    share_forward: bool = True
    exact_grad: Literal["rayleigh", "full"] = "rayleigh"
    fd_step: float | None = 1e-2
    trajectory_steps: int = 10

    def __post_init__(self) -> None:
        if self.exact_grad not in ("rayleigh", "full"):
            raise ValueError(f"exact_grad must be 'rayleigh' or 'full', got {self.exact_grad!r}")
        if self.fd_step is not None and not (math.isfinite(self.fd_step) and 0.0 < self.fd_step <= 1.0):
            raise ValueError(f"fd_step must be in (0, 1] or None (autograd), got {self.fd_step}")
        if not (0.0 < self.apply_prob <= 1.0):
            raise ValueError(f"apply_prob must be in (0, 1], got {self.apply_prob}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown contraction loss {self.loss!r}; expected one of {LOSSES}")
        allowed = {"hinge": ("auto", "exact", "power", "lanczos", "power_unshifted"),
                   "frobenius": ("auto", "exact", "hutchinson"), "authors": ("auto", "exact"),
                   "trajectory": ("auto", "exact")}[self.loss]
        if self.estimator not in allowed:
            raise ValueError(f"estimator {self.estimator!r} does not apply to loss {self.loss!r}; choose from {allowed}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight (gamma) must be finite and >= 0, got {self.weight}")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise ValueError(f"margin (beta) must be finite and >= 0, got {self.margin}")
        if self.trajectory_steps < 1:
            raise ValueError(f"trajectory_steps must be >= 1, got {self.trajectory_steps}")
        if self.iters < 1 or self.n_probes < 1:
            raise ValueError("iters and n_probes must be >= 1")
        lo, hi = self.t_range
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {self.t_range}")
        self.t_range = (float(lo), float(hi))
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {self.max_samples}")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of {PREDICTION_TYPES}")

    def to_dict(self) -> dict:
        return asdict(self)


class ContractionRegularizer:
    """The CDP loss term, independent of any algorithm.

    Usage::

        reg = ContractionRegularizer(ContractionConfig(weight=0.1), schedule)
        loss_c, metrics = reg(denoiser, noisy_action, t, cond)        # at given points
        loss_c, metrics = reg.loss_from_clean(denoiser, actions, cond)  # draws t in t_range and noise itself
        total = loss_d + loss_c                                        # loss_c already includes the weight γ

    Args:
        config: :class:`ContractionConfig`.
        schedule: the diffusion's :class:`~cdp.schedules.NoiseSchedule` (gives α_t, σ_t).
    """

    def __init__(self, config: ContractionConfig | None, schedule: NoiseSchedule) -> None:
        self.config = config if config is not None else ContractionConfig()
        self.schedule = schedule
        lo, hi = self.config.t_range
        T = schedule.num_steps
        ks = [k for k in range(1, T + 1) if lo < k / T <= hi + 1e-12]
        #: the discrete steps the regulariser is applied at
        self.steps = torch.tensor(ks if ks else [1], dtype=torch.long)

    def _estimator(self, d: int, denoiser: Denoiser | None = None) -> str:
        c = self.config
        if c.estimator != "auto":
            return c.estimator
        if c.loss in ("authors", "trajectory"):
            return "exact"
        if d <= c.auto_exact_max_dim:
            return "exact"
        return "hutchinson" if c.loss == "frobenius" else "power"

    def __call__(self, denoiser: Denoiser, noisy_action: torch.Tensor, t: torch.Tensor,
                 cond: torch.Tensor | None = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted contraction loss γ·L_c at the given points.

        Args:
            denoiser: ``(noisy_action (B, ...), t (B,), cond) -> (B, ...)``.
            noisy_action: (B, ...) points a_t. t: (B,) diffusion times in (0, 1]. cond: (B, Dc) or None.
            generator: RNG for start vectors / probes.
        Returns:
            (loss, metrics): a scalar tensor with graph to the denoiser's parameters, and floats
            ``lambda_max_mean``, ``lambda_max_max``, ``frac_contractive`` (λ_max(Ĵ) < 0), ``loss_c`` (unweighted).
        Raises:
            ValueError: shape mismatch between ``noisy_action``, ``t`` and ``cond``.
        """
        c = self.config
        if c.loss == "trajectory":
            raise ValueError("the trajectory loss visits points of its own: call loss_from_clean or trajectory_loss")
        B = noisy_action.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if cond is not None and cond.shape[0] != B:
            raise ValueError(f"cond batch {cond.shape[0]} != noisy_action batch {B}")
        d = noisy_action[0].numel()
        est = self._estimator(d, denoiser)
        if est == "exact" and self.uses_rayleigh(d, denoiser):  # J and v without a graph; only vᵀJv carries one
            x = noisy_action.detach()
            s, _ = sign_and_ratio(self.schedule, t.to(torch.float64), c.prediction)
            closed = getattr(denoiser, "forward_and_rayleigh", None)
            if callable(closed):  # the MLP's closed form: J without a graph, one tangent with it
                _, _, q = closed(x, t, cond, B, lambda J: self.top_direction(J, t))
                return self.loss_from_eigenvalue(s * q, t)
            with torch.no_grad():
                J = jacobian_fast(denoiser, x, t, cond)
                v = self.top_direction(J, t)
            if c.fd_step is None:
                return self.loss_from_eigenvalue(s * quadratic_form(denoiser, x, t, cond, v), t)
            q_h = central_difference_quadratic_form(denoiser, x, t, cond, v, c.fd_step)
            return self.loss_from_eigenvalue(s * self.exact_value_fd_grad(J, v, q_h), t)
        if est == "exact":  # every loss has an exact form in terms of the full Jacobian
            return self.loss_from_jacobian(jacobian_fast(denoiser, noisy_action, t, cond), t)
        s, r = sign_and_ratio(self.schedule, t.to(torch.float64), c.prediction)
        r = r.to(noisy_action.dtype)
        metrics: dict[str, float] = {}
        if c.loss == "hinge":
            lam_n = lambda_max(denoiser, noisy_action, t, cond, sign=s, estimator=est, iters=c.iters, generator=generator)
            lam = r + lam_n  # λ_max(Ĵ)
            per = torch.clamp(lam, min=-c.margin)
            lam_d = lam.detach()
        else:  # frobenius, Hutchinson: E_v ‖(Ĵ + βI) v‖² / d with Rademacher v
            shift = r + c.margin  # Ĵ + βI = (r + β) I + s J^sym
            per = torch.zeros(B, dtype=noisy_action.dtype, device=noisy_action.device)
            closed = getattr(denoiser, "input_jacobian", None)
            Jc = closed(noisy_action.detach(), t, cond).reshape(B, d, d) if callable(closed) else None
            for _ in range(c.n_probes):
                v = torch.randint(0, 2, (B, d), generator=generator, device=noisy_action.device).to(noisy_action.dtype) * 2 - 1
                if Jc is not None:  # J^sym v by the closed-form Jacobian (with graph)
                    sv = 0.5 * (torch.bmm(Jc, v.unsqueeze(-1)) + torch.bmm(Jc.transpose(1, 2), v.unsqueeze(-1))).squeeze(-1)
                else:
                    sv = sym_matvec(denoiser, noisy_action.detach(), t, cond, v)
                Mv = s * sv + shift[:, None] * v
                per = per + (Mv**2).sum(-1) / (d * c.n_probes)
            lam_d = None
        loss_c = per.mean()
        metrics["loss_c"] = float(loss_c.detach())
        if lam_d is not None:
            metrics["lambda_max_mean"] = float(lam_d.mean())
            metrics["lambda_max_max"] = float(lam_d.max())
            metrics["frac_contractive"] = float((lam_d < 0).float().mean())
            metrics["hinge_active_frac"] = float((lam_d >= -c.margin).float().mean())
        return self.weigh(loss_c), metrics

    @property
    def covers_all_steps(self) -> bool:
        """True when :attr:`steps` is every step 1..T (``t_range`` (0, 1)): L_d's points are then valid points."""
        return len(self.steps) == self.schedule.num_steps

    def uses_exact(self, d: int, denoiser: Denoiser | None = None) -> bool:
        """Whether the loss at action dimension ``d`` is computed from the full Jacobian at the training points (so
        a network's ``forward_and_jacobian`` can supply it; the ``trajectory`` loss uses points of its own)."""
        return self.config.loss != "trajectory" and self._estimator(d, denoiser) == "exact"

    def uses_rayleigh(self, d: int, denoiser: Denoiser | None = None) -> bool:
        """Whether the loss at action dimension ``d`` is the hinge on the exact λ_max differentiated through
        vᵀĴv at the detached eigenvector (``exact_grad="rayleigh"``), so only one tangent needs a graph."""
        c = self.config
        return c.loss == "hinge" and c.exact_grad == "rayleigh" and self.uses_exact(d, denoiser)

    def top_direction(self, J: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""Unit eigenvector of :math:`s\,J^{sym}` for its largest eigenvalue, i.e. the direction in which the
        sampling flow expands fastest (the one :math:`\lambda_{\max}(\hat J)` is taken along).

        Args:
            J: (B, d, d) input Jacobians of the network (any graph is ignored). t: (B,) their diffusion times
                (only the sign s of the prediction type matters, see :func:`sign_and_ratio`).
        Returns:
            (B, d) detached unit vectors v with :math:`v^\top s J v = \lambda_{\max}(s J^{sym})`.
        """
        s = prediction_sign(self.config.prediction)
        with torch.no_grad():  # eigenvectors of 2 J^sym; the top one of s J^sym is its last (s = 1) or first (s = −1)
            _, vecs = torch.linalg.eigh(J + J.transpose(1, 2))
        return vecs[:, :, -1 if s > 0 else 0]

    @staticmethod
    def exact_value_fd_grad(J: torch.Tensor, v: torch.Tensor, q_h: torch.Tensor) -> torch.Tensor:
        """vᵀJv with the exact value (from J) and the gradient of its central-difference estimate ``q_h``.

        Args:
            J: (B, d, d) Jacobians (no graph). v: (B, d) directions. q_h: (B,) with a graph
                (:func:`central_difference_quadratic_form` / :func:`central_difference_from_rows`).
        Returns:
            (B,) tensor equal to vᵀJv whose gradient is that of q_h.
        """
        with torch.no_grad():
            q = (v * torch.bmm(J.reshape(v.shape[0], v.shape[1], v.shape[1]), v.unsqueeze(-1)).squeeze(-1)).sum(-1)
        return q.to(q_h.dtype) + (q_h - q_h.detach())

    def loss_from_eigenvalue(self, lam_n: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        r"""Weighted hinge loss γ·mean(max(−β, r + λ)) from :math:`\lambda = \lambda_{\max}(s J_N^{sym})` per sample.

        Args:
            lam_n: (B,) the eigenvalue (with its graph to the parameters), e.g. :math:`s\,v^\top J v` at
                :meth:`top_direction`'s v. t: (B,) diffusion times.
        Returns:
            (loss, metrics) as :meth:`__call__`.
        Raises:
            ValueError: the loss is not ``hinge``, or shapes differ.
        """
        if self.config.loss != "hinge":
            raise ValueError(f"loss_from_eigenvalue is the hinge loss; this regulariser's loss is {self.config.loss!r}")
        if lam_n.shape != t.shape or lam_n.dim() != 1:
            raise ValueError(f"need lam (B,) and t (B,), got {tuple(lam_n.shape)} and {tuple(t.shape)}")
        loss, lam, per_mean = self.hinge_tensors(lam_n, t)
        return loss, self.loss_metrics(per_mean, lam, self.config.margin)

    def hinge_tensors(self, lam_n: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tensor part of :meth:`loss_from_eigenvalue` (no host transfers, so it can sit in a compiled graph):
        (γ·mean max(−β, r + λ) with its graph, λ̂ = r + λ (B,) detached, the unweighted mean detached)."""
        _, r = sign_and_ratio(self.schedule, t.to(torch.float64), self.config.prediction)
        lam = r.to(lam_n.dtype) + lam_n
        per_mean = torch.clamp(lam, min=-self.config.margin).mean()
        return self.weigh(per_mean), lam.detach(), per_mean.detach()

    @staticmethod
    def loss_metrics(per_mean: torch.Tensor, lam: torch.Tensor, margin: float | None = None) -> dict[str, float]:
        """The regulariser's metrics (``loss_c``, ``lambda_max_mean``, ``lambda_max_max``, ``frac_contractive`` and,
        given the hinge's ``margin`` β, ``hinge_active_frac``: the fraction of rows with λ̂ ≥ −β, where the hinge has
        a gradient) from the unweighted loss and λ̂ (B,), both detached (e.g. :meth:`hinge_tensors`' outputs)."""
        with torch.no_grad():  # one tensor → one host transfer for the metrics
            parts = [per_mean, lam.mean(), lam.max(), (lam < 0).to(lam.dtype).mean()]
            if margin is not None:
                parts.append((lam >= -margin).to(lam.dtype).mean())
            vals = torch.stack(parts).tolist()
        return dict(zip(("loss_c", "lambda_max_mean", "lambda_max_max", "frac_contractive", "hinge_active_frac"), vals))

    def _ratio_values(self, t: torch.Tensor) -> list[float]:
        """r(t) of :func:`sign_and_ratio` as Python floats, memoised per distinct t (a discrete schedule has T)."""
        cache = self.__dict__.setdefault("_r_cache", {})
        ts = t.tolist()
        missing = [x for x in set(ts) if x not in cache]
        if missing:
            if len(cache) > 100_000:  # continuous t: keep the memo bounded
                cache.clear()
            _, r = sign_and_ratio(self.schedule, torch.tensor(missing, dtype=torch.float64), self.config.prediction)
            cache.update(zip(missing, r.tolist()))
        return [cache[x] for x in ts]

    def hinge_of_rayleigh(self, t: torch.Tensor, metrics: dict) -> Callable:
        r"""The weighted hinge on Rayleigh quotients as a graph-free closure, for a fused forward that applies
        the loss itself (:meth:`cdp.nets.mlp.MLPDenoiser.forward_and_rayleigh` ``q_loss``).

        The closure maps q (B,) (:math:`v^\top J v`, detached) to ``(loss, dloss/dq)``: loss = γ·mean_i
        max(−β, r_i + s q_i), the value of :meth:`loss_from_eigenvalue` at ``s * q``, and its gradient
        γ s/B · 1[r_i + s q_i ≥ −β] (the sub-gradient ``torch.clamp`` uses), both computed on B floats in Python
        (a handful of small tensor operations and autograd nodes cost more than the arithmetic). It fills
        ``metrics`` with the keys of :meth:`loss_from_eigenvalue`.

        Args:
            t: (B,) diffusion times of the rows. metrics: dict to fill when the closure runs.
        Returns:
            closure ``q -> (loss () tensor, grad (B,) tensor)`` in q's dtype.
        Raises:
            ValueError: the loss is not ``hinge``.
        """
        c = self.config
        if c.loss != "hinge":
            raise ValueError(f"hinge_of_rayleigh is the hinge loss; this regulariser's loss is {c.loss!r}")
        s, beta, w = prediction_sign(c.prediction), float(c.margin), self.weigh(1.0)
        r = self._ratio_values(t)

        def closure(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if q.shape != (len(r),):
                raise ValueError(f"need q ({len(r)},), got {tuple(q.shape)}")
            lam = [ri + s * qi for ri, qi in zip(r, q.tolist())]
            n = len(lam)
            loss_c = sum(max(x, -beta) for x in lam) / n
            metrics.update(loss_c=loss_c, lambda_max_mean=sum(lam) / n, lambda_max_max=max(lam),
                           frac_contractive=sum(x < 0 for x in lam) / n,
                           hinge_active_frac=sum(x >= -beta for x in lam) / n)
            grad = torch.tensor([w * s / n if x >= -beta else 0.0 for x in lam], dtype=q.dtype, device=q.device)
            return torch.tensor(w * loss_c, dtype=q.dtype, device=q.device), grad
        return closure

    def weigh(self, loss_c):
        """γ · L_c: the one place the contraction weight (``ContractionConfig.weight``, the paper's γ) is applied —
        to the unweighted loss (a tensor or, for the fused MLP pass's closure, the float 1.0 that scales its value
        and per-row gradient)."""
        return self.config.weight * loss_c

    def _weighted(self, per: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss_c = per.mean()
        margin = self.config.margin if self.config.loss == "hinge" else None
        return self.weigh(loss_c), self.loss_metrics(loss_c.detach(), lam.detach(), margin)

    def loss_from_jacobian(self, J: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted contraction loss γ·L_c from the denoiser's input Jacobians (the ``exact`` estimator).

        Args:
            J: (B, d, d) Jacobians ∂N/∂a at the regularised points (with graph to the parameters). t: (B,) their times.
        Returns:
            (loss, metrics) exactly as :meth:`__call__` with ``estimator="exact"``.
        Raises:
            ValueError: J not (B, d, d) or t not (B,).
        """
        c = self.config
        if J.dim() != 3 or J.shape[1] != J.shape[2] or t.shape != (J.shape[0],):
            raise ValueError(f"need J (B, d, d) and t (B,), got {tuple(J.shape)} and {tuple(t.shape)}")
        d = J.shape[1]
        s, r = sign_and_ratio(self.schedule, t.to(torch.float64), c.prediction)
        r = r.to(J.dtype)
        Js = 0.5 * (J + J.transpose(1, 2))
        eye = torch.eye(d, dtype=J.dtype, device=J.device)
        if c.loss == "hinge":  # λ_max(Ĵ) = r + λ_max(s J^sym)
            lam = r + torch.linalg.eigvalsh(s * Js)[:, -1]
            per = torch.clamp(lam, min=-c.margin)
        elif c.loss == "frobenius":  # ‖Ĵ + βI‖²_F / d with Ĵ + βI = (r + β) I + s J^sym
            M = s * Js + (r + c.margin)[:, None, None] * eye
            per = (M**2).sum((1, 2)) / d
            lam = r + torch.linalg.eigvalsh((s * Js).detach())[:, -1]
        else:  # authors: mean((J_x0^sym + m I)^2) over entries
            al = self.schedule.alpha(t.to(torch.float64)).to(J.dtype)[:, None, None]
            si = self.schedule.sigma(t.to(torch.float64)).to(J.dtype)[:, None, None]
            if c.prediction == "epsilon":
                Jx0 = (eye - si * Js) / al
            elif c.prediction == "sample":
                Jx0 = Js
            else:  # score: x0 = (a + σ² s)/α
                Jx0 = (eye + si**2 * Js) / al
            per = ((Jx0 + c.authors_shift * eye) ** 2).mean((1, 2))
            lam = r + torch.linalg.eigvalsh((s * Js).detach())[:, -1]
        return self._weighted(per, lam)

    def draw_apply(self, generator: torch.Generator | None = None) -> bool:
        """The lazy-regularisation coin (``apply_prob``): True when this step computes the term. Draws from
        ``generator`` only when apply_prob < 1."""
        p = self.config.apply_prob
        return p >= 1.0 or float(torch.rand((), generator=generator,
                                            device=generator.device if generator is not None else None)) < p

    def trajectory_grid(self) -> tuple[list[int], list[float]]:
        """The ``trajectory`` loss's grid: the DDIM steps k_i (descending, ``trajectory_steps`` of them, as
        :meth:`cdp.samplers.DiffusionSampler.set_timesteps` spaces them) whose t = k/T lies in ``t_range``, and their
        sampling-time lengths Δτ_i = (k_i − k_{i+1})/T (k_{n+1} = 0)."""
        T = self.schedule.num_steps
        n = min(self.config.trajectory_steps, T)
        ks = torch.round(torch.arange(n, 0, -1, dtype=torch.float64) * T / n).long().tolist()
        lo, hi = self.config.t_range
        grid = [(k, (k - kp) / T) for k, kp in zip(ks, ks[1:] + [0]) if lo < k / T <= hi + 1e-12]
        return [k for k, _ in grid], [dt for _, dt in grid]

    def trajectory_loss(self, denoiser: Denoiser, clean_action: torch.Tensor, cond: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, a_init: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        r"""γ·mean max(−β, Λ) over DDIM trajectories, Λ = Σ_i |c_n(t_i)| λ̂_i Δτ_i (the ``trajectory`` loss; module
        docstring).

        Args:
            denoiser: batched ``(x, t, cond) -> (B, ...)``. clean_action: (B, ...) normalised actions (only their
                shape and the batch's conditions are used). cond: (B, Dc) or None. generator: RNG of the row
                subsample and of the initial noise; ``a_init`` (b, ...) replaces the noise draw.
        Returns:
            (loss, metrics): ``loss_c`` (unweighted), ``log_bound_mean`` (mean Λ), ``frac_flows_contractive``
            (Λ < 0), ``hinge_active_frac`` (Λ ≥ −β), and λ̂ statistics over the visited points
            (``lambda_max_mean``, ``lambda_max_max``, ``frac_contractive``).
        Raises:
            ValueError: no grid step lies in ``t_range`` (raise ``trajectory_steps`` or widen ``t_range``).
        """
        from .samplers import make_sampler

        c = self.config
        ks, dts = self.trajectory_grid()
        if not ks:
            raise ValueError(f"no DDIM step of the trajectory loss lies in t_range {c.t_range} with "
                             f"trajectory_steps={c.trajectory_steps}; raise policy.contraction.trajectory_steps or "
                             "widen policy.contraction.t_range")
        B = clean_action.shape[0]
        b = B if c.max_samples is None else min(B, c.max_samples)
        dev = clean_action.device
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randperm(B, generator=generator, device=gdev)[:b].to(dev) if b < B else torch.arange(B, device=dev)
        cnd = None if cond is None else cond[idx]
        shape = (b,) + tuple(clean_action.shape[1:])
        if a_init is None:
            a_init = torch.randn(shape, generator=generator, dtype=clean_action.dtype, device=gdev).to(dev)
        sampler = make_sampler("ddim", self.schedule, c.prediction, None, min(c.trajectory_steps, self.schedule.num_steps))
        T = self.schedule.num_steps
        xs, ts = [], []
        a = a_init.detach()
        with torch.no_grad():  # the visited points, without a graph
            for i, k in enumerate(sampler.timesteps.tolist()):
                t_k = torch.full((b,), k / T, dtype=a.dtype, device=dev)
                if k in ks:
                    xs.append(a)
                    ts.append(t_k)
                if k == ks[-1]:
                    break
                a = sampler.step(denoiser(a, t_k, cnd), i, a)
        n = len(xs)
        x, t = torch.cat(xs), torch.cat(ts)  # (n·b, ...), rows grouped by grid step
        cc = None if cnd is None else cnd.repeat(n, 1)
        s, r = sign_and_ratio(self.schedule, t.to(torch.float64), c.prediction)
        with torch.no_grad():
            J = jacobian_fast(denoiser, x, t, cc)
            v = self.top_direction(J, t)
        if c.fd_step is None or callable(getattr(denoiser, "input_jacobian", None)):
            closed = getattr(denoiser, "input_jacobian", None)
            if callable(closed):  # vᵀJv with the graph by the closed form
                q = (v * torch.bmm(closed(x, t, cc).reshape(v.shape[0], v.shape[1], v.shape[1]),
                                   v.unsqueeze(-1)).squeeze(-1)).sum(-1)
            else:
                q = quadratic_form(denoiser, x, t, cc, v)
        else:
            q = self.exact_value_fd_grad(J, v, central_difference_quadratic_form(denoiser, x, t, cc, v, c.fd_step))
        lam = (r.to(q.dtype) + s * q).reshape(n, b)  # λ̂ at each visited point
        _, cn = self.schedule.ode_coefficients(t.to(torch.float64).reshape(n, b)[:, 0], c.prediction)
        w = (cn.abs() * torch.tensor(dts, dtype=torch.float64)).to(lam.dtype)  # (n,) |c_n| Δτ
        big_lambda = (w[:, None] * lam).sum(0)  # (b,) log of the Corollary 3.1.1 bound per trajectory
        per = torch.clamp(big_lambda, min=-c.margin)
        loss_c = per.mean()
        with torch.no_grad():
            ld, bl = lam.detach(), big_lambda.detach()
            vals = torch.stack([loss_c.detach(), bl.mean(), (bl < 0).to(bl.dtype).mean(),
                                (bl >= -c.margin).to(bl.dtype).mean(), ld.mean(), ld.max(),
                                (ld < 0).to(ld.dtype).mean()]).tolist()
        metrics = dict(zip(("loss_c", "log_bound_mean", "frac_flows_contractive", "hinge_active_frac",
                            "lambda_max_mean", "lambda_max_max", "frac_contractive"), vals))
        return self.weigh(loss_c), metrics

    def sample_points(self, clean_action: torch.Tensor, cond: torch.Tensor | None = None,
                      generator: torch.Generator | None = None):
        """Draw regularisation points: a subsample of the batch, steps k from :attr:`steps`, fresh noise.

        Args:
            clean_action: (B, ...) normalised actions a_0. cond: (B, Dc) or None.
        Returns:
            (noisy_action (b, ...), t (b,), cond (b, Dc) or None) with b = min(B, max_samples).
        """
        B = clean_action.shape[0]
        b = B if self.config.max_samples is None else min(B, self.config.max_samples)
        dev = clean_action.device
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randperm(B, generator=generator, device=gdev)[:b].to(dev) if b < B else torch.arange(B, device=dev)
        a0 = clean_action[idx]
        c = None if cond is None else cond[idx]
        k = self.steps[torch.randint(0, len(self.steps), (b,), generator=generator, device=gdev).cpu()]
        noise = torch.randn(a0.shape, generator=generator, dtype=a0.dtype, device=gdev).to(dev)
        a_t = self.schedule.add_noise(a0, noise, k.to(dev))
        t = (k.to(a0.dtype) / self.schedule.num_steps).to(dev)
        return a_t, t, c

    def loss_from_clean(self, denoiser: Denoiser, clean_action: torch.Tensor, cond: torch.Tensor | None = None,
                        generator: torch.Generator | None = None):
        """:meth:`sample_points` then :meth:`__call__`; returns (weighted loss, metrics).

        With ``apply_prob`` p < 1 the term is skipped with probability 1 − p (returning a zero loss and
        ``{"applied": 0.0}``) and otherwise divided by p, so its expectation equals the p = 1 loss.
        """
        p = self.config.apply_prob
        if not self.draw_apply(generator):
            return clean_action.new_zeros(()), {"applied": 0.0}
        if self.config.loss == "trajectory":
            loss, metrics = self.trajectory_loss(denoiser, clean_action, cond, generator)
        else:
            a_t, t, c = self.sample_points(clean_action, cond, generator)
            loss, metrics = self(denoiser, a_t, t, c, generator=generator)
        if p < 1.0:
            loss = loss / p
            metrics["applied"] = 1.0
        return loss, metrics
