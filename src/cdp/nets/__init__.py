"""Denoiser networks.

All share the interface ``net(x, t, cond) -> out`` with ``x`` of shape
``(B, Da)`` or ``(B, H, Da)``, ``t`` a ``(B,)`` float time in ``[0, 1]`` (a
one-element ``t`` is broadcast over the batch), ``cond`` of shape ``(B, Dc)``
or ``None`` (exactly when the net was built with ``cond_dim=0``), and ``out``
shaped like ``x``.  Forward passes are functional (no in-place ops, no
data-dependent Python control flow) so ``torch.func.jvp / vjp / jacfwd / vmap /
functional_call`` and reverse-mode AD through a JVP all work.

Caveat for new architectures (torch 2.13): ``F.layer_norm`` / ``nn.LayerNorm``
and ``F.batch_norm`` have correct first-order JVPs but wrong derivatives *of*
those JVPs (pytorch/pytorch#196700, #196699).  Use an explicit mean/var
normalisation (see ``cdp.nets.dit._LayerNorm``); ``GroupNorm`` was checked
and is fine.  ``F.scaled_dot_product_attention`` has no forward AD on CPU.
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
