"""The PushT imitation-learning job (cdp.il) and its CLI (cdp train / cdp eval) on a tiny synthetic replay buffer."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from cdp.cli import build_parser, main
from cdp.envs.pusht import HAVE_GYM_PUSHT
from cdp.policy import DiffusionPolicy
from cdp.il import PRESETS, ILConfig, action_offset_for, eval_checkpoint, make_windows, resolve_zarr, run_il
from cdp.runs import load_checkpoint, load_policy

from datasets import make_pusht_zarr

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_pusht():
    p = os.environ.get("CDP_PUSHT_ZARR") or str(REPO_ROOT / ".." / "shared" / "data" / "pusht" /
                                                 "pusht_cchi_v7_replay.zarr")
    return p if os.path.exists(p) else None


def tiny(zarr_path, **kw):
    base = dict(zarr=zarr_path, policy="cdp_unet", steps=20, batch_size=16, lr=1e-3, log_every=5, ckpt_every=0,
                unet_down_dims=(16, 32), unet_time_embed_dim=16, dit_d_model=16, dit_layers=1, dit_heads=2,
                mlp_hidden=32, mlp_layers=2, num_diffusion_steps=10, eval_inference_steps=4,
                eval_episodes=1 if HAVE_GYM_PUSHT else 0, eval_max_steps=16, diag_obs=1, diag_samples=2)
    base.update(kw)
    return ILConfig(**base)


def test_presets_and_windows(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    from cdp.data.il import load_pusht_lowdim
    ds = load_pusht_lowdim(p)
    for name, (net, H, To, Ta, contractive) in PRESETS.items():
        pc = tiny(p, policy=name).policy_config(20, 2)
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
    assert ILConfig(policy="dp_unet").diag_sizes() == (1, 1) and ILConfig(policy="cdp_dbc").diag_sizes() == (2, 4)
    with pytest.raises(ValueError, match="preset"):
        ILConfig(policy="nope")
    with pytest.raises(ValueError, match="fraction"):
        ILConfig(fraction=1.5)
    with pytest.raises(ValueError, match="eval_inference_steps"):
        ILConfig(num_diffusion_steps=10, eval_inference_steps=16)


def test_run_il_writes_run_and_reloads(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "run"
    cfg = tiny(p, policy="dp_unet")
    res = run_il(cfg, out, progress=False)
    ckpt = out / "checkpoints" / "last"
    assert (ckpt / "model.safetensors").exists() and (out / "config.yaml").exists()
    saved = json.loads((out / "results.json").read_text())
    for k in ("config", "policy_config", "data", "n_params", "train", "eval", "diagnostics", "checkpoint"):
        assert k in saved
    assert saved["data"]["episodes"] == 4 and saved["train"]["steps_run"] == 20
    assert saved["timing"]["act_ms_batch1"] > 0
    assert np.isfinite(saved["diagnostics"]["lambda_hat_mean"])
    assert any("train/loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert yaml.safe_load((out / "config.yaml").read_text())["il"]["policy"] == "dp_unet"
    # the saved EMA policy gives identical actions on reload
    a, b = load_policy(ckpt), load_policy(ckpt)
    obs = torch.rand(3, 2, 20) * 400 + 50
    xa = a.sample(obs, generator=torch.Generator().manual_seed(1))
    xb = b.sample(obs, generator=torch.Generator().manual_seed(1))
    assert xa.shape == (3, 16, 2) and torch.equal(xa, xb)
    if HAVE_GYM_PUSHT:  # evaluating the checkpoint reproduces the in-run evaluation exactly
        ev = eval_checkpoint(ckpt, episodes=1, max_steps=16, seed=cfg.seed)
        assert ev["max_coverage"] == res["eval"]["max_coverage"]
        assert main(["eval", "--checkpoint", str(ckpt), "--episodes", "1", "--max-steps", "16", "--seed",
                     str(cfg.seed), "--video", str(tmp_path / "vid"), "--video-episodes", "1", "--threads", "1"]) == 0
        assert (tmp_path / "vid" / "pusht_seed100000.gif").stat().st_size > 0
        assert set(res["eval"]) >= {"mean_max_coverage", "success_rate", "mean_max_reward"}


def test_cdp_unet_trains_with_contraction_metrics(tmp_path):
    # power-iteration regulariser on d = H*Da = 32 is the expensive part: regularise 2 samples for 2 steps
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "cdp"
    run_il(tiny(p, steps=2, log_every=1, cdp_max_samples=2, eval_episodes=0, diag_obs=0), out, progress=False)
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/contraction/lambda_max_mean" in r for r in rec)
    assert load_policy(out / "checkpoints" / "last").config.contraction["weight"] == 0.1


def test_resume_matches_uninterrupted(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    kw = dict(policy="dbc", eval_episodes=0, diag_obs=0)
    run_il(tiny(p, steps=20, **kw), tmp_path / "full", progress=False)
    run_il(tiny(p, steps=10, **kw), tmp_path / "split", progress=False)
    res = run_il(tiny(p, steps=20, **kw), tmp_path / "split", resume=True, progress=False)
    assert res["train"]["steps_run"] == 10
    ta, ma, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "last")
    tb, mb, _ = load_checkpoint(tmp_path / "split" / "checkpoints" / "last")
    assert ma["step"] == mb["step"] == 20
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    with pytest.raises(ValueError, match="settings differ"):
        run_il(tiny(p, steps=30, lr=5e-4, **kw), tmp_path / "split", resume=True, progress=False)


def test_cli_parse_config_file_and_overrides(tmp_path):
    args = build_parser().parse_args(["train", "--task", "pusht", "--policy", "cdp_unet", "--fraction", "0.1",
                                      "--steps", "2000", "--seed", "0", "--out", "runs/x", "--zarr", "Z"])
    cfg = config_from_args(args)
    assert (cfg.policy, cfg.fraction, cfg.steps, cfg.seed, cfg.zarr) == ("cdp_unet", 0.1, 2000, 0, "Z")
    assert cfg.max_episodes == 90 and args.out == "runs/x" and args.func.__name__ == "_run_train"
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"policy": "dbc", "steps": 50, "cdp_t_range": [0.0, 0.1], "max_episodes": None}))
    args = build_parser().parse_args(["train", "--config", str(y), "--steps", "70", "--out", "o",
                                      "--unet-down-dims", "32", "64", "--cdp-max-samples", "none"])
    cfg = config_from_args(args)
    assert (cfg.policy, cfg.steps, cfg.cdp_t_range, cfg.max_episodes) == ("dbc", 70, (0.0, 0.1), None)
    assert cfg.unet_down_dims == (32, 64) and cfg.cdp_max_samples is None
    args = build_parser().parse_args(["eval", "--checkpoint", "runs/x/checkpoints/last", "--episodes", "50"])
    assert args.episodes == 50 and args.func.__name__ == "_run_eval"


def test_missing_files_give_one_clear_line(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.zarr")
    assert main(["train", "--out", str(tmp_path / "o"), "--zarr", missing, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err and "CDP_PUSHT_ZARR" in err
    monkeypatch.setenv("CDP_PUSHT_ZARR", missing)
    with pytest.raises(FileNotFoundError, match="CDP_PUSHT_ZARR"):
        resolve_zarr(None)
    assert main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "not a cdp checkpoint" in capsys.readouterr().err


def test_cli_train_end_to_end(tmp_path, capsys):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "cli"
    rc = main(["train", "--policy", "cdp_dbc", "--steps", "10", "--batch-size", "16", "--mlp-hidden", "32",
               "--num-diffusion-steps", "10", "--eval-inference-steps", "4", "--eval-episodes", "0",
               "--diag-samples", "2", "--diag-obs", "1", "--zarr", p, "--out", str(out), "--no-progress",
               "--threads", "1"])
    assert rc == 0 and (out / "results.json").exists()
    assert "eval: skipped" in capsys.readouterr().out


@pytest.mark.skipif(real_pusht() is None, reason="real PushT zarr not available")
def test_real_pusht_smoke(tmp_path):
    cfg = ILConfig(zarr=real_pusht(), policy="cdp_dbc", fraction=0.1, steps=20, batch_size=32, mlp_hidden=64,
                   mlp_layers=2, num_diffusion_steps=20, eval_inference_steps=4,
                   eval_episodes=1 if HAVE_GYM_PUSHT else 0, eval_max_steps=10, diag_obs=0)
    res = run_il(cfg, tmp_path / "real", progress=False)
    assert res["data"]["episodes"] == 9 and res["data"]["windows"] > 500  # 10 % of the 90-demo pool
    assert np.isfinite(res["train"]["final_loss"])
    if HAVE_GYM_PUSHT:
        assert 0.0 <= res["eval"]["mean_max_coverage"] <= 1.0


def test_fraction_is_of_the_capped_pool(tmp_path):
    """fraction is taken of the max_episodes pool (nested subsets), not of all episodes before the cap."""
    from cdp.il import load_demos
    p = make_pusht_zarr(tmp_path / "p.zarr", lengths=(20, 22, 24, 26, 28, 30, 32, 34))
    for seed in range(3):
        pool = load_demos(ILConfig(zarr=p, max_episodes=4, seed=seed))
        half = load_demos(ILConfig(zarr=p, max_episodes=4, fraction=0.5, seed=seed))
        full = load_demos(ILConfig(zarr=p, max_episodes=4, fraction=1.0, seed=seed))
        assert pool.n_episodes == full.n_episodes == 4
        assert half.n_episodes == 2  # was min(round(0.5 * 8), 4) = 4: the same demos as fraction 1
        assert set(half.meta["episode_ids"]) <= set(pool.meta["episode_ids"])
    assert load_demos(ILConfig(zarr=p, max_episodes=None, fraction=0.25)).n_episodes == 2


def test_il_contraction_defaults_follow_contraction_config():
    """The IL job's contraction settings default to ContractionConfig's (max_samples 16), not to 'whole batch'."""
    from cdp.contraction import ContractionConfig
    cc = ILConfig(policy="cdp_dbc").policy_config(20, 2).contraction_config()
    ref = ContractionConfig()
    assert cc.max_samples == ref.max_samples == 16
    assert (cc.loss, cc.estimator, cc.weight, cc.margin, cc.t_range) == (ref.loss, ref.estimator, ref.weight,
                                                                         ref.margin, ref.t_range)
    assert ILConfig(policy="cdp_dbc", cdp_max_samples=None).policy_config(20, 2).contraction_config().max_samples is None


def test_cli_none_overrides_non_none_defaults(tmp_path):
    """'none' on the command line must reach ILConfig even where the default is not None (it used to be dropped:
    --max-episodes none trained on 90 demos, --cdp-max-samples none on 16 samples)."""
    args = build_parser().parse_args(["train", "--out", "o", "--max-episodes", "none", "--grad-clip", "none",
                                      "--cdp-max-samples", "none"])
    cfg = config_from_args(args)
    assert cfg.max_episodes is None and cfg.grad_clip is None and cfg.cdp_max_samples is None
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"max_episodes": 10, "cdp_max_samples": 4}))
    cfg = config_from_args(build_parser().parse_args(["train", "--out", "o", "--config", str(y)]))
    assert (cfg.max_episodes, cfg.cdp_max_samples, cfg.grad_clip) == (10, 4, 1.0)  # YAML kept, defaults elsewhere
    cfg = config_from_args(build_parser().parse_args(["train", "--out", "o", "--config", str(y),
                                                      "--max-episodes", "none"]))
    assert cfg.max_episodes is None and cfg.cdp_max_samples == 4


def test_bc_gmm_job_learns_saves_reloads_and_evaluates(tmp_path):
    """BC-GMM through the same job and run folder: NLL falls, the checkpoint reloads to identical actions, the
    mixture fits a deterministic target, and `cdp eval` reads it."""
    from cdp.policies.bc_gmm import BCGMMConfig, BCGMMPolicy

    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "gmm"
    cfg = tiny(p, policy="bc_gmm", steps=60, gmm_hidden=32, gmm_layers=2, gmm_modes=3, log_every=10)
    res = run_il(cfg, out, progress=False)
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
        assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last"), "--episodes", "1",
                     "--max-steps", "8", "--threads", "1"]) == 0
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


def json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_resume_a_run_made_before_a_config_field_existed(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "old"
    run_il(tiny(p, policy="dbc", steps=10, eval_episodes=0, diag_obs=0), out, progress=False)
    c = yaml.safe_load((out / "config.yaml").read_text())
    for k in ("gmm_hidden", "gmm_layers", "gmm_modes"):  # fields added later: absent from older runs
        del c["il"][k]
    (out / "config.yaml").write_text(yaml.safe_dump(c))
    res = run_il(tiny(p, policy="dbc", steps=20, eval_episodes=0, diag_obs=0), out, resume=True, progress=False)
    assert res["train"]["steps_run"] == 10
    with pytest.raises(ValueError, match="gmm_modes"):  # a non-default value is still a real difference
        run_il(tiny(p, policy="dbc", steps=30, eval_episodes=0, diag_obs=0, gmm_modes=3), out, resume=True,
               progress=False)


def test_cli_compile_flag_is_a_real_boolean():
    """--compile takes true/false (a plain bool() type would read 'false' as True) and reaches the policy config."""
    parse = lambda *a: config_from_args(build_parser().parse_args(["train", "--out", "o", *a]))  # noqa: E731
    assert parse().compile is False
    assert parse("--compile", "true").compile is True and parse("--compile", "false").compile is False
    assert parse("--compile", "true", "--policy", "cdp_dbc").policy_config(20, 2).compile is True
    with pytest.raises(SystemExit):
        parse("--compile", "maybe")
