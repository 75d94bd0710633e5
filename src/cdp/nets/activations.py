r"""Mish written with one exponential — the same function as :func:`torch.nn.functional.mish`, 3× faster on CPU.

Mish (Misra 2019) is :math:`x\tanh(\operatorname{softplus}(x))`. With :math:`e = e^{x}` and :math:`n = e(e + 2)`,
:math:`\tanh(\log(1 + e)) = ((1+e)^2 - 1)/((1+e)^2 + 1) = n / (n + 2)`, so

.. math:: \operatorname{mish}(x) = x\,\frac{n}{n + 2},\qquad
          \operatorname{mish}'(x) = \frac{n}{n+2} + x\Big(1 - \big(\tfrac{n}{n+2}\big)^2\Big)\frac{e}{1 + e}.

The exponent is clamped at 20, where n/(n+2) = 1 to float64 precision (≥ 1 − 9e-18), so nothing overflows. Built
from ordinary differentiable ops, so double backward, ``torch.func`` transforms (jvp, vmap, jacfwd) all work.
Measured on these 2-core CPUs (1 thread, 256×256 float32): forward 155 µs vs 491 µs for ``F.mish``, forward +
backward 712 µs vs 1154 µs; values agree to 1e-6 (float32) and 4e-15 (float64) — tested in ``tests/test_nets.py``.
For small tensors (batch-1 sampling) the five separate ops cost more than one ``F.mish`` kernel, so :func:`mish`
hands tensors below :data:`SMALL` elements to ``F.mish``.
Diffusion-QL / EDP / Diffusion Policy all use Mish in their networks, where ``F.mish`` dominated a CPU training step.
"""

from __future__ import annotations

import torch
from torch import nn

_CLAMP = 20.0


#: below this many elements ``F.mish`` (one kernel) is faster than the 5-op form: per-op dispatch dominates (measured
#: at 1×256: 7 µs vs 38 µs; at 50×256: 151 µs vs 57 µs; 1 thread, loaded machine). Both compute the same function.
SMALL = 4096


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish, elementwise; any shape. Equal to ``torch.nn.functional.mish`` (see the module docstring); tensors with
    fewer than :data:`SMALL` elements (batch-1 sampling) go to ``F.mish`` itself.

    Under plain autograd (grad enabled, no ``torch.func`` transform active, not being compiled) it is one autograd
    node that keeps mish'(x) from the forward, so the backward is one multiplication (:class:`_MishFused`,
    docs/speed.md); otherwise the composite ops above, which every transform and the compiler differentiate.
    Inside a ``torch.func`` transform the composite ops are used at every size: ``F.mish``'s backward
    (``aten::mish_backward``) has no ``vmap`` batching rule in PyTorch 2.13, so a vmapped pullback (the
    Jacobian of :func:`cdp.contraction.jacobian_fast`) would loop over the cotangents one by one."""
    transformed = torch._C._are_functorch_transforms_active()
    if x.numel() < SMALL and not transformed:
        return nn.functional.mish(x)
    if torch.is_grad_enabled() and x.requires_grad and not transformed and not torch.compiler.is_compiling():
        return _MishFused.apply(x)
    e = torch.exp(x.clamp(max=_CLAMP))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


def tanh_softplus_and_sigmoid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) = (tanh(softplus(x)), σ(x)) from one exponential: t = n / (n + 2) with n = e(e + 2), s = e / (1 + e).
    Above the exponent clamp (x > 20) s is 1 − 2e-9 instead of 1; Mish' and Mish'' only use it times 1 − t² = 0."""
    e = torch.exp(x.clamp(max=_CLAMP))
    n = e * (e + 2.0)
    return n / (n + 2.0), e / (1.0 + e)


def mish_parts(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mish(x), mish'(x)) from one exponential, mish' = t + x s (1 − t²) (t, s of
    :func:`tanh_softplus_and_sigmoid`); plain ops, for code that writes its own backward. ``out``: optional
    tensor to write mish(x) into."""
    t, s = tanh_softplus_and_sigmoid(x)
    return torch.mul(x, t, out=out), torch.addcmul(t, x, s * (1.0 - t * t))


def mish_second(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """mish''(x) = s (1 − t²) (2 + x (1 − s − 2 s t)) from t = tanh(softplus(x)) and s = σ(x); differentiable.

    From mish' = t + x·s·(1 − t²) with t' = s·(1 − t²) and s' = s·(1 − s)."""
    return s * (1.0 - t * t) * (2.0 + x * (1.0 - s - 2.0 * s * t))


class _MishFused(torch.autograd.Function):
    """mish(x) whose forward also computes mish'(x) (sharing the exponential), so the first-order backward is
    ``g · mish'(x)``. With ``create_graph`` (double backward) the backward is :func:`mish_grad` of the saved
    input instead, which is differentiable (its own backward is mish'' in closed form)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y, d1 = mish_parts(x)
        ctx.save_for_backward(x, d1)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, d1 = ctx.saved_tensors
        if torch.is_grad_enabled():
            return g * mish_grad(x)
        return g * d1


class _MishGrad(torch.autograd.Function):
    """mish'(x) as one autograd node whose backward is mish''(x) in closed form (about a third of the ops of
    differentiating the composite; double backward works because the backward uses differentiable ops)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # mish' and mish'' share t and s: compute both now, so the (first-order) backward is one multiplication
        t, s = torch.tanh(nn.functional.softplus(x)), torch.sigmoid(x)
        ctx.save_for_backward(x, mish_second(x, t, s))
        return torch.addcmul(t, x, s * (1.0 - t * t))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, second = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable mish'' (double backward works)
            return g * mish_second(x, torch.tanh(nn.functional.softplus(x)), torch.sigmoid(x))
        return g * second


def mish_grad(x: torch.Tensor) -> torch.Tensor:
    """mish'(x), elementwise, any shape; differentiable to any order (one autograd node, closed-form mish'').

    Used by the closed-form input Jacobians (:meth:`cdp.nets.mlp.MLPDenoiser.input_jacobian`,
    :meth:`~cdp.nets.mlp.MLPDenoiser.forward_and_jacobian`), whose parameter gradient passes through mish''.
    Not usable inside ``torch.func`` transforms (custom autograd Function without ``vmap``/``jvp`` rules); the
    functorch estimators differentiate :func:`mish` itself. While being compiled it is the same formula in plain ops,
    which the compiler differentiates."""
    if torch.compiler.is_compiling():
        t = torch.tanh(nn.functional.softplus(x))
        return t + x * torch.sigmoid(x) * (1.0 - t * t)
    return _MishGrad.apply(x)


def mish_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mish(x), mish'(x)), elementwise; both differentiable (used by closed-form Jacobians)."""
    return mish(x), mish_grad(x)


class Mish(nn.Module):
    """``nn.Mish`` replacement computed by :func:`mish` (no parameters; state dicts are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)
