"""Device, precision and thread settings (``train.device``, ``train.precision``, ``train.threads``).

Every tensor of a run follows the resolved device: datasets (held on the device as one tensor each), batches,
``torch.Generator`` objects, networks, EMA copies, normalisers, critics, samplers and evaluation inputs.
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` → a :class:`torch.device` that exists here.

    ``auto``: CUDA when available, else CPU (MPS only on request: its lack of float64 makes some schedules fail).

    Raises:
        ValueError: an unknown name, or a device this machine does not have (naming what it has).
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"train.device {name!r}: this machine has no CUDA device (use --train.device cpu)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"train.device {name!r}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("train.device 'mps': MPS is not available on this machine (use --train.device cpu)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    return dev


def available_devices() -> list[torch.device]:
    """Every device this machine can train on (CPU first)."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append(torch.device("mps"))
    return out


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device`` (CPU streams are those of ``torch.Generator().manual_seed(seed)``)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def check_precision(precision: str, device: torch.device) -> None:
    """Raises ValueError for an unknown precision or bf16 off CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"train.precision bf16 uses CUDA autocast; the device here is {device} (use fp32)")


def autocast(precision: str, device: torch.device):
    """The training step's autocast context: bf16 on CUDA, else a no-op. The contraction regulariser leaves it
    (:func:`fp32_region`)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32_region(device: torch.device):
    """Disable autocast inside (the contraction Jacobian and its eigenvalues stay in float32)."""
    if device.type == "cuda" and torch.is_autocast_enabled():
        return torch.autocast(device_type="cuda", enabled=False)
    return contextlib.nullcontext()


def set_threads(n: int | None) -> int:
    """Use ``n`` CPU threads (default: min(2, cores)); oversubscription makes small networks crawl. Returns n."""
    n = n or min(2, os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"train.threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
