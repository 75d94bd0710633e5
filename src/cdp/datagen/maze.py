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

Differences from D4RL maze2d (documented, deliberate; the simulator, goal radius and observation
differences are listed in :mod:`cdp.envs.maze`, which makes the env and evaluates policies):

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
from typing import Any, Callable, Sequence

import numpy as np

from ..data.rl import OfflineDataset, write_d4rl_hdf5
from ..envs import maze as maze_env
from ..envs.maze import MAZE_REF_SCORES, _import_gym, _ref_key, make_maze_env

__all__ = [
    "WaypointController",
    "random_policy",
    "compute_ref_scores",
    "generate_maze_dataset",
]


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
    lo = maze_env.evaluate(random_policy(2, seed), env_name, n_episodes, seed, reward_type)["mean_return"]
    hi = maze_env.evaluate(expert, env_name, n_episodes, seed, reward_type)["mean_return"]
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
            "generator": "cdp.datagen.maze.generate_maze_dataset",
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
