"""MLP denoiser in the Diffusion-QL / EDP style.

Architecture facts from Wang et al., "Diffusion Policies as an Expressive
Policy Class for Offline Reinforcement Learning" (Diffusion-QL, ICLR 2023;
reference code Zhendong-Wang/Diffusion-Policies-for-Offline-RL,
``agents/model.py``) and Kang et al., "Efficient Diffusion Policies for
Offline RL" (EDP, NeurIPS 2023):

* time: sinusoidal embedding (``time_dim``) -> Linear(time_dim, 2 time_dim)
  -> Mish -> Linear(2 time_dim, time_dim);
* trunk: concat ``[x, t_emb, cond]`` -> ``n_layers`` x (Linear(hidden) -> Mish)
  -> Linear(hidden, action_dim).

Time is the project's continuous ``t in [0, 1]`` embedded as ``1000 t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cdp.nets.activations import (Mish, mish, mish_and_grad, mish_grad, mish_parts, mish_second,
                                  tanh_softplus_and_sigmoid)
from cdp.nets.embeddings import SinusoidalTimeEmbedding

__all__ = ["MLPDenoiserConfig", "MLPDenoiser"]


class _FusedTrunk(torch.autograd.Function):
    r"""The MLP's trunk and output layer, z_l = h_{l−1} W_lᵀ + b_l, h_l = Mish(z_l), y = h_n W_oᵀ + b_o, as one
    autograd node with a hand-written first-order backward — and, for the first m rows, the Rayleigh quotient
    q = vᵀ J v of their input Jacobian J = W_o D_n W_n ⋯ D_1 W_1[:, :d] (D_l = diag Mish'(z_l)) at the direction
    v = ``direction(J)`` (a constant).

    Forward: Mish and Mish' from one exponential; J by the transposed chain Jᵀ_l = D_l P_l, P_l = W_l Jᵀ_{l−1}
    (m, d, H), without a graph, its m·d rows stacked above the batch's rows in each layer's matrix product (the
    bias taken off them again), so the chain costs rows, not extra products; Mish'' of the first m rows of every
    layer in one stacked pass; v; the tangent a_l = P_l v (batched (1, d)·(d, H) products), u_l = D_l a_l, written
    into m spare rows under each layer's output. Buffer layout per layer: [Jᵀ rows (m·d) | batch (B) | tangent (m)].
    Backward: with G_l = ∂L/∂z_l (batch rows) and, in the spare rows, g_a = ∂q/∂a_l, every weight gradient is one
    product over B + m rows, [G_l; g_a]ᵀ [h_{l−1}; u_{l−1}] (u_0 = v on W_1's first d columns), and the input
    gradients one product [G_l; g_a] W_l; the slope path adds g_u ⊙ a_l ⊙ Mish''(z_l) to the first m rows of G_l.
    Equal to autograd through ``nn.Linear`` + Mish (and to :meth:`MLPDenoiser.forward_and_jvp`) to 1e-10 in float64
    (tests/test_nets.py, tests/test_contraction.py). A double backward raises (``once_differentiable``).

    Inputs (in this order; the backward's ``needs_input_grad[4]`` is h0's): m (0: no Rayleigh quotient),
    ``direction`` (or None), ``q_loss`` (or None: a graph-free ``q -> (loss (), dloss/dq (m,))`` applied to q, whose
    loss is then output instead of q), d, h0 (B, D0), W_o (d_out, H), b_o, then the n hidden weights and the n
    hidden biases. Outputs: (y (B, d_out), q (m,) or q_loss's loss (), v (m, d)); q and v are empty when m = 0.
    """

    @staticmethod
    def forward(ctx, m: int, direction, q_loss, d: int, h0: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
                *wb: torch.Tensor):  # noqa: D102
        n = len(wb) // 2
        ws, bs = wb[:n], wb[n:]
        B, md = h0.shape[0], m * d
        if m:
            x0 = h0.new_zeros(B + m, h0.shape[1])
            x0[:B] = h0
            w_in_t = ws[0][:, :d].t().contiguous()  # (d, H); contiguous, else the products below are strided
        else:
            x0 = h0
        # Each hidden layer writes one buffer of md + B + m rows: [Jᵀ rows (m·d) | batch rows (B) | tangent (m)].
        # The next layer's matrix product takes the first md + B rows at once, so the Jacobian chain rides in the
        # batch's product (its bias is taken off again); the backward uses the last B + m rows.
        ins, d1s, pre, z_reg, buf = [x0], [], [], [], None
        for l, (w, b) in enumerate(zip(ws, bs)):
            if l == 0:
                z = torch.addmm(b, h0, w.t())
            else:
                z_all = torch.addmm(b, buf[: md + B], w.t())
                z = z_all[md:]
                if m:
                    pre.append(z_all[:md].sub_(b).view(m, d, -1))  # P_l = W_l Jᵀ_{l−1}, no bias
            buf = z.new_empty(md + B + m, z.shape[1])
            _, d1 = mish_parts(z, out=buf[md: md + B])  # Mish into the batch rows, Mish' kept for the backward
            d1s.append(d1)
            if m:
                z_reg.append(z[:m])
                torch.mul(d1[:m].unsqueeze(1), w_in_t if l == 0 else pre[-1], out=buf[:md].view(m, d, -1))
            ins.append(buf[md:])
        y_all = torch.addmm(b_out, buf[: md + B], w_out.t())
        y = y_all[md:]
        ctx.n, ctx.m, ctx.B, ctx.d = n, m, B, d
        if not m:
            ctx.save_for_backward(w_out, *ws, *ins, *d1s)
            q, v = y.new_empty(0), y.new_empty(0)
            ctx.mark_non_differentiable(q, v)
            return y, q, v
        zr = torch.stack(z_reg)  # (n, m, H): Mish'' of the regularised rows of every layer at once
        d2s = mish_second(zr, *tanh_softplus_and_sigmoid(zr))
        J = y_all[:md].sub_(b_out).view(m, d, -1).transpose(1, 2)
        v = direction(J)
        if tuple(v.shape) != (m, d):
            raise ValueError(f"direction must return shape ({m}, {d}), got {tuple(v.shape)}")
        v = v.to(J.dtype)
        x0[B:, :d] = v
        slopes = [g[:m] for g in d1s]
        w_in = ws[0][:, :d]
        a = [torch.mm(v, w_in.t())]
        for p in pre:
            a.append(torch.bmm(v.unsqueeze(1), p).squeeze(1))
        for l in range(n):
            torch.mul(slopes[l], a[l], out=ins[l + 1][B:])
        q = (v * torch.mm(ins[n][B:], w_out.t())).sum(-1)
        ctx.q_grad = None
        if q_loss is not None:  # the loss of q applied here: output it, keep dloss/dq for the backward
            q, ctx.q_grad = q_loss(q)
        ctx.save_for_backward(w_out, *ws, *ins, *d1s, d2s, *a, v)
        ctx.mark_non_differentiable(v)
        return y, q, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y: torch.Tensor, g_q: torch.Tensor | None, _g_v):  # noqa: D102
        n, m, B = ctx.n, ctx.m, ctx.B
        saved = ctx.saved_tensors
        w_out, ws, ins, d1s = saved[0], saved[1:1 + n], saved[1 + n:2 + 2 * n], saved[2 + 2 * n:2 + 3 * n]
        if m:
            d2s, a, v = saved[2 + 3 * n], saved[3 + 3 * n:3 + 4 * n], saved[-1]
            if ctx.q_grad is not None:  # g_q is ∂L/∂loss(q), a scalar
                g_q = ctx.q_grad * g_q
            g_rows = torch.cat([g_y, g_q.unsqueeze(1) * v])  # [∂L/∂y; ∂L/∂(J v)]
        else:
            g_rows = g_y
        g_wout = torch.mm(g_rows.t(), ins[n])
        g_bout = g_y.sum(0)
        g_h = torch.mm(g_rows, w_out)  # [∂L/∂h_n; ∂q/∂u_n]
        g_ws, g_bs = [None] * n, [None] * n
        g_h0 = None
        for l in range(n - 1, -1, -1):
            G = g_h.new_empty(B + m, g_h.shape[1])
            torch.mul(g_h[:B], d1s[l], out=G[:B])
            if m:
                g_u = g_h[B:]
                G[:m].addcmul_(g_u * a[l], d2s[l])  # through Mish'(z_l) of the regularised rows
                torch.mul(g_u, d1s[l][:m], out=G[B:])  # ∂q/∂a_l
            g_ws[l] = torch.mm(G.t(), ins[l])
            g_bs[l] = G[:B].sum(0)
            if l > 0:
                g_h = torch.mm(G, ws[l])
            elif ctx.needs_input_grad[4]:  # h0 (after m, direction, q_loss, d)
                g_h0 = torch.mm(G[:B], ws[0])
        return (None, None, None, None, g_h0, g_wout, g_bout, *g_ws, *g_bs)


@dataclass
class MLPDenoiserConfig:
    """Hyper-parameters of :class:`MLPDenoiser`.

    Attributes:
        action_dim: ``Da``.
        cond_dim: ``Dc`` (0 means unconditional; ``cond`` must then be ``None``).
        hidden: width of the hidden layers (256 in Diffusion-QL).
        n_layers: number of hidden Linear+Mish layers (3 in Diffusion-QL).
        time_dim: size of the sinusoidal time embedding and of the time-MLP output (16).
        horizon: chunk length ``H`` accepted for ``(B, H, Da)`` inputs, which are
            flattened to ``H * Da`` features; ``(B, Da)`` inputs require ``horizon == 1``.
    """

    action_dim: int
    cond_dim: int = 0
    hidden: int = 256
    n_layers: int = 3
    time_dim: int = 16
    horizon: int = 1

    def __post_init__(self) -> None:
        if self.action_dim < 1:
            raise ValueError(f"MLPDenoiserConfig: action_dim must be >= 1, got {self.action_dim}")
        if self.cond_dim < 0:
            raise ValueError(f"MLPDenoiserConfig: cond_dim must be >= 0, got {self.cond_dim}")
        if self.hidden < 1:
            raise ValueError(f"MLPDenoiserConfig: hidden must be >= 1, got {self.hidden}")
        if self.n_layers < 1:
            raise ValueError(f"MLPDenoiserConfig: n_layers must be >= 1, got {self.n_layers}")
        if self.time_dim < 2 or self.time_dim % 2 != 0:
            raise ValueError(f"MLPDenoiserConfig: time_dim must be even and >= 2, got {self.time_dim}")
        if self.horizon < 1:
            raise ValueError(f"MLPDenoiserConfig: horizon must be >= 1, got {self.horizon}")


class MLPDenoiser(nn.Module):
    """Diffusion-QL style MLP denoiser.

    Interface: ``net(x, t, cond) -> out``.

    Args:
        action_dim, cond_dim, hidden, n_layers, time_dim, horizon: see
        :class:`MLPDenoiserConfig` (or pass ``config=``).

    Shapes:
        x: ``(B, Da)`` (needs ``horizon == 1``) or ``(B, H, Da)`` with ``H == horizon``
        (flattened to ``(B, H * Da)`` internally).
        t: ``(B,)`` float diffusion time in ``[0, 1]`` (one element: broadcast).
        cond: ``(B, Dc)`` or ``None`` (iff ``cond_dim == 0``).
        returns: same shape as ``x``.
    """

    def __init__(
        self,
        action_dim: int | None = None,
        cond_dim: int = 0,
        hidden: int = 256,
        n_layers: int = 3,
        time_dim: int = 16,
        horizon: int = 1,
        *,
        config: MLPDenoiserConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            if action_dim is None:
                raise ValueError("MLPDenoiser: pass action_dim or config")
            config = MLPDenoiserConfig(action_dim, cond_dim, hidden, n_layers, time_dim, horizon)
        self.config = config
        c = config
        self.flat_dim = c.horizon * c.action_dim
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(c.time_dim),
            nn.Linear(c.time_dim, 2 * c.time_dim),
            Mish(),
            nn.Linear(2 * c.time_dim, c.time_dim),
        )
        layers: list[nn.Module] = []
        width = self.flat_dim + c.time_dim + c.cond_dim
        for _ in range(c.n_layers):
            layers += [nn.Linear(width, c.hidden), Mish()]
            width = c.hidden
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(c.hidden, self.flat_dim)

    def _check_inputs(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        c = self.config
        if x.dim() == 2:
            ok = c.horizon == 1 and x.shape[-1] == c.action_dim
        elif x.dim() == 3:
            ok = x.shape[1] == c.horizon and x.shape[2] == c.action_dim
        else:
            ok = False
        if not ok:
            expect = f"(B, {c.action_dim})" if c.horizon == 1 else f"(B, {c.horizon}, {c.action_dim})"
            raise ValueError(f"MLPDenoiser: x must have shape {expect}, got {tuple(x.shape)}")
        if c.cond_dim == 0 and cond is not None:
            raise ValueError("MLPDenoiser: built with cond_dim=0 but cond was given")
        if c.cond_dim > 0:
            if cond is None:
                raise ValueError(f"MLPDenoiser: cond of shape (B, {c.cond_dim}) is required")
            if cond.dim() != 2 or cond.shape[-1] != c.cond_dim:
                raise ValueError(f"MLPDenoiser: cond must have shape (B, {c.cond_dim}), got {tuple(cond.shape)}")

    def _trunk_input(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                     t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's input rows ``[x flattened, time embedding, cond]``, (B, d + time_dim + Dc), after checking
        the shapes (ValueError). ``t`` may have one element (broadcast); a given ``t_emb`` replaces it."""
        self._check_inputs(x, cond)
        b = x.shape[0]
        if t_emb is None:
            t = t.reshape(-1).expand(b) if t.numel() == 1 else t
            t_emb = self.time_mlp(t.to(x.dtype))
        elif t_emb.shape[0] != b:
            t_emb = t_emb.expand(b, -1)
        parts = [x.reshape(b, self.flat_dim), t_emb]
        if cond is not None:
            parts.append(cond)
        return torch.cat(parts, dim=-1)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time MLP's output for t of shape (B,) → (B, time_dim); pass it back as ``t_emb`` to skip recomputing it
        (samplers do, since every sample of a step shares t)."""
        return self.time_mlp(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Da) or (B, H, Da), t (B,) or one element, cond (B, Dc) or None; optional precomputed
        ``t_emb`` (B, time_dim) or (1, time_dim) from :meth:`embed_time` (then ``t`` is ignored). Returns x's shape."""
        return self.out(self.trunk(self._trunk_input(x, t, cond, t_emb))).reshape(x.shape)

    def forward_and_jacobian(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, n_jac: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass on all B rows and, in the same layer loop, the input Jacobian of the first ``n_jac``.

        The Jacobian rows reuse the forward's pre-activations (no second forward pass, no second time embedding):
        per layer, Jᵀ ← Mish'(z[:n_jac]) ⊙ (Jᵀ Wᵀ), one (n_jac·d, width) product beside the batch's. (Stacking the
        Jacobian rows into the batch's product through autograd is no faster — the cat / slice backward costs what
        it saves; :class:`_FusedTrunk` stacks them with a written-out backward instead.)

        Args:
            x: (B, Da) or (B, H, Da). t: (B,). cond: (B, Dc) or None. n_jac: 0 ≤ n_jac ≤ B.
        Returns:
            (out with x's shape, J (n_jac, d, d) with d = H·Da) — equal to ``forward`` and :meth:`input_jacobian`
            (tested to 1e-12 in float64, parameter gradients included).
        Raises:
            ValueError: bad shapes, or n_jac outside [0, B].
        """
        h = self._trunk_input(x, t, cond)
        if not 0 <= n_jac <= x.shape[0]:
            raise ValueError(f"n_jac must be in [0, {x.shape[0]}], got {n_jac}")
        d = self.flat_dim
        jac_t = None  # (n_jac, d, width): transposed Jacobian of h w.r.t. the first n_jac rows' flat inputs
        for lin in list(self.trunk)[0::2]:
            z = lin(h)
            # contiguous, so jac_t stays contiguous (see _FusedTrunk: a strided one makes linear ~10x slower)
            jz = lin.weight[:, :d].t().contiguous() if jac_t is None else nn.functional.linear(jac_t, lin.weight)
            jac_t = mish_grad(z[:n_jac]).unsqueeze(1) * jz
            h = mish(z)
        out = self.out(h).reshape(x.shape)
        return out, nn.functional.linear(jac_t, self.out.weight).transpose(1, 2)

    def forward_and_jvp(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, n_jac: int,
                        direction: "Callable[[torch.Tensor], torch.Tensor]"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""The forward pass on all B rows and, for the first ``n_jac``, a Jacobian-vector product :math:`J v` along a
        direction chosen from their Jacobian — the cheap way to differentiate an eigenvalue of :math:`J^{sym}`.

        In one layer loop: the forward (with graph) keeps each layer's Mish'(z) of the first ``n_jac`` rows; the
        input Jacobian J (n_jac, d, d) is built from them *without* a graph; ``v = direction(J)``; then the single
        tangent v is pushed through the same layers *with* a graph, u ← Mish'(z) ⊙ (W u), giving :math:`J v`. Its
        backward costs one tangent row per sample instead of the d of :meth:`forward_and_jacobian`; with v the top
        eigenvector, :math:`v^\top J v` has the eigenvalue's value and gradient (Hellmann–Feynman; see
        :class:`cdp.contraction.ContractionConfig` ``exact_grad``).

        Args:
            x: (B, Da) or (B, H, Da). t: (B,). cond: (B, Dc) or None. n_jac: 1 ≤ n_jac ≤ B.
            direction: maps the detached Jacobians (n_jac, d, d) to directions (n_jac, d) (treated as constants).
        Returns:
            (out with x's shape, v (n_jac, d) detached, Jv (n_jac, d) with graph to the parameters); d = H·Da.
        Raises:
            ValueError: bad shapes, n_jac outside [1, B], or ``direction`` returning a wrong shape.
        """
        h = self._trunk_input(x, t, cond)
        if not 1 <= n_jac <= x.shape[0]:
            raise ValueError(f"n_jac must be in [1, {x.shape[0]}], got {n_jac}")
        d = self.flat_dim
        lins = list(self.trunk)[0::2]
        slopes = []  # Mish'(z) of the first n_jac rows, per layer, with graph
        for lin in lins:
            z = lin(h)
            slopes.append(mish_grad(z[:n_jac]))
            h = mish(z)
        out = self.out(h).reshape(x.shape)
        with torch.no_grad():
            jac_t = slopes[0].detach().unsqueeze(1) * lins[0].weight[:, :d].t().contiguous()  # contiguous: see _FusedTrunk
            for lin, sl in zip(lins[1:], slopes[1:]):
                jac_t = sl.detach().unsqueeze(1) * nn.functional.linear(jac_t, lin.weight)
            J = nn.functional.linear(jac_t, self.out.weight).transpose(1, 2)
            v = direction(J)
        if tuple(v.shape) != (n_jac, d):
            raise ValueError(f"direction must return shape ({n_jac}, {d}), got {tuple(v.shape)}")
        v = v.detach().to(h.dtype)
        u = slopes[0] * nn.functional.linear(v, lins[0].weight[:, :d])
        for lin, sl in zip(lins[1:], slopes[1:]):
            u = sl * nn.functional.linear(u, lin.weight)
        return out, v, nn.functional.linear(u, self.out.weight)

    def _fused(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, n_jac: int, direction,
               q_loss=None):
        h0 = self._trunk_input(x, t, cond)
        lins = list(self.trunk)[0::2]
        y, q, v = _FusedTrunk.apply(n_jac, direction, q_loss, self.flat_dim, h0, self.out.weight, self.out.bias,
                                    *[lin.weight for lin in lins], *[lin.bias for lin in lins])
        return y.reshape(x.shape), v, q

    def train_forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` for first-order training: the trunk is one autograd node with a written-out backward
        (:class:`_FusedTrunk`; same values and gradients). Used by :meth:`cdp.policy.DiffusionPolicy.compute_loss`
        for the diffusion loss, with and without the regulariser, so both pay the same for the shared part. A double
        backward through it raises; use :meth:`forward` for that (and inside ``torch.func`` transforms).

        Shapes as :meth:`forward`."""
        return self._fused(x, t, cond, 0, None)[0]

    def forward_and_rayleigh(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, n_jac: int,
                             direction: "Callable[[torch.Tensor], torch.Tensor]", q_loss: Callable | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""The forward pass on all B rows and, for the first ``n_jac``, the Rayleigh quotient :math:`q = v^\top J v`
        at a direction chosen from their Jacobian J — the training-time path of the exact hinge
        (``exact_grad="rayleigh"``): with v the top eigenvector of :math:`s J^{sym}`, :math:`s q` is
        :math:`\lambda_{\max}(s J^{sym})` with its gradient (Hellmann–Feynman).

        Same value and parameter gradients as ``(v * jv).sum(-1)`` from :meth:`forward_and_jvp` (tested to 1e-12 in
        float64), at a lower cost (:class:`_FusedTrunk`): Mish and Mish' share one
        exponential, the tangent reuses the Jacobian chain's products, and its gradients ride in the batch's matrix
        products (m extra rows). First-order only: a double backward raises.

        Args:
            x: (B, Da) or (B, H, Da). t: (B,). cond: (B, Dc) or None. n_jac: 1 ≤ n_jac ≤ B.
            direction: maps the detached Jacobians (n_jac, d, d) to directions (n_jac, d), d = H·Da.
            q_loss: optional graph-free loss of q, ``q (n_jac,) -> (loss (), dloss/dq (n_jac,))`` (e.g.
                :meth:`cdp.contraction.ContractionRegularizer.hinge_of_rayleigh`); then the third output is that
                loss, whose gradient the fused backward applies (no autograd nodes of its own).
        Returns:
            (out with x's shape, v (n_jac, d) detached, q (n_jac,) — or q_loss's loss () — with graph to the
            parameters).
        Raises:
            ValueError: bad shapes, n_jac outside [1, B], or ``direction`` returning a wrong shape.
        """
        if not 1 <= n_jac <= x.shape[0]:
            raise ValueError(f"n_jac must be in [1, {x.shape[0]}], got {n_jac}")
        return self._fused(x, t, cond, n_jac, direction, q_loss)

    def input_jacobian(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample Jacobians ∂out/∂x in closed form (chain rule through the Linear+Mish trunk), (B, d, d).

        d = H·Da (the flattened action). Equals :func:`cdp.contraction.jacobian` (tested to 1e-10 in float64) but
        uses ordinary ops only (no functorch forward-mode), so it and its gradient w.r.t. the parameters are several
        times cheaper for the small batches the contraction regulariser uses. Differentiable w.r.t. the parameters
        (Mish' is written out, so double backward works).
        """
        h = self._trunk_input(x, t, cond)
        jac_t = None  # (B, d, width): the TRANSPOSED Jacobian of h w.r.t. flat, so each layer is one (B·d, width) mm
        mods = list(self.trunk)
        for lin in mods[0::2]:
            z = lin(h)
            jz = (lin.weight[:, : self.flat_dim].t().contiguous() if jac_t is None  # contiguous: see _FusedTrunk
                  else nn.functional.linear(jac_t, lin.weight))
            h, dmish = mish_and_grad(z)  # Mish(z), Mish'(z)
            jac_t = dmish.unsqueeze(1) * jz
        return nn.functional.linear(jac_t, self.out.weight).transpose(1, 2)
