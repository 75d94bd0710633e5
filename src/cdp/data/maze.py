"""PointMaze offline datasets in the style of D4RL maze2d, on gymnasium-robotics.

Recipe (D4RL ``scripts/generation/generate_maze2d_datasets.py`` and
``d4rl/pointmaze/waypoint_controller.py``, read for facts only):

* a waypoint expert plans a shortest path over maze cells to the goal cell and
  drives the ball towards the next waypoint with a PD law
  ``a = clip(Kp * (w - p) + Kd * v, -1, 1)`` with ``Kp = 10``, ``Kd = -1``;
* goals are re-sampled every time the ball reaches the current goal, the agent
  keeps moving (one long stream of goal-reaching segments);
* ``N`` steps are collected; timeouts are set at a fixed episode length;
* rewards are sparse (1 within the goal radius) or dense (``exp(-distance)``);
* reference scores for the normalised score: ``ref_min`` = mean return of a
  uniform random policy, ``ref_max`` = mean return of the (noise-free) waypoint
  expert, both on the evaluation task (fixed goal per episode, episode length
  = the env's ``max_episode_steps``).

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
* Planning is BFS over free cells (D4RL runs Q-iteration on a grid world and
  jitters intermediate waypoints by U(0, 0.2)); here the waypoint is the next
  cell's centre, or the goal itself once the next cell is the goal cell. A
  straight segment between two edge-adjacent cells never crosses a wall.
* Goal re-sampling is done by the environment (``reset_target=True``) when the
  ball is within 0.45 of the goal, rather than by the controller's
  "solved" test (distance < 0.1 and speed < 0.1).
* At a timeout the environment is reset (new start and goal), so every
  trajectory looks like an evaluation episode; D4RL keeps the ball moving.
* ``next_observations`` are stored explicitly: when the goal switches, the
  transition's next observation carries the goal that was used for its reward,
  while the next row's observation carries the new goal.
"""

from __future__ import annotations

import collections
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cdp.data.rl import OfflineDataset, normalized_score, vector_rollout, write_d4rl_hdf5

__all__ = [
    "GoalFlattenObservation",
    "WaypointController",
    "make_maze_env",
    "evaluate_policy",
    "random_policy",
    "compute_ref_scores",
    "generate_maze_dataset",
    "MAZE_REF_SCORES",
]

#: (ref_min, ref_max) measured with ``compute_ref_scores(env, n_episodes=100, seed=0)``
#: (uniform random policy / noise-free waypoint expert, registered episode length)
#: on gymnasium 1.4.0, gymnasium-robotics 1.4.2, mujoco 4.0.0. Keys are env ids.
#: Not comparable with D4RL's maze2d references (different simulator, goal radius
#: 0.45, random goals). Recompute with :func:`compute_ref_scores` if the stack changes.
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
        raise ImportError("PointMaze needs gymnasium and gymnasium-robotics (pip install cdp[rl])") from e
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


class WaypointController:
    """Shortest-path + PD expert for PointMaze (D4RL ``WaypointController`` analogue).

    Plans with breadth-first search over free maze cells (distance maps are cached
    per goal cell) and outputs ``clip(p_gain * (w - p) + d_gain * v, -1, 1)``
    where ``w`` is the next waypoint: the centre of the next cell on the shortest
    path, or the goal itself when the ball is in, or next to, the goal cell.

    Args:
        maze_map: list of rows, 1 = wall, anything else free (gymnasium-robotics format).
        scaling: maze cell size in metres (PointMaze: 1.0).
        p_gain, d_gain: PD gains (D4RL: 10, -1).

    Call with a (Do,) or (B, Do) observation ``[x, y, vx, vy, gx, gy, ...]``; returns
    (2,) or (B, 2) float32 actions in [-1, 1].
    """

    def __init__(self, maze_map: Sequence[Sequence[Any]], scaling: float = 1.0, p_gain: float = 10.0, d_gain: float = -1.0):
        self.grid = np.array([[1 if c == 1 else 0 for c in row] for row in maze_map], dtype=np.int8)
        self.rows, self.cols = self.grid.shape
        self.scaling = float(scaling)
        self.p_gain = float(p_gain)
        self.d_gain = float(d_gain)
        self._xc = self.cols / 2 * self.scaling
        self._yc = self.rows / 2 * self.scaling
        self._dist_cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_env(cls, env, **kw) -> "WaypointController":
        m = env.unwrapped.maze
        return cls(m.maze_map, m.maze_size_scaling, **kw)

    def cell(self, xy: np.ndarray) -> tuple[int, int]:
        """(row, col) of a world position, clamped into the grid."""
        r = int(np.floor((self._yc - xy[1]) / self.scaling))
        c = int(np.floor((xy[0] + self._xc) / self.scaling))
        return min(max(r, 0), self.rows - 1), min(max(c, 0), self.cols - 1)

    def cell_center(self, rc: tuple[int, int]) -> np.ndarray:
        r, c = rc
        return np.array([(c + 0.5) * self.scaling - self._xc, self._yc - (r + 0.5) * self.scaling])

    def distances(self, goal_rc: tuple[int, int]) -> np.ndarray:
        """(rows, cols) BFS step distance to ``goal_rc`` (-1 = wall / unreachable)."""
        d = self._dist_cache.get(goal_rc)
        if d is not None:
            return d
        d = -np.ones((self.rows, self.cols), dtype=np.int64)
        if self.grid[goal_rc] == 0:
            d[goal_rc] = 0
            q = collections.deque([goal_rc])
            while q:
                r, c = q.popleft()
                for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    nr, nc = r + dr, c + dc
                    if 0 <= nr < self.rows and 0 <= nc < self.cols and self.grid[nr, nc] == 0 and d[nr, nc] < 0:
                        d[nr, nc] = d[r, c] + 1
                        q.append((nr, nc))
        self._dist_cache[goal_rc] = d
        return d

    def waypoint(self, pos: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Next (2,) waypoint for a ball at ``pos`` heading to ``goal``."""
        cur, gc = self.cell(pos), self.cell(goal)
        if cur == gc:
            return np.asarray(goal, dtype=np.float64)
        d = self.distances(gc)
        if d[cur] < 0:  # inside a wall cell (numerical) or unreachable: head for the goal
            return np.asarray(goal, dtype=np.float64)
        best = None
        r, c = cur
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nr, nc = r + dr, c + dc
            if 0 <= nr < self.rows and 0 <= nc < self.cols and d[nr, nc] == d[cur] - 1:
                best = (nr, nc)
                break
        if best is None or best == gc:
            return np.asarray(goal, dtype=np.float64)
        return self.cell_center(best)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        single = obs.ndim == 1
        o = obs[None] if single else obs
        out = np.empty((o.shape[0], 2), dtype=np.float32)
        for i, row in enumerate(o):
            pos, vel, goal = row[0:2], row[2:4], row[4:6]
            w = self.waypoint(pos, goal)
            out[i] = np.clip(self.p_gain * (w - pos) + self.d_gain * vel, -1.0, 1.0)
        return out[0] if single else out


def random_policy(action_dim: int = 2, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Uniform U(-1, 1) actions, (B, Do) -> (B, action_dim); seeded numpy generator."""
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        b = () if obs.ndim == 1 else (obs.shape[0],)
        return rng.uniform(-1.0, 1.0, size=b + (action_dim,)).astype(np.float32)

    return act


def evaluate_policy(
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


def compute_ref_scores(
    env_name: str = "PointMaze_UMaze-v3",
    n_episodes: int = 100,
    seed: int = 0,
    reward_type: str | None = None,
) -> tuple[float, float]:
    """(ref_min, ref_max) = mean evaluation return of a uniform random policy and of the
    noise-free :class:`WaypointController`, over the same ``n_episodes`` seeds."""
    env = make_maze_env(env_name, seed)
    expert = WaypointController.from_env(env)
    env.close()
    lo = evaluate_policy(random_policy(2, seed), env_name, n_episodes, seed, reward_type)["mean_return"]
    hi = evaluate_policy(expert, env_name, n_episodes, seed, reward_type)["mean_return"]
    return lo, hi


def generate_maze_dataset(
    env_name: str = "PointMaze_UMaze-v3",
    n_steps: int = 50_000,
    seed: int = 0,
    reward_type: str | None = None,
    episode_len: int | None = None,
    action_noise: float = 0.0,
    path: str | os.PathLike | None = None,
    ref_episodes: int = 50,
    ref_scores: tuple[float, float] | None = None,
    progress: bool = True,
) -> OfflineDataset:
    """Collect a D4RL-maze2d-style dataset with the waypoint expert.

    Args:
        env_name: registered ``PointMaze_*`` id (``...Dense-v3`` for dense rewards).
        n_steps: number of transitions N.
        seed: seeds env resets, action noise and the reference-score rollouts.
        reward_type: override ``"sparse"``/``"dense"``.
        episode_len: steps between timeouts (default: the env's
            ``max_episode_steps``, e.g. 300 for UMaze).
        action_noise: std of Gaussian noise added to expert actions before
            clipping to [-1, 1] (D4RL's ``--noisy`` used 0.5; default 0 = clean).
        path: if given, the dataset is written there atomically (D4RL layout,
            ref scores as attributes).
        ref_episodes: episodes per policy for :func:`compute_ref_scores`
            (0 = skip the rollouts and take :data:`MAZE_REF_SCORES` for the env,
            or leave the ref scores unset if it has no entry).
        ref_scores: precomputed (ref_min, ref_max), skips the computation.
        progress: show a tqdm progress bar.

    Returns:
        OfflineDataset with observations (N, 6) ``[x, y, vx, vy, gx, gy]``,
        actions (N, 2) in [-1, 1], rewards (N,), terminals all False, timeouts
        every ``episode_len`` steps (and at row N-1).
    """
    from tqdm.auto import tqdm

    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    gym = _import_gym()
    if episode_len is None:
        spec = gym.spec(env_name)
        episode_len = int(spec.max_episode_steps or 300)
    env = make_maze_env(env_name, None, reward_type=reward_type, continuing_task=True, reset_target=True,
                        max_episode_steps=episode_len)
    u = env.unwrapped
    ctrl = WaypointController.from_env(env)
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)

    obs_b = np.empty((n_steps, 6), np.float32)
    nobs_b = np.empty((n_steps, 6), np.float32)
    act_b = np.empty((n_steps, 2), np.float32)
    rew_b = np.empty(n_steps, np.float32)
    tout_b = np.zeros(n_steps, bool)
    n_goals = 0
    episode = 0
    o, _ = env.reset(seed=seed)
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"collect {env_name}", unit="step", disable=not progress, mininterval=0.5)
    for i in range(n_steps):
        o = o.copy()
        o[4:6] = u.goal  # current goal (may have been re-sampled by the last step)
        a = ctrl(o)
        if action_noise > 0:
            a = np.clip(a + rng.normal(0.0, action_noise, size=2), -1.0, 1.0).astype(np.float32)
        o2, r, term, trunc, info = env.step(a)
        obs_b[i], act_b[i], rew_b[i], nobs_b[i] = o, a, r, o2
        n_goals += int(info.get("success", False))
        if term or trunc or i == n_steps - 1:
            tout_b[i] = True
            episode += 1
            o, _ = env.reset(seed=seed + episode)
        else:
            o = o2
        if (i + 1) % 1000 == 0:
            bar.update(1000)
    bar.update(n_steps - bar.n)
    bar.close()
    elapsed = time.perf_counter() - t0
    env.close()

    if ref_scores is None and ref_episodes > 0:
        ref_scores = compute_ref_scores(env_name, ref_episodes, seed, reward_type)
    elif ref_scores is None:
        ref_scores = MAZE_REF_SCORES.get(_ref_key(env_name, reward_type))
    rmin, rmax = ref_scores if ref_scores is not None else (None, None)
    rt = reward_type or ("dense" if "Dense" in env_name else "sparse")
    ds = OfflineDataset(
        observations=obs_b,
        actions=act_b,
        rewards=rew_b,
        next_observations=nobs_b,
        terminals=np.zeros(n_steps, bool),
        timeouts=tout_b,
        env_id=env_name,
        ref_min_score=rmin,
        ref_max_score=rmax,
        meta={
            "generator": "cdp.data.maze.generate_maze_dataset",
            "reward_type": rt,
            "episode_len": int(episode_len),
            "action_noise": float(action_noise),
            "seed": int(seed),
            "ref_episodes": int(ref_episodes),
            "goals_reached": int(n_goals),
            "steps_per_second": float(n_steps / max(elapsed, 1e-9)),
        },
    )
    if path is not None:
        write_d4rl_hdf5(ds, path)
    return ds
