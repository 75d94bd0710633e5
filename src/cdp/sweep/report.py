"""Aggregating a ``cdp bench`` grid over seeds: per-cell numbers from the results files, statistics,
markdown / CSV tables, learning curves and PNG plots, and publishing them into a marked markdown block."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

from .spec import DEFAULT_BASELINES, MAIN_METRIC, RESULT_FILE, Spec, expand
from .._optional import optional


# ---------------------------------------------------------------------------------------------------- aggregation
def _get(d: Any, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _num(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return x


def extract(job: str, algo: str, res: dict) -> dict[str, float]:
    """Per-cell numbers from a results file: ``main`` (the job's main metric), ``success``, ``sec_per_1k``,
    ``lambda_mean``, ``frac_contractive``, ``best`` (il: the main metric of ``eval_best``, the best periodic
    evaluation) (nan when absent). il's ``main`` is the final checkpoint's (``eval``, ``checkpoints/last``)."""
    nan = float("nan")
    if job == "rl":
        steps = _num(res.get("steps"))
        train_s = _num(_get(res, "timing", "train_s"))
        diag = res.get("contraction_diagnostics") or {}
        return {"main": _num(res.get("normalized_score_mean")), "success": _num(res.get("success_rate")),
                "sec_per_1k": 1000 * train_s / steps if steps and steps > 0 else nan,
                "act_ms": _num(_get(res, "timing", "act_ms_batch1")),
                "lambda_mean": _num(diag.get("lambda_hat_mean")),
                "frac_contractive": _num(diag.get("frac_points_contractive"))}
    if job == "il":
        ev = res.get("eval") or {}
        diag = res.get("diagnostics") or {}
        # PushT: mean max-coverage; robosuite tasks (no coverage): the success rate is the main metric
        main = ev.get("mean_max_coverage", ev.get("success_rate"))
        return {"main": _num(main), "success": _num(ev.get("success_rate")),
                "sec_per_1k": _num(_get(res, "train", "sec_per_1k_steps")),
                "act_ms": _num(_get(res, "timing", "act_ms_batch1")),
                "lambda_mean": _num(diag.get("lambda_hat_mean")), "frac_contractive": _num(diag.get("frac_contractive")),
                "best": _num(_get(res, "eval_best", "value"))}
    m = _get(res, "variants", algo) or {}
    steps = _num(_get(res, "config", "train", "steps"))
    return {"main": _num(m.get("off_support")), "success": nan,
            "sec_per_1k": 1000 * _num(m.get("train_seconds")) / steps if steps and steps > 0 else nan,
            "act_ms": nan,
            "lambda_mean": _num(m.get("lambda_hat_mean")), "frac_contractive": _num(m.get("frac_contractive"))}


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value; nan for none)."""
    xs = _finite(xs)
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def iqm(xs) -> float:
    """Interquartile mean (rliable): the mean of the middle 50% (scipy.stats.trim_mean(x, 0.25))."""
    trim_mean = optional("scipy.stats", "bench", "the IQM of cdp bench").trim_mean

    xs = _finite(xs)
    return float(trim_mean(xs, 0.25)) if xs else float("nan")


def bootstrap_ci(xs, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over seeds (resampling seeds with replacement)."""
    import numpy as np

    xs = np.asarray(_finite(xs), dtype=float)
    if xs.size == 0:
        return float("nan"), float("nan")
    if xs.size == 1:
        return float(xs[0]), float(xs[0])
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, xs.size, size=(n_boot, xs.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def collect(spec: Spec) -> list[dict]:
    """One row per finished cell: the grid coordinates plus :func:`extract`'s numbers."""
    rows = []
    for c in expand(spec):
        p = c.out / RESULT_FILE[spec.job]
        if not p.exists():
            continue
        res = json.loads(p.read_text())
        rows.append({"algo": c.algo, "dataset": c.dataset, "fraction": c.fraction, "seed": c.seed,
                     **extract(spec.job, c.preset, res), "path": str(c.out)})
    return rows


def summarize(spec: Spec, rows: list[dict]) -> list[dict]:
    """Per (algo, dataset, fraction) in grid order: n, mean/std/IQM/bootstrap CI of the main metric, and
    mean ± std of success, sec_per_1k, lambda_mean, frac_contractive."""
    out = []
    for algo in spec.algos:
        for ds in spec.datasets:
            for frac in spec.fractions:
                g = [r for r in rows if (r["algo"], r["dataset"], r["fraction"]) == (algo, ds, frac)]
                if not g:
                    continue
                main = [r["main"] for r in g]
                m, s = mean_std(main)
                lo, hi = bootstrap_ci(main)
                row = {"algo": algo, "dataset": ds, "fraction": frac, "n": len(_finite(main)), "seeds": len(g),
                       "main_mean": m, "main_std": s, "main_iqm": iqm(main), "main_ci_low": lo, "main_ci_high": hi}
                for k in ("success", "sec_per_1k", "lambda_mean", "frac_contractive"):
                    row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in g])
                if "best" in g[0]:  # il: the best periodic evaluation, and the final one of the same cells
                    gb = [r for r in g if math.isfinite(r["best"])]
                    row["best_n"] = len(gb)
                    row["best_mean"], row["best_std"] = mean_std([r["best"] for r in gb])
                    row["best_final_mean"], row["best_final_std"] = mean_std([r["main"] for r in gb])
                out.append(row)
    return out


def _baseline(spec: Spec, algo: str) -> str | None:
    b = spec.baselines.get(algo, DEFAULT_BASELINES.get(algo, DEFAULT_BASELINES.get(spec.preset(algo))))
    return b if b in spec.algos and b != algo else None


def _f(x: float, fmt: str = "{:.3g}") -> str:
    return "–" if x is None or not math.isfinite(x) else fmt.format(x)


def _pm(m: float, s: float, fmt: str = "{:.3g}") -> str:
    return "–" if not math.isfinite(m) else f"{fmt.format(m)} ± {_f(s, fmt)}"


def tables_markdown(spec: Spec, rows: list[dict], summary: list[dict]) -> str:
    label, higher = MAIN_METRIC[spec.job]
    n_cells = len(expand(spec))
    lines = [f"# {spec.name}: {spec.job} grid", "",
             f"{len(rows)}/{n_cells} cells finished. Mean ± std (sample, ddof 1) over seeds; IQM = interquartile "
             f"mean (rliable); 95% CI = percentile bootstrap of the mean over seeds (2000 resamples). Main metric: "
             f"{label} ({'higher' if higher else 'lower'} is better). Checkpoint evaluated: the final one"
             f"{' (`checkpoints/last`; tables use it, not `checkpoints/best`)' if spec.job == 'il' else ''}.", ""]
    if spec.overrides:
        lines += ["Overrides: " + ", ".join(f"`{k}={v}`" for k, v in spec.overrides.items()), ""]
    for algo, ov in spec.algo_overrides.items():
        if ov:
            lines += [f"Overrides of {algo} only: " + ", ".join(f"`{k}={v}`" for k, v in ov.items()), ""]
    lines += ["## Main metric", "",
              f"| algo | dataset | fraction | n | {label} | IQM | 95% CI | success | train s / 1k steps |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['algo']} | {r['dataset']} | {r['fraction']:g} | {r['n']} | {_pm(r['main_mean'], r['main_std'])} "
                     f"| {_f(r['main_iqm'])} | [{_f(r['main_ci_low'])}, {_f(r['main_ci_high'])}] "
                     f"| {_pm(r['success_mean'], r['success_std'], '{:.2f}')} | {_pm(r['sec_per_1k_mean'], r['sec_per_1k_std'], '{:.1f}')} |")
    lines.append("")
    best = [r for r in summary if r.get("best_n")]
    if best:
        lines += ["## Best checkpoint", "", "Best checkpoint (max over periodic evaluations, `eval.every`; "
                  "optimistic: selected on the test episodes), beside the final checkpoint of the same cells; cells without "
                  "periodic evaluations are left out.", "",
                  f"| algo | dataset | fraction | n | {label}, best | {label}, final |", "|---|---|---|---|---|---|"]
        for r in best:
            lines.append(f"| {r['algo']} | {r['dataset']} | {r['fraction']:g} | {r['best_n']} "
                         f"| {_pm(r['best_mean'], r['best_std'])} | {_pm(r['best_final_mean'], r['best_final_std'])} |")
        lines.append("")
    fr = sorted(spec.fractions)
    if len(fr) >= 2:
        lo_f, hi_f = fr[0], fr[-1]
        lines += [f"## Data-scarce regime ({lo_f:g} vs {hi_f:g} of the data)", "",
                  f"| algo | dataset | {label} @ {hi_f:g} | {label} @ {lo_f:g} | change | retained |",
                  "|---|---|---|---|---|---|"]
        by = {(r["algo"], r["dataset"], r["fraction"]): r for r in summary}
        for algo in spec.algos:
            for ds in spec.datasets:
                a, b = by.get((algo, ds, hi_f)), by.get((algo, ds, lo_f))
                if not a or not b:
                    continue
                d = b["main_mean"] - a["main_mean"]
                ret = b["main_mean"] / a["main_mean"] if a["main_mean"] else float("nan")
                lines.append(f"| {algo} | {ds} | {_pm(a['main_mean'], a['main_std'])} | {_pm(b['main_mean'], b['main_std'])} "
                             f"| {_f(d, '{:+.3g}')} | {_f(ret, '{:.2f}')} |")
        lines.append("")
    lines += ["## Compute cost", "", "Training seconds per 1 000 gradient steps over all fractions and seeds of an algo: "
              "median [min, max] (the cells share the machine, so one starved cell can be far off; the median is "
              "robust to it). Ratio to base = median over the cells of this algo of (its s/1k) / (s/1k of the base "
              "cell with the same dataset, fraction and seed), which ran at about the same time. ms per batch-1 "
              "action: `timing.act_ms_batch1` of each run (one decision of the evaluated policy: the whole sampling "
              "chain, or an RL agent's candidates and their selection; median of 20 calls after training; "
              "blank when a results file lacks it)."
              + COMPUTE_NOTE[spec.job], "",
              "| algo | dataset | train s / 1k steps, median [min, max] | base | ratio to base (paired median) "
              "| ms per batch-1 action, median (cells) |",
              "|---|---|---|---|---|---|"]
    for algo in spec.algos:
        for ds in spec.datasets:
            mine = [r for r in rows if r["algo"] == algo and r["dataset"] == ds and math.isfinite(r["sec_per_1k"])]
            if not mine:
                continue
            xs = [r["sec_per_1k"] for r in mine]
            base = _baseline(spec, algo)
            ratio = "–"
            if base:
                ref = {(r["fraction"], r["seed"]): r["sec_per_1k"] for r in rows
                       if r["algo"] == base and r["dataset"] == ds and math.isfinite(r["sec_per_1k"])}
                pairs = [r["sec_per_1k"] / ref[(r["fraction"], r["seed"])] for r in mine
                         if ref.get((r["fraction"], r["seed"]))]
                ratio = f"{statistics.median(pairs):.2f} (n = {len(pairs)})" if pairs else "–"
            lat = [r["act_ms"] for r in mine if math.isfinite(r.get("act_ms", float("nan")))]
            lat_s = f"{statistics.median(lat):.3g} ({len(lat)})" if lat else "–"
            lines.append(f"| {algo} | {ds} | {statistics.median(xs):.1f} [{min(xs):.1f}, {max(xs):.1f}] "
                         f"| {base or '–'} | {ratio} | {lat_s} |")
    lines.append("")
    if any(math.isfinite(r["lambda_mean_mean"]) for r in summary):
        lines += ["## Contraction", "", "λ̂ = largest eigenvalue of the symmetrised, normalised sampling-drift "
                  "Jacobian along sampling trajectories (< 0: contracting); frac = fraction of trajectory points with λ̂ < 0.", "",
                  "| algo | dataset | fraction | mean λ̂ | frac λ̂ < 0 |", "|---|---|---|---|---|"]
        for r in summary:
            if math.isfinite(r["lambda_mean_mean"]):
                lines.append(f"| {r['algo']} | {r['dataset']} | {r['fraction']:g} | {_pm(r['lambda_mean_mean'], r['lambda_mean_std'])} "
                             f"| {_pm(r['frac_contractive_mean'], r['frac_contractive_std'], '{:.2f}')} |")
        lines.append("")
    missing = [c.label() for c in expand(spec) if not c.done]
    if missing:
        lines += [f"Unfinished cells ({len(missing)}): " + ", ".join(missing), ""]
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


COMPUTE_NOTE = {"rl": " rl: `timing.train_s` / steps (training loop only; periodic evaluations are "
                      "timed apart).",
                "il": " il: `train.sec_per_1k_steps` (training loop only).",
                "toy": " toy: `train_seconds` / steps (training loop only)."}

#: eval metric in metrics.jsonl used for learning curves
CURVE_KEY = {"rl": "eval/normalized_score_mean", "il": "eval/mean_max_coverage", "toy": None}


def learning_curves(spec: Spec) -> dict[tuple, dict[int, list[float]]]:
    """(algo, dataset, fraction) → step → values over seeds, from each cell's metrics.jsonl eval records."""
    key = CURVE_KEY[spec.job]
    curves: dict[tuple, dict[int, list[float]]] = {}
    if key is None:
        return curves
    for c in expand(spec):
        p = c.out / "metrics.jsonl"
        if not p.exists():
            continue
        pts = {}
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in rec:
                pts[int(rec["step"])] = float(rec[key])  # a resumed run may repeat a step: keep the last
        for step, v in pts.items():
            curves.setdefault(c.key, {}).setdefault(step, []).append(v)
    return curves


def plot(spec: Spec, summary: list[dict], out_dir: Path) -> list[Path]:
    matplotlib = optional("matplotlib", "plots", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    label, higher = MAIN_METRIC[spec.job]
    written = []
    if summary:
        groups = [(ds, f) for ds in spec.datasets for f in spec.fractions]
        groups = [g for g in groups if any((r["dataset"], r["fraction"]) == g for r in summary)]
        width = 0.8 / max(len(spec.algos), 1)
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(spec.algos) / 2)), 3.8))
        for i, algo in enumerate(spec.algos):
            xs, ms, lo, hi = [], [], [], []
            for j, g in enumerate(groups):
                r = next((r for r in summary if (r["algo"], r["dataset"], r["fraction"]) == (algo, *g)), None)
                if r is None or not math.isfinite(r["main_mean"]):
                    continue
                xs.append(j + (i - (len(spec.algos) - 1) / 2) * width)
                ms.append(r["main_mean"])
                lo.append(r["main_mean"] - r["main_ci_low"])
                hi.append(r["main_ci_high"] - r["main_mean"])
            if xs:
                ax.bar(xs, ms, width, yerr=[lo, hi], capsize=3, label=algo)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{ds}\nfrac {f:g}" if len(spec.datasets) > 1 else f"frac {f:g}" for ds, f in groups])
        ax.set_ylabel(f"{label} ({'↑' if higher else '↓'})")
        ax.set_title(f"{spec.name}: mean over seeds, 95% bootstrap CI", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / "bar.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    curves = learning_curves(spec)
    curves = {k: v for k, v in curves.items() if len(v) >= 2}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (algo, ds, f), pts in curves.items():
            steps = sorted(pts)
            m = np.array([np.mean(pts[s]) for s in steps])
            sd = np.array([np.std(pts[s], ddof=1) if len(pts[s]) > 1 else 0.0 for s in steps])
            name = f"{algo} frac {f:g}" + (f" {ds}" if len(spec.datasets) > 1 else "")
            line, = ax.plot(steps, m, label=name)
            ax.fill_between(steps, m - sd, m + sd, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("gradient step")
        ax.set_ylabel(label)
        ax.set_title(f"{spec.name}: mean ± std over seeds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "curves.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


def aggregate(spec: Spec, plots: bool = True) -> dict:
    """Write ``summary.md``, ``summary.csv`` (per group), ``cells.csv`` (per cell), ``ablation.csv`` (per cell and
    metric, with the contraction settings: :mod:`cdp.sweep.ablation`) and the plots into ``<out>/<job>/summary/``;
    returns {"rows", "summary", "markdown", "files"}."""
    rows = collect(spec)
    summary = summarize(spec, rows)
    out_dir = spec.root / "summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = tables_markdown(spec, rows, summary)
    (out_dir / "summary.md").write_text(md)
    _write_csv(out_dir / "summary.csv", summary)
    _write_csv(out_dir / "cells.csv", rows)
    from .ablation import ablation_rows, write_ablation_csv

    files = [out_dir / "summary.md", out_dir / "summary.csv", out_dir / "cells.csv",
             write_ablation_csv(out_dir / "ablation.csv", ablation_rows(spec))]
    if plots:
        files += plot(spec, summary, out_dir)
    return {"rows": rows, "summary": summary, "markdown": md, "files": files}


# ------------------------------------------------------------------------------------------------ publishing
PUBLISH_BEGIN = "<!-- cdp bench: {name} -->"
PUBLISH_END = "<!-- /cdp bench: {name} -->"


def check_publish_target(path: str | os.PathLike, names: list[str]) -> str:
    """Read the markdown file ``path`` and check it has one begin/end marker pair per spec name.

    A block is ``<!-- cdp bench: NAME -->`` … ``<!-- /cdp bench: NAME -->``; :func:`publish` replaces what lies
    between the two lines. Returns the file's text. Raises FileNotFoundError (no file) or ValueError naming the
    spec(s) whose markers are missing, duplicated or out of order — before any cell runs.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--publish: no such markdown file: {p}")
    text = p.read_text()
    bad = []
    for n in names:
        b, e = PUBLISH_BEGIN.format(name=n), PUBLISH_END.format(name=n)
        if text.count(b) != 1 or text.count(e) != 1 or text.index(b) > text.index(e):
            bad.append(n)
    if bad:
        raise ValueError(f"--publish {p}: need exactly one '{PUBLISH_BEGIN.format(name='NAME')}' … "
                         f"'{PUBLISH_END.format(name='NAME')}' pair (in that order) "
                         f"for spec(s) {', '.join(bad)}")
    return text


def publish_block(text: str, name: str, markdown: str) -> str:
    """``text`` with the block of spec ``name`` replaced by ``markdown`` (markers kept; see :func:`check_publish_target`)."""
    b, e = PUBLISH_BEGIN.format(name=name), PUBLISH_END.format(name=name)
    i, j = text.index(b) + len(b), text.index(e)
    return text[:i] + "\n" + markdown.strip("\n") + "\n" + text[j:]


def publish(path: str | os.PathLike, spec: Spec, agg: dict, command: str) -> Path:
    """Write a spec's aggregate into its marked block of the markdown file ``path`` (e.g. docs/results.md).

    The summary's headings are demoted under the page's own, its PNG plots are copied to
    ``<page dir>/figures/bench/<name>/`` and linked, and the command that made it is stated. The file is replaced
    atomically. Returns the path. Raises as :func:`check_publish_target`.
    """
    p = Path(path)
    text = check_publish_target(p, [spec.name])
    fig_dir = p.parent / "figures" / "bench" / spec.name
    links = []
    for f in agg["files"]:
        f = Path(f)
        if f.suffix == ".png":
            fig_dir.mkdir(parents=True, exist_ok=True)
            dst = fig_dir / f.name
            dst.write_bytes(f.read_bytes())
            links.append(f"![{spec.name} {f.stem}]({dst.relative_to(p.parent).as_posix()})")
    md = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", agg["markdown"], flags=re.M)
    body = [f"*Generated from the finished cells by `{command}`; do not edit inside the markers.*", "", md]
    if links:
        body += ["", *links]
    new = publish_block(text, spec.name, "\n".join(body))
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, p)
    return p
