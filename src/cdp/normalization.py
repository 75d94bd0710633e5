"""Feature normalisers stored as module buffers, so they travel inside a policy's safetensors checkpoint.

* ``minmax`` maps each dimension linearly onto [-1, 1] from the data's min/max (Diffusion Policy's
  ``LinearNormalizer`` with ``mode="limits"``); a constant dimension maps to 0.
* ``gaussian`` subtracts the mean and divides by the standard deviation (+ eps), as IQL/EDP do for observations.
* ``identity`` leaves data unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

NORMALIZER_MODES = ("minmax", "gaussian", "identity")


class Normalizer(nn.Module):
    """Per-dimension affine normaliser y = (x - offset) / scale over the last axis.

    Args:
        dim: feature dimension D.
        mode: ``"minmax"``, ``"gaussian"`` or ``"identity"``.
        eps: floor on the scale (constant features).

    Raises:
        ValueError: unknown mode, non-positive dim, or data with the wrong last dimension / non-finite values.
    """

    def __init__(self, dim: int, mode: str = "minmax", eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in NORMALIZER_MODES:
            raise ValueError(f"unknown normaliser mode {mode!r}; expected one of {NORMALIZER_MODES}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.mode, self.dim, self.eps = mode, dim, eps
        self.register_buffer("offset", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> "Normalizer":
        """Fit to data of shape (N, ..., D); returns self."""
        data = torch.as_tensor(data, dtype=torch.float32)
        if data.shape[-1] != self.dim:
            raise ValueError(f"normaliser expects last dimension {self.dim}, got data of shape {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("cannot fit a normaliser: data contain NaN or inf")
        flat = data.reshape(-1, self.dim)
        if self.mode == "minmax":
            lo, hi = flat.min(0).values, flat.max(0).values
            half = (hi - lo) / 2
            const = half < self.eps
            self.offset.copy_(torch.where(const, lo, (hi + lo) / 2))
            self.scale.copy_(torch.where(const, torch.ones_like(half), half))
        elif self.mode == "gaussian":
            self.offset.copy_(flat.mean(0))
            self.scale.copy_(flat.std(0, unbiased=False).clamp_min(self.eps))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., D) normalised."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        return (x - self.offset.to(x.dtype)) / self.scale.to(x.dtype)

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        if y.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(y.shape)}")
        return y * self.scale.to(y.dtype) + self.offset.to(y.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode}"
