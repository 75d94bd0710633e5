"""PointMaze (gymnasium-robotics) evaluation environment in the style of D4RL maze2d: env creation, reference
scores and closed-loop evaluation (:func:`evaluate`). The datasets are made by :mod:`cdp.datagen.maze`.

Evaluation task (D4RL maze2d style): fixed goal per episode, no termination, truncation at the env's
``max_episode_steps``; rewards are sparse (1 within the goal radius) or dense (``exp(-distance)``). Reference scores
for the normalised score: ``ref_min`` = mean return of a uniform random policy, ``ref_max`` = mean return of the
(noise-free) waypoint expert, both on the evaluation task (:data:`MAZE_REF_SCORES`, measured with
:func:`cdp.datagen.maze.compute_ref_scores`).

Differences from D4RL maze2d (documented, deliberate):

* Simulator: gymnasium-robotics ``PointMaze_*-v3`` (MuJoCo >= 3 python
  bindings) instead of D4RL's mujoco-py ``maze2d-*``; the ball's dynamics
  (actuator gear, damping, velocity clip) and coordinates differ (maze centred
  at the origin, cell size 1, y up), so D4RL numbers are not comparable.
* Goal radius 0.45 (gymnasium-robotics) instead of 0.5; start / goal are cell
  centres plus uniform noise of +-0.25.
* Observations are ``[x, y, vx, vy, gx, gy]`` (Do = 6): the goal is part of the
  observation because evaluation goals are random per episode, whereas D4RL's
  maze2d observation is 4-d with a fixed evaluation goal.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from ..data.rl import normalized_score, vector_rollout

__all__ = [
    "GoalFlattenObservation",
    "make_maze_env",
    "evaluate",
    "MAZE_REF_SCORES",
]

#: (ref_min, ref_max) measured with ``cdp.datagen.maze.compute_ref_scores(env, n_episodes=100, seed=0)``
#: (uniform random policy / noise-free waypoint expert, registered episode length)
#: on gymnasium 1.4.0, gymnasium-robotics 1.4.2, mujoco 4.0.0. Keys are env ids.
#: Not comparable with D4RL's maze2d references (different simulator, goal radius
#: 0.45, random goals). Recompute with :func:`cdp.datagen.maze.compute_ref_scores` if the stack changes.
MAZE_REF_SCORES: dict[str, tuple[float, float]] = {
    "PointMaze_UMaze-v3": (15.03, 245.41),
    "PointMaze_Medium-v3": (14.81, 499.26),
    "PointMaze_Large-v3": (6.11, 638.03),
    "PointMaze_UMazeDense-v3": (66.787432, 255.879151),
    "PointMaze_MediumDense-v3": (63.910570, 513.022896),
    "PointMaze_LargeDense-v3": (40.666486, 651.602769),
}


def _import_gym():
    try:
        import gymnasium as gym
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import gymnasium_robotics
    except ImportError as e:  # pragma: no cover - depends on env
        raise ImportError("PointMaze needs gymnasium and gymnasium-robotics (pip install 'cdp[rl]')") from e
    gym.register_envs(gymnasium_robotics)
    return gym


def _goal_flatten_wrapper_cls():
    gym = _import_gym()

    class GoalFlattenObservation(gym.ObservationWrapper):
        """Dict obs -> ``[observation, desired_goal]`` float32 vector, (4 + 2,) for PointMaze."""

        def __init__(self, env):
            super().__init__(env)
            sp = env.observation_space
            d = sp["observation"].shape[0] + sp["desired_goal"].shape[0]
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(d,), dtype=np.float32)

        def observation(self, obs):
            return np.concatenate([obs["observation"], obs["desired_goal"]]).astype(np.float32)

    return GoalFlattenObservation


def GoalFlattenObservation(env):  # noqa: N802 - factory mimicking a class
    """Wrap a goal-conditioned dict env so observations are ``[obs, desired_goal]`` (Do,)."""
    return _goal_flatten_wrapper_cls()(env)


def make_maze_env(
    name: str = "PointMaze_UMaze-v3",
    seed: int | None = None,
    reward_type: str | None = None,
    continuing_task: bool = True,
    reset_target: bool = False,
    max_episode_steps: int | None = None,
):
    """Make a PointMaze env with flattened (6,) float32 observations ``[x, y, vx, vy, gx, gy]``.

    Defaults give the evaluation task (D4RL maze2d style): fixed goal per episode,
    no termination, truncation at ``max_episode_steps`` (registered default:
    UMaze/Open 300, Medium 600, Large 800 steps), reward accumulated every step
    spent within the goal radius (sparse) or ``exp(-dist)`` (dense).

    Args:
        name: a registered ``PointMaze_*`` id.
        seed: seeds the first ``reset`` and the action space; ``None`` = unseeded.
        reward_type: ``"sparse"``/``"dense"`` overriding the id's default.
        continuing_task, reset_target: gymnasium-robotics maze options.
        max_episode_steps: overrides the registered time limit.

    Raises:
        KeyError: unknown / non-PointMaze env id (message lists the PointMaze ids).
    """
    gym = _import_gym()
    if name not in gym.registry or not name.startswith("PointMaze"):
        ids = sorted(k for k in gym.registry if k.startswith("PointMaze"))
        raise KeyError(f"unknown PointMaze env {name!r}; registered: {ids}")
    kw: dict[str, Any] = dict(continuing_task=continuing_task, reset_target=reset_target)
    if reward_type is not None:
        if reward_type not in ("sparse", "dense"):
            raise ValueError(f"reward_type must be 'sparse' or 'dense', got {reward_type!r}")
        kw["reward_type"] = reward_type
    if max_episode_steps is not None:
        kw["max_episode_steps"] = int(max_episode_steps)
    env = GoalFlattenObservation(gym.make(name, **kw))
    if seed is not None:
        env.reset(seed=int(seed))
        env.action_space.seed(int(seed))
    return env


def evaluate(
    policy_fn: Callable[[np.ndarray], np.ndarray],
    env_name: str = "PointMaze_UMaze-v3",
    n_episodes: int = 10,
    seed: int = 0,
    reward_type: str | None = None,
    max_episode_steps: int | None = None,
    ref_min: float | None = None,
    ref_max: float | None = None,
) -> dict[str, Any]:
    """Roll out ``policy_fn`` for ``n_episodes`` evaluation episodes in parallel.

    Uses ``gymnasium.vector.SyncVectorEnv`` with one sub-env per episode; env i is
    reset with seed ``seed + i``. Each env's first episode is counted (the task
    never terminates early, so all run ``max_episode_steps`` steps).

    Args:
        policy_fn: (B, Do) float32 observations -> (B, Da) actions (numpy or torch).
        ref_min, ref_max: reference scores; default :data:`MAZE_REF_SCORES` for
            ``env_name`` if present, otherwise normalised scores are ``None``.

    Returns:
        dict with ``mean_return``, ``std_return``, ``returns`` (n_episodes,),
        ``success_rate`` (fraction of episodes that ended within the goal radius),
        ``normalized_score_mean``/``_std`` (or None), ``steps`` (total env steps).
    """
    gym = _import_gym()
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    fns = [
        (lambda: make_maze_env(env_name, None, reward_type=reward_type, max_episode_steps=max_episode_steps))
        for _ in range(n_episodes)
    ]
    venv = gym.vector.SyncVectorEnv(fns)
    try:
        returns, lengths, success = vector_rollout(venv, policy_fn, n_episodes, seed)
    finally:
        venv.close()
    steps = int(lengths.sum())
    if ref_min is None or ref_max is None:
        ref = MAZE_REF_SCORES.get(_ref_key(env_name, reward_type))
        if ref is not None:
            ref_min, ref_max = ref
    ns = None
    if ref_min is not None and ref_max is not None:
        ns = np.asarray(normalized_score(None, returns, ref_min, ref_max))
    return {
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "returns": returns,
        "success_rate": float(success.mean()),
        "normalized_score_mean": None if ns is None else float(ns.mean()),
        "normalized_score_std": None if ns is None else float(ns.std()),
        "steps": steps,
    }


def _ref_key(env_name: str, reward_type: str | None) -> str:
    """Key into MAZE_REF_SCORES: the env id, with ``Dense`` inserted when dense rewards are forced."""
    if reward_type == "dense" and "Dense" not in env_name:
        base, ver = env_name.rsplit("-", 1)
        return f"{base}Dense-{ver}"
    if reward_type == "sparse" and "Dense" in env_name:
        return env_name.replace("Dense", "")
    return env_name

