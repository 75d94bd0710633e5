"""PushT low-dim environment matching Diffusion Policy's dataset layout, built on the ``gym-pusht`` package.

Observation (20-D float32, pixels in the 512x512 workspace), identical in layout to
``cdp.data.il.load_pusht_lowdim``: ``[kp0_x, kp0_y, ..., kp8_x, kp8_y, agent_x, agent_y]``.
Action (2-D): commanded agent target position (pixels); the env runs a PD controller for 10 physics steps of
0.01 s per action (10 Hz control).

Mapping between the dataset (Chi et al., RSS 2023, ``pusht_cchi_v7_replay.zarr``) and ``gym_pusht/PushT-v0``
----------------------------------------------------------------------------------------------------------------
* ``data/state`` = (agent x, agent y, block x, block y, block angle) where (block x, block y) is the block body's
  *origin* (pymunk ``Body.position``), the same quantity ``gym-pusht`` reports with ``obs_type="state"``.
  The T's body origin is the middle of the top edge of the cross-bar; its centre of gravity is at local (0, 45).
* ``gym-pusht``'s ``reset(options={"reset_to_state": s})`` sets the position *before* the angle, and pymunk
  rotates a body about its centre of gravity, so the block ends up displaced (up to ~90 px). To land exactly on a
  dataset frame we pass the pre-image ``p = s_xy - c + R(theta) c`` (c = CoG in body coordinates), see
  :func:`dataset_state_to_reset_state`. After that, open-loop replay of the recorded actions reproduces the
  recorded block trajectory (see docs/pusht_mapping.md for the measured errors).
* ``data/keypoint`` holds 9 block keypoints fixed in the block frame: ``kp = p + R(theta) k_local``. ``gym-pusht``'s
  own ``environment_state_agent_pos`` gives 8 polygon vertices instead, so it is *not* used; we compute the 9
  dataset keypoints from the block pose with :data:`PUSHT_LOCAL_KEYPOINTS`, which were fitted from the dataset
  itself (per-keypoint median of ``R(-theta)(kp - p)`` over all 25,650 frames; see :func:`fit_local_keypoints`).
* Success: coverage of the goal T (pose (256, 256, pi/4)) > 0.95 (DP's criterion). DP's reported "score" is the
  episode max of ``clip(coverage / 0.95, 0, 1)``; we report raw coverage and that reward.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .._optional import optional
from .seeding import call_policy

try:  # optional dependency: pip install cdp[pusht]
    import gymnasium as gym
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    HAVE_GYM_PUSHT = True
except ImportError:  # pragma: no cover - exercised only without the extra
    HAVE_GYM_PUSHT = False

__all__ = [
    "PUSHT_LOCAL_KEYPOINTS",
    "PUSHT_BLOCK_COG",
    "SUCCESS_THRESHOLD",
    "fit_local_keypoints",
    "block_keypoints",
    "lowdim_obs_from_state",
    "dataset_state_to_reset_state",
    "PushTLowDim",
    "make_pusht_env",
    "replay_demo",
    "evaluate",
]

#: (9, 2) dataset keypoints in the block frame (pixels), fitted from pusht_cchi_v7_replay.zarr (median over frames;
#: 99.9 % of frames are reproduced within 0.45 px, median error 2e-5 px, worst frame 2.2 px).
PUSHT_LOCAL_KEYPOINTS = np.array(
    [
        [9.2698, 90.0410],
        [-60.9835, -1.1867],
        [60.9128, -1.3934],
        [-0.2705, 25.5436],
        [-14.0649, 122.8159],
        [39.0027, 32.8574],
        [-39.9664, 32.7297],
        [-16.8243, 62.8632],
        [23.5415, -1.7003],
    ],
    dtype=np.float64,
)

#: Centre of gravity of the T in its body frame (pixels): mean of the two rectangles' centroids (gym-pusht add_tee).
PUSHT_BLOCK_COG = np.array([0.0, 45.0])

#: Diffusion Policy's success criterion on goal coverage.
SUCCESS_THRESHOLD = 0.95


def _rot(theta: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate vectors ``v`` (..., K, 2) by angles ``theta`` broadcastable to (..., K) (radians, pymunk sense)."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], axis=-1)


def fit_local_keypoints(state: np.ndarray, keypoint: np.ndarray) -> np.ndarray:
    """Fit block-frame keypoints from dataset frames.

    Args: state (N, 5) dataset states; keypoint (N, K, 2) dataset keypoints (pixels).
    Returns: (K, 2) per-keypoint median of ``R(-theta)(kp - block_xy)``.
    Raises: ValueError on shape mismatch.
    """
    state = np.asarray(state, dtype=np.float64)
    keypoint = np.asarray(keypoint, dtype=np.float64)
    if state.ndim != 2 or state.shape[1] != 5 or keypoint.ndim != 3 or keypoint.shape[0] != state.shape[0]:
        raise ValueError(f"expected state (N, 5) and keypoint (N, K, 2), got {state.shape} and {keypoint.shape}")
    local = _rot(-state[:, 4:5], keypoint - state[:, None, 2:4])
    return np.median(local, axis=0)


def block_keypoints(state: np.ndarray, local_keypoints: np.ndarray = PUSHT_LOCAL_KEYPOINTS) -> np.ndarray:
    """Dataset-style block keypoints from states.

    Args: state (..., 5) = (agent x, agent y, block x, block y, block angle [rad]).
    Returns: (..., K, 2) keypoints in pixels (float64).
    """
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1] != 5:
        raise ValueError(f"state must have last dim 5, got {state.shape}")
    return state[..., None, 2:4] + _rot(state[..., 4:5], np.broadcast_to(local_keypoints, state.shape[:-1] +
                                                                          local_keypoints.shape))


def lowdim_obs_from_state(state: np.ndarray) -> np.ndarray:
    """(..., 5) states -> (..., 20) float32 observations ``[keypoints (18), agent_pos (2)]`` (dataset layout)."""
    state = np.asarray(state, dtype=np.float64)
    kp = block_keypoints(state)
    return np.concatenate([kp.reshape(state.shape[:-1] + (-1,)), state[..., :2]], axis=-1).astype(np.float32)


def dataset_state_to_reset_state(state: np.ndarray) -> np.ndarray:
    """Convert a dataset state (5,) into the ``reset_to_state`` argument that makes ``gym-pusht`` land on it.

    gym-pusht sets ``block.position = p`` (at angle 0) and then ``block.angle = theta``; pymunk rotates about the
    centre of gravity ``c``, so the final origin is ``p + c - R(theta) c``. Solving for a final origin ``s`` gives
    ``p = s - c + R(theta) c``. Returns float64 (5,).
    """
    s = np.array(state, dtype=np.float64).reshape(-1)
    if s.shape != (5,):
        raise ValueError(f"state must have 5 entries, got shape {np.shape(state)}")
    out = s.copy()
    out[2:4] = s[2:4] - PUSHT_BLOCK_COG + _rot(np.array(s[4]), PUSHT_BLOCK_COG[None])[0]
    return out


if HAVE_GYM_PUSHT:

    class PushTLowDim(gym.Wrapper):
        """Wrap ``gym_pusht/PushT-v0`` (obs_type "state") to emit the 20-D dataset observation.

        ``reset(options={"dataset_state": s})`` resets exactly to a dataset frame (5,); other options are passed
        through. ``info`` gains ``"state"`` (5,) and, after steps, gym-pusht's ``"coverage"`` / ``"is_success"``.
        """

        def __init__(self, env: "gym.Env") -> None:
            super().__init__(env)
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(20,), dtype=np.float32)

        def _state(self) -> np.ndarray:
            u = self.env.unwrapped
            return np.array([*u.agent.position, *u.block.position, u.block.angle % (2 * np.pi)], dtype=np.float64)

        def reset(self, *, seed=None, options=None):
            options = dict(options or {})
            ds = options.pop("dataset_state", None)
            if ds is not None:
                options["reset_to_state"] = dataset_state_to_reset_state(ds)
            _, info = self.env.reset(seed=seed, options=options or None)
            st = self._state()
            info["state"] = st
            return lowdim_obs_from_state(st), info

        def step(self, action):
            _, reward, terminated, truncated, info = self.env.step(np.asarray(action, dtype=np.float64))
            st = self._state()
            info["state"] = st
            return lowdim_obs_from_state(st), reward, terminated, truncated, info


def _require_gym_pusht() -> None:
    if not HAVE_GYM_PUSHT:
        raise ImportError("gym-pusht is not installed; install the extra: pip install 'cdp[pusht]'")


def make_pusht_env(seed: int | None = None, max_episode_steps: int | None = 300,
                   render: bool = False) -> "PushTLowDim":
    """Create the 20-D low-dim PushT env (gym-pusht 0.1.8 underneath), reset once with ``seed``.

    ``max_episode_steps=None`` disables the time limit (used for open-loop replay of long demos; the longest demo
    has 246 steps). The env's ``terminated`` flag fires at coverage > 0.95. ``render=True``: ``env.render()``
    returns (680, 680, 3) uint8 frames (gym-pusht's ``rgb_array`` mode; observations are unchanged).

    Raises: ImportError without gym-pusht.
    """
    _require_gym_pusht()
    kw = {} if max_episode_steps is None else {"max_episode_steps": int(max_episode_steps)}
    if render:
        kw["render_mode"] = "rgb_array"
    base = gym.make("gym_pusht/PushT-v0", obs_type="state", disable_env_checker=True, **kw)
    env = PushTLowDim(base)
    env.reset(seed=seed)
    return env


@functools.lru_cache(maxsize=2)
def _load_state_action(path: str):
    zarr = optional("zarr", "il", "reading Diffusion-Policy zarr files")

    if not os.path.exists(path):
        raise FileNotFoundError(f"PushT zarr not found: {path} (set CDP_PUSHT_ZARR)")
    root = zarr.open(path, mode="r")
    st = np.asarray(root["data/state"][:], dtype=np.float64)
    act = np.asarray(root["data/action"][:], dtype=np.float64)
    ends = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
    return st, act, ends


def replay_demo(episode_idx: int, zarr_path: str | None = None, return_details: bool = False):
    """Replay a PushT demonstration open loop and return its max goal coverage.

    The env is reset exactly onto the episode's first dataset state (agent velocity zero), then every recorded
    action is stepped (no early stop at success, no time limit).

    Args:
        episode_idx: episode index in the zarr (0-based, negative allowed).
        zarr_path: defaults to :func:`cdp.data.il.default_pusht_zarr_path`.
        return_details: if True return a dict ``{"max_coverage", "final_coverage", "success" (max > 0.95),
            "max_block_err_px", "max_agent_err_px", "length"}`` where the errors compare the replayed state after
            step t with the dataset state t+1 (block position / agent position, pixels).

    Returns: max coverage in [0, 1] (float), or the dict above.
    Raises: ImportError without gym-pusht; FileNotFoundError for a missing zarr; IndexError for a bad index.
    """
    _require_gym_pusht()
    from cdp.data.il import default_pusht_zarr_path

    st, act, ends = _load_state_action(os.fspath(zarr_path or default_pusht_zarr_path()))
    n = len(ends)
    if not -n <= episode_idx < n:
        raise IndexError(f"episode {episode_idx} out of range for {n} episodes")
    episode_idx %= n
    s = 0 if episode_idx == 0 else int(ends[episode_idx - 1])
    e = int(ends[episode_idx])
    env = make_pusht_env(max_episode_steps=None)
    _, info = env.reset(options={"dataset_state": st[s]})
    covs, berr, aerr = [], [0.0], [0.0]
    for t in range(s, e):
        _, _, _, _, info = env.step(act[t])
        covs.append(float(info["coverage"]))
        if t + 1 < e:
            berr.append(float(np.abs(info["state"][2:4] - st[t + 1, 2:4]).max()))
            aerr.append(float(np.abs(info["state"][:2] - st[t + 1, :2]).max()))
    env.close()
    mx = max(covs)
    if not return_details:
        return mx
    return {
        "max_coverage": mx,
        "final_coverage": covs[-1],
        "success": mx > SUCCESS_THRESHOLD,
        "max_block_err_px": max(berr),
        "max_agent_err_px": max(aerr),
        "length": e - s,
    }


def evaluate(
    policy_fn: Callable[[np.ndarray], np.ndarray],
    n_episodes: int = 50,
    seed_start: int = 100000,
    max_steps: int = 300,
    n_obs_steps: int = 2,
    n_action_steps: int = 8,
    action_offset: int = 0,
    video_dir: str | os.PathLike | None = None,
    video_episodes: int = 0,
) -> dict:
    """Closed-loop evaluation with receding-horizon action chunks (Diffusion Policy protocol).

    Episode ``i`` uses env seed ``seed_start + i`` (DP's test seeds start at 100000; note gym-pusht draws its
    initial states with its own RNG, so the start states are not DP's). All episodes run in lock-step: each
    round, ``policy_fn`` gets the observation histories of the still-running episodes and the first
    ``n_action_steps`` actions starting at ``action_offset`` are executed (for a policy trained on
    ``SequenceWindows(align="dp")`` whose chunk starts at the oldest observation, pass
    ``action_offset=n_obs_steps-1``, as DP does). The history is padded at the start by repeating the first
    observation. An episode stops at success (coverage > 0.95, the env's termination) or after ``max_steps`` env
    steps. A plain loop over envs is used instead of ``gymnasium.vector`` so finished episodes freeze without
    auto-reset; it is equivalent to a synchronous vector env.

    Args:
        policy_fn: ``(B, To, 20) float32 numpy -> (B, H, 2)`` actions in pixels (numpy or torch). A callback with
            a ``seeds`` keyword is also given the env seed of each row (:mod:`cdp.envs.seeding`), so it can draw
            each episode's noise from its own generator.
        video_dir / video_episodes: record the first ``video_episodes`` episodes (rendered frames after the reset
            and after every env step) to ``video_dir/pusht_seed<seed>.gif`` (:func:`cdp.video.write_gif`).
            Rendering does not change the rollouts.

    Returns:
        dict with ``mean_max_coverage``, ``success_rate``, ``mean_max_reward`` (DP's score:
        max of clip(coverage/0.95, 0, 1)), and per-episode lists ``max_coverage``, ``success``, ``n_steps``,
        ``seeds`` (and ``videos``, the files written, when recording).

    Raises: ValueError for a chunk of the wrong shape / too short, or non-finite actions; ImportError without
        gym-pusht.
    """
    _require_gym_pusht()
    if n_episodes < 1 or n_obs_steps < 1 or n_action_steps < 1 or max_steps < 1 or action_offset < 0:
        raise ValueError("n_episodes, n_obs_steps, n_action_steps, max_steps must be >= 1 and action_offset >= 0")
    if video_episodes < 0 or (video_episodes > 0 and video_dir is None):
        raise ValueError("video_episodes must be >= 0, and video_dir is needed to record any")
    seeds = [seed_start + i for i in range(n_episodes)]
    n_vid = min(video_episodes, n_episodes)
    envs = [make_pusht_env(max_episode_steps=None, render=i < n_vid) for i in range(n_episodes)]
    frames: list[list[np.ndarray]] = [[] for _ in range(n_vid)]
    hist, done = [], np.zeros(n_episodes, dtype=bool)
    max_cov = np.zeros(n_episodes)
    steps = np.zeros(n_episodes, dtype=np.int64)
    for i, (env, sd) in enumerate(zip(envs, seeds)):
        o, _ = env.reset(seed=sd)
        hist.append([o] * n_obs_steps)
        if i < n_vid:
            frames[i].append(env.render())
    while not done.all():
        active = np.nonzero(~done)[0]
        batch = np.stack([np.stack(hist[i][-n_obs_steps:]) for i in active]).astype(np.float32)
        chunk = call_policy(policy_fn, batch, [seeds[i] for i in active])
        if hasattr(chunk, "detach"):
            chunk = chunk.detach().cpu().numpy()
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 3 or chunk.shape[0] != len(active) or chunk.shape[2] != 2:
            raise ValueError(f"policy_fn must return (B={len(active)}, H, 2) actions, got {chunk.shape}")
        if chunk.shape[1] < action_offset + n_action_steps:
            raise ValueError(
                f"action chunk of length {chunk.shape[1]} is shorter than action_offset + n_action_steps = "
                f"{action_offset + n_action_steps}"
            )
        if not np.isfinite(chunk).all():
            raise ValueError("policy_fn returned NaN/inf actions")
        for j, i in enumerate(active):
            for k in range(n_action_steps):
                o, _, term, _, info = envs[i].step(chunk[j, action_offset + k])
                if i < n_vid:
                    frames[i].append(envs[i].render())
                hist[i].append(o)
                hist[i] = hist[i][-n_obs_steps:]
                steps[i] += 1
                max_cov[i] = max(max_cov[i], float(info["coverage"]))
                if term or steps[i] >= max_steps:
                    done[i] = True
                    break
    for env in envs:
        env.close()
    videos = []
    if n_vid:
        from cdp.video import write_gif
        videos = [str(write_gif(frames[i], Path(video_dir) / f"pusht_seed{seeds[i]}.gif")) for i in range(n_vid)]
    success = max_cov > SUCCESS_THRESHOLD
    out = {
        "mean_max_coverage": float(max_cov.mean()),
        "success_rate": float(success.mean()),
        "mean_max_reward": float(np.clip(max_cov / SUCCESS_THRESHOLD, 0, 1).mean()),
        "max_coverage": max_cov.tolist(),
        "success": success.tolist(),
        "n_steps": steps.tolist(),
        "seeds": seeds,
    }
    if n_vid:
        out["videos"] = videos
    return out
