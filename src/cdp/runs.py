"""The run-folder format shared by every ``cdp`` job (RL, IL, toy, benchmarks).

::

    <run_dir>/
      config.yaml              the fully resolved configuration of the run
      metrics.jsonl            one JSON object per logged step: {"step": int, "time": float, <name>: float, ...}
      tb/                      TensorBoard event files with the same scalars (+ the run's hparams and final metrics)
      wandb/                   Weights & Biases run files (only with --log.wandb True; offline by default)
      checkpoints/<name>/      model.safetensors (weights, EMA weights under "ema.") + policy.json (config) +
                               state.pt (optimiser/RNG state for resuming; only with trainer state)
      results.json / *.md/png  job outputs

Checkpoints are written atomically: into a temporary folder that is renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file, save_file


class RunDir:
    """A run folder: resolved config, metrics (JSONL + TensorBoard), checkpoints.

    Args:
        path: the folder (created if missing).
        config: the resolved configuration to save as ``config.yaml`` (None: keep an existing one).
        tensorboard: also write TensorBoard events under ``tb/`` (skipped silently when tensorboard is missing); at
            :meth:`close`, the HParams summary of the flat scalar config and the :meth:`summary` metrics.
        wandb: also mirror every :meth:`log` to a Weights & Biases run (``wandb.init(project=wandb_project,
            dir=<run folder>, config=config, mode=wandb_mode)``; the run id is kept in ``wandb_id`` so a resumed run
            continues the same W&B run). ImportError naming the install when wandb is missing.
        wandb_mode: ``offline`` (files under ``wandb/``, ``wandb sync`` uploads them later), ``online``, ``disabled``.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None, tensorboard: bool = True,
                 lock: bool = False, wandb: bool = False, wandb_project: str = "cdp",
                 wandb_mode: str = "offline") -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run folder {self.path} is a file; choose a folder for --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create run folder {self.path}: {e.strerror}; choose another --out") from None
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"run folder {self.path} is not writable; choose another --out")
        self._lock = _acquire_lock(self.path) if lock else None
        self._wandb = None
        if wandb:  # before anything is written: a missing wandb leaves the folder as it was
            try:
                self._wandb = start_wandb(self.path, config, wandb_project, wandb_mode)
            except BaseException:
                if self._lock is not None:
                    _release_lock(self._lock)
                raise
        if config is not None:
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.path / "tb"))
            except Exception:  # tensorboard missing: JSONL only
                self._tb = None
        self._config = config
        self._summary: dict[str, float] = {}
        self._summary_step = 0
        self._t0 = time.time()

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        """Append one line to metrics.jsonl and the same scalars to TensorBoard."""
        rec = {"step": int(step), "time": round(time.time() - self._t0, 3)}
        rec.update({f"{prefix}{k}": float(v) for k, v in metrics.items()})
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k not in ("step", "time")}, step=int(step))

    def summary(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """Record the run's final main metrics (finite numbers only; others are dropped): the W&B run summary, and
        the metrics of the TensorBoard HParams entry written at :meth:`close` (as scalars ``final/<name>``)."""
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._summary[f"{prefix}{k}"] = float(v)
        self._summary_step = int(step)
        if self._wandb is not None:
            self._wandb.summary.update(self._summary)

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        atomic_write_text(p, json.dumps(_plain(obj), indent=2))
        return p

    def close(self) -> None:
        if self._tb is not None:
            if self._config is not None:
                try:
                    self._write_hparams()
                except Exception:  # an old / partial tensorboard: scalars only
                    pass
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._lock is not None:
            _release_lock(self._lock)
            self._lock = None

    def _write_hparams(self) -> None:
        """The HParams plugin's experiment / session summaries into this run's own event file (so the dashboard
        pairs them with its scalars), the metrics as ``final/<name>`` scalars."""
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"final/{k}": v for k, v in self._summary.items()}
        exp, ssi, sei = hparams(flat_hparams(self._config), metrics)
        writer = self._tb._get_file_writer()
        for s in (exp, ssi, sei):
            writer.add_summary(s)
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, self._summary_step)
        self._tb.flush()


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The scalar leaves of a nested config as dotted keys (numbers, strings, bools; None, lists and non-finite
    numbers are left out): the TensorBoard HParams entry of a run."""
    out: dict[str, Any] = {}
    for k, v in _plain(config).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{key}."))
        elif isinstance(v, (bool, str)) or (isinstance(v, (int, float)) and math.isfinite(v)):
            out[key] = v
    return out


WANDB_MISSING = "Weights & Biases logging (--log.wandb True) needs wandb: pip install 'cdp[log]' (or pip install wandb)"


def import_wandb():
    """``import wandb``, or one ImportError line naming the install."""
    try:
        import wandb
    except ImportError:
        raise ImportError(WANDB_MISSING) from None
    return wandb


def start_wandb(path: Path, config: dict[str, Any] | None, project: str, mode: str, job_type: str | None = None):
    """A W&B run with its files under ``path/wandb``; its id is kept in ``path/wandb_id`` (the same run continues
    when the folder is resumed)."""
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"log.wandb_mode must be offline, online or disabled, got {mode!r}")
    wandb = import_wandb()
    path = Path(path)
    id_file = path / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=project, dir=str(path), config=_plain(config) if config is not None else None,
                      mode=mode, id=run_id, resume="allow", name=path.resolve().name, job_type=job_type,
                      reinit="create_new")


#: run folders this process holds: resolved path → [file descriptor, holders]
_LOCKS: dict[str, list] = {}


def _acquire_lock(path: Path) -> str:
    """An exclusive ``flock`` on ``<path>/.lock`` for this process (re-entrant within it). Two ``cdp`` processes on one
    run folder would interleave metrics and checkpoints; the second gets one clear error instead."""
    import fcntl

    key = str(path.resolve())
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return key
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"run folder {path} is in use by another cdp process (pid {other}); wait for it or "
                         f"choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[key] = [fd, 1]
    return key


def _release_lock(key: str) -> None:
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        os.close(entry[0])  # closing the descriptor releases the flock
        del _LOCKS[key]


def median_call_ms(fn: Callable[[], Any], n: int = 20, warmup: int = 3, inference_mode: bool = True) -> float:
    """Median wall milliseconds of ``fn()`` over ``n`` calls after ``warmup`` calls (under ``torch.inference_mode``
    unless ``inference_mode=False``).

    Used for the per-run action latency (``timing.act_ms_batch1`` in results.json: one batch-1 decision of the
    evaluated policy, i.e. a full sampling chain, or an RL agent's candidates + selection) and by
    ``benchmarks/bench_latency.py``. Absolute numbers depend on the machine's load; compare runs that ran side by
    side."""
    with torch.inference_mode(inference_mode):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e3 * (ts[(n - 1) // 2] + ts[n // 2]) / 2


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    state: dict[str, Any] | None = None) -> Path:
    """Atomically write ``model.safetensors`` + ``policy.json`` (+ ``state.pt``) into ``directory``.

    Args:
        tensors: name → tensor (made contiguous; shared storage is cloned).
        meta: JSON-serialisable metadata (policy class and config, step, ...).
        state: optional trainer state (optimiser, RNG) saved with ``torch.save``.
    Returns:
        the checkpoint folder.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
    try:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / "policy.json").write_text(json.dumps(_plain(meta), indent=2))
        if state is not None:
            torch.save(state, tmp / "state.pt")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Repair what a kill during :func:`save_checkpoint` can leave: ``last`` already moved to ``.last.old`` but the new
    folder not yet in place (the old one is put back), and orphan ``.last.tmp*`` folders (removed)."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if old.is_dir() and not directory.exists() and (old / "model.safetensors").exists():
        os.replace(old, directory)
    if directory.parent.is_dir():
        for orphan in directory.parent.glob(f".{directory.name}.tmp*"):
            shutil.rmtree(orphan, ignore_errors=True)


def load_checkpoint(directory: str | os.PathLike, with_state: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint folder → (tensors, meta, state or None).

    ``state.pt`` (trainer state: optimiser moments, RNG states, counters) is read with
    ``torch.load(weights_only=True)``, which unpickles only tensors and plain containers: a file that holds any other
    object is refused, so a checkpoint folder cannot execute code. ``with_state=False`` skips the file (evaluation).

    Raises:
        FileNotFoundError: the folder or its ``model.safetensors`` / ``policy.json`` is missing.
        ValueError: a damaged ``model.safetensors`` or ``policy.json``, NaN / inf weights, or a ``state.pt`` that
            holds something other than tensors and plain containers or is unreadable (one line naming the file).
    """
    directory = Path(directory)
    recover_checkpoint(directory)
    for name in ("model.safetensors", "policy.json"):
        if not (directory / name).exists():
            raise FileNotFoundError(f"not a cdp checkpoint: {directory / name} is missing")
    weights = directory / "model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # SafetensorError (truncated / garbled header), OSError
        raise ValueError(f"{weights} is damaged or not a safetensors file ({_one_line(e)}); restore the checkpoint "
                         f"from a copy or retrain") from None
    try:
        meta = json.loads((directory / "policy.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{directory / 'policy.json'} is not valid JSON ({_one_line(e)}); restore the checkpoint "
                         f"from a copy or retrain") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint {directory} holds NaN/inf weights ({len(bad)} tensors, e.g. {bad[0]}): it was "
                         f"written by a diverged or damaged run; use another checkpoint or retrain")
    state = None
    if with_state and (directory / "state.pt").exists():
        try:
            state = torch.load(directory / "state.pt", weights_only=True, map_location="cpu")
        except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError/EOFError for a damaged file
            raise ValueError(f"refusing {directory / 'state.pt'}: not a plain trainer state ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); delete the file to start the optimiser afresh, or use "
                             f"a new run folder") from None
    return tensors, meta, state


def save_policy(directory: str | os.PathLike, policy, ema=None, step: int = 0, extra: dict[str, Any] | None = None,
                state: dict[str, Any] | None = None) -> Path:
    """Save a :class:`~cdp.policy.DiffusionPolicy` (and its EMA weights) as a checkpoint folder."""
    tensors = {f"model.{k}": v for k, v in policy.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    meta = {"class": type(policy).__name__, "config": policy.config.to_dict(), "step": step, **(extra or {})}
    return save_checkpoint(directory, tensors, meta, state)


def load_policy(directory: str | os.PathLike, use_ema: bool = True):
    """Load a :class:`~cdp.policy.DiffusionPolicy` (or a :class:`~cdp.policies.bc_gmm.BCGMMPolicy`) from a
    checkpoint folder (EMA weights when present). Raises FileNotFoundError (not a checkpoint) or ValueError (a
    checkpoint of another class)."""
    from .policies.bc_gmm import BCGMMConfig, BCGMMPolicy
    from .policy import DiffusionPolicy, DiffusionPolicyConfig

    tensors, meta, _ = load_checkpoint(directory, with_state=False)
    classes = {"DiffusionPolicy": (DiffusionPolicy, DiffusionPolicyConfig), "BCGMMPolicy": (BCGMMPolicy, BCGMMConfig)}
    if meta.get("class") not in classes:
        raise ValueError(f"checkpoint {directory} holds a {meta.get('class')!r}, not one of {sorted(classes)}")
    cls, cfg_cls = classes[meta["class"]]
    policy = cls(cfg_cls.from_dict(meta["config"]))
    prefix = "ema." if use_ema and any(k.startswith("ema.") for k in tensors) else "model."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    load_module_state(policy, sd, directory)
    return policy.eval()


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], directory: str | os.PathLike,
                      name: str | None = None) -> None:
    """``module.load_state_dict(state)`` with a mismatch (missing / unexpected keys, other shapes: the weights do not
    belong to the ``policy.json`` beside them) as one ValueError naming the checkpoint."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        part = f" ({name})" if name else ""
        raise ValueError(f"{Path(directory) / 'model.safetensors'}{part} does not match {Path(directory) / 'policy.json'} "
                         f"({detail[:200]}); the checkpoint was modified or mixed from two runs: use an intact one or "
                         f"retrain") from None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
