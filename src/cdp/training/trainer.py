"""The one resumable training loop of every ``cdp`` job (toy, imitation learning, offline RL).

An *agent* is anything with the small protocol below; :class:`cdp.training.agents.DiffusionBC` (toy, diffusion BC,
Diffusion Policy, BC-GMM) and the offline-RL algorithms of :mod:`cdp.rl` (BC, EDP/CDP, Diffusion-QL, IDQL) all
follow it:

* ``fit_normalizers(observations, actions)`` — on the whole dataset before the first step;
* ``update(batch) -> dict[str, float]`` — one gradient step on a batch (a dict of tensors sliced from the dataset);
* ``modules()`` / ``optimizers()`` — name → ``nn.Module`` / optimiser, saved in the checkpoint;
* ``extra_state()`` / ``load_extra_state(state)`` — RNG and counters (plain tensors / numbers);
* ``checkpoint_meta()`` — JSON metadata written to ``policy.json`` (class, config), so the checkpoint reloads;
* ``generator`` — the ``torch.Generator`` behind the update's randomness.

:func:`fit` draws each batch uniformly with a seeded generator on ``train.device`` (the dataset is held there as
one tensor per key), calls ``agent.update``, logs ``train/*`` to the run folder, evaluates every
``eval_every`` steps (with ``keep_best``: also keeping the checkpoint of the best evaluation so far in
``checkpoints/best``), and writes atomic checkpoints to ``checkpoints/last``. Resuming restores weights,
optimisers, the agent's extra state, the batch generator, past evaluations and the best so far, so an interrupted run ends with the
same parameters as an uninterrupted one (on CPU, bit for bit). A checkpoint written by a different run (another
algorithm, settings or data — the ``identity`` the caller passes) is refused before anything is written. A
non-finite metric raises :class:`DivergenceError` (the last good checkpoint is kept).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..devices import autocast, make_generator
from ..runs import RunDir, load_checkpoint, load_module_state, recover_checkpoint, save_checkpoint

LR_SCHEDULES = ("constant", "cosine")


class DivergenceError(RuntimeError):
    """A training loss or metric became NaN / inf."""


def lr_at(step: int, lr: float, steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Learning rate for the update that follows ``step`` completed steps (0-based).

    warm-up: lr · (step + 1) / W for step < W (the first update is not at rate 0); then ``constant``: lr;
    ``cosine``: lr · ½(1 + cos(π · (step − W) / (steps − W))) (diffusers' ``get_cosine_schedule_with_warmup``, as
    Diffusion Policy uses). A function of the step index only, so resuming needs no scheduler state.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def data_fingerprint(data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rows and float64 sums of each dataset tensor: resuming on other data of the same size is caught."""
    return {"rows": int(next(iter(data.values())).shape[0]),
            **{f"sum.{k}": round(float(v.double().sum()), 6) for k, v in sorted(data.items())}}


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The resumable checkpoint folder of a run."""
    return Path(run_dir) / "checkpoints" / "last"


def best_checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder of a run's best checkpoint so far (``fit(..., keep_best=KEY)``): same format as ``last`` (no
    trainer state), its ``policy.json`` records ``step`` and ``best`` = ``{"metric", "value"}``."""
    return Path(run_dir) / "checkpoints" / "best"


def _norm(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def run_identity(settings: dict[str, Any], read: set[str], resumable: tuple[str, ...],
                 data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the flat ``settings`` the job reads (``read``), less the
    ``resumable`` ones (exact keys, or prefixes ending in ``.``), plus a fingerprint of the training data."""
    keep = {k: v for k, v in settings.items()
            if k in read and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in resumable)}
    return {**keep, **{f"data_fingerprint.{k}": v for k, v in data_fingerprint(data).items()}}


def resumable_identity(run_dir: str | Path, identity: dict[str, Any], defaults: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """``identity`` less the keys that the checkpoint in ``run_dir`` does not record (settings added to the config
    tree after it was written) where this run keeps them at their default (``defaults``, flat), so such a run still
    resumes; a key at another value stays, and :func:`check_resume` refuses it, naming it."""
    meta = checkpoint_dir(run_dir) / "policy.json"
    theirs = json.loads(meta.read_text()).get("identity") if meta.exists() else None
    if not isinstance(theirs, dict) or defaults is None:
        return identity
    mine = _norm(identity)
    return {k: v for k, v in identity.items() if k in theirs or k not in defaults or mine[k] != _norm(defaults[k])}


def check_resume(run_dir: str | Path, identity: dict[str, Any]) -> int:
    """The step of ``run_dir``'s checkpoint (0 when there is none) after checking it belongs to this run.

    Raises:
        ValueError: the checkpoint was written by a run with another ``identity`` (naming the differing keys), or its
            files are damaged (:func:`cdp.runs.load_checkpoint`).
    """
    ck = checkpoint_dir(run_dir)
    recover_checkpoint(ck)
    if not (ck / "policy.json").exists():
        return 0
    meta = json.loads((ck / "policy.json").read_text())
    theirs, mine = meta.get("identity"), _norm(identity)
    if theirs != mine:
        if not isinstance(theirs, dict):
            raise ValueError(f"{ck} was not written by this version of cdp's trainer; use a new run folder (--out)")
        keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in keys[:6])
        raise ValueError(f"{run_dir} holds a different run ({shown}); resume with the same settings or use a new "
                         f"run folder (--out)")
    load_checkpoint(ck)  # damaged weights / state are refused here, before the caller writes anything
    return int(meta.get("step", 0))


def fit(agent, data: dict[str, torch.Tensor], *, steps: int, batch_size: int, seed: int = 0,
        device: torch.device | str = "cpu", precision: str = "fp32", log_every: int = 100, ckpt_every: int = 0,
        eval_every: int = 0, evaluate: Callable[[Any, int], dict[str, Any]] | None = None,
        keep_best: str | None = None,
        callback: Callable[[int, Any], None] | None = None, run: RunDir | None = None,
        identity: dict[str, Any] | None = None, generator: torch.Generator | None = None,
        progress: bool = True, desc: str = "train") -> dict[str, Any]:
    """Train ``agent`` on ``data`` for ``steps`` gradient steps (resuming ``run``'s checkpoint when it exists).

    Args:
        data: name → tensor, all with the same first dimension N (``observations`` and ``actions`` at least);
            moved to ``device`` once.
        steps / batch_size / seed: the loop; batches are ``torch.randint(0, N, (batch_size,))`` from a generator
            seeded with ``seed`` on ``device`` (or ``generator``, which the agent may share).
        precision: ``"fp32"`` or ``"bf16"`` (CUDA autocast around ``update``).
        log_every / ckpt_every / eval_every: in steps (0: checkpoint at the end only / no periodic evaluation).
        evaluate: ``evaluate(agent, step) -> dict`` for periodic evaluations (numbers are logged as ``eval/*``; an
            empty dict records nothing).
        keep_best: a key of ``evaluate``'s result, higher is better: after each periodic evaluation that beats every
            earlier one (strictly), the weights are written atomically to ``checkpoints/best``
            (:func:`best_checkpoint_dir`); the best so far is part of the trainer state, so it survives a resume.
        callback: ``callback(step, agent)`` after each logged step (snapshots).
        run: run folder (metrics, ``checkpoints/last``); None: in memory only.
        identity: what must match for a checkpoint to be resumed (settings, data fingerprint).
    Returns:
        ``{"step", "start", "evals", "best", "last_metrics", "train_s", "eval_s"}`` (``best``: ``{"step",
        "metric", "value"}`` of the best checkpoint, or None; seconds of this call; ``train_s``
        excludes periodic evaluations).
    Raises:
        ValueError: ``data`` with NaN / inf or ragged first dimensions, or a checkpoint of another run.
        DivergenceError: a non-finite metric.
    """
    device = torch.device(device)
    if steps < 0 or batch_size < 1 or log_every < 1 or ckpt_every < 0 or eval_every < 0:
        raise ValueError("need train.steps >= 0, train.batch_size >= 1, train.log_every >= 1, train.ckpt_every >= 0 "
                         "and eval.every >= 0")
    sizes = {k: int(v.shape[0]) for k, v in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"dataset tensors have different lengths: {sizes}")
    for k, v in data.items():
        bad = (~torch.isfinite(v)).nonzero() if v.is_floating_point() else []
        if len(bad):
            raise ValueError(f"dataset {k} contains NaN or inf (first bad row {int(bad[0, 0])}); clean the data first")
    data = {k: v.to(device) for k, v in data.items()}
    N = next(iter(sizes.values()))
    gen = generator if generator is not None else make_generator(seed, device)
    ckpt = checkpoint_dir(run.path) if run is not None else None
    if ckpt is not None:
        recover_checkpoint(ckpt)
    start, evals, best = 0, [], None
    if ckpt is not None and ckpt.exists():
        if identity is not None:
            check_resume(run.path, identity)
        tensors, meta, state = load_checkpoint(ckpt)
        for name, m in agent.modules().items():
            p = name + "."
            load_module_state(m, {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}, ckpt, name)
        if state is not None:
            for name, opt in agent.optimizers().items():
                opt.load_state_dict(state["optimizers"][name])
            agent.load_extra_state(state["agent"])
            gen.set_state(state["generator"])
            evals = list(state.get("evals", []))
            best = state.get("best")
        start = int(meta["step"])
    else:
        agent.fit_normalizers(data["observations"], data["actions"])

    def weights_and_meta(step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{name}.{k}": v for name, m in agent.modules().items() for k, v in m.state_dict().items()}
        return tensors, {**agent.checkpoint_meta(), "step": int(step),
                         "identity": _norm(identity) if identity else None}

    def checkpoint(step: int) -> None:
        if ckpt is None:
            return
        tensors, meta = weights_and_meta(step)
        state = {"optimizers": {n: o.state_dict() for n, o in agent.optimizers().items()},
                 "agent": agent.extra_state(), "generator": gen.get_state(), "evals": evals, "best": best}
        save_checkpoint(ckpt, tensors, meta, _to_cpu(state))

    def consider_best(rec: dict[str, Any]) -> None:
        nonlocal best
        value = rec.get(keep_best)
        if value is None or not math.isfinite(value) or (best is not None and value <= best["value"]):
            return
        best = {"step": int(rec["step"]), "metric": keep_best, "value": float(value)}
        if run is not None:
            tensors, meta = weights_and_meta(rec["step"])
            save_checkpoint(best_checkpoint_dir(run.path), tensors,
                            {**meta, "best": {"metric": keep_best, "value": float(value)}})

    metrics: dict[str, float] = {}
    eval_s = 0.0
    t0 = time.perf_counter()
    interrupted = _InterruptAfterStep()

    def _step(step: int) -> None:
        nonlocal metrics, eval_s
        idx = torch.randint(0, N, (batch_size,), generator=gen, device=gen.device)
        with autocast(precision, device):
            metrics = agent.update({k: v[idx] for k, v in data.items()})
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise DivergenceError(f"{', '.join(bad)} became non-finite at step {step + 1}; last good checkpoint: {ckpt}")
        done = step + 1
        if done % log_every == 0 or done == steps:
            if run is not None:
                run.log(done, metrics, prefix="train/")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if callback is not None:
                callback(done, agent)
        if evaluate is not None and eval_every and (done % eval_every == 0 or done == steps):
            te = time.perf_counter()
            res = evaluate(agent, done)
            eval_s += time.perf_counter() - te
            if not res:
                res = None
        else:
            res = None
        if res is not None:
            rec = {"step": done, **{k: v for k, v in res.items() if isinstance(v, (int, float)) and v is not None}}
            evals.append(rec)
            if run is not None:
                run.log(done, {k: v for k, v in rec.items() if k != "step"}, prefix="eval/")
            if rec.get("normalized_score_mean") is not None:
                bar.write(f"[{desc}] step {done}: normalized score {rec['normalized_score_mean']:.1f} "
                          f"± {rec['normalized_score_std']:.1f}")
            if keep_best is not None:
                consider_best(rec)
        if ckpt_every and done % ckpt_every == 0:
            checkpoint(done)

    bar = tqdm(range(start, steps), desc=desc, disable=not progress, initial=start, total=steps, leave=False,
               dynamic_ncols=True)
    with interrupted:
        for step in bar:
            _step(step)
            if interrupted.requested:
                bar.close()
                checkpoint(step + 1)
                raise Interrupted(interrupted.signum, f"{interrupted.name} after step {step + 1}; checkpoint "
                                                      f"written to {ckpt}")
    bar.close()
    if steps > start or (ckpt is not None and not ckpt.exists()):
        checkpoint(max(steps, start))
    total = time.perf_counter() - t0
    return {"step": max(start, steps), "start": start, "evals": evals, "best": best, "last_metrics": metrics,
            "train_s": total - eval_s, "eval_s": eval_s}


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after a step was finished and checkpointed; ``signum`` says which
    (``cdp`` exits 130 / 143)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class _InterruptAfterStep:
    """Within the loop, Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and then raises
    :class:`Interrupted` (a KeyboardInterrupt), so an interrupted run resumes exactly; a second signal interrupts at
    once. Only in the main thread (elsewhere signals cannot be handled and the default behaviour stays)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return "terminated (SIGTERM)" if self.signum == signal.SIGTERM else "interrupted"

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise Interrupted(signum, "interrupted again: stopped without a checkpoint of the step in flight")
        self.requested, self.signum = True, signum

    def __enter__(self) -> "_InterruptAfterStep":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _to_cpu(x: Any) -> Any:
    """Trainer state with every tensor on the CPU (``torch.load(weights_only=True, map_location='cpu')`` reads it
    back on any machine; optimisers move it to their parameters' device on load)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x
