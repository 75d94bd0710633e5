"""Gymnasium MuJoCo locomotion (Hopper, Walker2d, HalfCheetah ``*-v5``): env-id → D4RL robot tables and closed-loop
evaluation (:func:`evaluate`) with D4RL's reference returns. The datasets are made by :mod:`cdp.datagen.mujoco`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..data.rl import normalized_score, ref_scores, vector_rollout
from .._optional import optional

#: Gymnasium env id → D4RL robot name (for reference scores).
LOCOMOTION_ENVS = {"Hopper-v5": "hopper", "Walker2d-v5": "walker2d", "HalfCheetah-v5": "halfcheetah"}


def robot_name(env_id: str) -> str:
    """``"Hopper-v5"`` → ``"hopper"``; raises ``KeyError`` for an env without D4RL reference scores."""
    if env_id in LOCOMOTION_ENVS:
        return LOCOMOTION_ENVS[env_id]
    base = env_id.split("-")[0].lower()
    if base in ("hopper", "walker2d", "halfcheetah"):
        return base
    raise KeyError(f"no D4RL locomotion robot for env {env_id!r}; expected one of {sorted(LOCOMOTION_ENVS)}")


def is_locomotion(env_id: str | None) -> bool:
    """True for Hopper / Walker2d / HalfCheetah env ids (any version)."""
    if not env_id:
        return False
    try:
        robot_name(env_id)
        return True
    except KeyError:
        return False


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(
    policy_fn: Callable[[np.ndarray], np.ndarray],
    env_id: str = "Hopper-v5",
    n_episodes: int = 10,
    seed: int = 0,
    ref_min: float | None = None,
    ref_max: float | None = None,
    max_episode_steps: int | None = None,
) -> dict[str, Any]:
    """Roll ``policy_fn`` out for ``n_episodes`` episodes in parallel (one sub-env each, env i seeded ``seed + i``).

    Args:
        policy_fn: (B, Do) float32 observations → (B, Da) actions (numpy or torch) in the env's action space.
        ref_min, ref_max: reference returns; default D4RL's for the robot.
    Returns:
        dict with ``mean_return``, ``std_return``, ``returns`` (n_episodes,), ``mean_length``,
        ``normalized_score_mean`` / ``_std`` (D4RL normalised), ``success_rate`` (None: no success notion), ``steps``.
    """
    gym = optional("gymnasium", "rl", "MuJoCo evaluation")

    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if ref_min is None or ref_max is None:
        ref_min, ref_max = ref_scores(robot_name(env_id))
    kw = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    venv = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **kw) for _ in range(n_episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    try:
        returns, lengths, _ = vector_rollout(venv, policy_fn, n_episodes, seed)
    finally:
        venv.close()
    ns = np.asarray(normalized_score(None, returns, ref_min, ref_max))
    return {"mean_return": float(returns.mean()), "std_return": float(returns.std()), "returns": returns,
            "mean_length": float(lengths.mean()), "normalized_score_mean": float(ns.mean()),
            "normalized_score_std": float(ns.std()), "success_rate": None, "steps": int(lengths.sum())}

