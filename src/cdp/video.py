"""Rollout videos: animated GIFs written with Pillow (a dependency of matplotlib, so always installed).

GIF needs no codec (ffmpeg is not a dependency of this project), plays in browsers, GitHub and TensorBoard's image
plugin. Frames are downscaled (default 256 px on the long side) to keep a 300-step PushT episode near 1-3 MB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ._optional import optional


def write_gif(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 10.0, size: int | None = 256) -> Path:
    """Write RGB frames to an animated GIF.

    Args:
        frames: sequence of (H, W, 3) uint8 arrays (all the same shape), e.g. ``env.render()`` output.
        path: output file (parent folders are created; written to ``path.tmp`` first, then renamed).
        fps: playback rate (PushT's control rate is 10 Hz).
        size: long-side pixels after downscaling (None: keep the size).
    Returns:
        The path written.
    Raises:
        ValueError: no frames, or a frame that is not (H, W, 3) uint8 of the first frame's shape.
    """
    Image = optional("PIL.Image", "plots", "writing rollout videos")

    if len(frames) == 0:
        raise ValueError("write_gif: no frames")
    shape = np.asarray(frames[0]).shape
    imgs = []
    for i, f in enumerate(frames):
        a = np.asarray(f)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape != shape:
            raise ValueError(f"write_gif: frame {i} must be (H, W, 3) uint8 like frame 0 {shape}, got {a.shape} {a.dtype}")
        img = Image.fromarray(a)
        if size is not None and max(a.shape[:2]) > size:
            scale = size / max(a.shape[:2])
            img = img.resize((max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale))), Image.BILINEAR)
        imgs.append(img.convert("P", palette=Image.ADAPTIVE))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)), loop=0)
    os.replace(tmp, path)
    return path
