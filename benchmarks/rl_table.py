"""Aggregate `cdp rl` runs (results.json) into the markdown table of docs/results_rl.md.

    python benchmarks/rl_table.py runs/rl/cmp runs/rl/probe

A run folder is named ``<algo>_f<fraction>_s<seed>`` (``edpeta0`` = EDP with η = 0, i.e. a diffusion-BC ablation);
``runs/rl/probe/{edp,cdp,edp_eta0}_s0`` (same settings, plus periodic
evaluations that do not touch the training RNG) count as ``f1_s0``. Training seconds exclude evaluation time
(for runs with periodic evaluations, the logged time between each step's train and eval records is subtracted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def eval_seconds(run: Path, eval_steps: set[int]) -> float:
    """Seconds spent in the periodic evaluations at ``eval_steps``, from metrics.jsonl timestamps."""
    train_t, total = {}, 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if any(k.startswith("train/") for k in r):
            train_t[r["step"]] = r["time"]
        if any(k.startswith("eval/") for k in r) and r["step"] in train_t and r["step"] in eval_steps:
            total += r["time"] - train_t[r["step"]]
    return total


def collect(roots: list[str]) -> dict:
    rows: dict = {}
    for root in roots:
        for res in sorted(Path(root).glob("*/results.json")):
            name = res.parent.name
            if name in ("edp_s0", "cdp_s0", "edp_eta0_s0"):
                name = name.replace("edp_eta0", "edpeta0").replace("_s0", "_f1_s0")
            parts = name.split("_")
            if len(parts) != 3 or not parts[1].startswith("f"):
                continue
            r = json.loads(res.read_text())
            train_s = r["timing"]["train_s"] - eval_seconds(res.parent, {e["step"] for e in r["evals"]})
            r["train_s_per_1k"] = 1000 * train_s / r["steps"]
            rows.setdefault((parts[0], float(parts[1][1:])), {})[int(parts[2][1:])] = r
    return rows


def fmt_stats(x):
    x = np.asarray(x, float)
    return f"{x.mean():.1f} ± {x.std(ddof=1) if len(x) > 1 else 0:.1f}"


def main(roots: list[str]) -> None:
    rows = collect(roots)
    print("| algo | data | seeds | normalized score (mean ± std over seeds) | per seed (0, 1, 2) | success rate | "
          "train s / 1k steps | mean λ̂ | max λ̂ | % points λ̂<0 | % trajectories λ̂<0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"bc": 0, "edpeta0": 1, "edp": 2, "cdp": 3}
    for (algo, frac) in sorted(rows, key=lambda k: (-k[1], order[k[0]])):
        runs = rows[(algo, frac)]
        seeds = sorted(runs)
        sc = [runs[s]["normalized_score_mean"] for s in seeds]
        per = ", ".join(f"{runs[s]['normalized_score_mean']:.1f}" for s in seeds)
        succ = [runs[s]["success_rate"] for s in seeds]
        tps = [runs[s]["train_s_per_1k"] for s in seeds]
        diags = [runs[s]["contraction_diagnostics"] for s in seeds if runs[s]["contraction_diagnostics"]]
        if diags:
            d = {k: [x[k] for x in diags] for k in diags[0]}
            dcols = (f"{fmt_stats(d['lambda_hat_mean']).replace(' ± ', ' ± ')} ",
                     f"{fmt_stats(d['lambda_hat_max'])}",
                     f"{fmt_stats(100 * np.asarray(d['frac_points_contractive']))}",
                     f"{fmt_stats(100 * np.asarray(d['frac_trajectories_contractive']))}")
            dcols = tuple(c.strip() for c in dcols)
            lam = [f"{np.mean(d['lambda_hat_mean']):+.3f} ± {np.std(d['lambda_hat_mean'], ddof=1) if len(diags) > 1 else 0:.3f}",
                   f"{np.mean(d['lambda_hat_max']):+.3f} ± {np.std(d['lambda_hat_max'], ddof=1) if len(diags) > 1 else 0:.3f}",
                   dcols[2], dcols[3]]
        else:
            lam = ["–"] * 4
        print(f"| {algo} | {100 * frac:g}% | {','.join(map(str, seeds))} | {fmt_stats(sc)} | {per} | "
              f"{np.mean(succ):.2f} | {np.mean(tps):.0f} | " + " | ".join(lam) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/rl/cmp", "runs/rl/probe"])
