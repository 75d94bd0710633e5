"""Tests for cdp.data.rl on tiny synthetic data made in tmp_path."""

from __future__ import annotations

import math

import h5py
import numpy as np
import torch
import pytest

from cdp.data.rl import (
    OfflineDataset,
    check_matches_env,
    load_d4rl_hdf5,
    load_minari,
    normalize_rewards,
    normalized_score,
    ref_scores,
    subsample_trajectories,
    write_d4rl_hdf5,
)


def _raw(n=10, do=3, da=2, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(n, do)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, da)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }


def _write_raw(path, raw):
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
    return path


def _ds_with_lengths(lengths, seed=0, do=3, da=2):
    n = int(sum(lengths))
    raw = _raw(n, do, da, seed)
    ends = np.cumsum(lengths) - 1
    raw["timeouts"][ends] = True
    raw["next_observations"] = np.roll(raw["observations"], -1, axis=0)
    return OfflineDataset(**raw)


def test_hdf5_round_trip(tmp_path):
    ds = _ds_with_lengths([4, 3, 5])
    ds.terminals[6] = True
    ds.timeouts[6] = False
    ds = OfflineDataset(
        ds.observations, ds.actions, ds.rewards, ds.next_observations, ds.terminals, ds.timeouts,
        env_id="hopper-medium-v2", ref_min_score=-1.5, ref_max_score=7.25, meta={"note": "x", "k": 3},
    )
    p = write_d4rl_hdf5(ds, tmp_path / "sub" / "d.hdf5")
    assert p.is_file() and not list(p.parent.glob("*.tmp"))
    back = load_d4rl_hdf5(p)
    for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "episode_starts"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k))
    assert back.env_id == "hopper-medium-v2"
    assert (back.ref_min_score, back.ref_max_score) == (-1.5, 7.25)
    assert back.meta["note"] == "x" and back.meta["k"] == 3
    # overwrite is atomic and replaces content
    write_d4rl_hdf5(ds.select_trajectories([0]), p)
    assert len(load_d4rl_hdf5(p)) == 4


def test_ref_scores_from_d4rl_table_when_no_attrs(tmp_path):
    p = _write_raw(tmp_path / "d.hdf5", _raw(6))
    ds = load_d4rl_hdf5(p, env_id="walker2d-medium-v2")
    assert (ds.ref_min_score, ds.ref_max_score) == (1.629008, 4592.3)


def test_next_observations_built_like_qlearning_dataset(tmp_path):
    n = 10
    raw = _raw(n, do=2)
    raw["observations"] = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    raw["rewards"] = np.arange(n, dtype=np.float32)
    raw["timeouts"][3] = True  # trajectory 0 = rows 0..3 (timeout)
    raw["terminals"][6] = True  # trajectory 1 = rows 4..6 (terminal)
    # trajectory 2 = rows 7..9 (no flag at the end of file)
    ds = load_d4rl_hdf5(_write_raw(tmp_path / "d.hdf5", raw))
    kept = np.array([0, 1, 2, 4, 5, 6, 7, 8])  # timeout row 3 and last row 9 dropped
    np.testing.assert_array_equal(ds.observations, raw["observations"][kept])
    np.testing.assert_array_equal(ds.next_observations, raw["observations"][kept + 1])
    np.testing.assert_array_equal(ds.rewards, raw["rewards"][kept])
    np.testing.assert_array_equal(ds.terminals, [0, 0, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(ds.timeouts, [0, 0, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ds.episode_starts, [0, 3, 6])
    # no next_obs crosses a trajectory boundary except at the terminal (as D4RL)
    for tr in ds.iter_trajectories():
        np.testing.assert_array_equal(tr["observations"][1:], tr["next_observations"][:-1])
    np.testing.assert_array_equal(ds.trajectory_returns(), [0 + 1 + 2, 4 + 5 + 6, 7 + 8])


def test_subsample_whole_trajectories_deterministic():
    lengths = list(range(3, 23))  # 20 trajectories of distinct lengths
    ds = _ds_with_lengths(lengths)
    a = subsample_trajectories(ds, 0.1, seed=1)
    b = subsample_trajectories(ds, 0.1, seed=1)
    c = subsample_trajectories(ds, 0.1, seed=2)
    assert a.n_trajectories == 2
    np.testing.assert_array_equal(a.observations, b.observations)
    assert not np.array_equal(a.trajectory_lengths(), c.trajectory_lengths()) or not np.array_equal(
        a.observations, c.observations
    )
    # every kept trajectory is a whole original trajectory
    orig = {tuple(tr["observations"][0]): tr for tr in ds.iter_trajectories()}
    for tr in a.iter_trajectories():
        o = orig[tuple(tr["observations"][0])]
        np.testing.assert_array_equal(tr["observations"], o["observations"])
        np.testing.assert_array_equal(tr["rewards"], o["rewards"])
        assert tr["timeouts"][-1] and not tr["timeouts"][:-1].any()
    assert subsample_trajectories(ds, 0.5, 0).n_trajectories == 10
    assert subsample_trajectories(ds, 1.0, 0).n_trajectories == 20
    assert subsample_trajectories(ds, 1e-6, 0).n_trajectories == 1
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            subsample_trajectories(ds, bad, 0)


def test_reward_normalisation_by_hand():
    ds = _ds_with_lengths([2, 3, 1])
    r = np.array([1.0, 2.0, -1.0, 0.5, 0.5, 10.0], np.float32)
    ds = ds.with_rewards(r)
    # returns: 3, 0, 10 -> range 10
    np.testing.assert_allclose(normalize_rewards(ds, "iql_locomotion").rewards, r * 1000 / 10, rtol=1e-6)
    np.testing.assert_allclose(normalize_rewards(ds, "iql_antmaze").rewards, r - 1)
    np.testing.assert_allclose(normalize_rewards(ds, "cql_antmaze").rewards, (r - 0.5) * 4)
    np.testing.assert_allclose(normalize_rewards(ds, "antmaze").rewards, (r - 0.25) * 2)
    np.testing.assert_allclose(normalize_rewards(ds, "scale_bias", 10.0, -5.0).rewards, r * 10 - 5)
    mean, sd = r.mean(), math.sqrt(((r - r.mean()) ** 2).sum() / 5)
    np.testing.assert_allclose(normalize_rewards(ds, "normalize").rewards, (r - mean) / sd, rtol=1e-5)
    np.testing.assert_array_equal(normalize_rewards(ds, "none").rewards, r)
    assert np.array_equal(ds.rewards, r)  # input untouched
    with pytest.raises(ValueError, match="unknown reward normalisation mode"):
        normalize_rewards(ds, "bogus")
    with pytest.raises(ValueError, match="zero range"):
        normalize_rewards(ds.with_rewards(np.zeros(6)), "iql_locomotion")


def test_gaussian_observation_normalizer_round_trip():
    """RL observations are standardised by cdp.normalization.Normalizer(mode="gaussian") inside the policy."""
    from cdp.normalization import Normalizer

    ds = _ds_with_lengths([5, 5], do=4)
    obs = torch.from_numpy(ds.observations)
    norm = Normalizer(4, mode="gaussian").fit(obs)
    x = norm.normalize(obs)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0, unbiased=False), 1, atol=1e-4)
    np.testing.assert_allclose(norm.unnormalize(x), obs, atol=1e-5)
    back = Normalizer(4, mode="gaussian")
    back.load_state_dict(norm.state_dict())
    assert torch.equal(back.normalize(obs), x)


def test_normalized_score_closed_form():
    assert normalized_score("hopper-medium-v2", 3234.3) == pytest.approx(100.0)
    assert normalized_score("hopper", -20.272305) == pytest.approx(0.0)
    r = 1000.0
    assert normalized_score("walker2d-medium-replay-v2", r) == pytest.approx(100 * (r - 1.629008) / (4592.3 - 1.629008))
    assert normalized_score("halfcheetah-expert-v2", r) == pytest.approx(100 * (r + 280.178953) / (12135.0 + 280.178953))
    assert normalized_score("maze2d-umaze-v1", 161.86) == pytest.approx(100.0)
    assert ref_scores("maze2d-large-v1") == (6.7, 273.99)
    arr = normalized_score("hopper", [3234.3, -20.272305])
    np.testing.assert_allclose(arr, [100.0, 0.0])
    assert normalized_score(None, 5.0, ref_min=0.0, ref_max=10.0) == 50.0
    with pytest.raises(KeyError, match="no D4RL reference scores"):
        normalized_score("cartpole-v1", 1.0)
    with pytest.raises(KeyError, match="maze2d"):
        normalized_score("maze2d-tiny-v9", 1.0)
    with pytest.raises(ValueError, match="degenerate"):
        normalized_score(None, 1.0, 2.0, 2.0)


# ---------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_d4rl_hdf5(tmp_path / "nope.hdf5")


def test_missing_keys_lists_present(tmp_path):
    raw = _raw(5)
    del raw["timeouts"], raw["rewards"]
    p = _write_raw(tmp_path / "d.hdf5", raw)
    with pytest.raises(KeyError, match=r"missing key\(s\) \['rewards', 'timeouts'\].*actions"):
        load_d4rl_hdf5(p)


def test_mismatched_lengths(tmp_path):
    raw = _raw(5)
    raw["actions"] = raw["actions"][:4]
    with pytest.raises(ValueError, match="mismatched lengths"):
        load_d4rl_hdf5(_write_raw(tmp_path / "d.hdf5", raw))


def test_bad_rank_and_next_obs_shape(tmp_path):
    raw = _raw(5)
    raw["observations"] = raw["observations"][:, 0]
    with pytest.raises(ValueError, match="observations has shape"):
        load_d4rl_hdf5(_write_raw(tmp_path / "a.hdf5", raw))
    raw = _raw(5)
    raw["next_observations"] = np.zeros((5, 7), np.float32)
    with pytest.raises(ValueError, match="different feature shapes"):
        load_d4rl_hdf5(_write_raw(tmp_path / "b.hdf5", raw))


@pytest.mark.parametrize("key", ["observations", "actions", "rewards"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf(tmp_path, key, bad):
    raw = _raw(5)
    raw[key].flat[3] = bad
    with pytest.raises(ValueError, match=f"{key} contains 1 NaN/inf"):
        load_d4rl_hdf5(_write_raw(tmp_path / "d.hdf5", raw))


def test_bad_episode_starts():
    ds = _ds_with_lengths([2, 2])
    with pytest.raises(ValueError, match="episode_starts"):
        OfflineDataset(ds.observations, ds.actions, ds.rewards, ds.next_observations, ds.terminals, ds.timeouts,
                       episode_starts=np.array([0, 3, 2]))
    with pytest.raises(ValueError, match="begin with 0"):
        OfflineDataset(ds.observations, ds.actions, ds.rewards, ds.next_observations, ds.terminals, ds.timeouts,
                       episode_starts=np.array([1]))


def test_check_matches_env():
    gym = pytest.importorskip("gymnasium")
    env = gym.make("Pendulum-v1")  # obs (3,), action (1,) in [-2, 2]
    ok = _ds_with_lengths([4], do=3, da=1)
    check_matches_env(ok, env)
    with pytest.raises(ValueError, match="observation dim 4 != env's 3"):
        check_matches_env(_ds_with_lengths([4], do=4, da=1), env)
    with pytest.raises(ValueError, match="action dim 2 != env's 1"):
        check_matches_env(_ds_with_lengths([4], do=3, da=2), env)
    big = ok.select_trajectories([0])
    big.actions[0, 0] = 3.0
    with pytest.raises(ValueError, match="outside env bounds"):
        check_matches_env(big, env)
    env.close()


# ---------------------------------------------------------------- minari


def _collect_with_data_collector(gym, minari, n_eps, dataset_id):
    """Minari's DataCollector wrapper (needs jax, i.e. ``minari[create]``)."""
    from minari import DataCollector

    env = DataCollector(gym.make("Pendulum-v1", max_episode_steps=20))
    for ep in range(n_eps):
        env.reset(seed=ep)
        env.action_space.seed(ep)
        done = False
        while not done:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            done = term or trunc
    mds = env.create_dataset(dataset_id=dataset_id, algorithm_name="random", ref_min_score=-1000.0, ref_max_score=0.0)
    env.close()
    return mds


def _collect_with_buffers(gym, minari, n_eps, dataset_id):
    """Minari's ``create_dataset_from_buffers`` with hand-filled EpisodeBuffers (no jax needed)."""
    from minari.data_collector import EpisodeBuffer

    env = gym.make("Pendulum-v1", max_episode_steps=20)
    buffers = []
    for ep in range(n_eps):
        obs, _ = env.reset(seed=ep)
        env.action_space.seed(ep)
        o, a, r, te, tr = [obs], [], [], [], []
        done = False
        while not done:
            act = env.action_space.sample()
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc)
            done = term or trunc
        buffers.append(
            EpisodeBuffer(id=ep, seed=ep, observations=np.stack(o), actions=np.stack(a), rewards=np.array(r),
                          terminations=np.array(te), truncations=np.array(tr), infos={})
        )
    mds = minari.create_dataset_from_buffers(
        dataset_id=dataset_id, buffer=buffers, env=env, algorithm_name="random",
        ref_min_score=-1000.0, ref_max_score=0.0, author="cdp tests", author_email="none@example.org",
        code_permalink="https://example.org/cdp", description="tiny test dataset", eval_env="Pendulum-v1",
    )
    env.close()
    return mds


@pytest.mark.parametrize("collector", ["buffers", "data_collector"])
def test_minari_round_trip(tmp_path, monkeypatch, collector):
    minari = pytest.importorskip("minari")
    gym = pytest.importorskip("gymnasium")
    if collector == "data_collector":
        pytest.importorskip("jax", reason="minari.DataCollector needs jax (minari[create])")
        make = _collect_with_data_collector
    else:
        make = _collect_with_buffers

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    n_eps = 3
    mds = make(gym, minari, n_eps, "cdptest/pendulum/tiny-v0")
    episodes = list(mds.iterate_episodes())

    for src in ("cdptest/pendulum/tiny-v0", tmp_path / "minari" / "cdptest" / "pendulum" / "tiny-v0"):
        ds = load_minari(src)
        assert len(ds) == n_eps * 20 and ds.n_trajectories == n_eps
        assert (ds.ref_min_score, ds.ref_max_score) == (-1000.0, 0.0)
        assert ds.timeouts.sum() == n_eps and not ds.terminals.any()
        for tr, ep in zip(ds.iter_trajectories(), episodes):
            np.testing.assert_allclose(tr["observations"], ep.observations[:-1], rtol=1e-6)
            np.testing.assert_allclose(tr["next_observations"], ep.observations[1:], rtol=1e-6)
            np.testing.assert_allclose(tr["actions"], ep.actions, rtol=1e-6)
            np.testing.assert_allclose(tr["rewards"], ep.rewards, rtol=1e-6)
        check_matches_env(ds, gym.make("Pendulum-v1"))

    with pytest.raises(FileNotFoundError, match="local store"):
        load_minari("cdptest/pendulum/absent-v0")
    with pytest.raises(FileNotFoundError, match="not a Minari dataset directory"):
        load_minari(tmp_path)
