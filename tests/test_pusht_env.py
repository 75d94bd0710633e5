"""Tests for cdp.envs.pusht (skipped without gym-pusht; replay tests skipped without the PushT zarr).

Measured (see docs/pusht_mapping.md): open-loop replay of all 206 demos reproduces the recorded block positions
within 0.17 px; max coverage 0.86-0.966 (mean 0.8995), 7/206 above 0.95. Episodes 20 (0.966) and 51 (0.953)
succeed, episode 1 reaches 0.920.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gym_pusht")

from cdp.envs.pusht import (  # noqa: E402
    PUSHT_LOCAL_KEYPOINTS,
    block_keypoints,
    dataset_state_to_reset_state,
    fit_local_keypoints,
    lowdim_obs_from_state,
    make_pusht_env,
    replay_demo,
)
from cdp.envs import pusht as pusht_env  # noqa: E402

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pusht():
    p = os.environ.get("CDP_PUSHT_ZARR") or str(REPO_ROOT / ".." / "shared" / "data" / "pusht" /
                                                  "pusht_cchi_v7_replay.zarr")
    if not os.path.exists(p):
        pytest.skip("PushT zarr not found (set CDP_PUSHT_ZARR)")
    os.environ.setdefault("CDP_PUSHT_ZARR", p)
    return p


def test_env_obs_layout():
    env = make_pusht_env(seed=100000)
    o, info = env.reset(seed=100000)
    assert o.shape == (20,) and o.dtype == np.float32
    np.testing.assert_allclose(o, lowdim_obs_from_state(info["state"]), atol=1e-4)
    np.testing.assert_allclose(o[18:], info["state"][:2], atol=1e-4)
    o2, r, term, trunc, info2 = env.step(np.array([256.0, 256.0]))
    assert o2.shape == (20,) and 0.0 <= info2["coverage"] <= 1.0
    env.close()


def test_reset_lands_on_dataset_state():
    env = make_pusht_env(seed=0)
    for s in ([100.0, 200.0, 300.0, 250.0, 2.5], [400.0, 120.0, 200.0, 350.0, 5.9]):
        _, info = env.reset(options={"dataset_state": s})
        np.testing.assert_allclose(info["state"][:4], s[:4], atol=1e-6)
        np.testing.assert_allclose(info["state"][4], s[4], atol=1e-9)
    # raw reset_to_state (gym-pusht semantics) is displaced by the rotation about the CoG
    s = np.array([100.0, 200.0, 300.0, 250.0, 2.5])
    _, info = env.reset(options={"reset_to_state": s})
    assert np.abs(info["state"][2:4] - s[2:4]).max() > 10
    assert np.allclose(dataset_state_to_reset_state([0, 0, 5, 5, 0.0]), [0, 0, 5, 5, 0])
    env.close()


def test_keypoints_reproduce_dataset(pusht):
    import zarr

    root = zarr.open(pusht, mode="r")
    st, kp = root["data/state"][:3000], root["data/keypoint"][:3000]
    err = np.linalg.norm(block_keypoints(st) - kp, axis=-1).max(1)
    assert np.median(err) < 1e-3 and np.percentile(err, 99) < 0.5 and err.max() < 3.0
    np.testing.assert_allclose(fit_local_keypoints(st, kp), PUSHT_LOCAL_KEYPOINTS, atol=0.01)
    obs = lowdim_obs_from_state(st)
    np.testing.assert_allclose(obs[:, :18], kp.reshape(-1, 18), atol=3.0)


@pytest.mark.parametrize("ep,expect_success", [(1, False), (20, True), (51, True)])
def test_open_loop_replay(pusht, ep, expect_success):
    r = replay_demo(ep, return_details=True)
    assert r["max_block_err_px"] < 0.01 and r["max_agent_err_px"] < 0.01  # exact reproduction of the demo
    assert r["max_coverage"] > 0.9
    assert r["success"] == expect_success
    assert replay_demo(ep) == pytest.approx(r["max_coverage"])


def _toward_center(obs_hist):
    """Dummy policy: chunk of 8 targets moving the agent towards the workspace centre."""
    B = obs_hist.shape[0]
    return np.tile(np.array([256.0, 256.0]), (B, 8, 1))


def test_pusht_evaluate_smoke():
    calls = []

    def pol(x):
        calls.append(x.shape)
        assert x.dtype == np.float32 and x.shape[1:] == (2, 20)
        return torch.as_tensor(_toward_center(x))

    out = pusht_env.evaluate(pol, n_episodes=2, max_steps=20)
    assert set(out) >= {"mean_max_coverage", "success_rate", "mean_max_reward", "max_coverage", "success", "seeds"}
    assert out["seeds"] == [100000, 100001]
    assert all(n <= 20 for n in out["n_steps"])
    assert calls[0] == (2, 2, 20) and len(calls) == 3  # 20 steps / 8 per chunk -> 3 rounds
    out2 = pusht_env.evaluate(_toward_center, n_episodes=2, max_steps=20)
    assert out2["max_coverage"] == out["max_coverage"]  # deterministic in the seeds
    with pytest.raises(ValueError, match="shorter than"):
        pusht_env.evaluate(lambda x: np.zeros((x.shape[0], 4, 2)), n_episodes=1, max_steps=8)
    with pytest.raises(ValueError, match="NaN"):
        pusht_env.evaluate(lambda x: np.full((x.shape[0], 8, 2), np.nan), n_episodes=1, max_steps=8)


def test_pusht_evaluate_records_gifs_without_changing_rollouts(tmp_path):
    from PIL import Image

    ref = pusht_env.evaluate(_toward_center, n_episodes=2, max_steps=12)
    out = pusht_env.evaluate(_toward_center, n_episodes=2, max_steps=12, video_dir=tmp_path / "vid", video_episodes=1)
    assert out["max_coverage"] == ref["max_coverage"] and out["n_steps"] == ref["n_steps"]
    assert out["videos"] == [str(tmp_path / "vid" / "pusht_seed100000.gif")]
    with Image.open(out["videos"][0]) as im:
        # the reset frame and one per env step at 10 fps (Pillow merges identical consecutive frames, so count time)
        total_ms = 0
        for k in range(im.n_frames):
            im.seek(k)
            total_ms += im.info["duration"]
        assert total_ms == 100 * (out["n_steps"][0] + 1)
        assert max(im.size) == 256
    assert not (tmp_path / "vid" / "pusht_seed100001.gif").exists()
    with pytest.raises(ValueError, match="video_dir"):
        pusht_env.evaluate(_toward_center, n_episodes=1, max_steps=8, video_episodes=1)


def test_write_gif_rejects_bad_frames(tmp_path):
    from cdp.video import write_gif

    with pytest.raises(ValueError, match="no frames"):
        write_gif([], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="frame 1"):
        write_gif([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="uint8"):
        write_gif([np.zeros((8, 8, 3), np.float32)], tmp_path / "a.gif")
    assert not list(tmp_path.iterdir())  # nothing half-written
