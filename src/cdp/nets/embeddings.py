"""Time embeddings shared by all denoisers.

Convention of this project: diffusion time is a continuous float ``t in [0, 1]``
(a discrete step ``k`` of ``T`` is fed as ``k / T``).  Embeddings act on the
rescaled value ``1000 * t`` so that the frequencies match the usual
integer-timestep embeddings of DDPM / Diffusion Policy / DiT.

Reference: the sin/cos position encoding of Vaswani et al., "Attention Is All
You Need" (NeurIPS 2017), Sec. 3.5, as used for diffusion steps by Ho et al.
(DDPM, 2020) and Chi et al. (Diffusion Policy, RSS 2023).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinusoidalTimeEmbedding", "TIME_SCALE"]

#: ``t in [0, 1]`` is multiplied by this before the sinusoidal embedding.
TIME_SCALE = 1000.0


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal embedding of continuous diffusion time.

    ``emb(t) = [sin(1000 t w_0), ..., sin(1000 t w_{h-1}), cos(1000 t w_0), ..., cos(1000 t w_{h-1})]``
    with ``h = dim // 2`` and ``w_i = max_period ** (-i / h)`` (Vaswani et al. 2017).

    Args:
        dim: embedding size; must be even and >= 2.
        max_period: base of the geometric frequency progression (10000 as in the
            transformer paper).

    Shapes:
        t: ``(B,)`` float tensor with values in ``[0, 1]`` (a 0-d tensor is
        treated as ``(1,)``).
        returns: ``(B, dim)`` in ``t``'s dtype.

    Differentiable in ``t`` (forward and reverse mode; works under ``torch.func``).
    The frequency table is a non-persistent buffer, so it follows ``.to(dtype)``
    and ``.to(device)`` but is not part of ``state_dict``.
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2 != 0:
            raise ValueError(f"SinusoidalTimeEmbedding: dim must be an even int >= 2, got {dim!r}")
        if max_period <= 1.0:
            raise ValueError(f"SinusoidalTimeEmbedding: max_period must be > 1, got {max_period!r}")
        self.dim = dim
        self.max_period = float(max_period)
        half = dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.reshape(1)
        if not t.is_floating_point():
            t = t.to(self.freqs.dtype)
        args = (TIME_SCALE * t).unsqueeze(-1) * self.freqs.to(t.dtype)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}"
