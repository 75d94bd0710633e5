"""The resumable offline-RL training loop (one loop for every algorithm of :data:`cdp.rl.ALGOS`).

Each step draws a batch of transitions uniformly with a seeded ``torch.Generator``, calls ``agent.update(batch)``,
logs to the run folder (``metrics.jsonl`` + TensorBoard), evaluates every ``eval_every`` steps in the simulator
(:func:`cdp.data.maze.evaluate_policy`, D4RL normalised score with the dataset's reference scores), and writes
atomic safetensors checkpoints (actor, EMA, critics, target critics, normalisers; optimiser and RNG state in
``state.pt``) to ``checkpoints/last``. Resuming restores all of it, so an interrupted run ends with the same
parameters as an uninterrupted one on CPU. A NaN/inf in the data raises ``ValueError`` before training; a
non-finite loss raises :class:`DivergenceError` (the last good checkpoint is kept).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runs import RunDir, load_checkpoint, save_checkpoint
from . import make_agent


class DivergenceError(RuntimeError):
    """Raised when a training loss becomes NaN/inf."""


@dataclass
class RLTrainConfig:
    """Loop settings.

    Attributes:
        steps: gradient steps. batch_size: transitions per step. seed: seeds the batch generator.
        log_every / ckpt_every / eval_every: in steps (0: ckpt only at the end / no periodic evaluation).
        eval_episodes: simulator episodes per evaluation. eval_seed: seed of the first evaluation episode.
        progress: tqdm bar.
    """

    steps: int = 10_000
    batch_size: int = 256
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 0
    eval_every: int = 0
    eval_episodes: int = 10
    eval_seed: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.log_every < 1 or self.ckpt_every < 0 or self.eval_every < 0:
            raise ValueError("need steps >= 0, batch_size >= 1, log_every >= 1, ckpt_every >= 0, eval_every >= 0")
        if self.eval_episodes < 1:
            raise ValueError("eval_episodes must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_tensors(ds) -> dict[str, torch.Tensor]:
    """An :class:`~cdp.data.rl.OfflineDataset` as float32 tensors; raises ``ValueError`` on NaN/inf."""
    out = {
        "observations": torch.as_tensor(ds.observations, dtype=torch.float32),
        "actions": torch.as_tensor(ds.actions, dtype=torch.float32),
        "rewards": torch.as_tensor(ds.rewards, dtype=torch.float32),
        "next_observations": torch.as_tensor(ds.next_observations, dtype=torch.float32),
        "terminals": torch.as_tensor(np.asarray(ds.terminals), dtype=torch.float32),
    }
    for k, v in out.items():
        bad = (~torch.isfinite(v)).nonzero()
        if len(bad):
            raise ValueError(f"dataset {k} contains NaN or inf (first bad row {int(bad[0, 0])}); clean the data first")
    return out


# ------------------------------------------------------------------------------------------------ checkpoints
def save_agent(directory: str | Path, agent, step: int = 0, extra: dict[str, Any] | None = None,
               state: dict[str, Any] | None = None) -> Path:
    """Atomic checkpoint: every module's state under ``<module>.<param>``, config in ``policy.json``."""
    tensors = {f"{name}.{k}": v for name, m in agent.modules().items() for k, v in m.state_dict().items()}
    meta = {"class": type(agent).__name__, "algo": getattr(agent, "name_full", agent.name),
            "obs_dim": agent.obs_dim, "action_dim": agent.action_dim, "config": agent.config.to_dict(),
            "step": int(step), **(extra or {})}
    return save_checkpoint(directory, tensors, meta, state)


def _load_modules(agent, tensors: dict[str, torch.Tensor]) -> None:
    for name, m in agent.modules().items():
        p = name + "."
        m.load_state_dict({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)})


def load_agent(directory: str | Path):
    """Rebuild an agent from :func:`save_agent`'s folder (weights only) → (agent, meta)."""
    tensors, meta, _ = load_checkpoint(directory, with_state=False)
    algo = meta["algo"]
    agent = make_agent(algo, meta["obs_dim"], meta["action_dim"], meta["config"])
    _load_modules(agent, tensors)
    return agent, meta


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_agent(agent, ds, n_episodes: int = 10, seed: int = 1000) -> dict[str, Any]:
    """Roll the agent out in the dataset's env → a dict with the D4RL normalised score (mean/std over episodes).

    PointMaze datasets use :func:`cdp.data.maze.evaluate_policy`; Hopper / Walker2d / HalfCheetah datasets use
    :func:`cdp.data.mujoco.evaluate_locomotion`. Both run the episodes as one vectorised env and use the
    dataset's reference scores.

    Raises:
        ValueError: the dataset names no env (``ds.env_id`` is None) and is not a PointMaze dataset.
    """
    from ..data.maze import evaluate_policy
    from ..data.mujoco import evaluate_locomotion, is_locomotion

    gen = torch.Generator().manual_seed(seed)

    def policy_fn(obs: np.ndarray) -> np.ndarray:
        return agent.act(torch.as_tensor(obs, dtype=torch.float32), generator=gen).numpy()

    if is_locomotion(ds.env_id):
        return evaluate_locomotion(policy_fn, ds.env_id, n_episodes=n_episodes, seed=seed,
                                   ref_min=ds.ref_min_score, ref_max=ds.ref_max_score)
    return evaluate_policy(policy_fn, ds.env_id or "PointMaze_UMaze-v3", n_episodes=n_episodes, seed=seed,
                           reward_type=ds.meta.get("reward_type"), ref_min=ds.ref_min_score, ref_max=ds.ref_max_score)


# ------------------------------------------------------------------------------------------------ the loop
def train_offline(agent, ds, config: RLTrainConfig, run: RunDir | None = None, resume: bool = True,
                  evaluate: Callable[[Any, int], dict[str, Any]] | None = None, desc: str = "rl") -> dict[str, Any]:
    """Train ``agent`` on the OfflineDataset ``ds`` (normalisers are fitted here unless resuming).

    Args:
        config: :class:`RLTrainConfig`. run: run folder (metrics, ``checkpoints/last``); None: in memory only.
        resume: continue from ``run/checkpoints/last`` when it exists.
        evaluate: ``evaluate(agent, step) -> dict`` for periodic evaluation (default: :func:`evaluate_agent`
            with ``config.eval_episodes``); called every ``eval_every`` steps when ``eval_every > 0``.
    Returns:
        ``{"step", "evals": [{step, ...}], "last_metrics", "eval_s"}`` (eval_s: seconds spent in periodic
        evaluations during this call, so callers can report training time without them).
    Raises:
        ValueError: NaN/inf in the dataset. DivergenceError: a non-finite loss.
    """
    data = dataset_tensors(ds)
    N = data["rewards"].shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = run.path / "checkpoints" / "last" if run is not None else None
    start, evals = 0, []
    if resume and ckpt is not None and ckpt.exists():
        tensors, meta, state = load_checkpoint(ckpt)
        mine = {"algo": getattr(agent, "name_full", agent.name), "config": agent.config.to_dict(), "n_transitions": N}
        theirs = {"algo": meta.get("algo"), "config": meta.get("config"), "n_transitions": meta.get("n_transitions")}
        if json.loads(json.dumps(mine)) != theirs:
            raise ValueError(f"{ckpt} holds a different run ({theirs['algo']}, {theirs['n_transitions']} transitions, "
                             f"other settings); resume with the same settings or use a new run folder")
        _load_modules(agent, tensors)
        if state is not None:
            for name, opt in agent.optimizers().items():
                opt.load_state_dict(state["optimizers"][name])
            agent.load_extra_state(state["agent"])
            gen.set_state(state["generator"])
            evals = list(state.get("evals", []))
        start = int(meta["step"])
    else:
        agent.fit_normalizers(data["observations"], data["actions"])
    if evaluate is None:
        def evaluate(a, step):  # noqa: E306
            return evaluate_agent(a, ds, config.eval_episodes, config.eval_seed)

    def checkpoint(step: int) -> None:
        if ckpt is not None:
            state = {"optimizers": {n: o.state_dict() for n, o in agent.optimizers().items()},
                     "agent": agent.extra_state(), "generator": gen.get_state(), "evals": evals}
            save_agent(ckpt, agent, step, {"dataset": ds.env_id, "n_transitions": N}, state)

    metrics: dict[str, float] = {}
    eval_s = 0.0
    bar = tqdm(range(start, config.steps), desc=desc, disable=not config.progress, initial=start,
               total=config.steps, leave=False, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, N, (config.batch_size,), generator=gen)
        metrics = agent.update({k: v[idx] for k, v in data.items()})
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise DivergenceError(f"{', '.join(bad)} became non-finite at step {step + 1}; last good checkpoint: {ckpt}")
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            if run is not None:
                run.log(done, metrics, prefix="train/")
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            te = time.perf_counter()
            res = evaluate(agent, done)
            eval_s += time.perf_counter() - te
            rec = {"step": done, **{k: v for k, v in res.items() if isinstance(v, (int, float)) and v is not None}}
            evals.append(rec)
            if run is not None:
                run.log(done, {k: v for k, v in rec.items() if k != "step"}, prefix="eval/")
            if rec.get("normalized_score_mean") is not None:
                bar.write(f"[{desc}] step {done}: normalized score {rec['normalized_score_mean']:.1f} "
                          f"± {rec['normalized_score_std']:.1f}")
        if config.ckpt_every and done % config.ckpt_every == 0:
            checkpoint(done)
    bar.close()
    if config.steps > start or (ckpt is not None and not ckpt.exists()):
        checkpoint(config.steps)
    return {"step": max(start, config.steps), "evals": evals, "last_metrics": metrics, "eval_s": eval_s}
