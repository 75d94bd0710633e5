"""Tests for cdp.data.il: loaders, episodes, windows, subsampling, normaliser, error messages."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cdp.normalization import Normalizer
import zarr

from cdp.data.il import (
    EpisodicDataset,
    SequenceWindows,
    load_pusht_lowdim,
    load_robomimic_hdf5,
    load_zarr_replay,
    subsample_episodes,
)

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def pusht_path():
    p = os.environ.get("CDP_PUSHT_ZARR") or str(REPO_ROOT / ".." / "shared" / "data" / "pusht" /
                                                  "pusht_cchi_v7_replay.zarr")
    return p if os.path.exists(p) else None


# ---------------------------------------------------------------------------------------------------- fixtures
LENGTHS = [3, 5, 4]


def make_zarr(path, lengths=LENGTHS, ends=None, action=None, state=None):
    n = sum(lengths)
    t = np.arange(n, dtype=np.float32)
    root = zarr.open_group(str(path), mode="w")
    root.create_dataset("data/action", data=np.stack([100 + t, 200 + t], 1) if action is None else action)
    st = np.stack([t, -t, 2 * t, 3 * t, 0.5 * t], 1) if state is None else state
    root.create_dataset("data/state", data=st)
    root.create_dataset("data/keypoint", data=np.stack([st[:, :2] * (k + 1) for k in range(3)], 1))
    root.create_dataset("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64) if ends is None else ends)
    return str(path)


def make_h5(path, lengths=(4, 2, 6, 3), names=("demo_0", "demo_1", "demo_10", "demo_2"), env_args=None):
    with h5py.File(path, "w") as f:
        g = f.create_group("data")
        g.attrs["env_args"] = json.dumps({"env_name": "Lift", "env_kwargs": {"a": 1}}) if env_args is None \
            else env_args
        for name, L in zip(names, lengths):
            i = int(name.split("_")[1])
            d = g.create_group(name)
            d.create_dataset("actions", data=np.full((L, 7), i, dtype=np.float64) + np.arange(L)[:, None])
            d.create_dataset("obs/eef_pos", data=np.full((L, 3), 10 * i, dtype=np.float32))
            d.create_dataset("obs/gripper", data=np.full((L, 2), -i, dtype=np.float32))
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_10"]))
    return str(path)


# ---------------------------------------------------------------------------------------------------- zarr
def test_zarr_round_trip_and_boundaries(tmp_path):
    p = make_zarr(tmp_path / "r.zarr")
    ds = load_zarr_replay(p, obs_keys=("keypoint", ("state", slice(0, 2))), action_key="action")
    n = sum(LENGTHS)
    t = np.arange(n, dtype=np.float32)
    assert ds.obs.shape == (n, 8) and ds.actions.shape == (n, 2)
    assert ds.obs.dtype == np.float32
    # keypoint (n, 3, 2) flattened row-major: k0x, k0y, k1x, ...
    np.testing.assert_array_equal(ds.obs[:, 0], t)
    np.testing.assert_array_equal(ds.obs[:, 1], -t)
    np.testing.assert_array_equal(ds.obs[:, 2], 2 * t)
    np.testing.assert_array_equal(ds.obs[:, 6:], np.stack([t, -t], 1))
    np.testing.assert_array_equal(ds.actions[:, 0], 100 + t)
    assert ds.meta["obs_layout"] == {"keypoint": (0, 6), "state[0:2]": (6, 8)}
    np.testing.assert_array_equal(ds.episode_ends, [3, 8, 12])
    np.testing.assert_array_equal(ds.episode_starts, [0, 3, 8])
    np.testing.assert_array_equal(ds.episode_lengths, LENGTHS)
    o, a = ds.episode(1)
    np.testing.assert_array_equal(o[:, 0], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(a[:, 0], 100 + np.arange(3, 8))
    # index selection on flattened columns
    ds2 = load_zarr_replay(p, obs_keys=[("state", [4, 0])])
    np.testing.assert_array_equal(ds2.obs, np.stack([0.5 * t, t], 1))


def test_zarr_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_zarr_replay(tmp_path / "nope.zarr")
    p = make_zarr(tmp_path / "a.zarr")
    with pytest.raises(ValueError, match=r"missing data keys \['img'\].*available keys: \['action', 'keypoint', "):
        load_zarr_replay(p, obs_keys=("img",))
    with pytest.raises(ValueError, match="missing data keys"):
        load_zarr_replay(p, obs_keys=("state",), action_key="act")
    # episode ends not increasing
    p = make_zarr(tmp_path / "b.zarr", ends=np.array([5, 3, 12]))
    with pytest.raises(ValueError, match="strictly increasing"):
        load_zarr_replay(p, obs_keys=("state",))
    # last end != N
    p = make_zarr(tmp_path / "c.zarr", ends=np.array([3, 8, 11]))
    with pytest.raises(ValueError, match="does not match the number of steps"):
        load_zarr_replay(p, obs_keys=("state",))
    # wrong action rank
    p = make_zarr(tmp_path / "d.zarr", action=np.zeros(12, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must have shape \(N, Da\)"):
        load_zarr_replay(p, obs_keys=("state",))
    # obs length mismatch
    p = make_zarr(tmp_path / "e.zarr", action=np.zeros((11, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="has 12 steps, expected 11"):
        load_zarr_replay(p, obs_keys=("state",))
    # NaN / inf
    st = np.ones((12, 5), dtype=np.float32)
    st[4, 2] = np.nan
    p = make_zarr(tmp_path / "f.zarr", state=st)
    with pytest.raises(ValueError, match="NaN/inf"):
        load_zarr_replay(p, obs_keys=("state",))
    st[4, 2] = np.inf
    p = make_zarr(tmp_path / "g.zarr", state=st)
    with pytest.raises(ValueError, match="NaN/inf"):
        load_zarr_replay(p, obs_keys=("state",))
    # missing meta/episode_ends
    root = zarr.open_group(str(tmp_path / "h.zarr"), mode="w")
    root.create_dataset("data/action", data=np.zeros((2, 2)))
    root.create_group("meta")
    with pytest.raises(ValueError, match="episode_ends"):
        load_zarr_replay(str(tmp_path / "h.zarr"), obs_keys=("action",))


def test_dataset_direct_validation():
    with pytest.raises(ValueError, match="different numbers of steps"):
        EpisodicDataset(np.zeros((4, 2)), np.zeros((3, 1)), np.array([4]))
    with pytest.raises(ValueError, match="strictly increasing"):
        EpisodicDataset(np.zeros((4, 2)), np.zeros((4, 1)), np.array([0, 4]))
    with pytest.raises(ValueError, match=r"shape \(N, Do\)"):
        EpisodicDataset(np.zeros(4), np.zeros((4, 1)), np.array([4]))


# ---------------------------------------------------------------------------------------------------- robomimic
def test_robomimic_round_trip_sorted(tmp_path):
    p = make_h5(tmp_path / "d.hdf5")
    ds = load_robomimic_hdf5(p, obs_keys=["eef_pos", "gripper"])
    assert ds.meta["demo_names"] == ["demo_0", "demo_1", "demo_2", "demo_10"]
    np.testing.assert_array_equal(ds.episode_ends, np.cumsum([4, 2, 3, 6]))
    assert ds.obs.shape == (15, 5) and ds.actions.shape == (15, 7)
    for e, i in enumerate([0, 1, 2, 10]):
        o, a = ds.episode(e)
        np.testing.assert_array_equal(o[:, :3], 10 * i)
        np.testing.assert_array_equal(o[:, 3:], -i)
        np.testing.assert_array_equal(a[:, 0], i + np.arange(len(a)))
    assert ds.meta["env_args"] == {"env_name": "Lift", "env_kwargs": {"a": 1}}
    assert ds.meta["obs_layout"] == {"eef_pos": (0, 3), "gripper": (3, 5)}
    tr = load_robomimic_hdf5(p, obs_keys=["eef_pos"], filter_key="train")
    assert tr.meta["demo_names"] == ["demo_0", "demo_10"]


def test_robomimic_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_robomimic_hdf5(tmp_path / "missing.hdf5", obs_keys=["eef_pos"])
    p = make_h5(tmp_path / "d.hdf5")
    with pytest.raises(ValueError, match=r"missing keys \['joint'\]; available: \['eef_pos', 'gripper'\]"):
        load_robomimic_hdf5(p, obs_keys=["eef_pos", "joint"])
    with pytest.raises(ValueError, match="has no 'acts'"):
        load_robomimic_hdf5(p, obs_keys=["eef_pos"], action_key="acts")
    with pytest.raises(ValueError, match="filter key 'valid' not found"):
        load_robomimic_hdf5(p, obs_keys=["eef_pos"], filter_key="valid")
    p2 = make_h5(tmp_path / "bad.hdf5", env_args="{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_robomimic_hdf5(p2, obs_keys=["eef_pos"])
    with h5py.File(tmp_path / "empty.hdf5", "w") as f:
        f.create_group("data")
    with pytest.raises(ValueError, match="no 'demo_<i>' groups"):
        load_robomimic_hdf5(tmp_path / "empty.hdf5", obs_keys=["eef_pos"])


# ---------------------------------------------------------------------------------------------------- windows
def counting_ds(lengths=(3, 5)):
    n = sum(lengths)
    t = np.arange(n, dtype=np.float32)
    return EpisodicDataset(obs=t[:, None].repeat(2, 1), actions=100 + t[:, None], episode_ends=np.cumsum(lengths))


def test_windows_dp_alignment_exact_indices():
    ds = counting_ds()
    w = SequenceWindows(ds, n_obs_steps=2, horizon=4)  # S=4, pad_before=1, pad_after=S-To=2
    expected = [
        [0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2],  # episode 0 (steps 0..2), padded at both edges
        [3, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 7], [6, 7, 7, 7],  # episode 1 (steps 3..7)
    ]
    np.testing.assert_array_equal(w.indices, expected)
    np.testing.assert_array_equal(w.current, [0, 1, 2, 3, 4, 5, 6, 7])  # every step is "current" once
    assert len(w) == 8
    item = w[0]
    assert item["obs"].shape == (2, 2) and item["action"].shape == (4, 1)
    assert item["obs"].dtype == torch.float32 and item["action"].dtype == torch.float32
    np.testing.assert_array_equal(item["obs"][:, 0], [0, 0])  # obs[t-1], obs[t] with t=0 -> first frame repeated
    np.testing.assert_array_equal(item["action"][:, 0], [100, 100, 101, 102])  # a[t-1 .. t+2]
    last = w[7]
    np.testing.assert_array_equal(last["obs"][:, 0], [6, 7])
    np.testing.assert_array_equal(last["action"][:, 0], [106, 107, 107, 107])  # last action repeated
    # windows never cross episodes
    for i in range(len(w)):
        ep = np.searchsorted(ds.episode_ends, w.indices[i], side="right")
        assert len(set(ep.tolist())) == 1


def test_windows_dp_pusht_counts():
    ds = counting_ds((20, 30))
    w = SequenceWindows(ds, n_obs_steps=2, horizon=16, n_action_steps=8)  # DP: pad_before=1, pad_after=7
    assert len(w) == (20 - 16 + 1 + 7 + 1) + (30 - 16 + 1 + 7 + 1)
    np.testing.assert_array_equal(w.indices[0], [0] + list(range(15)))
    np.testing.assert_array_equal(w.indices[12], list(range(11, 20)) + [19] * 7)  # last window of episode 0
    # short episode contributes nothing
    w2 = SequenceWindows(counting_ds((5, 20)), n_obs_steps=2, horizon=16, n_action_steps=8)
    assert w2.indices.min() >= 5


def test_windows_single_action_bc():
    ds = counting_ds()
    w = SequenceWindows(ds, n_obs_steps=2, horizon=1, align="current")
    assert len(w) == ds.n_steps
    for i in range(len(w)):
        it = w[i]
        t = int(w.current[i])
        assert it["action"].shape == (1, 1) and it["obs"].shape == (2, 2)
        assert it["action"][0, 0] == 100 + t  # the action at the current step
        assert it["obs"][1, 0] == t
    np.testing.assert_array_equal(w[0]["obs"][:, 0], [0, 0])
    np.testing.assert_array_equal(w[3]["obs"][:, 0], [3, 3])  # first step of episode 1 pads, no crossing
    with pytest.raises(ValueError, match="horizon >= n_obs_steps"):
        SequenceWindows(ds, n_obs_steps=2, horizon=1, align="dp")
    with pytest.raises(ValueError, match="align"):
        SequenceWindows(ds, 2, 4, align="foo")


def test_windows_with_normalizers():
    ds = counting_ds()
    on = Normalizer(ds.obs.shape[1]).fit(torch.from_numpy(ds.obs))
    an = Normalizer(ds.actions.shape[1]).fit(torch.from_numpy(ds.actions))
    w = SequenceWindows(ds, 2, 4, obs_normalizer=on, action_normalizer=an)
    it = w[0]
    np.testing.assert_allclose(it["obs"][0].numpy(), [-1, -1])
    np.testing.assert_allclose(it["action"][0, 0].item(), -1.0)


# ---------------------------------------------------------------------------------------------------- subsampling
def test_subsample_whole_episodes_and_seed():
    lengths = list(range(3, 23))  # 20 episodes of distinct lengths
    ds = counting_ds(lengths)
    a = subsample_episodes(ds, fraction=0.1, seed=3)
    b = subsample_episodes(ds, fraction=0.1, seed=3)
    c = subsample_episodes(ds, fraction=0.3, seed=4)
    assert a.n_episodes == 2 and c.n_episodes == 6
    np.testing.assert_array_equal(a.meta["episode_ids"], b.meta["episode_ids"])
    np.testing.assert_array_equal(a.obs, b.obs)
    for sub in (a, c):
        ids = sub.meta["episode_ids"]
        assert list(ids) == sorted(ids)
        for k, i in enumerate(ids):  # each kept episode is whole and identical to the original
            np.testing.assert_array_equal(sub.episode(k)[0], ds.episode(int(i))[0])
            np.testing.assert_array_equal(sub.episode(k)[1], ds.episode(int(i))[1])
    seeds_differ = {tuple(subsample_episodes(ds, fraction=0.3, seed=s).meta["episode_ids"]) for s in range(5)}
    assert len(seeds_differ) > 1
    assert subsample_episodes(ds, fraction=0.01).n_episodes == 1  # at least one
    assert subsample_episodes(ds, fraction=1.0) is ds
    assert subsample_episodes(ds, max_episodes=7, seed=0).n_episodes == 7
    assert subsample_episodes(ds, fraction=0.5, max_episodes=4).n_episodes == 4
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            subsample_episodes(ds, fraction=bad)
    with pytest.raises(ValueError, match="max_episodes"):
        subsample_episodes(ds, max_episodes=0)


# ---------------------------------------------------------------------------------------------------- normaliser
def test_minmax_normalizer_range_constant_dim_round_trip_and_checkpoint():
    """cdp.normalization.Normalizer (the one normaliser; it lives in the policy's checkpoint) on PushT-like ranges."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)) * [1.0, 100.0, 1e-3, 1.0] + [0, 300, 5, 0]
    x[:, 3] = 7.0  # constant dim
    xt = torch.tensor(x, dtype=torch.float64)
    n = Normalizer(4).fit(xt)
    y = n.normalize(xt)
    assert y.dtype == torch.float64
    # statistics are float32 buffers: exact ends up to float32 rounding of the offset relative to the half-range
    # (dim 2: offset 5, half-range ~3e-3 -> ~2e-4)
    np.testing.assert_allclose(y[:, :2].min(0).values, -1.0, atol=1e-6)
    np.testing.assert_allclose(y[:, :2].max(0).values, 1.0, atol=1e-6)
    np.testing.assert_allclose(y[:, 2].min(), -1.0, atol=3e-4)
    np.testing.assert_allclose(y[:, 2].max(), 1.0, atol=3e-4)
    np.testing.assert_array_equal(y[:, 3], 0.0)  # constant dim guarded: centred, not divided by 0
    np.testing.assert_allclose(n.unnormalize(y), x, rtol=0, atol=1e-9)
    x32 = xt.float()
    y32 = Normalizer(4).fit(x32).normalize(x32)
    assert y32.dtype == torch.float32 and abs(float(y32[:, :3].abs().max()) - 1.0) < 1e-6
    n2 = Normalizer(4)
    n2.load_state_dict(n.state_dict())  # what a checkpoint round trip does
    assert torch.equal(n2.normalize(xt), y)
    with pytest.raises(ValueError, match="NaN or inf"):
        Normalizer(2).fit(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="last dimension"):
        n.normalize(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------- real PushT
@pytest.fixture(scope="module")
def pusht():
    p = pusht_path()
    if p is None:
        pytest.skip("PushT zarr not found (set CDP_PUSHT_ZARR)")
    return p


def test_pusht_lowdim_smoke(pusht):
    ds = load_pusht_lowdim(pusht)
    assert ds.obs.shape == (25650, 20) and ds.actions.shape == (25650, 2) and ds.n_episodes == 206
    root = zarr.open(pusht, mode="r")
    np.testing.assert_array_equal(ds.obs[:100, :18], root["data/keypoint"][:100].reshape(100, 18))
    np.testing.assert_array_equal(ds.obs[:100, 18:], root["data/state"][:100, :2])
    w = SequenceWindows(ds, n_obs_steps=2, horizon=16, n_action_steps=8)
    assert len(w) == 25650 - 206 * 7
    it = w[len(w) // 2]
    assert it["obs"].shape == (2, 20) and it["action"].shape == (16, 2)
    sub = load_pusht_lowdim(pusht, max_episodes=90, seed=42)
    assert sub.n_episodes == 90
    n = Normalizer(2).fit(torch.from_numpy(sub.actions))
    y = n.normalize(torch.from_numpy(sub.actions))
    assert abs(float(y.min()) + 1.0) < 1e-6 and abs(float(y.max()) - 1.0) < 1e-6
