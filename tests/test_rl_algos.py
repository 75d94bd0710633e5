"""Offline-RL algorithms (BC, EDP, CDP, Diffusion-QL, IDQL and their CDP variants), the trainer loop
(:func:`cdp.training.trainer.fit`) on a tiny synthetic dataset, and ``cdp rl`` (:mod:`cdp.experiments.rl`) on a tiny
PointMaze dataset (CPU, seconds)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from cdp.data.rl import OfflineDataset
from cdp.rl import ALGOS as REGISTERED
from cdp.rl import make_agent
from cdp.experiments.rl import dataset_tensors, load_agent
from cdp.runs import RunDir
from cdp.training.trainer import checkpoint_dir, fit

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
    """fit's checkpoint (agent.modules() + checkpoint_meta()) rebuilds an agent that acts identically."""
    ds = tiny_dataset()
    ag = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]))
    fit(ag, dataset_tensors(ds), steps=3, batch_size=32, run=RunDir(tmp_path, tensorboard=False), progress=False)
    ag2, meta = load_agent(checkpoint_dir(tmp_path))
    assert meta["step"] == 3 and meta["algo"] == algo
    obs = torch.as_tensor(ds.observations[:16])
    a1 = ag.act(obs, generator=torch.Generator().manual_seed(7))
    a2 = ag2.act(obs, generator=torch.Generator().manual_seed(7))
    assert a1.shape == (16, 2)
    assert torch.equal(a1, a2)


@pytest.mark.parametrize("algo", ALGOS)
def test_resume_equals_uninterrupted(algo, tmp_path):
    ds = tiny_dataset()
    data = dataset_tensors(ds)
    kw = dict(batch_size=32, seed=3, log_every=2, progress=False, identity={"algo": algo})
    full = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=1)
    fit(full, data, steps=6, run=RunDir(tmp_path / "a", tensorboard=False), **kw)
    part = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=1)
    fit(part, data, steps=3, run=RunDir(tmp_path / "b", tensorboard=False), **kw)
    resumed = make_agent(algo, ds.obs_dim, ds.act_dim, dict(SMALL[algo]), seed=99)  # init overwritten by resume
    res = fit(resumed, data, steps=6, run=RunDir(tmp_path / "b", tensorboard=False), **kw)
    assert res["step"] == 6 and res["start"] == 3
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
        fit(ag, dataset_tensors(ds), steps=2, batch_size=16, progress=False)
    b = batch_of(ds, 8)
    with pytest.raises(ValueError, match=r"batch\['rewards'\] contains NaN"):
        ag.update(b)


def test_resume_with_other_settings_is_refused(tmp_path):
    ds = tiny_dataset()
    data = dataset_tensors(ds)
    kw = dict(steps=2, batch_size=16, progress=False)
    fit(make_agent("bc", 3, 2, dict(SMALL["bc"])), data, run=RunDir(tmp_path, tensorboard=False),
        identity={"algo.name": "bc"}, **kw)
    with pytest.raises(ValueError, match="holds a different run.*algo.name: 'bc' there, 'edp' now"):
        fit(make_agent("edp", 3, 2, dict(SMALL["edp"])), data, run=RunDir(tmp_path, tensorboard=False),
            identity={"algo.name": "edp"}, **kw)


def test_compile_reaches_the_actor_config():
    """The RL configs' ``compile`` flag (cdp rl --train.compile True) reaches the diffusion actor's policy config."""
    from cdp.config import apply, base_config
    from cdp.experiments.rl import agent_config
    from cdp.rl import make_config

    for algo in ("edp", "cdp", "idql", "cdp_idql"):
        cfg = make_config(algo, {"compile": True})
        assert cfg.policy_config(5, 2).compile is True and make_config(algo).policy_config(5, 2).compile is False
        tree = apply(base_config("rl", algo), {"algo.name": algo})  # base_config leaves algo.name at the job's
        assert agent_config(apply(tree, {"train.compile": True})).policy_config(5, 2).compile is True
        assert agent_config(tree).policy_config(5, 2).compile is False


# ------------------------------------------------------------------------------------------------ cdp rl
#: a small diffusion run of ``cdp rl`` (CPU, seconds)
SMALL_FLAGS = ["--policy.network.hidden", "32", "--policy.network.layers", "2", "--policy.schedule.num_steps", "10",
               "--policy.num_inference_steps", "3", "--algo.num_candidates", "4", "--train.batch_size", "32"]


@pytest.fixture(scope="module")
def maze_data(tmp_path_factory):
    pytest.importorskip("gymnasium_robotics")
    from cdp.datagen.maze import generate_maze_dataset

    path = tmp_path_factory.mktemp("maze") / "maze.hdf5"
    generate_maze_dataset("PointMaze_UMaze-v3", n_steps=600, seed=0, path=path, ref_episodes=0, progress=False)
    return path


def rl_argv(out, data, *extra) -> list[str]:
    return ["rl", "--out", str(out), "--data.path", str(data), "--eval.episodes", "1", "--train.threads", "1",
            "--train.progress", "False", "--log.tensorboard", "False", *map(str, extra)]


def test_cli_registers_rl(monkeypatch):
    """``cdp rl`` parses dotted flags into the config tree and hands it to cdp.experiments.rl.run_rl."""
    import cdp.experiments.rl as rl_job
    from cdp.cli import main, parse_job

    cfg = parse_job("rl", ["--algo.name", "edp", "--data.fraction", "0.1", "--train.steps", "10", "--train.seed", "2"])
    assert (cfg.job, cfg.algo.name, cfg.data.fraction, cfg.train.steps, cfg.train.seed) == ("rl", "edp", 0.1, 10, 2)
    for algo in REGISTERED:
        assert parse_job("rl", ["--algo.name", algo]).algo.name == algo
    seen = []
    monkeypatch.setattr(rl_job, "run_rl", lambda c, log=print: seen.append(c) or {})
    assert main(["rl", "--algo.name", "idql", "--train.steps", "3", "--train.threads", "1"]) == 0
    assert [(c.algo.name, c.train.steps) for c in seen] == [("idql", 3)]
    with pytest.raises(SystemExit) as e:  # an unknown flag: tyro prints the usage
        parse_job("rl", ["--steps", "3"])
    assert e.value.code == 2


def test_rl_config_file_with_command_line_overrides(tmp_path, capsys, maze_data):
    """cdp rl --config: defaults < presets < YAML (nested or dotted keys) < explicit flags; unknown keys, missing
    files and keys the algorithm does not read give one clear error."""
    import yaml
    from cdp.cli import main, parse_job

    cfg = tmp_path / "rl.yaml"
    cfg.write_text(yaml.safe_dump({"algo": {"name": "bc"}, "train": {"steps": 7, "seed": 3}, "eval.episodes": 1,
                                   "data": {"path": str(maze_data)}}))
    c = parse_job("rl", ["--config", str(cfg), "--train.steps", "2"])
    assert (c.algo.name, c.train.steps, c.eval.episodes, c.train.seed, c.train.batch_size) == ("bc", 2, 1, 3, 256)
    out = tmp_path / "run"
    assert main(["rl", "--config", str(cfg), "--train.steps", "2", "--train.threads", "1", "--train.progress", "False",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["algo"] == "bc" and res["steps"] == 2 and res["seed"] == 3 and res["episodes"] == 1
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: {name: bc}\nlearning_rate: 3\n")
    assert main(["rl", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdp rl: error: ") and "unknown config key learning_rate" in err
    assert main(["rl", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "y")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["rl", "--config", str(cfg), "--train.compile", "True", "--out", str(tmp_path / "z")]) == 2  # bc: no diffusion
    assert "--train.compile does not apply to cdp rl with algo.name bc" in capsys.readouterr().err
    assert main(["rl", "--algo.name", "idql", "--algo.eta", "2", "--out", str(tmp_path / "w")]) == 2
    assert "--algo.eta does not apply to cdp rl with algo.name idql" in capsys.readouterr().err
    assert main(["rl", "--algo.name", "edp", "--policy.contraction.weight", "0.5", "--out", str(tmp_path / "v")]) == 2
    assert "--policy.contraction.weight does not apply to cdp rl with algo.name edp" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "xyzwv")


def test_saved_config_reruns_the_run(tmp_path, capsys, maze_data):
    """A run folder's config.yaml re-runs the run: it resumes the finished checkpoint (no training step, no new
    checkpoint) and reports the same results; more steps in the file (or a flag) continue it."""
    import yaml
    from cdp.cli import main

    out = tmp_path / "run"
    assert main(rl_argv(out, maze_data, "--algo.name", "cdp", "--train.steps", "3", "--train.log_every", "1",
                        "--eval.every", "3", *SMALL_FLAGS)) == 0
    ck = checkpoint_dir(out)
    first = json.loads((out / "results.json").read_text())
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["job"] == "rl" and saved["out"] == str(out) and saved["algo"]["name"] == "cdp"
    assert saved["policy"]["network"]["hidden"] == 32 and saved["train"]["steps"] == 3
    stamp = {f.name: f.stat().st_mtime_ns for f in ck.iterdir()}
    rows = (out / "metrics.jsonl").read_text().splitlines()

    assert main(["rl", "--config", str(out / "config.yaml")]) == 0
    again = json.loads((out / "results.json").read_text())
    assert {f.name: f.stat().st_mtime_ns for f in ck.iterdir()} == stamp  # no new checkpoint
    new_rows = (out / "metrics.jsonl").read_text().splitlines()[len(rows):]
    assert not any(k.startswith("train/") for r in new_rows for k in json.loads(r))  # no training step
    drop = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert drop(again) == drop(first) and again["steps"] == 3 and [e["step"] for e in again["evals"]] == [3]
    assert yaml.safe_load((out / "config.yaml").read_text()) == saved
    assert main(["rl", "--config", str(out / "config.yaml"), "--train.steps", "4", "--eval.every", "0"]) == 0
    more = json.loads((out / "results.json").read_text())
    assert more["steps"] == 4 and json.loads((ck / "policy.json").read_text())["step"] == 4
    train_steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()
                   if any(k.startswith("train/") for k in json.loads(r))]
    assert train_steps == [1, 2, 3, 4]


def test_cli_resume_equals_uninterrupted_and_other_settings_are_refused(tmp_path, capsys, maze_data):
    """cdp rl with the same --out resumes (2 + 2 steps == 4 steps, bit for bit); other settings are refused before
    anything is written, naming the differing keys."""
    from safetensors.torch import load_file
    from cdp.cli import main

    base = ["--algo.name", "bc", "--policy.network.hidden", "32", "--train.batch_size", "32", "--train.seed", "1"]
    assert main(rl_argv(tmp_path / "full", maze_data, *base, "--train.steps", "4")) == 0
    assert main(rl_argv(tmp_path / "part", maze_data, *base, "--train.steps", "2")) == 0
    assert main(rl_argv(tmp_path / "part", maze_data, *base, "--train.steps", "4")) == 0
    a, b = load_file(str(checkpoint_dir(tmp_path / "full") / "model.safetensors")), \
        load_file(str(checkpoint_dir(tmp_path / "part") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, part = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "part"))
    assert part["steps"] == 4 and part["normalized_score_mean"] == full["normalized_score_mean"]
    capsys.readouterr()
    out = tmp_path / "part"
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for flags, named in ((["--train.batch_size", "16"], "train.batch_size: 32 there, 16 now"),
                         (["--algo.name", "edp"], "algo.name: 'bc' there, 'edp' now"),
                         (["--data.fraction", "0.5"], "data.fraction: 1.0 there, 0.5 now")):
        argv = rl_argv(out, maze_data, *(base + ["--train.steps", "6"] + flags))
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("cdp rl: error: ") and "holds a different run" in err and named in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp


@pytest.mark.parametrize("flags, message", [
    (["--data.fraction", "1.5"], r"data.fraction must be in \(0, 1\], got 1.5"),
    (["--data.fraction", "0"], r"data.fraction must be in \(0, 1\], got 0"),
    (["--data.fraction", "nan"], "data.fraction must be a finite number, got nan"),
    ("yaml: {train: {steps: abc}}", "config key 'train.steps': expected an integer, got 'abc'"),
    ("yaml: {data: {fraction: .nan}}", "data.fraction must be a finite number, got nan"),
    (["--train.steps", "-1"], "train.steps must be >= 1, got -1"),
    (["--eval.episodes", "-1"], "eval.episodes must be >= 0, got -1"),
    (["--eval.diag_obs", "-2"], "eval.diag_obs must be >= 0, got -2"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    """Out-of-range / NaN fractions and mistyped YAML values: one error line, and the out folder is not created
    (not even the cached PointMaze dataset)."""
    import re

    from cdp.cli import main

    out = tmp_path / "run"
    argv = ["rl", "--out", str(out), "--train.steps", "2", "--train.progress", "False"]
    if isinstance(flags, str):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(flags.removeprefix("yaml: ") + "\n")
        argv += ["--config", str(cfg)]
    else:
        argv += flags
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdp rl: error: ") and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_eval_episodes_zero_skips_evaluation_and_diag_obs_sets_the_diagnostics(tmp_path, maze_data):
    """eval.episodes 0 skips the evaluations (scores None, no eval/ metrics); eval.diag_obs N diagnoses N dataset
    states, 0 none."""
    from cdp.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(rl_argv(a, maze_data, "--algo.name", "cdp", "--train.steps", "2", "--eval.every", "1",
                        "--eval.episodes", "0", "--eval.diag_obs", "5", *SMALL_FLAGS)) == 0
    res = json.loads((a / "results.json").read_text())
    assert res["normalized_score_mean"] is None and res["evals"] == [] and res["episodes"] == 0
    assert res["contraction_diagnostics"]["n_states"] == 5
    assert not any(k.startswith("eval/") for line in (a / "metrics.jsonl").read_text().splitlines()
                   for k in json.loads(line))
    assert main(rl_argv(b, maze_data, "--algo.name", "cdp", "--train.steps", "1", "--eval.diag_obs", "0",
                        *SMALL_FLAGS)) == 0
    res = json.loads((b / "results.json").read_text())
    assert res["contraction_diagnostics"] is None and np.isfinite(res["normalized_score_mean"])


def test_dataset_of_another_env_is_refused_before_training(tmp_path, capsys):
    """Hopper-shaped data (obs 11, action 3) with --data.env Walker2d-v5 (obs 17, action 6) is refused before
    training, naming both dimensions; the same file with its own env loads."""
    gym = pytest.importorskip("gymnasium")
    try:
        gym.make("Walker2d-v5").close()
        gym.make("Hopper-v5").close()
    except Exception as e:  # mujoco not installed
        pytest.skip(f"gymnasium's MuJoCo envs are unavailable: {e}")
    from cdp.cli import main
    from cdp.config import apply, base_config
    from cdp.data.rl import write_d4rl_hdf5
    from cdp.experiments.rl import load_dataset

    rng = np.random.default_rng(0)
    n = 40
    obs = rng.normal(size=(n, 11)).astype(np.float32)
    ds = OfflineDataset(obs, rng.uniform(-1, 1, (n, 3)).astype(np.float32), rng.normal(size=n).astype(np.float32),
                        np.roll(obs, -1, 0), np.zeros(n, bool), np.arange(n) % 20 == 19, env_id="Hopper-v5",
                        ref_min_score=-20.272305, ref_max_score=3234.3)
    path = write_d4rl_hdf5(ds, tmp_path / "hopper.hdf5")
    out = tmp_path / "run"
    assert main(["rl", "--data.path", str(path), "--data.env", "Walker2d-v5", "--algo.name", "bc", "--out", str(out),
                 "--train.steps", "2", "--train.progress", "False"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdp rl: error: ") and "holds Hopper-v5 data" in err and "not Walker2d-v5" in err, err
    assert not out.exists()  # refused before anything (checkpoint, config.yaml) was written
    # a file that names no env: the dimensions are checked against the env given
    anon = write_d4rl_hdf5(dataclasses.replace(ds, env_id=None), tmp_path / "anon.hdf5")
    assert main(["rl", "--data.path", str(anon), "--data.env", "Walker2d-v5", "--algo.name", "bc", "--out", str(out),
                 "--train.steps", "2", "--train.progress", "False"]) == 2
    err = capsys.readouterr().err
    assert "observation dim 11 != env's 17" in err and "action dim 3 != env's 6" in err, err
    assert not out.exists()
    cfg = apply(base_config("rl", "bc"), {"algo.name": "bc", "data.path": str(path), "out": str(out)})
    assert load_dataset(cfg, out).env_id == "Hopper-v5"  # the file's own env: accepted
    assert load_dataset(apply(cfg, {"data.env": "Hopper-v5"}), out).obs_dim == 11


# ------------------------------------------------------------------------------------------------ Diffusion-QL
def test_dql_chain_equals_handwritten_ddpm_loop():
    """sample_chain = Diffusion-QL's p_sample_loop written out (posterior coefficients from the betas), same noise."""
    ds = tiny_dataset()
    ag = agent_for("dql", ds)
    p, T, B = ag.policy, ag.config.num_diffusion_steps, 6
    cond = p.condition(torch.as_tensor(ds.observations[:B]))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(B, 2, generator=g)
    noises = [torch.randn(B, 2, generator=g) for _ in range(T)]
    with torch.no_grad():
        got = ag.sample_chain(cond, noise, noises)

        betas = p.schedule.betas.float()
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1), abar[:-1]])
        coef1 = betas * abar_prev.sqrt() / (1 - abar)
        coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
        var = betas * (1 - abar_prev) / (1 - abar)
        x = noise
        for i in reversed(range(T)):  # i = k - 1
            eps = p.net(x, torch.full((B,), (i + 1) / T), cond)
            x0 = ((1 / abar[i]).sqrt() * x - (1 / abar[i] - 1).sqrt() * eps).clamp(-1, 1)
            mean = coef1[i] * x0 + coef2[i] * x
            x = mean + var[i].sqrt() * noises[T - 1 - i] if i > 0 else mean
        want = x.clamp(-1, 1)
    assert got.shape == (B, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dql_q_term_gradient_flows_through_the_whole_chain():
    """With L_d weighted 0 (the Q term alone) every denoiser parameter gets a gradient, and a_0 depends on a_T."""
    ds = tiny_dataset()
    ag = agent_for("dql", ds)
    for _ in range(2):
        ag.update(batch_of(ds))
    cond = ag.policy.condition(torch.as_tensor(ds.observations[:32]))
    ag.policy.net.zero_grad(set_to_none=True)
    ag.q_term(cond).backward()
    missing = [n for n, q in ag.policy.net.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
    assert not missing, f"no Q-term gradient reaches {missing}"
    noise = torch.randn(32, 2, requires_grad=True)
    ag.sample_chain(cond.detach(), noise).sum().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0  # back-propagated through all T steps to a_T
    # the actor samples by the full T-step DDPM chain (no action approximation, no skipped steps)
    assert ag.config.num_inference_steps == ag.config.num_diffusion_steps == 5 and ag.policy.config.sampler == "ddpm"


def test_dql_config_and_hparams():
    from cdp.rl import DQL_HPARAMS, DQLConfig, dql_overrides, make_config

    c = DQLConfig()
    assert (c.num_diffusion_steps, c.num_inference_steps, c.target_inference_steps, c.num_candidates) == (5, 5, 5, 50)
    assert DQLConfig(**c.to_dict()) == c  # round trip (checkpoint reload)
    assert dql_overrides("hopper-medium-replay-v2") == {"actor_lr": 3e-4, "eta": 1.0, "max_q_backup": False,
                                                         "grad_clip": 4.0}
    assert DQL_HPARAMS["walker2d-medium-replay"]["grad_clip"] == 4.0
    assert DQL_HPARAMS["halfcheetah-medium-replay"]["grad_clip"] == 2.0
    assert make_config("cdp_dql").contraction["weight"] == 0.1 and make_config("dql").contraction is None
    with pytest.raises(ValueError, match="no Diffusion-QL hyper-parameters"):
        dql_overrides("pointmaze")
    with pytest.raises(ValueError, match="backup_samples"):
        DQLConfig(backup_samples=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DQLConfig(num_inference_steps=6)
    with pytest.raises(ValueError, match="needs a contraction"):
        make_config("cdp_dql", {"contraction": None})
    with pytest.raises(ValueError, match="takes a DQLConfig"):
        make_agent("dql", 3, 2, make_config("edp"))


def test_dql_max_q_backup_is_min_over_critics_of_max_over_samples():
    ds = tiny_dataset()
    ag = make_agent("dql", 3, 2, {**SMALL["dql"], "max_q_backup": True, "backup_samples": 3})
    ag.fit_normalizers(torch.as_tensor(ds.observations), torch.as_tensor(ds.actions))
    b = batch_of(ds, 8)
    ag.generator.manual_seed(4)
    _, m = ag.critic_loss(b)
    ag.generator.manual_seed(4)
    with torch.no_grad():
        nobs, na = ag._sample(ag.ema.model, b["next_observations"], 3, ag.config.target_inference_steps)
        t1, t2 = ag.critic_target(ag._obs(nobs), na)
        q = torch.minimum(t1.view(8, 3).max(1).values, t2.view(8, 3).max(1).values)
    want = b["rewards"] + 0.99 * (1 - b["terminals"]) * q
    assert m["target_q_mean"] == pytest.approx(float(want.mean()), abs=1e-6)


# ------------------------------------------------------------------------------------------------ IDQL
def test_idql_expectile_loss_by_hand():
    from cdp.rl.idql import expectile_loss

    u = torch.tensor([-2.0, 1.0, 0.5, 0.0])
    # |τ − 1(u<0)| u² with τ = 0.7: 0.3·4 + 0.7·1 + 0.7·0.25 + 0 = 2.075, mean over 4
    assert float(expectile_loss(u, 0.7)) == pytest.approx(2.075 / 4, abs=1e-7)
    assert float(expectile_loss(u, 0.5)) == pytest.approx(0.5 * (4 + 1 + 0.25) / 4, abs=1e-7)  # τ = ½: half the MSE


def test_idql_value_and_q_losses_match_the_formulas():
    from cdp.rl.idql import expectile_loss

    ds = tiny_dataset()
    ag = agent_for("idql", ds)
    b = batch_of(ds, 16)
    with torch.no_grad():
        s, s2 = ag._obs(b["observations"]), ag._obs(b["next_observations"])
        q1t, q2t = ag.critic_target(s, b["actions"])
        v = ag.value(s).squeeze(-1)
        u = torch.minimum(q1t, q2t) - v
        want_v = (torch.where(u < 0, 0.3, 0.7) * u**2).mean()
        y = b["rewards"] + 0.99 * (1 - b["terminals"]) * ag.value(s2).squeeze(-1)
        q1, q2 = ag.critic(s, b["actions"])
        want_q = 0.5 * (((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean())
        lv, _ = ag.value_loss(b)
        lq, _ = ag.q_loss(b)
    assert float(lv) == pytest.approx(float(want_v), rel=1e-6)
    assert float(lv) == pytest.approx(float(expectile_loss(u, 0.7)), rel=1e-6)
    assert float(lq) == pytest.approx(float(want_q), rel=1e-6)


def test_idql_implicit_weights_by_hand():
    from cdp.rl.idql import implicit_weights

    adv = torch.tensor([[-0.5, 0.2, 1.0, -2.0]])
    w = implicit_weights(adv, 0.7, "expectile")
    torch.testing.assert_close(w, torch.tensor([[0.3 / 0.5, 0.7 / 0.2, 0.7 / 1.0, 0.3 / 2.0]]))
    torch.testing.assert_close(implicit_weights(adv, 0.7, "expectile_simple"), torch.tensor([[0.3, 0.7, 0.7, 0.3]]))
    assert float(implicit_weights(torch.tensor([0.0]), 0.7, "expectile", adv_floor=1e-3)) == pytest.approx(700.0)
    with pytest.raises(ValueError, match="kind"):
        implicit_weights(adv, 0.7, "softmax")


@pytest.mark.parametrize("selection", ["expectile", "expectile_simple", "argmax"])
def test_idql_act_resamples_with_the_formula_weights(selection):
    """act = N EMA samples, weights from min Q' and V by the formula, one multinomial (or argmax) draw."""
    ds = tiny_dataset()
    ag = make_agent("idql", 3, 2, {**SMALL["idql"], "selection": selection, "num_candidates": 5})
    ag.fit_normalizers(torch.as_tensor(ds.observations), torch.as_tensor(ds.actions))
    for _ in range(3):
        ag.update(batch_of(ds))
    obs = torch.as_tensor(ds.observations[:7])
    got = ag.act(obs, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        a = ag.ema.model.sample(obs.repeat_interleave(5, 0), generator=g)
        q = ag.critic_target.q_min(ag._obs(obs.repeat_interleave(5, 0)), a).view(7, 5)
        adv = q - ag.value(ag._obs(obs)).view(7, 1)
        tw = torch.where(adv < 0, 0.3, 0.7)
        if selection == "argmax":
            idx = q.argmax(1)
        else:
            w = tw / adv.abs().clamp_min(1e-6) if selection == "expectile" else tw
            torch.testing.assert_close(ag.candidate_weights(obs, a.view(7, 5, 2)), w)
            idx = torch.multinomial(w / w.sum(1, keepdim=True), 1, generator=g).squeeze(1)
    assert torch.equal(got, a.view(7, 5, 2)[torch.arange(7), idx])


def test_idql_actor_is_plain_bc_and_cdp_adds_contraction():
    ds = tiny_dataset()
    b = batch_of(ds, 32)
    plain, reg = agent_for("idql", ds), agent_for("cdp_idql", ds)
    reg.policy.load_state_dict(plain.policy.state_dict())
    plain.generator.manual_seed(2)
    lp, mp = plain.actor_loss(b)
    plain.generator.manual_seed(2)
    ld, _ = plain.policy.compute_loss(b["observations"], b["actions"], generator=plain.generator)
    assert float(lp) == float(ld) == mp["loss_d"]  # L_d only: no critic in the actor loss
    reg.generator.manual_seed(2)
    lr_, mr = reg.actor_loss(b)
    assert "contraction/loss_c" in mr and mr["loss_d"] == pytest.approx(mp["loss_d"], rel=1e-6)
    assert float(lr_) == pytest.approx(mr["loss_d"] + 0.1 * mr["contraction/loss_c"], rel=1e-5)  # L_d + γ L_c
    from cdp.rl import IDQLConfig
    for bad in ({"expectile": 1.0}, {"selection": "softmax"}, {"value_lr": 0.0}, {"adv_floor": 0.0}):
        with pytest.raises(ValueError):
            IDQLConfig(**bad)
