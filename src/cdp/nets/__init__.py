"""Denoiser networks.  All share the interface ``net(x, t, cond) -> out`` with
``x`` of shape ``(B, Da)`` or ``(B, H, Da)``, ``t`` a ``(B,)`` float time in
``[0, 1]``, ``cond`` of shape ``(B, Dc)`` or ``None``, and ``out`` shaped like ``x``.
"""

from cdp.nets.dit import DiTConfig, DiTDenoiser
from cdp.nets.embeddings import SinusoidalTimeEmbedding
from cdp.nets.mlp import MLPDenoiser, MLPDenoiserConfig
from cdp.nets.unet1d import ConditionalUnet1D, UNet1DConfig

__all__ = [
    "SinusoidalTimeEmbedding",
    "ConditionalUnet1D",
    "UNet1DConfig",
    "DiTDenoiser",
    "DiTConfig",
    "MLPDenoiser",
    "MLPDenoiserConfig",
]
