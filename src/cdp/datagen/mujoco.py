"""D4RL-recipe datasets for Gymnasium MuJoCo locomotion (Hopper, Walker2d, HalfCheetah), made with SAC.

The recipe (Fu et al. 2020, "D4RL", Sec. 5 and App. C; the public D4RL generation scripts):

* **medium**: train SAC online and stop early when the policy reaches about **one third of expert** performance;
  the dataset is rollouts of that (stochastic) policy (D4RL: 1M steps).
* **medium-replay**: *every* transition in SAC's replay buffer up to that moment — a mix of the random-initial
  policy, learning policies and the medium policy.
* **random**: rollouts of the randomly initialised policy (D4RL: 1M steps).
* **expert** / **medium-expert** (optional): keep training to ``expert_steps`` and roll out that policy; the
  medium-expert dataset is medium + expert concatenated.

What differs here (stated in each file's attributes): Gymnasium ``*-v5`` envs on MuJoCo 3/4 instead of gym ``-v2`` on
mujoco-py; stable-baselines3's SAC (rl-zoo hyper-parameters: 2×256 MLPs, lr 3e-4, batch 256, τ = 0.005,
automatic entropy, 10k random warm-up steps); "medium" is reached when the mean *deterministic* evaluation
return (``eval_episodes`` episodes every ``eval_every`` steps) crosses ``medium_score`` on the D4RL normalised
scale (default 100/3, i.e. one third of the D4RL expert reference); rollouts are scaled down (``rollout_steps``,
default 100k instead of 1M). Normalised scores use D4RL's reference returns (``hopper`` −20.27 / 3234.3, …).

Long on 2 CPU cores (~10 min per 10k SAC steps on one busy core), so :func:`generate_mujoco_datasets` is
**resumable**: every ``ckpt_every`` steps it atomically saves the SAC model, its replay buffer and the evaluation
history to ``<out>/sac/``; running it again continues from there (the interrupted episode is cut as a timeout).
Datasets already written are skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.rl import OfflineDataset, load_d4rl_hdf5, normalized_score, ref_scores, write_d4rl_hdf5
from ..envs import mujoco as mujoco_env
from ..envs.mujoco import robot_name

KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")


def _require_sb3():
    try:
        import stable_baselines3  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("dataset generation needs stable-baselines3: pip install 'cdp[rl]'") from e
    return stable_baselines3


@dataclass
class MujocoDataConfig:
    """Settings of :func:`generate_mujoco_datasets` (see the module docstring for the recipe).

    Attributes:
        env_id: Gymnasium locomotion env (``Hopper-v5``, ``Walker2d-v5``, ``HalfCheetah-v5``).
        max_steps: SAC env-step budget for reaching medium (stops earlier when reached).
        medium_score: D4RL normalised score that counts as medium (default 100/3).
        eval_every / eval_episodes: deterministic evaluation schedule during SAC training.
        ckpt_every: env steps between resumable checkpoints.
        learning_starts: SAC's uniformly random warm-up steps (rl-zoo: 10000).
        rollout_steps: transitions in the random / medium / expert rollout datasets.
        expert_steps: total SAC steps for the expert policy (0: no expert / medium-expert datasets).
        buffer_size: SAC replay-buffer capacity; must hold every step until medium (the medium-replay dataset).
        kinds: which datasets to write.
        seed: seeds SAC, the envs and the rollouts.
    """

    env_id: str = "Hopper-v5"
    max_steps: int = 300_000
    medium_score: float = 100.0 / 3.0
    eval_every: int = 5_000
    eval_episodes: int = 5
    ckpt_every: int = 10_000
    learning_starts: int = 10_000
    rollout_steps: int = 100_000
    expert_steps: int = 0
    buffer_size: int = 500_000
    kinds: tuple[str, ...] = ("random", "medium", "medium-replay")
    seed: int = 0

    def __post_init__(self) -> None:
        robot_name(self.env_id)
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown dataset kinds {bad}; expected some of {KINDS}")
        if ("expert" in self.kinds or "medium-expert" in self.kinds) and self.expert_steps <= 0:
            raise ValueError("expert / medium-expert datasets need expert_steps > 0")
        if self.buffer_size < self.max_steps:
            raise ValueError(f"buffer_size ({self.buffer_size}) must be >= max_steps ({self.max_steps}) so the "
                             f"replay buffer keeps every transition until medium")
        if min(self.max_steps, self.eval_every, self.eval_episodes, self.ckpt_every, self.rollout_steps) < 1:
            raise ValueError("max_steps, eval_every, eval_episodes, ckpt_every and rollout_steps must be >= 1")
        if self.learning_starts < 0:
            raise ValueError("learning_starts must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


def dataset_path(out_dir: str | os.PathLike, env_id: str, kind: str) -> Path:
    """``<out>/<robot>-<kind>-v5.hdf5`` (the version is the Gymnasium env's)."""
    ver = env_id.rsplit("-", 1)[-1] if "-" in env_id else "v0"
    return Path(out_dir) / f"{robot_name(env_id)}-{kind}-{ver}.hdf5"


# ------------------------------------------------------------------------------------------------ rollouts
def rollout_dataset(
    policy_fn: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    n_steps: int,
    seed: int = 0,
    progress: bool = True,
    desc: str = "rollout",
) -> OfflineDataset:
    """Collect ``n_steps`` transitions of ``policy_fn`` (batch-1 observations (1, Do) → actions) in ``env_id``.

    Episodes end by termination (``terminals``) or the env's time limit (``timeouts``); the last row is cut as a
    timeout. Reference scores are D4RL's for the robot.
    """
    import gymnasium as gym
    from tqdm.auto import tqdm

    env = gym.make(env_id)
    do = env.observation_space.shape[0]
    da = env.action_space.shape[0]
    obs_b = np.empty((n_steps, do), np.float32)
    nobs_b = np.empty((n_steps, do), np.float32)
    act_b = np.empty((n_steps, da), np.float32)
    rew_b = np.empty(n_steps, np.float32)
    term_b = np.zeros(n_steps, bool)
    tout_b = np.zeros(n_steps, bool)
    episode = 0
    o, _ = env.reset(seed=seed)
    bar = tqdm(total=n_steps, desc=desc, unit="step", disable=not progress, mininterval=1.0)
    try:
        for i in range(n_steps):
            a = np.asarray(policy_fn(o[None].astype(np.float32)), dtype=np.float32).reshape(da)
            o2, r, term, trunc, _ = env.step(a)
            obs_b[i], act_b[i], rew_b[i], nobs_b[i] = o, a, r, o2
            term_b[i] = term
            tout_b[i] = (trunc and not term) or i == n_steps - 1
            if term or trunc:
                episode += 1
                o, _ = env.reset(seed=seed + episode)
            else:
                o = o2
            if (i + 1) % 1000 == 0:
                bar.update(1000)
        bar.update(n_steps - bar.n)
    finally:
        bar.close()
        env.close()
    rmin, rmax = ref_scores(robot_name(env_id))
    return OfflineDataset(observations=obs_b, actions=act_b, rewards=rew_b, next_observations=nobs_b,
                          terminals=term_b, timeouts=tout_b, env_id=env_id, ref_min_score=rmin, ref_max_score=rmax)


def replay_buffer_dataset(buffer, n: int, env_id: str) -> OfflineDataset:
    """The first ``n`` transitions of an SB3 ``ReplayBuffer`` (one env) as an :class:`OfflineDataset`.

    ``terminals = dones & ~timeouts``; a trajectory also ends where ``next_observations[i] != observations[i+1]``
    (a resume cut), and at row n-1 (timeout).
    """
    if n < 1:
        raise ValueError("the replay buffer is empty")
    obs = np.asarray(buffer.observations[:n, 0], np.float32)
    nobs = np.asarray(buffer.next_observations[:n, 0], np.float32)
    dones = np.asarray(buffer.dones[:n, 0]).astype(bool)
    touts = np.asarray(buffer.timeouts[:n, 0]).astype(bool)
    term = dones & ~touts
    cut = np.zeros(n, bool)
    cut[:-1] = ~dones[:-1] & np.any(nobs[:-1] != obs[1:], axis=1)
    cut[-1] = not term[-1]
    rmin, rmax = ref_scores(robot_name(env_id))
    return OfflineDataset(observations=obs, actions=np.asarray(buffer.actions[:n, 0], np.float32),
                          rewards=np.asarray(buffer.rewards[:n, 0], np.float32), next_observations=nobs,
                          terminals=term, timeouts=(touts & dones) | cut, env_id=env_id,
                          ref_min_score=rmin, ref_max_score=rmax)


# ------------------------------------------------------------------------------------------------ SAC
def _atomic_save(save: Callable[[str], None], path: Path, suffix: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save(str(tmp))
    written = tmp if tmp.exists() else tmp.with_name(tmp.name + suffix)  # SB3 appends .zip / .pkl
    os.replace(written, path)


class _SACState:
    """The resumable part of generation: ``<out>/sac/{model.zip, buffer.pkl, state.json, policy_*.zip}``."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "sac"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = {"steps": 0, "evals": [], "medium_step": None, "expert_done": False}
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())

    def save_state(self) -> None:
        tmp = self.state_path.with_name("state.json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def policy_path(self, name: str) -> Path:
        return self.dir / f"policy_{name}.zip"


def _make_sac(env, cfg: MujocoDataConfig, buffer_size: int):
    from stable_baselines3 import SAC

    return SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=buffer_size, batch_size=256, tau=0.005, gamma=0.99,
               learning_starts=cfg.learning_starts, train_freq=1, gradient_steps=1, ent_coef="auto",
               policy_kwargs={"net_arch": [256, 256]}, seed=cfg.seed, device="cpu", verbose=0)


def _train_sac(cfg: MujocoDataConfig, st: _SACState, target_steps: int, stop_at_medium: bool, progress: bool,
               log: Callable[[str], None]):
    """Train (or resume) SAC up to ``target_steps`` env steps, evaluating and checkpointing; → the model."""
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    env = gym.make(cfg.env_id)
    env.reset(seed=cfg.seed)
    model_path, buf_path = st.dir / "model.zip", st.dir / "buffer.pkl"
    if model_path.exists():
        model = SAC.load(model_path, env=env, device="cpu")
        model.load_replay_buffer(buf_path)
        rb = model.replay_buffer
        if rb.pos > 0:  # the episode in progress at the checkpoint is cut: mark it as a timeout
            rb.dones[rb.pos - 1] = 1.0
            rb.timeouts[rb.pos - 1] = 1.0
        log(f"resumed SAC at {model.num_timesteps} env steps ({rb.pos} transitions in the buffer)")
    else:
        model = _make_sac(env, cfg, cfg.buffer_size)
        model.save(st.policy_path("random"))  # the randomly initialised policy (random dataset)
    rmin, rmax = ref_scores(robot_name(cfg.env_id))

    def eval_model(m) -> dict[str, float]:
        res = mujoco_env.evaluate(lambda o: m.predict(o, deterministic=True)[0], cfg.env_id, cfg.eval_episodes,
                                  seed=10_000 + len(st.state["evals"]), ref_min=rmin, ref_max=rmax)
        return {"step": int(m.num_timesteps), "return": res["mean_return"],
                "normalized_score": res["normalized_score_mean"], "length": res["mean_length"]}

    def checkpoint(m) -> None:
        _atomic_save(m.save, model_path, ".zip")
        _atomic_save(m.save_replay_buffer, buf_path, ".pkl")
        st.state["steps"] = int(m.num_timesteps)
        st.save_state()

    class Hook(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.bar = tqdm(total=target_steps, initial=model.num_timesteps, desc=f"SAC {cfg.env_id}", unit="step",
                            disable=not progress, mininterval=2.0, dynamic_ncols=True)

        def _on_step(self) -> bool:
            n = self.model.num_timesteps
            self.bar.update(1)
            if n % cfg.eval_every == 0:
                rec = eval_model(self.model)
                st.state["evals"].append(rec)
                self.bar.set_postfix(score=f"{rec['normalized_score']:.1f}")
                log(f"step {n}: eval return {rec['return']:.1f} (normalised {rec['normalized_score']:.1f}, "
                    f"length {rec['length']:.0f})")
                if stop_at_medium and rec["normalized_score"] >= cfg.medium_score:
                    st.state["medium_step"] = n
                    self.model.save(st.policy_path("medium"))
                    checkpoint(self.model)
                    return False
            if n % cfg.ckpt_every == 0:
                checkpoint(self.model)
            return n < target_steps

    remaining = target_steps - model.num_timesteps
    if remaining > 0:
        hook = Hook()
        try:
            model.learn(total_timesteps=remaining, callback=hook, reset_num_timesteps=False, progress_bar=False)
        finally:
            hook.bar.close()
        checkpoint(model)
    return model


def generate_mujoco_datasets(cfg: MujocoDataConfig, out_dir: str | os.PathLike, progress: bool = True,
                             log: Callable[[str], None] = print) -> dict[str, Path]:
    """Make the configured D4RL-recipe datasets in ``out_dir`` (resumable; existing files are kept).

    Returns:
        {kind: path of the written D4RL-layout hdf5}.
    Raises:
        ImportError: stable-baselines3 missing. KeyError: env without reference scores.
        RuntimeError: SAC did not reach ``medium_score`` within ``max_steps`` (the buffer and model are kept;
            raise ``max_steps`` and run again to continue).
    """
    _require_sb3()
    from stable_baselines3 import SAC

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "generation_config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        fixed = ("env_id", "medium_score", "seed", "learning_starts", "eval_every", "eval_episodes", "buffer_size")
        diff = {k: (old.get(k), cfg.to_dict()[k]) for k in fixed if old.get(k) != cfg.to_dict()[k]}
        if diff:
            raise ValueError(f"{out} was generated with other settings {diff}; use a new folder")
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=1))
    st = _SACState(out)
    paths = {k: dataset_path(out, cfg.env_id, k) for k in cfg.kinds}
    common = {"generator": "cdp.datagen.mujoco.generate_mujoco_datasets", "recipe": "D4RL (Fu et al. 2020), scaled",
              "sac": "stable-baselines3 SAC 2x256, lr 3e-4, batch 256", "seed": cfg.seed,
              "medium_score": cfg.medium_score}
    rmin, rmax = ref_scores(robot_name(cfg.env_id))
    t0 = time.perf_counter()

    need_medium = any(k in cfg.kinds and not paths[k].exists() for k in ("medium", "medium-replay", "medium-expert"))
    if need_medium and st.state["medium_step"] is None:
        _train_sac(cfg, st, cfg.max_steps, True, progress, log)
        if st.state["medium_step"] is None:
            raise RuntimeError(f"SAC reached no normalised score >= {cfg.medium_score:.1f} within {cfg.max_steps} "
                               f"steps (best {max([e['normalized_score'] for e in st.state['evals']] or [float('nan')]):.1f}); "
                               f"run again with a larger max_steps to continue from {st.dir}")
    med_step = st.state["medium_step"]

    def write(kind: str, ds: OfflineDataset, extra: dict[str, Any]) -> None:
        ds.env_id = cfg.env_id
        ds.ref_min_score, ds.ref_max_score = rmin, rmax
        rets = ds.trajectory_returns()
        ds.meta = {**common, "kind": kind, **extra, "n_trajectories": int(ds.n_trajectories),
                   "mean_trajectory_return": float(rets.mean()),
                   "mean_trajectory_normalized_score": float(normalized_score(None, rets.mean(), rmin, rmax))}
        write_d4rl_hdf5(ds, paths[kind])
        log(f"wrote {paths[kind]}: {len(ds)} transitions, {ds.n_trajectories} trajectories, mean return "
            f"{rets.mean():.1f} (normalised {ds.meta['mean_trajectory_normalized_score']:.1f})")

    if "medium-replay" in cfg.kinds and not paths["medium-replay"].exists():
        model = SAC.load(st.dir / "model.zip", device="cpu")
        model.load_replay_buffer(st.dir / "buffer.pkl")
        if model.replay_buffer.full:
            raise RuntimeError(f"the SAC replay buffer ({cfg.buffer_size}) wrapped before medium; regenerate with a "
                               f"larger buffer_size")
        n = min(int(model.replay_buffer.pos), med_step)
        write("medium-replay", replay_buffer_dataset(model.replay_buffer, n, cfg.env_id),
              {"sac_steps": med_step})

    def policy_rollout(name: str, kind: str, seed_offset: int) -> OfflineDataset:
        m = SAC.load(st.policy_path(name), device="cpu")
        return rollout_dataset(lambda o: m.predict(o, deterministic=False)[0], cfg.env_id, cfg.rollout_steps,
                               seed=cfg.seed + seed_offset, progress=progress, desc=f"{kind} rollouts")

    if "random" in cfg.kinds and not paths["random"].exists():
        write("random", policy_rollout("random", "random", 1_000_000), {"policy": "SAC at initialisation"})
    if "medium" in cfg.kinds and not paths["medium"].exists():
        write("medium", policy_rollout("medium", "medium", 2_000_000), {"policy": f"SAC at {med_step} steps"})
    if any(k in cfg.kinds and not paths[k].exists() for k in ("expert", "medium-expert")):
        if not st.policy_path("expert").exists():
            model = _train_sac(cfg, st, cfg.expert_steps, False, progress, log)
            model.save(st.policy_path("expert"))
        ex = policy_rollout("expert", "expert", 3_000_000)
        if "expert" in cfg.kinds and not paths["expert"].exists():
            write("expert", ex, {"policy": f"SAC at {cfg.expert_steps} steps"})
        if "medium-expert" in cfg.kinds and not paths["medium-expert"].exists():
            med = load_d4rl_hdf5(paths["medium"]) if paths.get("medium", Path()).exists() else \
                policy_rollout("medium", "medium", 2_000_000)
            both = OfflineDataset(**{k: np.concatenate([getattr(med, k), getattr(ex, k)]) for k in
                                     ("observations", "actions", "rewards", "next_observations", "terminals",
                                      "timeouts")})
            write("medium-expert", both, {"policy": "medium + expert"})
    log(f"datasets ready in {out} ({time.perf_counter() - t0:.0f} s this run)")
    return {k: p for k, p in paths.items()}
