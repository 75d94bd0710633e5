"""Tests for cdp.datagen.maze and cdp.envs.maze (PointMaze dataset generation and evaluation)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from cdp.datagen.maze import WaypointController, generate_maze_dataset, random_policy  # noqa: E402
from cdp.envs import maze  # noqa: E402
from cdp.envs.maze import make_maze_env  # noqa: E402
from cdp.data.rl import check_matches_env, load_d4rl_hdf5  # noqa: E402

ENV = "PointMaze_UMaze-v3"


def test_generate_small_dataset_shapes_and_file(tmp_path):
    p = tmp_path / "umaze.hdf5"
    ds = generate_maze_dataset(ENV, n_steps=500, seed=0, episode_len=100, path=p,
                               ref_scores=(1.0, 2.0), progress=False)
    assert ds.observations.shape == (500, 6) and ds.next_observations.shape == (500, 6)
    assert ds.actions.shape == (500, 2) and ds.rewards.shape == (500,)
    assert np.all(np.abs(ds.actions) <= 1.0)
    assert set(np.unique(ds.rewards)) <= {0.0, 1.0}
    assert not ds.terminals.any()
    np.testing.assert_array_equal(np.flatnonzero(ds.timeouts), [99, 199, 299, 399, 499])
    assert ds.n_trajectories == 5
    # within a trajectory the state part chains; goal part only changes when a goal was reached
    for tr in ds.iter_trajectories():
        np.testing.assert_allclose(tr["observations"][1:, :4], tr["next_observations"][:-1, :4])
        changed = np.any(tr["observations"][1:, 4:] != tr["next_observations"][:-1, 4:], axis=1)
        assert np.all(tr["rewards"][:-1][changed] == 1.0)
    assert ds.meta["goals_reached"] > 0
    back = load_d4rl_hdf5(p)
    np.testing.assert_array_equal(back.observations, ds.observations)
    np.testing.assert_array_equal(back.episode_starts, ds.episode_starts)
    assert (back.env_id, back.ref_min_score, back.ref_max_score) == (ENV, 1.0, 2.0)
    assert back.meta["reward_type"] == "sparse" and back.meta["episode_len"] == 100
    env = make_maze_env(ENV, 0)
    check_matches_env(back, env)
    env.close()


def test_generation_is_seed_deterministic_and_dense():
    a = generate_maze_dataset(ENV, 200, seed=3, ref_episodes=0, progress=False)
    b = generate_maze_dataset(ENV, 200, seed=3, ref_episodes=0, progress=False)
    np.testing.assert_array_equal(a.observations, b.observations)
    d = generate_maze_dataset(ENV, 200, seed=3, reward_type="dense", ref_episodes=0, progress=False)
    assert np.all((d.rewards > 0) & (d.rewards <= 1))
    dist = np.linalg.norm(d.next_observations[:, :2] - d.next_observations[:, 4:6], axis=1)
    np.testing.assert_allclose(d.rewards, np.exp(-dist), rtol=1e-5)


def test_expert_beats_random():
    env = make_maze_env(ENV, 0)
    assert env.observation_space.shape == (6,)
    expert = WaypointController.from_env(env)
    env.close()
    kw = dict(env_name=ENV, n_episodes=8, seed=0, max_episode_steps=150)
    rnd = maze.evaluate(random_policy(2, 0), **kw)
    exp = maze.evaluate(expert, **kw, ref_min=0.0, ref_max=100.0)
    assert exp["success_rate"] >= 0.75 > rnd["success_rate"]
    assert exp["mean_return"] > 3 * max(rnd["mean_return"], 5.0)
    assert exp["normalized_score_mean"] == pytest.approx(exp["mean_return"])
    assert exp["returns"].shape == (8,) and exp["steps"] == 8 * 150


def test_controller_plans_around_walls():
    # U-maze: start bottom-left corridor, goal top-left; straight line crosses the wall row
    ctrl = WaypointController([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]])
    start = ctrl.cell_center((3, 1))
    goal = ctrl.cell_center((1, 1))
    assert ctrl.distances((1, 1))[3, 1] == 6
    np.testing.assert_allclose(ctrl.waypoint(start, goal), ctrl.cell_center((3, 2)))
    a = ctrl(np.concatenate([start, [0, 0], goal]))
    assert a.shape == (2,) and a[0] > 0.99 and abs(a[1]) < 1e-6


def test_ref_scores_table_and_compute():
    from cdp.datagen.maze import compute_ref_scores
    from cdp.envs.maze import MAZE_REF_SCORES

    lo, hi = MAZE_REF_SCORES[ENV]
    assert 0 <= lo < hi
    r = maze.evaluate(random_policy(2, 0), ENV, n_episodes=2, seed=0, max_episode_steps=20)
    assert r["normalized_score_mean"] == pytest.approx(100 * (r["mean_return"] - lo) / (hi - lo))
    ds = generate_maze_dataset(ENV, 50, seed=0, ref_episodes=0, progress=False)
    assert (ds.ref_min_score, ds.ref_max_score) == (lo, hi)
    dense = generate_maze_dataset(ENV, 50, seed=0, reward_type="dense", ref_episodes=0, progress=False)
    assert (dense.ref_min_score, dense.ref_max_score) == MAZE_REF_SCORES["PointMaze_UMazeDense-v3"]
    rmin, rmax = compute_ref_scores(ENV, n_episodes=2, seed=0)
    assert rmax > rmin


def test_bad_env_name():
    with pytest.raises(KeyError, match="unknown PointMaze env"):
        make_maze_env("PointMaze_Nope-v3")
    with pytest.raises(ValueError, match="reward_type"):
        make_maze_env(ENV, reward_type="shaped")
