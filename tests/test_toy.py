import json

import pytest
import torch

from cdp.cli import main
from cdp.config import apply, base_config
from cdp.diagnostics import off_support_fraction
from cdp.experiments.toy import MODE_CENTRES, run_toy, toy_metrics, validate


def test_toy_metrics_exact_cases():
    pts = MODE_CENTRES.repeat(25, 1)  # 100 points exactly on the centres, 25 per mode
    m = toy_metrics(torch.cat([pts, torch.zeros(100, 2)]), mode_std=0.1)  # + 100 points at the origin
    assert m["off_support"] == 0.5
    assert all(abs(m[f"mode{i}_share"] - 0.25) < 1e-12 for i in range(4)) and m["mode_share_tv"] < 1e-6
    ref = torch.randn(500, 2)
    assert off_support_fraction(ref[:100] * 0.5, ref, threshold=1e9) == 0.0
    assert off_support_fraction(ref[:10] + 100.0, ref) == 1.0


def test_toy_job_writes_figure_and_tables(tmp_path):
    cfg = apply(base_config("toy"), {
        "out": str(tmp_path), "train.steps": 40, "eval.snapshots": 2, "data.n_data": 512, "eval.n_samples": 100,
        "policy.network.hidden": 32, "policy.schedule.num_steps": 5, "train.batch_size": 64,
        "algo.variants": ["standard", "cdp_all"], "train.progress": False})
    res = run_toy(cfg, log=lambda *a: None)
    for f in ("toy_samples.png", "toy_lambda.png", "toy_table.md", "toy_results.json", "config.yaml", "metrics.jsonl"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "toy_results.json").read_text())
    assert set(saved["variants"]) == {"standard", "cdp_all"}
    assert saved["config"]["train"]["steps"] == 40 and saved["config"]["algo"]["variants"] == ["standard", "cdp_all"]
    assert saved["snap_steps"] == [20, 40]
    for m in res["variants"].values():
        assert 0 <= m["off_support"] <= 1 and m["div_ratio_median"] >= 0 and m["div_bound_median"] >= 0
    assert "CDP (all steps)" in (tmp_path / "toy_table.md").read_text()
    with pytest.raises(ValueError, match="finished cdp toy run"):  # a finished folder is not overwritten
        run_toy(cfg, log=lambda *a: None)


@pytest.mark.parametrize("change, msg", [
    ({"algo.variants": ["standard", "cdp_some"]}, "algo.variants"),
    ({"algo.variants": []}, "algo.variants"),
    ({"eval.snapshots": 0}, "eval.snapshots"),
    ({"train.steps": 3, "eval.snapshots": 4}, "eval.snapshots"),
    ({"data.mode_std": 0.0}, "data.mode_std"),
    ({"data.n_data": 3}, "data.n_data"),
    ({"eval.n_samples": 5}, "eval.n_samples"),
])
def test_toy_settings_out_of_range_are_refused(change, msg):
    with pytest.raises(ValueError, match=msg):
        validate(apply(base_config("toy"), change))


def test_toy_cli(tmp_path, capsys):
    out = tmp_path / "toy"
    argv = ["toy", "--out", str(out), "--train.steps", "4", "--train.progress", "False", "--eval.snapshots", "1",
            "--data.n_data", "64", "--eval.n_samples", "20", "--policy.network.hidden", "8",
            "--policy.schedule.num_steps", "3", "--train.batch_size", "16", "--algo.variants", "standard",
            "--log.tensorboard", "False"]
    assert main(argv) == 0
    assert "standard diffusion" in capsys.readouterr().out
    cfg = json.loads((out / "toy_results.json").read_text())["config"]
    assert cfg["job"] == "toy" and cfg["train"]["steps"] == 4 and cfg["algo"]["variants"] == ["standard"]
    assert main(argv) == 2  # a finished folder: one clear line, nothing overwritten
    assert "finished cdp toy run" in capsys.readouterr().err
    assert main(["toy", "--out", str(tmp_path / "t2"), "--algo.eta", "0.5"]) == 2  # a key the toy job does not read
    assert "--algo.eta does not apply to cdp toy" in capsys.readouterr().err


def test_saved_config_reproduces_the_toy_run(tmp_path):
    """The config.yaml of a cdp toy run, re-run into a new folder through --config, gives the same results."""
    import json

    from cdp.cli import main

    args = ["--train.steps", "6", "--data.n_data", "64", "--eval.n_samples", "32", "--eval.snapshots", "1",
            "--policy.network.hidden", "16", "--algo.variants", "standard", "cdp_all", "--train.progress", "False",
            "--log.tensorboard", "False"]
    assert main(["toy", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["toy", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")]) == 0
    ra, rb = (json.loads((tmp_path / d / "toy_results.json").read_text()) for d in "ab")
    for v in ("standard", "cdp_all"):
        for k in ("off_support", "mode_share_tv", "lambda_hat_mean", "div_ratio_median"):
            assert ra["variants"][v][k] == rb["variants"][v][k], (v, k)
    ca, cb = ra["config"], rb["config"]
    assert {**ca, "out": None} == {**cb, "out": None}
