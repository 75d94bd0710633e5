"""Short fixed-seed runs of the toy, IL and RL jobs reproduce metrics and weights recorded with the code before the
one-trainer / one-config refactor (tests/data/fixed_seed_reference.json, written by the previous trainers
``train_policy`` and ``train_offline`` at commit 3860fa5). CPU, one thread."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp.config import apply, base_config
from cdp.data.rl import OfflineDataset
from cdp.experiments.il import run_il
from cdp.experiments.rl import agent_config
from cdp.experiments.toy import run_toy
from cdp.rl import make_agent
from cdp.runs import RunDir, load_checkpoint
from cdp.training.trainer import fit

from demo_data import make_pusht_zarr

REF = json.loads((Path(__file__).parent / "data" / "fixed_seed_reference.json").read_text())


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(run_dir):
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("train/") and k != "train/lr"})
            for r in RunDir(run_dir, tensorboard=False).read_metrics() if "train/loss" in r]


def _close(got, want, what):
    assert len(got) == len(want), what
    for (sg, mg), (sw, mw) in zip(got, want):
        assert sg == sw, what
        assert set(mw) <= set(mg), (what, sorted(set(mw) - set(mg)))  # metrics added later are not compared
        for k in mw:
            assert mg[k] == pytest.approx(mw[k], rel=1e-5, abs=1e-7), (what, sg, k)


def _weights(ckpt):
    t, _, _ = load_checkpoint(ckpt)
    return {k: float(v.double().sum()) for k, v in sorted(t.items())}


def test_toy_matches_reference(tmp_path):
    cfg = apply(base_config("toy"), {"out": str(tmp_path / "toy"), "data.n_data": 256, "train.steps": 30,
                                     "train.batch_size": 32, "eval.snapshots": 1, "eval.n_samples": 64,
                                     "policy.network.hidden": 32, "policy.network.layers": 2,
                                     "algo.variants": ["standard", "cdp_all"], "train.progress": False,
                                     "train.device": "cpu"})
    res = run_toy(cfg, log=lambda *a: None)
    for v in ("standard", "cdp_all"):
        _close(_losses(tmp_path / "toy" / v), REF["toy"][v]["losses"], f"toy {v}")
        for k, want in REF["toy"][v]["metrics"].items():
            assert res["variants"][v][k] == pytest.approx(want, rel=1e-5, abs=1e-7), (v, k)


@pytest.mark.parametrize("preset", ["cdp_dbc", "cdp_unet"])
def test_il_matches_reference(tmp_path, preset):
    zp = make_pusht_zarr(tmp_path / "p.zarr")
    cfg = apply(base_config("il", preset), {
        "out": str(tmp_path / "run"), "data.path": zp, "algo.name": preset, "train.steps": 12,
        "train.batch_size": 16, "train.lr": 1e-3, "train.log_every": 4, "train.ckpt_every": 0,
        "policy.network.unet_down_dims": [16, 32], "policy.network.unet_time_embed_dim": 16,
        "policy.network.hidden": 32, "policy.network.layers": 2, "policy.schedule.num_steps": 10,
        "policy.num_inference_steps": 4, "eval.episodes": 0, "eval.diag_obs": 0, "eval.diag_samples": 0,
        "train.progress": False, "train.device": "cpu",
        # the UNet's hinge gradient by autograd on separately drawn points, the route the reference was recorded with
        # (the central-difference route in the training pass is tested in tests/test_policy.py)
        **({"policy.contraction.fd_step": None} if preset == "cdp_unet" else {})})
    run_il(cfg, log=lambda *a: None)
    _close(_losses(tmp_path / "run"), REF["il"][preset]["losses"], preset)
    got = _weights(tmp_path / "run" / "checkpoints" / "last")
    want = REF["il"][preset]["weights"]
    assert set(got) == set(want)
    for k in want:
        # float32 sums of weights after 12 steps: 2e-5 apart on CPUs whose kernels round differently from the one
        # that recorded them (the UNet's eigenvector amplifies rounding); another route or point draw moves them by >1
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def _rl_dataset():
    rng = np.random.default_rng(0)
    n = 300
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    act = np.tanh(rng.normal(size=(n, 2))).astype(np.float32)
    rew = rng.normal(size=n).astype(np.float32)
    nobs = obs + 0.1 * rng.normal(size=(n, 4)).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[99::100] = True
    return OfflineDataset(obs, act, rew, nobs, np.zeros(n, bool), timeouts, env_id="synthetic")


@pytest.mark.parametrize("algo", ["cdp", "cdp_dql", "cdp_idql"])
def test_rl_matches_reference(tmp_path, algo):
    from cdp.experiments.rl import dataset_tensors

    over = {"algo.name": algo}
    if algo == "cdp":
        over.update({"policy.schedule.num_steps": 10, "policy.num_inference_steps": 5})
    cfg = apply(base_config("rl", algo), over)
    ds = _rl_dataset()
    agent = make_agent(algo, 4, 2, agent_config(cfg), seed=0)
    run = RunDir(tmp_path / "run", tensorboard=False)
    fit(agent, dataset_tensors(ds), steps=10, batch_size=32, seed=0, log_every=5, run=run, progress=False)
    got = [(r["step"], {k: v for k, v in r.items() if k.startswith("train/")}) for r in run.read_metrics()]
    _close(got, REF["rl"][algo]["losses"], algo)
    w = _weights(tmp_path / "run" / "checkpoints" / "last")
    for k, want in REF["rl"][algo]["weights"].items():
        assert w[k] == pytest.approx(want, rel=1e-5, abs=1e-6), k
