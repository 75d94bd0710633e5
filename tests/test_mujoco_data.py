"""D4RL-recipe MuJoCo datasets via SAC (cdp.datagen.mujoco), locomotion evaluation (cdp.envs.mujoco) and offline RL
on them — tiny budgets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
gym = pytest.importorskip("gymnasium")

from cdp.datagen.mujoco import (  # noqa: E402
    MujocoDataConfig,
    dataset_path,
    generate_mujoco_datasets,
    replay_buffer_dataset,
)
from cdp.envs import mujoco  # noqa: E402
from cdp.envs.mujoco import robot_name  # noqa: E402
from cdp.data.rl import load_d4rl_hdf5, normalized_score  # noqa: E402

TINY = dict(env_id="Hopper-v5", learning_starts=150, eval_every=150, eval_episodes=1, ckpt_every=150,
            rollout_steps=300, buffer_size=2000)


def _check_trajectories_whole(ds):
    """Inside a trajectory, next_observations[i] == observations[i+1]; flags only at trajectory ends."""
    for sl in ds.trajectory_slices():
        o, no = ds.observations[sl], ds.next_observations[sl]
        assert np.array_equal(no[:-1], o[1:])
        ends = (ds.terminals | ds.timeouts)[sl]
        assert ends[-1] and not ends[:-1].any()


def test_generate_resume_and_datasets(tmp_path):
    out = tmp_path / "hopper"
    # an unreachable medium score: SAC stops at max_steps with a clear error, and its state is kept
    cfg = MujocoDataConfig(max_steps=300, medium_score=1e4, **TINY)
    with pytest.raises(RuntimeError, match="reached no normalised score"):
        generate_mujoco_datasets(cfg, out, progress=False, log=lambda s: None)
    state = json.loads((out / "sac" / "state.json").read_text())
    assert state["steps"] == 300 and len(state["evals"]) == 2 and state["medium_step"] is None
    # changing a fixed setting of the folder is refused
    with pytest.raises(ValueError, match="other settings"):
        generate_mujoco_datasets(MujocoDataConfig(max_steps=450, medium_score=-1e4, **{**TINY, "seed": 1}), out,
                                 progress=False, log=lambda s: None)
    # resume: more steps, and a reachable score (edit the folder's config as a user raising the budget would not
    # need to; here it makes medium reachable at the next evaluation)
    gc = json.loads((out / "generation_config.json").read_text())
    gc["medium_score"] = -1e4
    (out / "generation_config.json").write_text(json.dumps(gc))
    logs: list[str] = []
    cfg2 = MujocoDataConfig(max_steps=600, medium_score=-1e4, **TINY)
    paths = generate_mujoco_datasets(cfg2, out, progress=False, log=logs.append)
    assert any(s.startswith("resumed SAC at 300") for s in logs)
    state = json.loads((out / "sac" / "state.json").read_text())
    assert state["medium_step"] == 450
    assert set(paths) == {"random", "medium", "medium-replay"}
    for kind, p in paths.items():
        assert p == dataset_path(out, "Hopper-v5", kind) and p.exists()
        ds = load_d4rl_hdf5(p)
        assert ds.env_id == "Hopper-v5" and ds.obs_dim == 11 and ds.act_dim == 3
        assert (ds.ref_min_score, ds.ref_max_score) == (-20.272305, 3234.3)
        assert ds.meta["kind"] == kind and np.abs(ds.actions).max() <= 1.0
        _check_trajectories_whole(ds)
    mr = load_d4rl_hdf5(paths["medium-replay"])
    # every stored SAC transition until medium: SB3 stores a step's transition after the callback, so the step
    # that triggered a checkpoint/stop is missing once at the resume point (300) and once at medium (450)
    assert len(mr) == 448 and mr.meta["sac_steps"] == 450
    assert mr.timeouts[298] and not mr.terminals[298]  # the resume cut ends a trajectory as a timeout
    assert mr.terminals.sum() >= 1  # Hopper falls: true terminations are kept as terminals
    assert len(load_d4rl_hdf5(paths["medium"])) == 300
    # a second call writes nothing new and trains nothing
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    generate_mujoco_datasets(cfg2, out, progress=False, log=lambda s: None)
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == before


def test_replay_buffer_dataset_cuts_resume_gaps():
    n, do = 7, 2
    obs = np.arange(n * do, dtype=np.float32).reshape(n, 1, do)
    nobs = obs + 100.0
    nobs[:-1, 0] = obs[1:, 0]  # continuous ...
    nobs[3, 0] = -1.0  # ... except a gap after row 3 (a resume cut)
    dones = np.zeros((n, 1), np.float32)
    touts = np.zeros((n, 1), np.float32)
    dones[1] = 1.0  # true termination after row 1
    buf = SimpleNamespace(observations=obs, next_observations=nobs, actions=np.zeros((n, 1, 3), np.float32),
                          rewards=np.ones((n, 1), np.float32), dones=dones, timeouts=touts)
    ds = replay_buffer_dataset(buf, 6, "Hopper-v5")
    assert len(ds) == 6
    assert ds.terminals.tolist() == [False, True, False, False, False, False]
    assert ds.timeouts.tolist() == [False, False, False, True, False, True]
    assert ds.episode_starts.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="empty"):
        replay_buffer_dataset(buf, 0, "Hopper-v5")


def test_locomotion_evaluate_normalised_score_matches_manual_rollout():
    zero = lambda o: np.zeros((o.shape[0], 3), np.float32)  # noqa: E731
    res = mujoco.evaluate(zero, "Hopper-v5", n_episodes=2, seed=5, max_episode_steps=50)
    rets = []
    for i in range(2):
        env = gym.make("Hopper-v5", max_episode_steps=50)
        env.reset(seed=5 + i)
        r, done = 0.0, False
        while not done:
            _, rew, term, trunc, _ = env.step(np.zeros(3, np.float32))
            r += rew
            done = term or trunc
        rets.append(r)
    assert res["returns"] == pytest.approx(rets)
    assert res["normalized_score_mean"] == pytest.approx(float(np.mean(normalized_score("hopper", np.array(rets)))))
    assert res["success_rate"] is None


def test_config_errors():
    with pytest.raises(KeyError, match="no D4RL locomotion robot"):
        MujocoDataConfig(env_id="Ant-v5")
    with pytest.raises(ValueError, match="buffer_size"):
        MujocoDataConfig(max_steps=10, buffer_size=5)
    with pytest.raises(ValueError, match="expert_steps"):
        MujocoDataConfig(kinds=("expert",))
    with pytest.raises(ValueError, match="unknown dataset kinds"):
        MujocoDataConfig(kinds=("medium-rePlay",))
    assert robot_name("Walker2d-v5") == "walker2d"


def test_cdp_rl_on_a_generated_hopper_dataset(tmp_path):
    from cdp.cli import main

    paths = generate_mujoco_datasets(MujocoDataConfig(max_steps=150, medium_score=-1e4, **TINY),
                                     tmp_path / "d", progress=False, log=lambda s: None)
    out = tmp_path / "run"
    rc = main(["rl", "--algo.name", "cdp", "--data.path", str(paths["medium-replay"]), "--train.steps", "3",
               "--eval.episodes", "2", "--eval.every", "3", "--train.threads", "1", "--train.progress", "False",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["env"] == "Hopper-v5" and res["steps"] == 3 and res["success_rate"] is None
    assert [e["step"] for e in res["evals"]] == [3]  # the in-loop evaluation is the reported one
    assert np.isfinite(res["normalized_score_mean"]) and res["contraction_diagnostics"]["n_states"] > 0
    assert res["timing"]["act_ms_batch1"] > 0  # one batch-1 decision (candidates + selection), measured after training
