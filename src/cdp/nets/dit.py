"""DiT-style transformer denoiser for actions and action chunks.

Follows the adaLN-Zero design of Peebles & Xie, "Scalable Diffusion Models
with Transformers" (ICCV 2023; reference code facebookresearch/DiT,
``models.py``), applied to action tokens instead of image patches:

* tokens: ``Linear(Da -> d_model)`` of each action in the chunk plus a learned
  positional embedding (``max_horizon`` positions);
* conditioning vector ``c = time_mlp(sin_emb(1000 t)) + cond_mlp(cond)``
  (the analogue of DiT's timestep + class embedding sum);
* each block: ``x += gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)`` and
  ``x += gate_m * MLP(LN(x) * (1 + scale_m) + shift_m)`` with the six
  modulation vectors regressed from ``SiLU(c)`` by a zero-initialised linear
  layer (adaLN-Zero: every block starts as the identity);
* final layer: adaLN (shift, scale) + zero-initialised ``Linear(d_model -> Da)``.

LayerNorm is computed explicitly (mean / variance / rsqrt) instead of with
``torch.nn.functional.layer_norm``: in torch 2.13 the latter has a correct JVP
but reverse-mode AD *through* that JVP (what the contraction regulariser
needs) returns wrong gradients (pytorch/pytorch#196700; checked against finite
differences in ``tests/test_nets.py``).

Because of the zero initialisation the freshly built network outputs exactly
zero for every input (as in DiT); gradients are non-zero so training proceeds
normally.  Attention is written with plain matmuls + softmax (no fused
``scaled_dot_product_attention``) so that forward-mode AD
(``torch.func.jvp`` / ``jacfwd``) and double-backward work on every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cdp.nets.embeddings import SinusoidalTimeEmbedding

__all__ = ["DiTConfig", "DiTDenoiser"]


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`DiTDenoiser`.

    Attributes:
        action_dim: ``Da``.
        cond_dim: ``Dc`` (0 means unconditional; ``cond`` must then be ``None``).
        max_horizon: number of learned positional embeddings; inputs may use any
            ``H <= max_horizon`` (single actions use ``H = 1``).
        d_model: token width; must be divisible by ``n_heads``.
        n_layers: number of DiT blocks.
        n_heads: attention heads.
        mlp_ratio: hidden width of the block MLP is ``mlp_ratio * d_model``.
        time_embed_dim: size of the sinusoidal time embedding fed to the time MLP.
    """

    action_dim: int
    cond_dim: int = 0
    max_horizon: int = 16
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_ratio: float = 4.0
    time_embed_dim: int = 256

    def __post_init__(self) -> None:
        if self.action_dim < 1:
            raise ValueError(f"DiTConfig: action_dim must be >= 1, got {self.action_dim}")
        if self.cond_dim < 0:
            raise ValueError(f"DiTConfig: cond_dim must be >= 0, got {self.cond_dim}")
        if self.max_horizon < 1:
            raise ValueError(f"DiTConfig: max_horizon must be >= 1, got {self.max_horizon}")
        if self.n_layers < 1:
            raise ValueError(f"DiTConfig: n_layers must be >= 1, got {self.n_layers}")
        if self.n_heads < 1 or self.d_model < 1 or self.d_model % self.n_heads != 0:
            raise ValueError(
                f"DiTConfig: d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.time_embed_dim < 2 or self.time_embed_dim % 2 != 0:
            raise ValueError(f"DiTConfig: time_embed_dim must be even and >= 2, got {self.time_embed_dim}")


class _LayerNorm(nn.Module):
    """Non-affine LayerNorm over the last dim, written with elementary ops.

    ``(..., D) -> (..., D)``; same values as ``nn.LayerNorm(D, elementwise_affine=False)``
    but differentiable to any order in any AD mode (see module docstring).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(dim=-1, keepdim=True)
        var = (xc * xc).mean(dim=-1, keepdim=True)
        return xc * torch.rsqrt(var + self.eps)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (B, H, D)``, ``shift/scale (B, D)`` -> ``x * (1 + scale) + shift``."""
    return x * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _SelfAttention(nn.Module):
    """Multi-head self-attention with explicit matmul/softmax (forward-AD safe).

    ``(B, H, D) -> (B, H, D)``; no masking (the denoiser sees the whole chunk).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, d = x.shape
        qkv = self.qkv(x).reshape(b, h, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, H, hd)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, h, d)
        return self.proj(y)


class _DiTBlock(nn.Module):
    """adaLN-Zero transformer block.  ``x (B, H, D)``, ``c (B, D)`` -> ``(B, H, D)``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(eps=1e-6)
        self.attn = _SelfAttention(d_model, n_heads)
        self.norm2 = _LayerNorm(eps=1e-6)
        hidden = int(round(mlp_ratio * d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.ada(c).chunk(6, dim=-1)
        x = x + g_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sh_a, sc_a))
        x = x + g_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh_m, sc_m))
        return x


class DiTDenoiser(nn.Module):
    """DiT (adaLN-Zero) transformer denoiser over action tokens.

    Interface: ``net(x, t, cond) -> out``.

    Args:
        action_dim, cond_dim, max_horizon, d_model, n_layers, n_heads,
        mlp_ratio, time_embed_dim: see :class:`DiTConfig` (or pass ``config=``).

    Shapes:
        x: ``(B, H, Da)`` with ``1 <= H <= max_horizon``, or ``(B, Da)`` (single
        action, treated as ``H = 1``).
        t: ``(B,)`` float diffusion time in ``[0, 1]`` (one element: broadcast).
        cond: ``(B, Dc)`` or ``None`` (iff ``cond_dim == 0``).
        returns: same shape as ``x``.
    """

    def __init__(
        self,
        action_dim: int | None = None,
        cond_dim: int = 0,
        max_horizon: int = 16,
        d_model: int = 256,
        n_layers: int = 6,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        time_embed_dim: int = 256,
        *,
        config: DiTConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            if action_dim is None:
                raise ValueError("DiTDenoiser: pass action_dim or config")
            config = DiTConfig(action_dim, cond_dim, max_horizon, d_model, n_layers, n_heads, mlp_ratio, time_embed_dim)
        self.config = config
        c = config
        d = c.d_model

        self.in_proj = nn.Linear(c.action_dim, d)
        self.pos_emb = nn.Parameter(torch.randn(1, c.max_horizon, d) * 0.02)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(c.time_embed_dim), nn.Linear(c.time_embed_dim, d), nn.SiLU(), nn.Linear(d, d)
        )
        self.cond_mlp = (
            nn.Sequential(nn.Linear(c.cond_dim, d), nn.SiLU(), nn.Linear(d, d)) if c.cond_dim > 0 else None
        )
        self.blocks = nn.ModuleList(_DiTBlock(d, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers))
        self.final_norm = _LayerNorm(eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out_proj = nn.Linear(d, c.action_dim)
        for lin in (self.final_ada[1], self.out_proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _check_inputs(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        c = self.config
        if x.dim() not in (2, 3) or x.shape[-1] != c.action_dim:
            raise ValueError(
                f"DiTDenoiser: x must have shape (B, {c.action_dim}) or (B, H, {c.action_dim}), got {tuple(x.shape)}"
            )
        if x.dim() == 3 and not 1 <= x.shape[1] <= c.max_horizon:
            raise ValueError(f"DiTDenoiser: horizon H={x.shape[1]} must be in [1, max_horizon={c.max_horizon}]")
        if c.cond_dim == 0 and cond is not None:
            raise ValueError("DiTDenoiser: built with cond_dim=0 but cond was given")
        if c.cond_dim > 0:
            if cond is None:
                raise ValueError(f"DiTDenoiser: cond of shape (B, {c.cond_dim}) is required")
            if cond.dim() != 2 or cond.shape[-1] != c.cond_dim:
                raise ValueError(f"DiTDenoiser: cond must have shape (B, {c.cond_dim}), got {tuple(cond.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, cond)
        single = x.dim() == 2
        xs = x.unsqueeze(1) if single else x  # (B, H, Da)
        h = xs.shape[1]
        t = t.reshape(-1).expand(xs.shape[0]) if t.numel() == 1 else t
        c = self.time_mlp(t.to(x.dtype))  # (B, D)
        if self.cond_mlp is not None:
            c = c + self.cond_mlp(cond)
        z = self.in_proj(xs) + self.pos_emb[:, :h]  # (B, H, D)
        for blk in self.blocks:
            z = blk(z, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.out_proj(_modulate(self.final_norm(z), shift, scale))  # (B, H, Da)
        return out.squeeze(1) if single else out
