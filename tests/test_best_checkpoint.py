"""``eval.every`` in ``cdp train``: periodic closed-loop evaluations, ``checkpoints/best`` beside ``checkpoints/last``
(trainer hook ``fit(keep_best=...)``), ``eval_best`` / ``evals`` in results.json and the bench tables."""

import json

import pytest
import torch

import cdp.experiments.il as il
from cdp.cli import main
from cdp.envs.pusht import HAVE_GYM_PUSHT
from cdp.experiments.il import eval_checkpoint, run_il
from cdp.runs import load_checkpoint
from cdp.sweep.report import aggregate, collect, summarize
from cdp.sweep.spec import cell_dir, parse_spec

from demo_data import make_pusht_zarr
from test_il_job import quiet, tiny

KW = {"eval.diag_obs": 0, "eval.max_steps": 16, "train.steps": 20}


def scripted_eval(monkeypatch, values):
    """Replace the closed-loop evaluation by one returning ``values[i]`` as the main metric of its i-th call."""
    calls = []

    def fake(policy, episodes, max_steps=300, seed_start=100000, seed=0, **kw):
        v = values[len(calls)]
        calls.append(v)
        return {"mean_max_coverage": v, "success_rate": float(v > 0.95), "mean_max_reward": v,
                "max_coverage": [v] * episodes, "seconds": 0.0}

    monkeypatch.setattr(il, "evaluate_policy", fake)
    return calls


def ckpt_meta(run, name):
    return json.loads((run / "checkpoints" / name / "policy.json").read_text())


def test_best_is_the_max_of_the_periodic_evals_and_survives_a_resume(tmp_path, monkeypatch):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    kw = {**KW, "eval.episodes": 1, "eval.every": 5}
    calls = scripted_eval(monkeypatch, [0.2, 0.6, 0.4, 0.6])  # steps 5, 10, 15, 20
    full = run_il(tiny(p, "dbc", out=tmp_path / "full", **kw), log=quiet)
    assert len(calls) == 4  # the periodic evaluation at the final step is the final evaluation (not repeated)
    assert [r["step"] for r in full["evals"]] == [5, 10, 15, 20]
    assert full["eval"]["mean_max_coverage"] == 0.6 == full["evals"][-1]["mean_max_coverage"]
    b = full["eval_best"]
    assert (b["step"], b["metric"], b["value"]) == (10, "mean_max_coverage", 0.6)  # first of the tied maxima
    assert b["value"] == max(r["mean_max_coverage"] for r in full["evals"])
    assert b["checkpoint"] == str(tmp_path / "full" / "checkpoints" / "best")
    meta = ckpt_meta(tmp_path / "full", "best")
    assert meta["step"] == 10 and meta["best"] == {"metric": "mean_max_coverage", "value": 0.6}
    assert ckpt_meta(tmp_path / "full", "last")["step"] == 20
    assert not (tmp_path / "full" / "checkpoints" / "best" / "state.pt").exists()
    assert json.loads((tmp_path / "full" / "results.json").read_text())["eval_best"]["step"] == 10
    logged = [r for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
              if "eval/mean_max_coverage" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]

    # split run: 10 steps, then resumed to 20 with a worse second half; the best (step 10) is kept
    scripted_eval(monkeypatch, [0.2, 0.6])
    run_il(tiny(p, "dbc", out=tmp_path / "split", **{**kw, "train.steps": 10}), log=quiet)
    scripted_eval(monkeypatch, [0.4, 0.6])
    res = run_il(tiny(p, "dbc", out=tmp_path / "split", **kw), log=quiet)
    assert res["evals"] == full["evals"] and res["eval_best"]["step"] == 10 and res["eval_best"]["value"] == 0.6
    for name in ("best", "last"):
        ta, ma, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / name, with_state=False)
        tb, mb, _ = load_checkpoint(tmp_path / "split" / "checkpoints" / name, with_state=False)
        assert ma["step"] == mb["step"] and set(ta) == set(tb)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    # a resume whose new evaluation beats the best so far replaces it
    scripted_eval(monkeypatch, [0.9])
    res = run_il(tiny(p, "dbc", out=tmp_path / "split", **{**kw, "train.steps": 25}), log=quiet)
    assert (res["eval_best"]["step"], res["eval_best"]["value"]) == (25, 0.9)
    assert ckpt_meta(tmp_path / "split", "best")["step"] == 25


def test_every_zero_changes_nothing(tmp_path, monkeypatch):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    calls = scripted_eval(monkeypatch, [0.3])
    res = run_il(tiny(p, "dbc", out=tmp_path / "r", **{**KW, "eval.episodes": 1}), log=quiet)
    assert len(calls) == 1 and "evals" not in res and "eval_best" not in res
    assert not (tmp_path / "r" / "checkpoints" / "best").exists()
    # eval.every without episodes: nothing periodic either
    res = run_il(tiny(p, "dbc", out=tmp_path / "z", **{**KW, "eval.episodes": 0, "eval.every": 5}), log=quiet)
    assert "evals" not in res and not (tmp_path / "z" / "checkpoints" / "best").exists()


@pytest.mark.skipif(not HAVE_GYM_PUSHT, reason="gym-pusht not installed")
def test_real_periodic_eval_and_cdp_eval_on_best(tmp_path):
    p = make_pusht_zarr(tmp_path / "p.zarr")
    out = tmp_path / "run"
    res = run_il(tiny(p, "dbc", out=out, **{**KW, "train.steps": 10, "eval.episodes": 1, "eval.every": 5}),
                 log=quiet)
    assert [r["step"] for r in res["evals"]] == [5, 10]
    b = res["eval_best"]
    assert b["value"] == max(r["mean_max_coverage"] for r in res["evals"])
    ckpt = out / "checkpoints" / "best"
    ev = eval_checkpoint(ckpt, episodes=1, max_steps=16, seed=0)  # reproduces the in-run evaluation of that step
    assert ev["mean_max_coverage"] == pytest.approx(b["value"], abs=1e-9)  # same episode; float reductions may reorder
    assert main(["eval", "--checkpoint", str(ckpt), "--eval.episodes", "1", "--eval.max_steps", "16",
                 "--eval.json", str(tmp_path / "ev.json"), "--train.threads", "1"]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["mean_max_coverage"] == pytest.approx(b["value"], abs=1e-9)


def test_bench_il_tables_state_the_checkpoint_and_add_best(tmp_path):
    s = parse_spec({"name": "b", "job": "il", "out": str(tmp_path), "algos": ["dbc"], "datasets": ["pusht"],
                    "fractions": [1.0], "seeds": [0, 1]})
    for seed, (last, best) in enumerate([(0.5, 0.7), (0.3, None)]):
        d = cell_dir(s.root, "dbc", "pusht", 1.0, seed)
        d.mkdir(parents=True)
        res = {"eval": {"mean_max_coverage": last, "success_rate": 0.0}, "train": {"sec_per_1k_steps": 1.0}}
        if best is not None:
            res["eval_best"] = {"step": 10, "metric": "mean_max_coverage", "value": best}
        (d / "results.json").write_text(json.dumps(res))
    rows = collect(s)
    assert sorted(r["main"] for r in rows) == [0.3, 0.5]
    summ = summarize(s, rows)[0]
    assert summ["main_mean"] == pytest.approx(0.4) and summ["best_n"] == 1 and summ["best_mean"] == 0.7
    md = aggregate(s, plots=False)["markdown"]
    assert "Checkpoint evaluated: the final one (`checkpoints/last`" in md
    assert "optimistic: selected on the test episodes" in md
    assert "| dbc | pusht | 1 | 1 | 0.7 ± 0 | 0.5 ± 0 |" in md  # final: of the cells with a best
    for d in (cell_dir(s.root, "dbc", "pusht", 1.0, k) for k in (0, 1)):  # no eval_best anywhere: no such table
        r = json.loads((d / "results.json").read_text())
        r.pop("eval_best", None)
        (d / "results.json").write_text(json.dumps(r))
    assert "## Best checkpoint" not in aggregate(s, plots=False)["markdown"]
