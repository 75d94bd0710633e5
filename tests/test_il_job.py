"""The imitation-learning job (cdp.experiments.il) and its CLI (cdp train / cdp eval) on a tiny synthetic replay
buffer."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cdp.cli import main, parse_job
from cdp.config import apply, base_config, resolve
from cdp.envs.pusht import HAVE_GYM_PUSHT
from cdp.experiments.il import (PRESETS, action_offset_for, diag_sizes, eval_checkpoint, load_demos, make_windows,
                                policy_config, resolve_zarr, run_il, validate)
from cdp.policy import DiffusionPolicy
from cdp.runs import load_checkpoint, load_policy

from demo_data import make_pusht_zarr

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_pusht():
    p = os.environ.get("CDP_PUSHT_ZARR") or str(REPO_ROOT / ".." / "shared" / "data" / "pusht" /
                                                 "pusht_cchi_v7_replay.zarr")
    return p if os.path.exists(p) else None


def quiet(*a, **k):
    pass


def il_config(name="cdp_unet", over=None):
    """The IL tree of preset ``name`` with dotted-key overrides (``base_config`` presets H / To / Ta but leaves
    algo.name at the job's default, so it is set here)."""
    return apply(base_config("il", name), {"algo.name": name, **(over or {})})


def tiny(zarr_path, policy="cdp_unet", out=None, **kw):
    """A small IL config of preset ``policy`` on ``zarr_path``; ``kw``: more dotted-key overrides."""
    over = {"data.path": zarr_path, "train.steps": 20, "train.batch_size": 16, "train.lr": 1e-3,
            "train.log_every": 5, "train.ckpt_every": 0, "train.progress": False,
            "policy.network.unet_down_dims": (16, 32), "policy.network.unet_time_embed_dim": 16,
            "policy.network.dit_d_model": 16, "policy.network.dit_layers": 1, "policy.network.dit_heads": 2,
            "policy.network.hidden": 32, "policy.network.layers": 2, "policy.schedule.num_steps": 10,
            "policy.num_inference_steps": 4, "eval.episodes": 1 if HAVE_GYM_PUSHT else 0, "eval.max_steps": 16,
            "eval.diag_obs": 1, "eval.diag_samples": 2}
    if out is not None:
        over["out"] = str(out)
    over.update(kw)
    return il_config(policy, over)


def json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def folder_bytes(path):
    """relative path → bytes of every file under ``path`` (to check that a refused run changed nothing)."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*")) if f.is_file()}


def one_error_line(capsys, command="train"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cdp {command}: error: "), err
    return err


def test_presets_and_windows(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    from cdp.data.il import load_pusht_lowdim
    ds = load_pusht_lowdim(p)
    for name, (net, H, To, Ta, contractive) in PRESETS.items():
        pc = policy_config(tiny(p, name), 20, 2)
        assert (pc.network, pc.horizon, pc.n_obs_steps, pc.n_action_steps) == (net, H, To, Ta)
        if net == "gmm":  # BC-GMM: not a diffusion policy (tested below)
            continue
        assert (pc.contraction is not None) == contractive
        assert action_offset_for(pc) == (To - 1 if H > 1 else 0)
        obs, act = make_windows(ds, pc)
        assert obs.shape[1:] == (To, 20) and act.shape[1:] == ((H, 2) if H > 1 else (2,))
        pol = DiffusionPolicy(pc)  # every preset's network builds and samples the right shape
        pol.fit_normalizers(obs, act)
        assert pol.sample(obs[:2], num_inference_steps=2).shape == (2,) + tuple(act.shape[1:])
    assert diag_sizes(il_config("dp_unet")) == (1, 1) and diag_sizes(il_config("cdp_dbc")) == (2, 4)
    with pytest.raises(ValueError, match="preset"):
        base_config("il", "nope")
    with pytest.raises(ValueError, match="algo.name"):
        validate(apply(base_config("il"), {"algo.name": "nope"}))
    with pytest.raises(ValueError, match=r"data.fraction must be in \(0, 1\]"):
        validate(apply(base_config("il"), {"data.fraction": 1.5}))
    with pytest.raises(ValueError, match="policy.num_inference_steps"):
        validate(apply(base_config("il"), {"policy.schedule.num_steps": 10, "policy.num_inference_steps": 16}))
    with pytest.raises(ValueError, match="data.task"):
        validate(apply(base_config("il"), {"data.task": "square"}))
    validate(tiny(p, "cdp_dbc"))


def test_run_il_writes_run_and_reloads(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "run"
    cfg = tiny(p, "dp_unet", out=out)
    res = run_il(cfg, log=quiet)
    ckpt = out / "checkpoints" / "last"
    assert (ckpt / "model.safetensors").exists() and (out / "config.yaml").exists()
    saved = json.loads((out / "results.json").read_text())
    for k in ("config", "policy_config", "data_path", "data", "n_params", "train", "checkpoint", "timing", "eval",
              "diagnostics", "device"):
        assert k in saved
    assert saved["data_path"] == p and "zarr" not in saved
    assert saved["config"] == cfg.to_dict()
    assert saved["data"]["episodes"] == 4 and saved["train"]["steps_run"] == 20
    assert saved["timing"]["act_ms_batch1"] > 0
    assert np.isfinite(saved["diagnostics"]["lambda_hat_mean"])
    assert any("train/loss" in r for r in json_lines(out / "metrics.jsonl"))
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["algo"]["name"] == "dp_unet" and saved_cfg["data"]["task"] == "pusht"
    # the saved EMA policy gives identical actions on reload
    a, b = load_policy(ckpt), load_policy(ckpt)
    obs = torch.rand(3, 2, 20) * 400 + 50
    xa = a.sample(obs, generator=torch.Generator().manual_seed(1))
    xb = b.sample(obs, generator=torch.Generator().manual_seed(1))
    assert xa.shape == (3, 16, 2) and torch.equal(xa, xb)
    if HAVE_GYM_PUSHT:  # evaluating the checkpoint reproduces the in-run evaluation exactly
        ev = eval_checkpoint(ckpt, episodes=1, max_steps=16, seed=cfg.train.seed)
        assert ev["task"] == "pusht"
        assert ev["max_coverage"] == res["eval"]["max_coverage"]
        assert main(["eval", "--checkpoint", str(ckpt), "--eval.episodes", "1", "--eval.max_steps", "16",
                     "--train.seed", str(cfg.train.seed), "--eval.video_dir", str(tmp_path / "vid"),
                     "--eval.video_episodes", "1", "--eval.json", str(tmp_path / "ev.json"),
                     "--train.threads", "1"]) == 0
        assert (tmp_path / "vid" / "pusht_seed100000.gif").stat().st_size > 0
        assert json.loads((tmp_path / "ev.json").read_text())["max_coverage"] == res["eval"]["max_coverage"]
        assert set(res["eval"]) >= {"mean_max_coverage", "success_rate", "mean_max_reward"}


def test_cdp_unet_trains_with_contraction_metrics(tmp_path):
    # power-iteration regulariser on d = H*Da = 32 is the expensive part: regularise 2 samples for 2 steps
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "cdp"
    run_il(tiny(p, out=out, **{"train.steps": 2, "train.log_every": 1, "policy.contraction.max_samples": 2,
                               "eval.episodes": 0, "eval.diag_obs": 0}), log=quiet)
    assert any("train/contraction/lambda_max_mean" in r for r in json_lines(out / "metrics.jsonl"))
    assert load_policy(out / "checkpoints" / "last").config.contraction["weight"] == 0.1


def test_resume_matches_uninterrupted(tmp_path):
    """Re-running a run folder with more train.steps resumes it (no resume flag) and ends bit for bit where an
    uninterrupted run ends; another setting is refused, naming the key, before anything is written."""
    p = make_pusht_zarr(tmp_path / "p.zarr")
    kw = {"eval.episodes": 0, "eval.diag_obs": 0}
    run_il(tiny(p, "dbc", out=tmp_path / "full", **kw), log=quiet)
    run_il(tiny(p, "dbc", out=tmp_path / "split", **{**kw, "train.steps": 10}), log=quiet)
    res = run_il(tiny(p, "dbc", out=tmp_path / "split", **kw), log=quiet)
    assert res["train"]["steps_run"] == 10
    ta, ma, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "last")
    tb, mb, _ = load_checkpoint(tmp_path / "split" / "checkpoints" / "last")
    assert ma["step"] == mb["step"] == 20
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    before = folder_bytes(tmp_path / "split")
    with pytest.raises(ValueError, match="train.lr"):
        run_il(tiny(p, "dbc", out=tmp_path / "split", **{**kw, "train.steps": 30, "train.lr": 5e-4}), log=quiet)
    make_pusht_zarr(p, seed=1)  # other demonstrations under the same path and settings
    with pytest.raises(ValueError, match="data_fingerprint"):
        run_il(tiny(p, "dbc", out=tmp_path / "split", **{**kw, "train.steps": 30}), log=quiet)
    assert folder_bytes(tmp_path / "split") == before


def test_cli_parse_config_file_and_overrides(tmp_path):
    cfg = parse_job("train", ["--data.task", "pusht", "--algo.name", "cdp_unet", "--data.fraction", "0.1",
                              "--train.steps", "2000", "--train.seed", "0", "--out", "runs/x", "--data.path", "Z"])
    assert (cfg.algo.name, cfg.data.fraction, cfg.train.steps, cfg.train.seed, cfg.data.path) == \
        ("cdp_unet", 0.1, 2000, 0, "Z")
    assert cfg.data.max_episodes == 90 and cfg.out == "runs/x" and cfg.job == "il"
    assert (cfg.policy.horizon, cfg.policy.n_obs_steps, cfg.policy.n_action_steps) == (16, 2, 8)  # the preset's
    y = tmp_path / "c.yaml"  # nested and dotted keys in one file
    y.write_text(yaml.safe_dump({"algo": {"name": "cdp_dbc"}, "train": {"steps": 50},
                                 "policy.contraction.t_range": [0.0, 0.1], "data": {"max_episodes": None}}))
    cfg = parse_job("train", ["--config", str(y), "--train.steps", "70", "--out", "o",
                              "--policy.contraction.max_samples", "none"])
    assert (cfg.algo.name, cfg.train.steps, cfg.policy.contraction.t_range, cfg.data.max_episodes) == \
        ("cdp_dbc", 70, (0.0, 0.1), None)
    assert cfg.policy.contraction.max_samples is None
    assert (cfg.policy.horizon, cfg.policy.n_action_steps) == (1, 1)  # the file's algo.name picks the preset
    cfg = parse_job("train", ["--algo.name", "cdp_unet", "--out", "o", "--policy.network.unet_down_dims", "32", "64"])
    assert cfg.policy.network.unet_down_dims == (32, 64)
    # a key the preset does not read is refused, naming it (it used to be silently ignored)
    with pytest.raises(ValueError, match="--policy.network.unet_down_dims does not apply to cdp train with "
                                         "algo.name cdp_dbc"):
        parse_job("train", ["--config", str(y), "--policy.network.unet_down_dims", "32", "64"])
    with pytest.raises(ValueError, match="policy.contraction.weight"):  # no contraction in plain DBC
        resolve("il", il_config("dbc", {"policy.contraction.weight": 0.5}))
    cfg = parse_job("eval", ["--checkpoint", "runs/x/checkpoints/last", "--eval.episodes", "50"])
    assert cfg.eval.episodes == 50 and cfg.checkpoint == "runs/x/checkpoints/last" and cfg.job == "eval"


def test_missing_files_give_one_clear_line(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.zarr")
    assert main(["train", "--out", str(tmp_path / "o"), "--data.path", missing, "--train.progress", "False"]) == 2
    err = one_error_line(capsys)
    assert missing in err and "CDP_PUSHT_ZARR" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("CDP_PUSHT_ZARR", missing)
    with pytest.raises(FileNotFoundError, match="CDP_PUSHT_ZARR"):
        resolve_zarr(None)
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "not a cdp checkpoint" in one_error_line(capsys, "eval")
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in one_error_line(capsys)


def test_cli_train_end_to_end(tmp_path, capsys):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "cli"
    rc = main(["train", "--algo.name", "cdp_dbc", "--train.steps", "10", "--train.batch_size", "16",
               "--policy.network.hidden", "32", "--policy.schedule.num_steps", "10",
               "--policy.num_inference_steps", "4", "--eval.episodes", "0", "--eval.diag_samples", "2",
               "--eval.diag_obs", "1", "--data.path", p, "--out", str(out), "--train.progress", "False",
               "--train.threads", "1"])
    assert rc == 0 and (out / "results.json").exists()
    assert "eval: skipped" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["data_path"] == p and res["config"]["algo"]["name"] == "cdp_dbc" and res["train"]["steps_run"] == 10


def _cli_run(tmp_path, steps=6):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "run"
    assert main(["train", "--algo.name", "dbc", "--train.steps", str(steps), "--train.batch_size", "16",
                 "--policy.network.hidden", "32", "--policy.schedule.num_steps", "10",
                 "--policy.num_inference_steps", "4", "--eval.episodes", "0", "--eval.diag_obs", "0",
                 "--data.path", p, "--out", str(out), "--train.progress", "False", "--train.threads", "1"]) == 0
    return p, out


def test_saved_config_reruns_and_resumes(tmp_path, capsys):
    """A run folder's config.yaml re-runs the run through `cdp train --config`: it resumes (0 new steps, the
    checkpoint untouched) instead of retraining, and with more train.steps it continues."""
    p, out = _cli_run(tmp_path)
    ckpt = out / "checkpoints" / "last"
    ck_before = folder_bytes(ckpt)
    cfg_before = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(out / "config.yaml")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["steps_run"] == 0 and "no new steps" in capsys.readouterr().out
    assert folder_bytes(ckpt) == ck_before
    assert (out / "config.yaml").read_bytes() == cfg_before  # the same resolved tree
    assert res["config"] == yaml.safe_load(cfg_before)
    assert main(["train", "--config", str(out / "config.yaml"), "--train.steps", "8"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["steps_run"] == 2 and load_checkpoint(ckpt)[1]["step"] == 8
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 8


def test_resume_with_changed_setting_is_refused_and_changes_nothing(tmp_path, capsys):
    p, out = _cli_run(tmp_path)
    before = folder_bytes(out)
    capsys.readouterr()
    assert main(["train", "--config", str(out / "config.yaml"), "--train.lr", "0.005"]) == 2
    err = one_error_line(capsys)
    assert "train.lr" in err and "0.005" in err
    assert folder_bytes(out) == before  # config.yaml, metrics, checkpoint, results: byte for byte
    assert main(["train", "--config", str(out / "config.yaml"), "--policy.network.hidden", "64"]) == 2
    assert "policy.network.hidden" in one_error_line(capsys)
    assert folder_bytes(out) == before
    # settings that may change on resume (evaluation, logging cadence) are accepted
    assert main(["train", "--config", str(out / "config.yaml"), "--train.log_every", "3"]) == 0
    assert json.loads((out / "results.json").read_text())["train"]["steps_run"] == 0


@pytest.mark.parametrize("value", ["1.5", "nan", "0", "inf"])
def test_bad_fraction_is_refused_before_training(tmp_path, capsys, value):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "run"
    assert main(["train", "--algo.name", "dbc", "--data.path", p, "--out", str(out), "--data.fraction", value,
                 "--train.steps", "4", "--train.progress", "False", "--eval.episodes", "0"]) == 2
    err = one_error_line(capsys)
    assert "data.fraction" in err
    assert not out.exists()  # refused before anything is written


def test_bad_flags_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume"])  # re-running the same --out resumes; there is no flag
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--train.steps", "many"])
    assert e.value.code == 2


@pytest.mark.skipif(real_pusht() is None, reason="real PushT zarr not available")
def test_real_pusht_smoke(tmp_path):
    cfg = il_config("cdp_dbc", {
        "data.path": real_pusht(), "data.fraction": 0.1, "out": str(tmp_path / "real"), "train.steps": 20,
        "train.batch_size": 32, "train.progress": False, "policy.network.hidden": 64, "policy.network.layers": 2,
        "policy.schedule.num_steps": 20, "policy.num_inference_steps": 4,
        "eval.episodes": 1 if HAVE_GYM_PUSHT else 0, "eval.max_steps": 10, "eval.diag_obs": 0})
    res = run_il(cfg, log=quiet)
    assert res["data"]["episodes"] == 9 and res["data"]["windows"] > 500  # 10 % of the 90-demo pool
    assert np.isfinite(res["train"]["final_loss"])
    if HAVE_GYM_PUSHT:
        assert 0.0 <= res["eval"]["mean_max_coverage"] <= 1.0


def test_fraction_is_of_the_capped_pool(tmp_path):
    """data.fraction is taken of the data.max_episodes pool (nested subsets), not of all episodes before the cap."""
    p = make_pusht_zarr(tmp_path / "p.zarr", lengths=(20, 22, 24, 26, 28, 30, 32, 34))
    demos = lambda **kw: load_demos(apply(base_config("il"), {"data.path": p, **kw}))  # noqa: E731
    for seed in range(3):
        pool = demos(**{"data.max_episodes": 4, "train.seed": seed})
        half = demos(**{"data.max_episodes": 4, "data.fraction": 0.5, "train.seed": seed})
        assert pool.n_episodes == 4
        assert half.n_episodes == 2  # was min(round(0.5 * 8), 4) = 4: the same demos as fraction 1
        assert set(half.meta["episode_ids"]) <= set(pool.meta["episode_ids"])
    assert demos(**{"data.max_episodes": None, "data.fraction": 0.25}).n_episodes == 2
    assert demos(**{"data.max_episodes": None}).n_episodes == 8


def test_il_contraction_defaults_follow_contraction_config():
    """The IL job's contraction settings default to ContractionConfig's (max_samples 16), not to 'whole batch'."""
    from cdp.contraction import ContractionConfig
    cc = policy_config(il_config("cdp_dbc"), 20, 2).contraction_config()
    ref = ContractionConfig()
    assert cc.max_samples == ref.max_samples == 16
    assert (cc.loss, cc.estimator, cc.weight, cc.margin, cc.t_range) == (ref.loss, ref.estimator, ref.weight,
                                                                         ref.margin, ref.t_range)
    cfg = il_config("cdp_dbc", {"policy.contraction.max_samples": None})
    assert policy_config(cfg, 20, 2).contraction_config().max_samples is None
    assert policy_config(il_config("dbc"), 20, 2).contraction is None


def test_cli_none_overrides_non_none_defaults(tmp_path):
    """'none' on the command line must reach the config even where the default is not None (it used to be dropped:
    --max-episodes none trained on 90 demos, --cdp-max-samples none on 16 samples)."""
    cfg = parse_job("train", ["--out", "o", "--data.max_episodes", "none", "--train.grad_clip", "none",
                              "--policy.contraction.max_samples", "none"])
    assert cfg.data.max_episodes is None and cfg.train.grad_clip is None and cfg.policy.contraction.max_samples is None
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"data": {"max_episodes": 10}, "policy": {"contraction": {"max_samples": 4}}}))
    cfg = parse_job("train", ["--out", "o", "--config", str(y)])
    assert (cfg.data.max_episodes, cfg.policy.contraction.max_samples, cfg.train.grad_clip) == (10, 4, 1.0)
    cfg = parse_job("train", ["--out", "o", "--config", str(y), "--data.max_episodes", "none"])
    assert cfg.data.max_episodes is None and cfg.policy.contraction.max_samples == 4


def test_bc_gmm_job_learns_saves_reloads_and_evaluates(tmp_path):
    """BC-GMM through the same job and run folder: NLL falls, the checkpoint reloads to identical actions, the
    mixture fits a deterministic target, and `cdp eval` reads it."""
    from cdp.policies.bc_gmm import BCGMMConfig, BCGMMPolicy

    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "gmm"
    cfg = tiny(p, "bc_gmm", out=out, **{"train.steps": 60, "policy.network.gmm_hidden": 32,
                                        "policy.network.gmm_layers": 2, "policy.network.gmm_modes": 3,
                                        "train.log_every": 10})
    res = run_il(cfg, log=quiet)
    assert res["diagnostics"]["skipped"].startswith("bc_gmm is not a diffusion policy")
    losses = [r["train/loss"] for r in json_lines(out / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    pol = load_policy(out / "checkpoints" / "last")
    assert isinstance(pol, BCGMMPolicy) and pol.config.num_modes == 3 and pol.config.hidden_dims == (32, 32)
    obs = torch.rand(4, 2, 20) * 400 + 50
    a1, a2 = pol.sample(obs), load_policy(out / "checkpoints" / "last").sample(obs)
    assert a1.shape == (4, 2) and torch.equal(a1, a2)
    if HAVE_GYM_PUSHT:
        assert set(res["eval"]) >= {"mean_max_coverage", "success_rate"}
        assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last"), "--eval.episodes", "1",
                     "--eval.max_steps", "8", "--train.threads", "1"]) == 0
    # the mixture fits a deterministic map obs -> action (in data units) from scratch
    torch.manual_seed(0)
    g = BCGMMPolicy(BCGMMConfig(obs_dim=3, action_dim=2, n_obs_steps=2, hidden_dims=(64, 64), num_modes=2))
    o = torch.rand(512, 2, 3)
    a = torch.stack([o[:, -1, 0] * 10 + 3, o[:, -1, 1] - o[:, 0, 2]], 1)
    g.fit_normalizers(o, a)
    opt = torch.optim.Adam(g.net.parameters(), lr=3e-3)
    for _ in range(400):
        loss, m = g.compute_loss(o, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    err = (g.sample(o) - a).abs().mean(0)
    assert err[0] < 0.3 and err[1] < 0.1, err  # ranges 10 and ~2; predicting the mean would give ~2.5 and ~0.4
    with pytest.raises(ValueError, match="obs must have shape"):
        g.sample(torch.rand(4, 3, 3))
    with pytest.raises(ValueError, match="actions contain NaN"):
        g.compute_loss(o[:2], torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="horizon and n_action_steps must be 1"):
        BCGMMConfig(obs_dim=3, action_dim=2, horizon=4)
    assert BCGMMConfig.from_dict(g.config.to_dict()) == g.config


def test_resume_a_run_made_before_a_config_field_existed(tmp_path):
    """A checkpoint whose recorded identity lacks keys added to the tree later resumes when this run keeps them at
    their preset values; a non-preset value is still a real difference."""
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "old"
    kw = {"eval.episodes": 0, "eval.diag_obs": 0}
    run_il(tiny(p, "dbc", out=out, **{**kw, "train.steps": 10}), log=quiet)
    meta_path = out / "checkpoints" / "last" / "policy.json"
    meta = json.loads(meta_path.read_text())
    for k in ("train.lr_warmup_steps", "policy.ema_power"):  # settings added later: absent from older runs
        del meta["identity"][k]
    meta_path.write_text(json.dumps(meta))
    res = run_il(tiny(p, "dbc", out=out, **kw), log=quiet)
    assert res["train"]["steps_run"] == 10
    with pytest.raises(ValueError, match="lr_warmup_steps"):  # a non-preset value is still a real difference
        run_il(tiny(p, "dbc", out=out, **{**kw, "train.steps": 30, "train.lr_warmup_steps": 3}), log=quiet)


def test_cli_compile_flag_is_a_real_boolean():
    """--train.compile takes true/false (a plain bool() type would read 'false' as True) and reaches the policy
    config."""
    parse = lambda *a: parse_job("train", ["--out", "o", *a])  # noqa: E731
    assert parse().train.compile is False
    assert parse("--train.compile", "true").train.compile is True
    assert parse("--train.compile", "false").train.compile is False
    assert parse("--train.compile", "True").train.compile is True
    assert policy_config(parse("--train.compile", "true", "--algo.name", "cdp_dbc"), 20, 2).compile is True
    with pytest.raises(SystemExit):
        parse("--train.compile", "maybe")
