import json

import torch

from cdp.diagnostics import off_support_fraction
from cdp.toy import MODE_CENTRES, ToyConfig, run_toy, toy_metrics


def test_toy_metrics_exact_cases():
    pts = MODE_CENTRES.repeat(25, 1)  # 100 points exactly on the centres, 25 per mode
    m = toy_metrics(torch.cat([pts, torch.zeros(100, 2)]), mode_std=0.1)  # + 100 points at the origin
    assert m["off_support"] == 0.5
    assert all(abs(m[f"mode{i}_share"] - 0.25) < 1e-12 for i in range(4)) and m["mode_share_tv"] < 1e-6
    ref = torch.randn(500, 2)
    assert off_support_fraction(ref[:100] * 0.5, ref, threshold=1e9) == 0.0
    assert off_support_fraction(ref[:10] + 100.0, ref) == 1.0


def test_toy_job_writes_figure_and_tables(tmp_path):
    cfg = ToyConfig(steps=40, snapshots=2, n_data=512, n_eval=100, hidden=32, num_steps=5, batch_size=64,
                    variants=["standard", "cdp_all"])
    res = run_toy(cfg, tmp_path, progress=False)
    for f in ("toy_samples.png", "toy_lambda.png", "toy_table.md", "toy_results.json", "config.yaml", "metrics.jsonl"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "toy_results.json").read_text())
    assert set(saved["variants"]) == {"standard", "cdp_all"}
    for m in res["variants"].values():
        assert 0 <= m["off_support"] <= 1 and m["div_ratio_median"] >= 0 and m["div_bound_median"] >= 0
    assert "CDP (all steps)" in (tmp_path / "toy_table.md").read_text()
