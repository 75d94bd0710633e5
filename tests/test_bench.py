"""cdp bench: spec validation, grid expansion, skipping finished cells, aggregation numbers, a tiny toy grid on Ray."""
import csv
import json
import math
import statistics

import numpy as np
import torch
import pytest
import yaml

from cdp.sweep.executor import cell_resources, run_grid
from cdp.sweep.report import aggregate, bootstrap_ci, collect, iqm, mean_std, summarize
from cdp.sweep.spec import cell_dir, expand, load_spec, parse_spec
from cdp.cli import main, parse_job
from cdp.config import flatten

RL = {"name": "t", "job": "rl", "out": "OUT", "algos": ["bc", "cdp"], "datasets": ["PointMaze_UMaze-v3"],
      "fractions": [1.0, 0.1], "seeds": [0, 1, 2], "overrides": {"train.steps": 10, "eval.episodes": 2, "train.threads": 1}}


def _spec(tmp_path, **kw):
    d = {**RL, "out": str(tmp_path), **kw}
    return parse_spec(d)


def test_parse_and_defaults(tmp_path):
    s = _spec(tmp_path)
    assert s.job == "rl" and s.algos == ["bc", "cdp"] and s.fractions == [1.0, 0.1] and s.seeds == [0, 1, 2]
    assert s.root == tmp_path / "rl"
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**RL, "out": str(tmp_path)}))
    assert load_spec(p).overrides == {"train.steps": 10, "eval.episodes": 2, "train.threads": 1}
    # nested mappings and dotted keys mean the same (stored dotted)
    nested = _spec(tmp_path, overrides={"train": {"steps": 10, "threads": 1}, "eval.episodes": 2})
    assert nested.overrides == {"train.steps": 10, "train.threads": 1, "eval.episodes": 2}
    toy = parse_spec({"job": "toy", "algos": ["standard"], "seeds": 0})
    assert toy.datasets == ["fourmode"] and toy.fractions == [1.0] and toy.seeds == [0]


@pytest.mark.parametrize("change, msg", [
    ({"job": "sl"}, "'job' must be one of"),
    ({"algos": ["bc", "sac"]}, "unknown rl algos"),
    ({"fractions": [0.0]}, "fractions must be in"),
    ({"fractions": [1.0, 1.0]}, "duplicates"),
    ({"seeds": [0, "a"]}, "must be int"),
    ({"seeds": []}, "is empty"),
    ({"overrides": {"train.seed": 3}}, "may not set"),
    ({"overrides": {"train": {"seed": 3}}}, "may not set"),
    ({"overrides": {"data.path": "x.hdf5"}}, "may not set"),
    ({"overrides": {"stepz": 3}}, "unknown config key stepz"),
    ({"overrides": {"train.stepz": 3}}, "unknown config key train.stepz"),
    ({"overrides": {"train.steps": "many"}}, "train.steps.*expected an integer"),
    ({"overrides": {"policy.contraction.weight": 0.2}}, "overrides for bc: --policy.contraction.weight does not apply"),
    ({"datasets": ["a/b"]}, "plain name"),
    ({"bogus": 1}, "unknown keys"),
    ({"workers": 0}, "'workers' must be"),
])
def test_validation_errors(tmp_path, change, msg):
    with pytest.raises(ValueError, match=msg):
        _spec(tmp_path, **change)


def test_overrides_the_job_does_not_read_are_refused_naming_the_key():
    il = {"job": "il", "algos": ["dbc"], "datasets": ["pusht"], "seeds": [0]}
    with pytest.raises(ValueError, match="overrides for dbc: --algo.eta does not apply to cdp train"):
        parse_spec({**il, "overrides": {"algo.eta": 0.5}})
    with pytest.raises(ValueError, match="policy.network.unet_down_dims does not apply"):  # dbc is an MLP
        parse_spec({**il, "overrides": {"policy.network.unet_down_dims": [32, 64, 128]}})
    with pytest.raises(ValueError, match="unknown config key eval.bogus"):
        parse_spec({**il, "overrides": {"eval": {"bogus": 1}}})
    with pytest.raises(ValueError, match="overrides for standard: --data.size does not apply to cdp toy"):
        parse_spec({"job": "toy", "algos": ["standard"], "seeds": [0], "overrides": {"data.size": 10}})
    with pytest.raises(ValueError, match="algo_overrides may not set \\['data.size'\\]"):  # one shared dataset
        parse_spec({**RL, "algo_overrides": {"cdp": {"data.size": 10}}})
    assert parse_spec({**il, "algos": ["cdp_unet"], "overrides": {"policy.network.unet_down_dims": [32, 64, 128]}})


def test_cell_resources_ask_for_a_gpu_with_cuda():
    assert cell_resources(parse_spec(RL), "cdp") == {"num_cpus": 1, "num_gpus": 0}
    for dev in ("cpu", "auto"):
        s = parse_spec({**RL, "overrides": {**RL["overrides"], "train.device": dev}})
        assert cell_resources(s, "cdp") == {"num_cpus": 1, "num_gpus": 0}, dev
    for dev in ("cuda", "cuda:1"):
        s = parse_spec({**RL, "overrides": {**RL["overrides"], "train": {"device": dev}}})
        assert cell_resources(s, "bc") == cell_resources(s, "cdp") == {"num_cpus": 1, "num_gpus": 1}, dev
    s = parse_spec({**RL, "algo_overrides": {"cdp": {"train.device": "cuda"}}})  # one algo on the GPU
    assert cell_resources(s, "cdp")["num_gpus"] == 1 and cell_resources(s, "bc")["num_gpus"] == 0


def test_validation_job_specific():
    with pytest.raises(ValueError, match="no data fraction"):
        parse_spec({"job": "toy", "algos": ["standard"], "fractions": [0.5], "seeds": [0]})
    with pytest.raises(ValueError, match="unknown il tasks"):
        parse_spec({"job": "il", "algos": ["dbc"], "datasets": ["kitchen"], "seeds": [0]})
    with pytest.raises(ValueError, match="missing 'seeds'"):
        parse_spec({"job": "il", "algos": ["dbc"], "datasets": ["pusht"]})


def test_cli_reports_bad_spec(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("job: rl\nalgos: [nope]\nseeds: [0]\ndatasets: [x]\n")
    assert main(["bench", str(p), "--dry-run"]) == 2
    assert "unknown rl algos" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    capsys.readouterr()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**RL, "out": str(tmp_path / "o")}))
    assert main(["bench", str(good), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[todo] bc/PointMaze_UMaze-v3/frac1/seed0: python -m cdp.cli rl --algo.name bc" in out
    assert "12 cells, 0 finished" in out and not (tmp_path / "o").exists()  # a dry run writes nothing
    # several specs: all validated first (a bad one stops everything), then run in order
    good2 = tmp_path / "good2.yaml"
    good2.write_text(yaml.safe_dump({**RL, "algos": ["edp"], "seeds": [0], "out": str(tmp_path / "o2")}))
    assert main(["bench", str(good), str(p), "--dry-run"]) == 2
    assert "unknown rl algos" in capsys.readouterr().err
    assert main(["bench", str(good), str(good2), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.index("12 cells, 0 finished") < out.index("2 cells, 0 finished")
    assert main(["bench", str(good), str(good2), "--out", str(tmp_path), "--dry-run"]) == 2


def test_grid_expansion(tmp_path):
    s = _spec(tmp_path)
    cells = expand(s)
    assert len(cells) == 2 * 1 * 2 * 3
    c = cells[4]  # bc, frac 0.1, seed 1
    assert (c.algo, c.fraction, c.seed) == ("bc", 0.1, 1)
    assert c.out == (tmp_path / "rl" / "bc" / "PointMaze_UMaze-v3" / "frac0.1" / "seed1").absolute()
    a = c.args
    assert a[:3] == ["rl", "--algo.name", "bc"]
    for flag, v in [("--data.env", "PointMaze_UMaze-v3"), ("--data.fraction", "0.1"), ("--train.seed", "1"),
                    ("--train.steps", "10"), ("--eval.episodes", "2"), ("--train.threads", "1"), ("--out", str(c.out)),
                    ("--train.progress", "False")]:
        assert a[a.index(flag) + 1] == v
    # every cell command parses with the real sub-command parser
    cfg = parse_job("rl", c.args[1:])
    assert (cfg.algo.name, cfg.data.fraction, cfg.train.seed, cfg.train.steps) == ("bc", 0.1, 1, 10)
    assert cfg.out == str(c.out) and cfg.train.progress is False and cfg.eval.episodes == 2
    toy = expand(parse_spec({"job": "toy", "algos": ["standard", "cdp_all"], "seeds": [0, 1],
                             "overrides": {"train.steps": 20}, "out": str(tmp_path)}))
    assert len(toy) == 4 and toy[0].args[:3] == ["toy", "--algo.variants", "standard"]
    assert "--data.fraction" not in toy[0].args
    cfg = parse_job("toy", toy[3].args[1:])
    assert cfg.algo.variants == ["cdp_all"] and cfg.train.seed == 1 and cfg.train.steps == 20


def test_algo_overrides_and_shared_dataset(tmp_path):
    s = _spec(tmp_path, algo_overrides={"cdp": {"policy.contraction.weight": 0.2,
                                                "policy": {"schedule": {"num_steps": 20}}}})
    cells = {c.algo: c for c in expand(s) if c.fraction == 1.0 and c.seed == 0}
    assert "--policy.contraction.weight" not in cells["bc"].args
    a = cells["cdp"].args
    assert a[a.index("--policy.contraction.weight") + 1] == "0.2"
    assert a[a.index("--policy.schedule.num_steps") + 1] == "20"
    cfg = parse_job("rl", a[1:])
    assert cfg.policy.contraction.weight == 0.2 and cfg.policy.schedule.num_steps == 20
    data = a[a.index("--data.path") + 1]  # one generated dataset shared by all cells
    assert data == str((tmp_path / "rl" / "_data" / "dataset_PointMaze_UMaze-v3_n50000_noise0_seed0.hdf5").absolute())
    assert "--data.path" not in expand(_spec(tmp_path, shared_dataset=False))[0].args
    # the shared dataset is the one cdp rl would generate for the spec's data.* overrides (same name and call)
    s2 = _spec(tmp_path, overrides={**RL["overrides"], "data.size": 2000, "data.seed": 3, "data.action_noise": 0.1})
    a2 = expand(s2)[0].args
    assert a2[a2.index("--data.path") + 1].endswith("_data/dataset_PointMaze_UMaze-v3_n2000_noise0.1_seed3.hdf5")
    import cdp.datagen.maze as maze
    from cdp.sweep.executor import prepare_rl_datasets

    calls = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(maze, "generate_maze_dataset", lambda env, **kw: calls.append((env, kw)))
    try:
        prepare_rl_datasets(s2, {"PointMaze_UMaze-v3"}, log=lambda m: None)
    finally:
        monkey.undo()
    assert [(e, kw["n_steps"], kw["seed"], kw["action_noise"]) for e, kw in calls] == [("PointMaze_UMaze-v3", 2000, 3, 0.1)]
    with pytest.raises(ValueError, match="not in 'algos'"):
        _spec(tmp_path, algo_overrides={"edp": {"policy.contraction.weight": 0.2}})
    with pytest.raises(ValueError, match="algo_overrides.cdp may not set"):
        _spec(tmp_path, algo_overrides={"cdp": {"train.seed": 1}})


def test_d4rl_named_mujoco_dataset(tmp_path, monkeypatch):
    data_root = tmp_path / "data"
    s = _spec(tmp_path, datasets=["hopper-medium-replay", "PointMaze_UMaze-v3"],
              data={"root": str(data_root), "max_steps": 1000, "buffer_size": 1000})
    c = next(c for c in expand(s) if c.dataset == "hopper-medium-replay")
    a = c.args
    assert a[a.index("--data.env") + 1] == "Hopper-v5"
    assert a[a.index("--data.path") + 1] == str((data_root / "hopper" / "hopper-medium-replay-v5.hdf5").absolute())
    assert "hopper-medium-replay" in str(c.out)
    cfg, folder = s.mujoco_data("hopper-medium-replay")
    assert cfg.env_id == "Hopper-v5" and cfg.kinds == ("medium-replay",) and cfg.max_steps == 1000
    assert folder == (data_root / "hopper").absolute() and s.mujoco_data("PointMaze_UMaze-v3") is None
    with pytest.raises(ValueError, match="'data' does not make dataset 'hopper-medium-replay'.*buffer_size"):
        _spec(tmp_path, datasets=["hopper-medium-replay"], data={"max_steps": 10, "buffer_size": 5})
    with pytest.raises(ValueError, match="'data' does not make"):
        _spec(tmp_path, datasets=["walker2d-medium"], data={"no_such_field": 1})
    # prepare: the grid makes a missing MuJoCo dataset with that config (generation itself is tested elsewhere)
    import cdp.datagen.mujoco as mj
    from cdp.sweep.executor import prepare_rl_datasets

    calls = []
    monkeypatch.setattr(mj, "generate_mujoco_datasets", lambda cfg, out, **kw: calls.append((cfg.env_id, out)))
    prepare_rl_datasets(s, {"hopper-medium-replay"}, log=lambda m: None)
    assert calls == [("Hopper-v5", (data_root / "hopper").absolute())]


def test_il_robosuite_demos_are_made_once_and_passed(tmp_path, monkeypatch):
    spec = parse_spec({"name": "l", "job": "il", "out": str(tmp_path), "algos": ["dbc"], "datasets": ["lift", "pusht"],
                       "seeds": [0], "data": {"root": str(tmp_path / "d"), "n_demos": 7, "seed": 3}})
    cells = {c.dataset: c for c in expand(spec)}
    a = cells["lift"].args
    want = (tmp_path / "d" / "lift7_seed3.hdf5").absolute()
    assert a[a.index("--data.path") + 1] == str(want) and "--data.path" not in cells["pusht"].args
    assert a[a.index("--data.task") + 1] == "lift"
    import cdp.datagen.robosuite as rd
    from cdp.sweep.executor import prepare_il_demos

    calls = []
    monkeypatch.setattr(rd, "generate_robosuite_demos", lambda task, n, out, **kw: calls.append((task, n, out, kw["seed"]))
                        or {"demos": n, "attempts": n, "seconds": 0.0})
    prepare_il_demos(spec, {"lift", "pusht"}, log=lambda m: None)
    assert calls == [("lift", 7, want, 3)]
    with pytest.raises(ValueError, match="il 'data' keys"):
        parse_spec({"job": "il", "algos": ["dbc"], "datasets": ["lift"], "seeds": [0], "data": {"max_steps": 1}})


def test_unreachable_address(tmp_path, capsys):
    pytest.importorskip("ray")
    import socket
    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**RL, "out": str(tmp_path)}))
    assert main(["bench", str(p), "--address", f"ray://127.0.0.1:{port}"]) == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


def test_unfinished_cell_reruns_its_command_to_resume(tmp_path):
    """A cell with a checkpoint but no results file is not done, and its command is the same one (the sub-command
    resumes from the checkpoint of the same --out by itself)."""
    s = parse_spec({"job": "il", "algos": ["dbc"], "datasets": ["pusht"], "fractions": [0.1], "seeds": [0],
                    "out": str(tmp_path)})
    (c,) = expand(s)
    before = c.argv()
    (c.out / "checkpoints" / "last").mkdir(parents=True)
    (c.out / "checkpoints" / "last" / "policy.json").write_text("{}")
    assert not c.done and c.argv() == before and "--resume" not in before
    assert before[before.index("--out") + 1] == str(c.out)


SCORES = {("bc", 1.0): [10.0, 20.0, 60.0], ("bc", 0.1): [5.0, 7.0, 9.0],
          ("cdp", 1.0): [50.0, 70.0, 90.0], ("cdp", 0.1): [40.0, 41.0]}  # cdp frac 0.1 seed 2 unfinished


def _fake_rl(s):
    for (algo, frac), xs in SCORES.items():
        for seed, x in enumerate(xs):
            d = cell_dir(s.root, algo, "PointMaze_UMaze-v3", frac, seed)
            d.mkdir(parents=True)
            diag = {"lambda_hat_mean": -0.1 * (seed + 1), "frac_points_contractive": 0.5} if algo == "cdp" else None
            sec = (2.0 if algo == "bc" else 6.0) * (1 + seed)  # 10 steps: bc 200/400/600, cdp 3x that, s per 1k
            timing = {"train_s": sec}
            if seed < 2:  # runs made before the latency field existed lack it
                timing["act_ms_batch1"] = (1.0 if algo == "bc" else 4.0) + seed
            (d / "results.json").write_text(json.dumps({
                "normalized_score_mean": x, "success_rate": x / 100, "steps": 10, "timing": timing,
                "contraction_diagnostics": diag}))
            with open(d / "metrics.jsonl", "w") as f:
                for step in (5, 10):
                    f.write(json.dumps({"step": step, "time": 0.0, "eval/normalized_score_mean": x * step / 10}) + "\n")


def test_skip_finished(tmp_path):
    s = _spec(tmp_path)
    _fake_rl(s)
    cells = expand(s)
    todo = [c for c in cells if not c.done]
    assert [c.label() for c in todo] == ["cdp/PointMaze_UMaze-v3/frac0.1/seed2"]


def test_aggregation_numbers(tmp_path):
    s = _spec(tmp_path, baselines={"cdp": "bc"}, algo_overrides={"cdp": {"policy.contraction.weight": 0.2}})
    _fake_rl(s)
    rows = collect(s)
    assert len(rows) == 11
    summ = {(r["algo"], r["fraction"]): r for r in summarize(s, rows)}
    r = summ[("bc", 1.0)]
    assert r["n"] == 3
    assert r["main_mean"] == pytest.approx(30.0)
    assert r["main_std"] == pytest.approx(statistics.stdev([10, 20, 60]))  # 26.458
    assert r["main_std"] == pytest.approx(math.sqrt(((10 - 30) ** 2 + (20 - 30) ** 2 + (60 - 30) ** 2) / 2))
    assert r["main_iqm"] == pytest.approx(30.0)  # rliable/scipy trim int(0.25 * 3) = 0 values per side: the mean
    assert 10.0 <= r["main_ci_low"] <= 30.0 <= r["main_ci_high"] <= 60.0
    # the bootstrap CI is the percentile interval of resampled means: reproduce it by hand
    rng = np.random.default_rng(0)
    xs = np.array([10.0, 20.0, 60.0])
    means = xs[rng.integers(0, 3, size=(2000, 3))].mean(1)
    assert (r["main_ci_low"], r["main_ci_high"]) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    assert summ[("cdp", 0.1)]["n"] == 2 and summ[("cdp", 0.1)]["main_mean"] == pytest.approx(40.5)
    assert summ[("cdp", 1.0)]["sec_per_1k_mean"] == pytest.approx(1200.0)
    assert summ[("cdp", 1.0)]["lambda_mean_mean"] == pytest.approx(-0.2)
    assert math.isnan(summ[("bc", 1.0)]["lambda_mean_mean"])
    agg = aggregate(s)
    md = agg["markdown"]
    assert "| bc | PointMaze_UMaze-v3 | 1 | 3 | 30 ± 26.5 | 30 |" in md
    assert "| cdp | PointMaze_UMaze-v3 | 70 ± 20 | 40.5 ± 0.707 | -29.5 | 0.58 |" in md  # data-scarce table
    # compute cost: median [min, max] over cdp's 5 cells; every cdp cell is 3x its same-(fraction, seed) bc cell
    # latency: cdp cells with the field: seed 0 (4.0 ms) and seed 1 (5.0 ms) at both fractions → median 4.5, 4 cells
    assert "| cdp | PointMaze_UMaze-v3 | 1200.0 [600.0, 1800.0] | bc | 3.00 (n = 5) | 4.5 (4) |" in md
    assert "| bc | PointMaze_UMaze-v3 | 400.0 [200.0, 600.0] | – | – | 1.5 (4) |" in md
    assert "## Contraction" in md and "Unfinished cells (1)" in md
    assert "Overrides: `train.steps=10`, `train.threads=1`, `eval.episodes=2`" in md  # grouped by section
    assert "Overrides of cdp only: `policy.contraction.weight=0.2`" in md
    out = s.root / "summary"
    for f in ("summary.md", "summary.csv", "cells.csv", "bar.png", "curves.png"):
        assert (out / f).exists(), f
    assert len((out / "cells.csv").read_text().splitlines()) == 12


def test_stats_helpers():
    assert mean_std([1.0]) == (1.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    assert mean_std([1.0, float("nan"), 3.0])[0] == 2.0
    assert iqm([1, 2, 3, 4, 100, 5, 6, 7]) == pytest.approx(np.mean([3, 4, 5, 6]))
    assert bootstrap_ci([2.0]) == (2.0, 2.0)


def test_toy_grid_on_ray(tmp_path, capsys):
    pytest.importorskip("ray")
    spec = {"name": "tiny", "job": "toy", "out": str(tmp_path), "algos": ["standard", "cdp_all", "w1_all"],
            "seeds": [0, 1], "variants": {"w1_all": {"algo": "cdp_all", "policy.contraction.weight": 1.0}},
            "overrides": {"train.steps": 20, "data.n_data": 256, "eval.n_samples": 50, "policy.network.hidden": 16,
                          "policy.schedule.num_steps": 5, "eval.snapshots": 2, "train.threads": 1}}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(spec))
    assert main(["bench", str(p), "--workers", "2", "--no-plots"]) == 0
    out = capsys.readouterr().out
    s = load_spec(p)
    assert all(c.done for c in expand(s))
    res = json.loads((expand(s)[0].out / "toy_results.json").read_text())
    cfg = res["config"]
    assert (cfg["train"]["steps"], cfg["data"]["n_data"], cfg["eval"]["n_samples"], cfg["policy"]["network"]["hidden"],
            cfg["policy"]["schedule"]["num_steps"], cfg["train"]["threads"]) == (20, 256, 50, 16, 5, 1)
    assert cfg["algo"]["variants"] == ["standard"] and cfg["train"]["seed"] == 0 and cfg["train"]["progress"] is False
    assert "| standard | fourmode | 1 | 2 |" in out and "| cdp_all | fourmode | 1 | 2 |" in out
    # the variant: its own row, run as the cdp_all preset with its weight, measured against standard
    assert "| w1_all | fourmode | 1 | 2 |" in out
    # the long table of the ablation studies: settings from each cell's resolved config, one row per metric
    with open(s.root / "summary" / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert len({(r["variant"], r["seed"]) for r in rows}) == 6
    by = {(r["variant"], r["seed"], r["metric"]): r for r in rows}
    assert (by[("standard", "0", "off_support")]["weight"], by[("standard", "0", "off_support")]["t_range"]) == ("0.0", "")
    w1 = by[("w1_all", "1", "off_support")]
    assert (w1["task"], w1["weight"], w1["t_range"], w1["loss"], w1["margin"]) == ("toy", "1.0", "0-1", "hinge", "0.1")
    assert by[("cdp_all", "0", "off_support")]["weight"] == "0.1"
    assert float(w1["value"]) == json.loads((expand(s)[-1].out / "toy_results.json").read_text())[
        "variants"]["cdp_all"]["off_support"]
    vres = json.loads((expand(s)[-1].out / "toy_results.json").read_text())
    assert vres["config"]["algo"]["variants"] == ["cdp_all"] and vres["config"]["policy"]["contraction"]["weight"] == 1.0
    assert "| w1_all | fourmode | " in out
    assert "| cdp_all | fourmode | " in out and "standard |" in out  # compute-cost row with its base
    # everything finished: a second run skips all cells without starting Ray
    res2 = run_grid(s, workers=2, log=lambda *a: None)
    assert res2 == {"ran": 0, "skipped": 6, "failed": [], "nodes": {}}


def test_bench_fans_out_to_a_ray_cluster_by_address(tmp_path, capsys):
    """The same command with --address runs the cells on an existing multi-node Ray cluster (here: two local
    nodes of one CPU each, ray.cluster_utils.Cluster), and both nodes take cells."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        spec = {"name": "tiny", "job": "toy", "out": str(tmp_path), "algos": ["standard", "cdp_all"],
                "seeds": [0, 1], "overrides": {"train.steps": 20, "data.n_data": 256, "eval.n_samples": 50,
                                                "policy.network.hidden": 16, "policy.schedule.num_steps": 5,
                                                "eval.snapshots": 2, "train.threads": 1}}
        p = tmp_path / "tiny.yaml"
        p.write_text(yaml.safe_dump(spec))
        res = run_grid(load_spec(p), address=cluster.address, log=lambda *a: None)
        assert res["ran"] == 4 and res["failed"] == []
        assert len(set(res["nodes"].values())) == 2  # 4 one-CPU cells on two one-CPU nodes: both were used
        assert all(c.done for c in expand(load_spec(p)))
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()


def test_publish_replaces_only_the_marked_block(tmp_path):
    from cdp.sweep.report import check_publish_target, publish
    s = _spec(tmp_path / "runs", baselines={"cdp": "bc"})
    _fake_rl(s)
    agg = aggregate(s)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\nintro\n\n<!-- cdp bench: t -->\nOLD TABLE\n<!-- /cdp bench: t -->\n\noutro\n")
    publish(page, s, agg, "cdp bench spec.yaml --publish docs/results.md")
    text = page.read_text()
    assert text.startswith("# Results\n\nintro\n\n<!-- cdp bench: t -->\n") and text.endswith("<!-- /cdp bench: t -->\n\noutro\n")
    assert "OLD TABLE" not in text and "`cdp bench spec.yaml --publish docs/results.md`" in text
    assert "| bc | PointMaze_UMaze-v3 | 1 | 3 | 30 ± 26.5 | 30 |" in text
    assert "\n### t: rl grid" in text and "\n#### Main metric" in text  # headings demoted under the page's
    assert (page.parent / "figures" / "bench" / "t" / "bar.png").exists()
    assert "](figures/bench/t/bar.png)" in text
    publish(page, s, agg, "cdp bench spec.yaml --publish docs/results.md")
    assert page.read_text() == text  # idempotent
    for bad in ("no markers here\n", "<!-- /cdp bench: t -->\n<!-- cdp bench: t -->\n",
                "<!-- cdp bench: t -->\n<!-- cdp bench: t -->\n<!-- /cdp bench: t -->\n"):
        page.write_text(bad)
        with pytest.raises(ValueError, match="spec\\(s\\) t"):
            check_publish_target(page, ["t"])
    with pytest.raises(FileNotFoundError, match="no such markdown file"):
        check_publish_target(tmp_path / "missing.md", ["t"])


def test_cli_publish_checks_markers_before_running(tmp_path, capsys):
    spec = tmp_path / "t.yaml"
    spec.write_text(yaml.safe_dump({**RL, "out": str(tmp_path / "runs")}))
    page = tmp_path / "results.md"
    page.write_text("nothing marked\n")
    assert main(["bench", str(spec), "--publish", str(page), "--workers", "1"]) == 2
    assert "for spec(s) t" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran
    page.write_text("<!-- cdp bench: t -->\n<!-- /cdp bench: t -->\n")
    assert main(["bench", str(spec), "--publish", str(page), "--aggregate-only", "--no-plots"]) == 0
    assert "Unfinished cells (12)" in page.read_text()
    assert f"`cdp bench {spec} --publish {page}`" in page.read_text()


def test_median_call_ms_times_a_call():
    import time as _time

    from cdp.runs import median_call_ms
    calls = []
    ms = median_call_ms(lambda: (calls.append(torch.is_inference_mode_enabled()), _time.sleep(0.003)), n=5, warmup=2)
    assert len(calls) == 7 and all(calls)  # warm-up + timed calls, all under inference_mode
    calls.clear()
    median_call_ms(lambda: calls.append(torch.is_inference_mode_enabled()), n=3, warmup=0, inference_mode=False)
    assert calls == [False, False, False]
    assert 2.9 <= ms < 50


def test_every_shipped_spec_parses_and_expands():
    """configs/experiments/*.yaml (the specs results.md is made from) are valid: known job, algos, tasks and config
    keys; each algo's cell command parses with the real sub-command and carries every override's value."""
    from pathlib import Path

    from cdp.sweep.spec import COMMAND
    specs = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))
    assert len(specs) >= 8
    for path in specs:
        spec = load_spec(path)
        cells = expand(spec)
        assert cells and len(cells) == len({c.out for c in cells}), path.name
        for algo in spec.algos:
            c = next(c for c in cells if c.algo == algo)
            cfg = flatten(parse_job(COMMAND[spec.job], c.args[1:]).to_dict())
            for k, v in {**spec.overrides, **spec.algo_overrides.get(algo, {})}.items():
                assert cfg[k] == v, (path.name, algo, k, cfg[k], v)


def test_variants_are_named_settings_of_a_preset(tmp_path):
    """'variants' name a preset plus keys; they are listed in 'algos' like presets, run the preset with the keys
    (algo_overrides of the same name win) and are validated like any cell; bad definitions are refused."""
    base = {"job": "toy", "seeds": [0], "out": str(tmp_path)}
    s = parse_spec({**base, "algos": ["standard", "frob", "hinge_w0.3"],
                    "variants": {"frob": {"algo": "cdp_all", "policy.contraction.loss": "frobenius"},
                                 "hinge_w0.3": {"algo": "cdp_low10", "policy": {"contraction": {"weight": 0.3}}},
                                 "unused": {"algo": "cdp_all"}},
                    "algo_overrides": {"frob": {"policy.contraction.margin": 0.0}}})
    assert s.variants == {"frob": "cdp_all", "hinge_w0.3": "cdp_low10"} and s.preset("standard") == "standard"
    cells = {c.algo: c for c in expand(s)}
    assert cells["frob"].preset == "cdp_all" and cells["frob"].out.parts[-4] == "frob"
    cfg = parse_job("toy", cells["frob"].args[1:])
    assert cfg.algo.variants == ["cdp_all"] and cfg.policy.contraction.loss == "frobenius"
    assert cfg.policy.contraction.margin == 0.0
    cfg = parse_job("toy", cells["hinge_w0.3"].args[1:])
    assert cfg.algo.variants == ["cdp_low10"] and cfg.policy.contraction.weight == 0.3
    for variants, msg in [({"x": {"policy.contraction.weight": 0.3}}, "needs 'algo'"),
                          ({"x": {"algo": "nope"}}, "needs 'algo'"),
                          ({"cdp_all": {"algo": "cdp_all"}}, "name of a toy preset"),
                          ({"x y": {"algo": "cdp_all"}}, "plain name"),
                          ({"x": {"algo": "cdp_all", "policy.contraction.nope": 1}}, "overrides for x"),
                          ({"x": "cdp_all"}, "must map")]:
        with pytest.raises(ValueError, match=msg):
            parse_spec({**base, "algos": ["x"] if "x" in variants else list(variants), "variants": variants})
    with pytest.raises(ValueError, match="unknown toy algos"):
        parse_spec({**base, "algos": ["y"], "variants": {"x": {"algo": "cdp_all"}}})
