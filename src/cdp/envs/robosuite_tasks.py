"""robosuite Lift / PickPlaceCan with robomimic's low-dim observations, a scripted expert, and closed-loop evaluation.

Facts used (robosuite 1.5.1, github.com/ARISE-Initiative/robosuite; robomimic, github.com/ARISE-Initiative/robomimic,
Mandlekar et al., CoRL 2021):

* Environments ``Lift`` (one cube, success = cube height > table top + 0.04 m) and ``PickPlaceCan`` (success = the
  can inside its target bin and the gripper away from it), both with a ``Panda`` arm, evaluated through the env's own
  ``_check_success()``.
* robomimic's low-dim observation keys: ``object`` (robosuite's ``object-state``: 10-D for Lift = cube pos, quat,
  gripper-to-cube vector; 14-D for Can), ``robot0_eef_pos`` (3), ``robot0_eef_quat`` (4, x-y-z-w),
  ``robot0_gripper_qpos`` (2). The flat observation used by the policies concatenates them in that order
  (:data:`OBS_KEYS`): 19-D for Lift, 23-D for Can.
* Controller ``OSC_POSE`` (robomimic's default): 7-D actions in [-1, 1] = end-effector position delta (scaled to
  ±0.05 m per step), axis-angle rotation delta (±0.5 rad) in the robot base frame, gripper (-1 open, +1 close).
  Control at 20 Hz (simulation step 2 ms, 25 substeps). Rollout horizon 400 steps (robomimic's Lift/Can setting).
* ``states`` in robomimic files are ``sim.get_state().flatten()`` = ``[time, qpos, qvel]``.

MuJoCo 4 compatibility
----------------------
robosuite 1.5.x (1.5.1, 1.5.2) is written for MuJoCo 3.x and fails with MuJoCo 4.0 in two places,
which :func:`patch_robosuite_for_mujoco4` fixes at run time without touching the installed files:

1. ``binding_utils.MjModel.get_joint_qpos_addr`` / ``get_joint_qvel_addr`` assert
   ``joint_type in (mjJNT_HINGE, mjJNT_SLIDE)``; MuJoCo 4's ``mjtJoint`` does not compare equal from the enum side
   (``np.int32(3) == mjJNT_HINGE`` is True but ``mjJNT_HINGE == np.int32(3)`` is not), so the assert fails for
   every hinge joint. The replacements compare integers.
2. ``controllers/parts/controller.py`` calls ``mujoco.mj_fullM(model, dst, data.qM)``; MuJoCo 4 removed ``qM`` and
   changed the signature to ``mj_fullM(model, data, dst)``. The patch gives that module a ``mujoco`` proxy whose
   ``mj_fullM`` accepts the old argument order (robosuite's ``MjData.qM`` then returns the raw ``mujoco.MjData``).

Only ``has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False`` is supported (no screen, no GL).
"""

from __future__ import annotations

import json
import logging
import time
import types
from typing import Callable

import numpy as np

from .seeding import call_policy

__all__ = [
    "TASKS",
    "OBS_KEYS",
    "HORIZON",
    "patch_robosuite_for_mujoco4",
    "RobosuiteLowDim",
    "ScriptedPickPlace",
    "evaluate",
    "env_args_for",
]

#: cdp task name → robosuite environment name
TASKS: dict[str, str] = {"lift": "Lift", "can": "PickPlaceCan"}
#: robosuite observables concatenated into robomimic's ``object`` key (robomimic's order; robosuite's own
#: ``object-state`` orders the Can entries differently)
OBJECT_KEYS: dict[str, tuple[str, ...]] = {
    "lift": ("cube_pos", "cube_quat", "gripper_to_cube_pos"),
    "can": ("Can_pos", "Can_quat", "Can_to_robot0_eef_pos", "Can_to_robot0_eef_quat"),
}
#: robomimic low-dim observation keys, in the order they are concatenated into the flat observation
OBS_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
#: robomimic's rollout horizon for Lift and Can (steps at 20 Hz)
HORIZON = 400
#: robomimic's EnvType.ROBOSUITE_TYPE (the ``type`` field of ``env_args``)
ROBOSUITE_ENV_TYPE = 1

_PATCHED = False


def _import_robosuite():
    try:
        import robosuite  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("robosuite is not installed: pip install 'cdp[robosuite]' (robosuite==1.5.1)") from e
    # robosuite logs a warning per missing body part of the composite controller on every reset; keep errors only
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    patch_robosuite_for_mujoco4()
    return robosuite


def patch_robosuite_for_mujoco4() -> bool:
    """Make robosuite 1.5.x run on MuJoCo 4 (see the module docstring); idempotent, a no-op on MuJoCo 3.

    Returns True when the patch was applied (now or earlier). Raises ImportError without robosuite.
    """
    global _PATCHED
    if _PATCHED:
        return True
    import mujoco
    import robosuite.controllers.parts.controller as rs_controller
    from robosuite.utils import binding_utils as bu

    if int(mujoco.__version__.split(".")[0]) < 4:
        return False
    # joint type -> (qpos width, qvel width)
    widths = {int(mujoco.mjtJoint.mjJNT_FREE): (7, 6), int(mujoco.mjtJoint.mjJNT_BALL): (4, 3),
              int(mujoco.mjtJoint.mjJNT_SLIDE): (1, 1), int(mujoco.mjtJoint.mjJNT_HINGE): (1, 1)}

    def _addr(self, name, which):
        j = self.joint_name2id(name)
        n = widths[int(self.jnt_type[j])][which]
        a = int((self.jnt_qposadr if which == 0 else self.jnt_dofadr)[j])
        return a if n == 1 else (a, a + n)

    bu.MjModel.get_joint_qpos_addr = lambda self, name: _addr(self, name, 0)
    bu.MjModel.get_joint_qvel_addr = lambda self, name: _addr(self, name, 1)
    if not hasattr(mujoco.MjData, "qM"):
        bu.MjData.qM = property(lambda self: self._data)

        class _MujocoProxy(types.ModuleType):
            def __getattr__(self, k):
                return getattr(mujoco, k)

        proxy = _MujocoProxy("mujoco_robosuite_compat")

        def mj_fullM(m, dst, d):  # robosuite's (model, dst, qM) order; qM is the raw MjData here
            return mujoco.mj_fullM(m, d, dst)

        proxy.mj_fullM = mj_fullM
        rs_controller.mujoco = proxy
    _PATCHED = True
    return True


def _controller_config():
    from robosuite.controllers import load_part_controller_config
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    part = load_part_controller_config(default_controller="OSC_POSE")
    return refactor_composite_controller_config(part, "Panda", ["right"])


def env_args_for(task: str, horizon: int = HORIZON) -> dict:
    """robomimic ``env_args`` dict (``env_name``, ``type``, ``env_kwargs``) of the environment :class:`RobosuiteLowDim`
    builds for ``task``. Raises ValueError for an unknown task."""
    if task not in TASKS:
        raise ValueError(f"unknown robosuite task {task!r}; expected one of {sorted(TASKS)}")
    kwargs = {"robots": ["Panda"], "has_renderer": False, "has_offscreen_renderer": False, "use_camera_obs": False,
              "use_object_obs": True, "reward_shaping": False, "control_freq": 20, "horizon": int(horizon),
              "ignore_done": True, "hard_reset": False, "controller": "OSC_POSE"}
    return {"env_name": TASKS[task], "type": ROBOSUITE_ENV_TYPE, "env_kwargs": kwargs}


class RobosuiteLowDim:
    """One robosuite environment with robomimic's low-dim observations (no rendering).

    Args:
        task: ``"lift"`` or ``"can"`` (:data:`TASKS`). horizon: steps before ``done`` (robomimic: 400).
        construction_seed: seeds numpy's global RNG while the model is built (restored afterwards). robosuite
            1.5.1 draws model-level randomness there, e.g. Lift's cube half-size, uniform in [0.020, 0.022] m per
            axis, fixed for the env's lifetime; with the same seed every env instance gets the same cube.
    Attributes:
        env: the robosuite environment. obs_dim: 19 (Lift) / 23 (Can). action_dim: 7.
    Raises:
        ValueError: unknown task or horizon < 1. ImportError: robosuite missing.
    """

    action_dim = 7

    def __init__(self, task: str = "lift", horizon: int = HORIZON, construction_seed: int = 0) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown robosuite task {task!r}; expected one of {sorted(TASKS)}")
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        suite = _import_robosuite()
        self.task, self.horizon = task, int(horizon)
        self.env_args = env_args_for(task, horizon)
        kw = dict(self.env_args["env_kwargs"])
        kw.pop("controller")
        kw["robots"] = "Panda"
        self.construction_seed = int(construction_seed)
        saved = np.random.get_state()
        np.random.seed(self.construction_seed)
        try:
            self.env = suite.make(TASKS[task], controller_configs=_controller_config(), **kw)
            self._raw = self.env.reset()
        finally:
            np.random.set_state(saved)
        self.t = 0
        self.obs_dim = int(self.flat(self.obs()).shape[0])

    # ------------------------------------------------------------------------------------------------- obs
    def obs(self) -> dict[str, np.ndarray]:
        """The last observation as robomimic keys → float64 arrays (``object`` = :data:`OBJECT_KEYS` concatenated)."""
        r = self._raw
        return {"object": np.concatenate([np.asarray(r[k], dtype=np.float64).reshape(-1) for k in OBJECT_KEYS[self.task]]),
                **{k: np.asarray(r[k], dtype=np.float64).copy() for k in OBS_KEYS[1:]}}

    @staticmethod
    def flat(obs: dict[str, np.ndarray]) -> np.ndarray:
        """Concatenate ``obs`` in :data:`OBS_KEYS` order → (Do,) float32."""
        return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in OBS_KEYS])

    def object_pos(self) -> np.ndarray:
        """World position (3,) of the task object (cube / can), metres (from the simulator)."""
        e = self.env
        bid = e.cube_body_id if self.task == "lift" else e.obj_body_id["Can"]
        return np.array(e.sim.data.body_xpos[bid], dtype=np.float64)

    def object_quat(self) -> np.ndarray:
        """World orientation (4,) of the task object, x-y-z-w (from the simulator)."""
        e = self.env
        bid = e.cube_body_id if self.task == "lift" else e.obj_body_id["Can"]
        w, x, y, z = e.sim.data.body_xquat[bid]
        return np.array([x, y, z, w], dtype=np.float64)

    def get_state(self) -> np.ndarray:
        """Flattened simulator state ``[time, qpos, qvel]`` (robomimic's ``states``)."""
        return np.asarray(self.env.sim.get_state().flatten(), dtype=np.float64)

    def is_success(self) -> bool:
        """The env's own ``_check_success()``."""
        return bool(self.env._check_success())

    # ------------------------------------------------------------------------------------------------- dynamics
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Reset; with ``seed`` the object placement and the robot's initial-joint noise are reproducible.

        robosuite 1.5.1 draws both from numpy's global ``np.random`` (1.5.2 from the env's ``rng``): both are seeded
        with ``seed`` for the reset, and the global state is restored afterwards, so the caller's ``np.random``
        stream is left as it was."""
        if seed is None:
            self._raw = self.env.reset()
        else:
            saved = np.random.get_state()
            np.random.seed(int(seed))
            rng = getattr(self.env, "rng", None)
            if isinstance(rng, np.random.Generator):
                rng.bit_generator.state = np.random.default_rng(int(seed)).bit_generator.state
            try:
                self._raw = self.env.reset()
            finally:
                np.random.set_state(saved)
        self.t = 0
        return self.obs()

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, dict]:
        """Apply one 7-D OSC_POSE action (clipped to [-1, 1]).

        Returns ``(obs, reward, done, info)``: reward = 1.0 on success else 0.0 (sparse, as robomimic's datasets),
        done = success or ``horizon`` steps reached, ``info["success"]``. Raises ValueError for a wrong shape.
        """
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,):
            raise ValueError(f"action must have 7 entries (OSC_POSE xyz, axis-angle, gripper), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN/inf: {a}")
        self._raw, _, _, _ = self.env.step(np.clip(a, -1.0, 1.0))
        self.t += 1
        succ = self.is_success()
        return self.obs(), float(succ), bool(succ or self.t >= self.horizon), {"success": succ}

    def close(self) -> None:
        self.env.close()


# -------------------------------------------------------------------------------------------------------- expert
def _quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _axis_angle(R: np.ndarray) -> np.ndarray:
    """Rotation matrix → axis-angle vector (3,)."""
    c = np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)
    ang = np.arccos(c)
    if ang < 1e-6:
        return np.zeros(3)
    v = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    s = np.linalg.norm(v)
    if s < 1e-9:  # angle ~ pi: axis from the diagonal
        axis = np.sqrt(np.clip((np.diag(R) + 1) / 2, 0, None))
        return axis / max(np.linalg.norm(axis), 1e-9) * ang
    return v / s * ang


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class ScriptedPickPlace:
    """Waypoint state machine for Lift (and Can): above object → descend → close → lift (→ carry to bin → release).

    Uses privileged state (object position and yaw, target bin) and outputs OSC_POSE actions: a proportional
    position command ``clip(gain · (target - eef) / 0.05)`` (0.05 m = OSC's full-scale step), a rotation command
    that keeps the initial downward gripper orientation, yawed to the nearest grasp face of the object (cube: 90°
    symmetry), and the gripper command. Diversity per demo: random waypoint offsets (±``offset`` m), gain,
    hover height, hold durations, plus Gaussian action noise of std ``noise`` on the arm dimensions.

    Args:
        env: :class:`RobosuiteLowDim`. rng: ``numpy.random.Generator``. noise: action noise std. offset: waypoint
            offset bound (m).
    """

    def __init__(self, env: RobosuiteLowDim, rng: np.random.Generator, noise: float = 0.05,
                 offset: float = 0.005) -> None:
        self.env, self.rng, self.noise = env, rng, float(noise)
        self.gain = rng.uniform(0.8, 1.2)
        self.hover = rng.uniform(0.06, 0.10)
        self.grasp_dz = rng.uniform(-0.01, 0.0)
        self.xy_off = rng.uniform(-offset, offset, size=2)
        self.close_steps = int(rng.integers(6, 11))
        self.lift_h = rng.uniform(0.12, 0.2)
        self.phase, self.count = "reach", 0
        o = env.obs()
        self.R0 = _quat_xyzw_to_mat(o["robot0_eef_quat"])
        self.R_goal = self.R0
        if env.task == "can":
            e = env.env
            self.bin_target = np.array(e.target_bin_placements[e.object_id], dtype=np.float64)

    def _object_yaw(self) -> float:
        R = _quat_xyzw_to_mat(self.env.object_quat())
        return float(np.arctan2(R[1, 0], R[0, 0]))

    def _grasp_goal(self) -> np.ndarray:
        # gripper yaw relative to its start: object yaw folded into (-45°, 45°] (cube faces every 90°)
        if self.env.task == "can":
            return self.R0
        d = (self._object_yaw() + np.pi / 4) % (np.pi / 2) - np.pi / 4
        return _rot_z(d) @ self.R0

    def act(self) -> np.ndarray:
        """The next 7-D action in [-1, 1] for the env's current state."""
        o = self.env.obs()
        eef = o["robot0_eef_pos"]
        obj = self.env.object_pos()
        grip = -1.0
        target = eef
        if self.phase == "reach":
            self.R_goal = self._grasp_goal()
            target = obj + np.array([*self.xy_off, self.hover])
            if np.linalg.norm(target - eef) < 0.015:
                self.phase, self.count = "descend", 0
        if self.phase == "descend":
            # the fingers may touch the floor (Can's bin) before the target height: move on after 20 steps
            target = obj + np.array([*self.xy_off, self.grasp_dz])
            self.count += 1
            if np.linalg.norm(target - eef) < 0.008 or (self.count > 20 and np.linalg.norm((target - eef)[:2]) < 0.015):
                self.phase, self.count = "close", 0
        if self.phase == "close":
            target, grip = obj + np.array([*self.xy_off, self.grasp_dz]), 1.0
            self.count += 1
            if self.count >= self.close_steps:
                self.phase = "lift"
                self.lift_from = eef.copy()
        if self.phase == "lift":
            grip = 1.0
            target = self.lift_from + np.array([0.0, 0.0, self.lift_h])
            if self.env.task == "can" and eef[2] > self.lift_from[2] + 0.1:
                self.phase = "carry"
        if self.phase == "carry":
            grip = 1.0
            target = np.array([self.bin_target[0], self.bin_target[1], self.lift_from[2] + 0.12])
            if np.linalg.norm(target[:2] - eef[:2]) < 0.03:
                self.phase, self.count = "release", 0
        if self.phase == "release":
            target, grip = np.array([self.bin_target[0], self.bin_target[1], self.lift_from[2] + 0.12]), -1.0
            self.count += 1
            if self.count > 8:
                self.phase = "retreat"
        if self.phase == "retreat":
            target, grip = np.array([self.bin_target[0], self.bin_target[1], self.lift_from[2] + 0.3]), -1.0
        a = np.zeros(7)
        a[:3] = np.clip(self.gain * (target - eef) / 0.05, -1.0, 1.0)
        R = _quat_xyzw_to_mat(o["robot0_eef_quat"])
        a[3:6] = np.clip(_axis_angle(self.R_goal @ R.T) / 0.5, -1.0, 1.0)
        a[:6] += self.noise * self.rng.standard_normal(6)
        a[6] = grip
        return np.clip(a, -1.0, 1.0)


# -------------------------------------------------------------------------------------------------------- evaluation
def evaluate(policy_fn: Callable[[np.ndarray], np.ndarray], task: str = "lift", n_episodes: int = 50,
             seed_start: int = 100000, max_steps: int = HORIZON, n_obs_steps: int = 2,
             n_action_steps: int = 1, action_offset: int = 0, n_envs: int = 10,
             progress: bool = False) -> dict:
    """Closed-loop success rate: ``n_episodes`` episodes on seeds ``seed_start, seed_start+1, ...``.

    Episodes run in groups of up to ``n_envs`` side by side (one robosuite env each, ~0.1 GB of memory, stepped in
    turn), so the policy is queried once per decision for the whole group of still-running episodes. An episode
    ends at the first success (robomimic's rollout convention) or after ``max_steps`` env steps. A callback with a
    ``seeds`` keyword gets the env seed of each row (:mod:`cdp.envs.seeding`); drawing each row's noise from its
    episode's generator makes the results independent of ``n_envs`` and ``n_episodes``.

    Args:
        policy_fn: obs (B, To, Do) float32 → actions (B, H', 7); ``chunk[action_offset : action_offset+Ta]`` is
            executed (``Ta = n_action_steps``). Observation histories are padded with the first frame.
    Returns:
        ``{"task", "success_rate", "successes" (list of 0/1), "episode_lengths", "seeds", "env_steps"}``.
    Raises:
        ValueError: counts < 1 or a policy output of the wrong shape. ImportError: robosuite missing.
    """
    if min(n_episodes, max_steps, n_obs_steps, n_action_steps, n_envs) < 1:
        raise ValueError("n_episodes, max_steps, n_obs_steps, n_action_steps and n_envs must be >= 1")
    succ, lengths = np.zeros(n_episodes, int), np.zeros(n_episodes, int)
    envs = [RobosuiteLowDim(task, horizon=max_steps) for _ in range(min(n_envs, n_episodes))]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_episodes, desc=f"eval {task}")
    steps = 0
    for g0 in range(0, n_episodes, len(envs)):
        ids = list(range(g0, min(g0 + len(envs), n_episodes)))
        hist, done = [], np.zeros(len(ids), bool)
        for j, ep in enumerate(ids):
            hist.append([envs[j].flat(envs[j].reset(seed_start + ep))] * n_obs_steps)
        while not done.all():
            live = np.nonzero(~done)[0]
            obs = np.stack([np.stack(hist[j][-n_obs_steps:]) for j in live]).astype(np.float32)
            chunk = np.asarray(call_policy(policy_fn, obs, [seed_start + ids[j] for j in live]))
            if chunk.ndim != 3 or chunk.shape[0] != len(live) or chunk.shape[2] != 7:
                raise ValueError(f"policy_fn returned actions of shape {chunk.shape}; expected ({len(live)}, H, 7)")
            chunk = chunk[:, action_offset: action_offset + n_action_steps]
            if chunk.shape[1] < 1:
                raise ValueError(f"action_offset {action_offset} is outside the returned chunk")
            for b, j in enumerate(live):
                for a in chunk[b]:
                    o, _, d, info = envs[j].step(a)
                    steps += 1
                    hist[j] = (hist[j] + [envs[j].flat(o)])[-n_obs_steps:]
                    if d:
                        done[j], succ[ids[j]], lengths[ids[j]] = True, int(info["success"]), envs[j].t
                        if bar is not None:
                            bar.update(1)
                        break
    if bar is not None:
        bar.close()
    for e in envs:
        e.close()
    return {"task": task, "success_rate": float(succ.mean()), "successes": succ.tolist(),
            "episode_lengths": lengths.tolist(), "seeds": list(range(seed_start, seed_start + n_episodes)),
            "env_steps": int(steps)}
