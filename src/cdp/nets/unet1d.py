"""Conditional 1-D temporal U-Net denoiser for action chunks.

Re-implementation of the ``ConditionalUnet1D`` of Diffusion Policy
(Chi et al., "Diffusion Policy: Visuomotor Policy Learning via Action
Diffusion", RSS 2023; reference code: real-stanford/diffusion_policy,
``diffusion_policy/model/diffusion/conditional_unet1d.py`` and
``conv1d_components.py``).  Architecture facts followed:

* the action chunk ``(B, H, Da)`` is treated as a 1-D signal over the horizon
  with ``Da`` channels;
* ``Conv1dBlock`` = Conv1d (same padding) -> GroupNorm(n_groups) -> Mish;
* conditional residual block = Conv1dBlock -> FiLM -> Conv1dBlock, plus a
  1x1-conv (or identity) skip; FiLM predicts a per-channel ``scale`` and
  ``bias`` (``cond_predict_scale=True`` in the reference configs) from the
  global feature ``[time embedding, cond]`` via Mish -> Linear;
* time encoder = sinusoidal embedding -> Linear(d, 4d) -> Mish -> Linear(4d, d);
* down path: per level two residual blocks, then a stride-2 Conv1d(k=3)
  (not after the last level); two mid residual blocks; up path: concat skip,
  two residual blocks, ConvTranspose1d(k=4, stride 2) upsampling; final
  Conv1dBlock + 1x1 Conv1d back to ``Da`` channels.

Differences from the reference: time is the project's continuous
``t in [0, 1]`` (embedded as ``1000 t``, see :mod:`cdp.nets.embeddings`), the
local-conditioning branch is not implemented, and the horizon is validated.
The module is purely functional in its forward pass (no in-place ops, no
data-dependent control flow), so it works under ``torch.func.jvp / vjp /
jacfwd / vmap / functional_call``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cdp.nets.activations import Mish
from cdp.nets.embeddings import SinusoidalTimeEmbedding

__all__ = ["UNet1DConfig", "ConditionalUnet1D"]


@dataclass
class UNet1DConfig:
    """Hyper-parameters of :class:`ConditionalUnet1D`.

    Attributes:
        action_dim: ``Da``, channels of the action signal.
        cond_dim: ``Dc``, size of the global condition (0 means unconditional;
            then ``cond`` must be ``None``).
        down_dims: channel width of each U-Net level (Diffusion Policy default
            ``(256, 512, 1024)``).  The horizon must be divisible by
            ``2 ** (len(down_dims) - 1)``.
        time_embed_dim: size of the diffusion-step embedding
            (``diffusion_step_embed_dim``; reference default 256).
        kernel_size: odd conv kernel size (reference configs use 5).
        n_groups: GroupNorm groups; must divide every entry of ``down_dims``.
    """

    action_dim: int
    cond_dim: int = 0
    down_dims: tuple[int, ...] = (256, 512, 1024)
    time_embed_dim: int = 256
    kernel_size: int = 5
    n_groups: int = 8

    def __post_init__(self) -> None:
        self.down_dims = tuple(int(d) for d in self.down_dims)
        if self.action_dim < 1:
            raise ValueError(f"UNet1DConfig: action_dim must be >= 1, got {self.action_dim}")
        if self.cond_dim < 0:
            raise ValueError(f"UNet1DConfig: cond_dim must be >= 0, got {self.cond_dim}")
        if len(self.down_dims) < 1:
            raise ValueError("UNet1DConfig: down_dims must have at least one level")
        if self.n_groups < 1:
            raise ValueError(f"UNet1DConfig: n_groups must be >= 1, got {self.n_groups}")
        for d in self.down_dims:
            if d < 1 or d % self.n_groups != 0:
                raise ValueError(
                    f"UNet1DConfig: every down_dims entry must be a positive multiple of "
                    f"n_groups={self.n_groups}, got {self.down_dims}"
                )
        if self.kernel_size < 1 or self.kernel_size % 2 != 1:
            raise ValueError(f"UNet1DConfig: kernel_size must be a positive odd int, got {self.kernel_size}")
        if self.time_embed_dim < 2 or self.time_embed_dim % 2 != 0:
            raise ValueError(f"UNet1DConfig: time_embed_dim must be even and >= 2, got {self.time_embed_dim}")

    @property
    def horizon_multiple(self) -> int:
        """The horizon ``H`` must be a multiple of this (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.down_dims) - 1)


class _Conv1dBlock(nn.Module):
    """Conv1d (same padding) -> GroupNorm -> Mish.  ``(B, C_in, H) -> (B, C_out, H)``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(n_groups, c_out)
        self.act = Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class _FiLMResBlock1D(nn.Module):
    """Conditional residual block with FiLM (per-channel scale and bias).

    Shapes: ``x (B, C_in, H)``, ``g (B, G)`` -> ``(B, C_out, H)``.
    """

    def __init__(self, c_in: int, c_out: int, g_dim: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.block1 = _Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = _Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(Mish(), nn.Linear(g_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.c_out = c_out

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        scale, bias = self.film(g).unsqueeze(-1).chunk(2, dim=1)  # each (B, C_out, 1)
        h = scale * h + bias
        h = self.block2(h)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Diffusion Policy's conditional 1-D U-Net (Chi et al., RSS 2023).

    Interface (shared by all ``cdp`` denoisers): ``net(x, t, cond) -> out``.

    Args:
        action_dim, cond_dim, down_dims, time_embed_dim, kernel_size, n_groups:
            see :class:`UNet1DConfig` (or pass ``config=``).

    Shapes:
        x: ``(B, H, Da)`` noisy action chunk; ``H`` must be a multiple of
        ``2 ** (len(down_dims) - 1)`` (``ValueError`` otherwise).
        t: ``(B,)`` float diffusion time in ``[0, 1]`` (one element: broadcast).
        cond: ``(B, Dc)`` or ``None`` (iff ``cond_dim == 0``).
        returns: ``(B, H, Da)``.
    """

    def __init__(
        self,
        action_dim: int | None = None,
        cond_dim: int = 0,
        down_dims: tuple[int, ...] = (256, 512, 1024),
        time_embed_dim: int = 256,
        kernel_size: int = 5,
        n_groups: int = 8,
        *,
        config: UNet1DConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            if action_dim is None:
                raise ValueError("ConditionalUnet1D: pass action_dim or config")
            config = UNet1DConfig(action_dim, cond_dim, tuple(down_dims), time_embed_dim, kernel_size, n_groups)
        self.config = config
        c = config
        k, ng = c.kernel_size, c.n_groups
        d_t = c.time_embed_dim

        self.time_encoder = nn.Sequential(
            SinusoidalTimeEmbedding(d_t),
            nn.Linear(d_t, 4 * d_t),
            Mish(),
            nn.Linear(4 * d_t, d_t),
        )
        g_dim = d_t + c.cond_dim

        widths = [c.action_dim, *c.down_dims]
        pairs = list(zip(widths[:-1], widths[1:]))
        n_levels = len(pairs)

        self.down = nn.ModuleList()
        for i, (ci, co) in enumerate(pairs):
            last = i == n_levels - 1
            self.down.append(
                nn.ModuleList(
                    [
                        _FiLMResBlock1D(ci, co, g_dim, k, ng),
                        _FiLMResBlock1D(co, co, g_dim, k, ng),
                        nn.Conv1d(co, co, 3, stride=2, padding=1) if not last else nn.Identity(),
                    ]
                )
            )

        mid = c.down_dims[-1]
        self.mid = nn.ModuleList([_FiLMResBlock1D(mid, mid, g_dim, k, ng), _FiLMResBlock1D(mid, mid, g_dim, k, ng)])

        # Up path: one level fewer than the down path, each ends with a x2 upsample,
        # so the total number of up-samplings equals the number of down-samplings.
        self.up = nn.ModuleList()
        for ci, co in reversed(pairs[1:]):
            self.up.append(
                nn.ModuleList(
                    [
                        _FiLMResBlock1D(2 * co, ci, g_dim, k, ng),
                        _FiLMResBlock1D(ci, ci, g_dim, k, ng),
                        nn.ConvTranspose1d(ci, ci, 4, stride=2, padding=1),
                    ]
                )
            )

        d0 = c.down_dims[0]
        self.final = nn.Sequential(_Conv1dBlock(d0, d0, k, ng), nn.Conv1d(d0, c.action_dim, 1))

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.action_dim:
            raise ValueError(
                f"ConditionalUnet1D: x must have shape (B, H, {c.action_dim}), got {tuple(x.shape)}"
            )
        h = x.shape[1]
        if h < 1 or h % c.horizon_multiple != 0:
            raise ValueError(
                f"ConditionalUnet1D: horizon H={h} must be a positive multiple of "
                f"2**(len(down_dims)-1)={c.horizon_multiple} (down_dims={c.down_dims}); "
                f"pad the action chunk or use fewer levels"
            )
        if c.cond_dim == 0 and cond is not None:
            raise ValueError("ConditionalUnet1D: built with cond_dim=0 but cond was given")
        if c.cond_dim > 0:
            if cond is None:
                raise ValueError(f"ConditionalUnet1D: cond of shape (B, {c.cond_dim}) is required")
            if cond.dim() != 2 or cond.shape[-1] != c.cond_dim:
                raise ValueError(
                    f"ConditionalUnet1D: cond must have shape (B, {c.cond_dim}), got {tuple(cond.shape)}"
                )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, t, cond)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        g = self.time_encoder(t.to(x.dtype))  # (B, d_t)
        if cond is not None:
            g = torch.cat([g, cond], dim=-1)  # (B, d_t + Dc)

        h = x.transpose(1, 2)  # (B, Da, H)
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, g), g)
            skips.append(h)
            h = downsample(h)
        for blk in self.mid:
            h = blk(h, g)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, g), g))
        h = self.final(h)  # (B, Da, H)
        return h.transpose(1, 2)
