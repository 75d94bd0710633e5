"""Offline-RL algorithms (BC, EDP, CDP, Diffusion-QL, IDQL and their CDP variants) and their trainer on a tiny
synthetic dataset (CPU, seconds)."""

import math

import numpy as np
import pytest
import torch

from cdp.data.rl import OfflineDataset
from cdp.rl import ALGOS as REGISTERED
from cdp.rl import make_agent
from cdp.rl.trainer import RLTrainConfig, load_agent, save_agent, train_offline
from cdp.runs import RunDir

ALGOS = list(REGISTERED)
CONTRACTION = {"loss": "hinge", "weight": 0.1, "margin": 0.5}
SMALL = {
    "bc": {"hidden_dims": [32, 32], "lr": 1e-3},
    "edp": {"hidden": 32, "n_layers": 2, "num_diffusion_steps": 10, "num_inference_steps": 3,
            "target_inference_steps": 2, "num_candidates": 4, "actor_lr": 1e-3, "critic_lr": 1e-3},
    "dql": {"hidden": 32, "n_layers": 2, "num_diffusion_steps": 5, "num_candidates": 4, "backup_samples": 2,
            "actor_lr": 1e-3, "critic_lr": 1e-3},
    "idql": {"hidden": 32, "n_layers": 2, "critic_hidden": 32, "num_diffusion_steps": 5, "num_candidates": 4,
             "actor_lr": 1e-3, "critic_lr": 1e-3, "value_lr": 1e-3},
}
SMALL["cdp"] = {**SMALL["edp"], "contraction": CONTRACTION}
SMALL["cdp_dql"] = {**SMALL["dql"], "contraction": CONTRACTION}
SMALL["cdp_idql"] = {**SMALL["idql"], "contraction": CONTRACTION}


def test_every_registered_algo_is_tested():
    assert set(SMALL) == set(REGISTERED)


def tiny_dataset(n: int = 200, seed: int = 0) -> OfflineDataset:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    act = np.tanh(obs[:, :2] + 0.1 * rng.normal(size=(n, 2))).astype(np.float32)
    rew = (obs[:, 0] > 0).astype(np.float32)
    nobs = obs + 0.05 * rng.normal(size=(n, 3)).astype(np.float32)
    timeouts = np.arange(n) % 20 == 19
    return OfflineDataset(obs, act, rew, nobs, np.zeros(n, bool), timeouts, env_id="synthetic",
                          ref_min_score=0.0, ref_max_score=1.0)


def batch_of(ds: OfflineDataset, n: int = 64) -> dict:
    return {"observations": torch.as_tensor(ds.observations[:n]), "actions": torch.as_tensor(ds.actions[:n]),
            "rewards": torch.as_tensor(ds.rewards[:n]), "next_observations": torch.as_tensor(ds.next_observations[:n]),
            "terminals": torch.as_tensor(ds.terminals[:n], dtype=torch.float32)}


def agent_for(algo: str, ds: OfflineDataset, seed: int = 0):
    ag = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=seed)
    ag.fit_normalizers(torch.as_tensor(ds.observations), torch.as_tensor(ds.actions))
    return ag


def fixed_losses(ag, batch) -> dict[str, float]:
    """Losses on a fixed batch with fixed randomness (the generator is restored afterwards)."""
    state = ag.generator.get_state()
    ag.generator.manual_seed(123)
    with torch.no_grad():
        if ag.name == "bc":
            out = {"actor": float(ag.loss(batch))}
        else:
            lq, _ = ag.critic_loss(batch)
            _, m = ag.actor_loss(batch)
            out = {"critic": float(lq), "diffusion": m["loss_d"]}
    ag.generator.set_state(state)
    return out


@pytest.mark.parametrize("algo", ALGOS)
def test_update_lowers_loss_on_fixed_batch(algo):
    ds = tiny_dataset()
    ag = agent_for(algo, ds)
    b = batch_of(ds)
    before = fixed_losses(ag, b)
    for _ in range(30):
        m = ag.update(b)
    after = fixed_losses(ag, b)
    assert all(math.isfinite(v) for v in m.values())
    for k in before:
        assert after[k] < before[k], (k, before[k], after[k])
    if algo.startswith("cdp"):
        assert "contraction/loss_c" in m and "contraction/lambda_max_mean" in m
    else:
        assert not any(k.startswith("contraction/") for k in m)


@pytest.mark.parametrize("algo", ALGOS)
def test_update_changes_every_actor_and_critic_parameter(algo):
    ds = tiny_dataset()
    ag = agent_for(algo, ds)
    nets = {"policy": ag.policy} if algo == "bc" else {"actor": ag.policy.net, "critic": ag.critic,
                                                         "critic_target": ag.critic_target, "ema": ag.ema.model.net}
    if hasattr(ag, "value"):
        nets["value"] = ag.value
    before = {(n, k): v.detach().clone() for n, m in nets.items() for k, v in m.named_parameters()}
    ag.update(batch_of(ds))
    after = {(n, k): v for n, m in nets.items() for k, v in m.named_parameters()}
    unchanged = [key for key, v in before.items() if torch.equal(v, after[key])]
    assert not unchanged, f"parameters not updated: {unchanged}"


@pytest.mark.parametrize("algo", ALGOS)
def test_save_load_gives_identical_actions(algo, tmp_path):
    ds = tiny_dataset()
    ag = agent_for(algo, ds)
    for _ in range(3):
        ag.update(batch_of(ds))
    save_agent(tmp_path / "ck", ag, step=3)
    ag2, meta = load_agent(tmp_path / "ck")
    assert meta["step"] == 3 and meta["algo"] == algo
    obs = torch.as_tensor(ds.observations[:16])
    a1 = ag.act(obs, generator=torch.Generator().manual_seed(7))
    a2 = ag2.act(obs, generator=torch.Generator().manual_seed(7))
    assert a1.shape == (16, 2)
    assert torch.equal(a1, a2)


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_equals_uninterrupted(algo, tmp_path):
    ds = tiny_dataset()
    cfg = dict(batch_size=32, seed=3, log_every=2, progress=False)
    full = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=1)
    train_offline(full, ds, RLTrainConfig(steps=6, **cfg), RunDir(tmp_path / "a", tensorboard=False))
    part = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=1)
    train_offline(part, ds, RLTrainConfig(steps=3, **cfg), RunDir(tmp_path / "b", tensorboard=False))
    resumed = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=99)  # init overwritten by resume
    res = train_offline(resumed, ds, RLTrainConfig(steps=6, **cfg), RunDir(tmp_path / "b", tensorboard=False))
    assert res["step"] == 6
    for name, m in full.modules().items():
        sd_full, sd_res = m.state_dict(), resumed.modules()[name].state_dict()
        for k in sd_full:
            assert torch.equal(sd_full[k], sd_res[k]), f"{name}.{k} differs after resume"
    rows = RunDir(tmp_path / "b", tensorboard=False).read_metrics()
    assert [r["step"] for r in rows] == [2, 3, 4, 6]


def test_nan_reward_raises_clear_error():
    ds = tiny_dataset()
    ds.rewards[5] = np.nan  # corrupted after construction (the constructor itself rejects NaN)
    ag = make_agent("edp", ds.obs_dim, ds.act_dim, dict(SMALL["edp"]))
    with pytest.raises(ValueError, match="rewards contains NaN"):
        train_offline(ag, ds, RLTrainConfig(steps=2, progress=False))
    b = batch_of(ds, 8)
    with pytest.raises(ValueError, match=r"batch\['rewards'\] contains NaN"):
        ag.update(b)


def test_cli_registers_rl():
    from cdp.cli import build_parser

    args = build_parser().parse_args(["rl", "--algo", "edp", "--fraction", "0.1", "--steps", "10", "--seed", "2"])
    assert args.command == "rl" and args.algo == "edp" and args.fraction == 0.1 and args.steps == 10
    assert args.func.__name__ == "run_rl"
    for algo in REGISTERED:
        assert build_parser().parse_args(["rl", "--algo", algo]).algo == algo


def test_resume_with_other_settings_is_refused(tmp_path):
    ds = tiny_dataset()
    cfg = RLTrainConfig(steps=2, batch_size=16, progress=False)
    train_offline(make_agent("bc", 3, 2, dict(SMALL["bc"])), ds, cfg, RunDir(tmp_path, tensorboard=False))
    with pytest.raises(ValueError, match="holds a different run"):
        train_offline(make_agent("edp", 3, 2, dict(SMALL["edp"])), ds, cfg, RunDir(tmp_path, tensorboard=False))
