"""Scripted robosuite demonstrations (Lift, Can) written in robomimic's hdf5 layout (``cdp data lift``).

Layout written (robomimic, github.com/ARISE-Initiative/robomimic, "Datasets" docs; read back with
:func:`cdp.data.il.load_robomimic_hdf5`)::

    data/                      attrs: env_args (JSON string: env_name, type=1 (robosuite), env_kwargs), total (int),
                               construction_seed (numpy seed the env was built with: fixes Lift's cube size)
        demo_<i>/              attrs: num_samples (int L), seed (reset seed of this demo)
            obs/<key>          (L, d) float64   key in cdp.envs.robosuite_tasks.OBS_KEYS
            next_obs/<key>     (L, d) float64   observation after actions[t]
            actions            (L, 7) float64   OSC_POSE actions in [-1, 1]
            rewards            (L,)   float64   1.0 where the env reports success after the step, else 0
            dones              (L,)   int64     1 on the last step
            states             (L, S) float64   sim state [time, qpos, qvel] before actions[t]
    mask/train, mask/valid     demo names (bytes), 90 / 10 % split (robomimic's filter keys)

Only successful demos are kept (a scripted attempt that has not succeeded within the horizon is dropped); each
demo ends at its first successful step. The file is written to ``FILE.tmp`` and moved into place with
``os.replace``, so an interrupted run never leaves a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .._optional import optional

__all__ = ["generate_robosuite_demos"]


def generate_robosuite_demos(task: str, n_demos: int, out: str | os.PathLike, seed: int = 0, noise: float = 0.05,
                             horizon: int | None = None, max_attempts: int | None = None,
                             progress: bool = True) -> dict:
    """Roll out :class:`~cdp.envs.robosuite_tasks.ScriptedPickPlace` until ``n_demos`` successes; write them.

    Args:
        task: ``"lift"`` or ``"can"``. n_demos: successful demos to keep (>= 1). out: hdf5 path (parent folders are
            created). seed: attempt ``k`` resets the env with seed ``seed + k`` and draws the expert's randomness
            from ``default_rng([seed, k])``. noise: std of the expert's Gaussian action noise (arm dims).
            horizon: steps per attempt (default 400, robomimic's). max_attempts: give up after this many attempts
            (default ``4 · n_demos + 10``). progress: tqdm bar over kept demos.
    Returns:
        ``{"path", "demos", "attempts", "success_rate" (scripted), "total_steps", "mean_length", "seconds"}``.
    Raises:
        ValueError: bad arguments. RuntimeError: fewer than ``n_demos`` successes within ``max_attempts``
            (nothing is written). ImportError: robosuite / h5py missing.
    """
    h5py = optional("h5py", "robosuite", "writing robomimic hdf5 files")

    from ..envs.robosuite_tasks import HORIZON, OBS_KEYS, TASKS, RobosuiteLowDim, ScriptedPickPlace

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if int(n_demos) < 1:
        raise ValueError(f"n_demos must be >= 1, got {n_demos}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    horizon = HORIZON if horizon is None else int(horizon)
    max_attempts = 4 * int(n_demos) + 10 if max_attempts is None else int(max_attempts)
    if max_attempts < n_demos:
        raise ValueError(f"max_attempts ({max_attempts}) must be >= n_demos ({n_demos})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    env = RobosuiteLowDim(task, horizon=horizon)
    t0 = time.time()
    demos: list[dict] = []
    attempts = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int(n_demos), desc=f"scripted {task} demos")
    while len(demos) < n_demos and attempts < max_attempts:
        k = attempts
        attempts += 1
        obs = env.reset(seed=seed + k)
        expert = ScriptedPickPlace(env, np.random.default_rng([seed, k]), noise=noise)
        rec = {"obs": [], "next_obs": [], "actions": [], "rewards": [], "states": []}
        success = False
        for _ in range(horizon):
            rec["states"].append(env.get_state())
            a = expert.act()
            nobs, r, done, info = env.step(a)
            rec["obs"].append(obs)
            rec["next_obs"].append(nobs)
            rec["actions"].append(a)
            rec["rewards"].append(r)
            obs = nobs
            if done:
                success = info["success"]
                break
        if success:
            rec["seed"] = seed + k
            demos.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success_rate=f"{len(demos) / attempts:.2f}")
    if bar is not None:
        bar.close()
    env_args, env_seed = env.env_args, env.construction_seed
    env.close()
    if len(demos) < n_demos:
        raise RuntimeError(f"only {len(demos)} of {n_demos} scripted {task} demos succeeded in {attempts} attempts "
                           f"(noise={noise}); nothing written")

    tmp = out.with_name(out.name + ".tmp")
    total = 0
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            names = []
            for i, rec in enumerate(demos):
                L = len(rec["actions"])
                g = data.create_group(f"demo_{i}")
                for part in ("obs", "next_obs"):
                    og = g.create_group(part)
                    for key in OBS_KEYS:
                        og.create_dataset(key, data=np.stack([o[key] for o in rec[part]]).astype(np.float64))
                g.create_dataset("actions", data=np.stack(rec["actions"]).astype(np.float64))
                g.create_dataset("rewards", data=np.asarray(rec["rewards"], dtype=np.float64))
                dones = np.zeros(L, dtype=np.int64)
                dones[-1] = 1
                g.create_dataset("dones", data=dones)
                g.create_dataset("states", data=np.stack(rec["states"]).astype(np.float64))
                g.attrs["num_samples"] = L
                g.attrs["seed"] = rec["seed"]
                names.append(f"demo_{i}")
                total += L
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["total"] = total
            data.attrs["construction_seed"] = env_seed  # numpy seed the env model was built with (cube size)
            n_valid = len(names) // 10
            mask = f.create_group("mask")
            mask.create_dataset("train", data=np.array(names[: len(names) - n_valid], dtype="S"))
            mask.create_dataset("valid", data=np.array(names[len(names) - n_valid:], dtype="S"))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "demos": len(demos), "attempts": attempts, "success_rate": len(demos) / attempts,
            "total_steps": total, "mean_length": total / len(demos), "seconds": time.time() - t0}
