"""Long-format rows of a grid for ablation studies: one row per (cell, metric) with the cell's contraction settings.

``cdp bench`` writes them to ``<out>/<job>/summary/ablation.csv`` for every spec; the columns are

    task, variant, weight, t_range, loss, margin, fraction, seed, metric, value

``variant`` is the grid's name of the cell (a preset or a named variant of one), ``weight`` / ``t_range`` /
``loss`` / ``margin`` the contraction settings the cell actually trained with (read from its resolved
``config.yaml``; the toy's placement comes from its variant; weight 0 and empty fields for a cell without the
regulariser), ``task`` the toy (``toy``), the IL task or the RL dataset. The metrics per job are :data:`METRICS`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from .spec import RESULT_FILE, Spec, expand

COLUMNS = ("task", "variant", "weight", "t_range", "loss", "margin", "fraction", "seed", "metric", "value")

#: (metric name, path into the results file) per job; ``{main}`` is the IL task's main metric
METRICS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "toy": [(k, ("variants", "{preset}", k)) for k in (
        "off_support", "mode_share_tv", "within_mode_var", "div_ratio_median", "div_ratio_t1_median",
        "div_bound_median", "lambda_hat_mean", "lambda_hat_mean_high_noise", "lambda_hat_mean_low_noise",
        "frac_contractive")],
    "il": [("mean_max_coverage", ("eval", "mean_max_coverage")), ("success_rate", ("eval", "success_rate")),
           ("lambda_hat_mean", ("diagnostics", "lambda_hat_mean")),
           ("div_ratio_median", ("diagnostics", "div_ratio_median")),
           ("loss_ratio", ("loss_scale", "loss_ratio")), ("hinge_active_frac", ("loss_scale", "hinge_active_frac"))],
    "rl": [("normalized_score", ("normalized_score_mean",)), ("success_rate", ("success_rate",)),
           ("lambda_hat_mean", ("contraction_diagnostics", "lambda_hat_mean")),
           ("loss_ratio", ("loss_scale", "loss_ratio")), ("hinge_active_frac", ("loss_scale", "hinge_active_frac"))],
}


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def contraction_settings(job: str, preset: str, config: dict) -> dict[str, Any]:
    """(weight, t_range, loss, margin) a cell trained with, from its resolved config tree (a mapping) and its preset;
    weight 0 and empty fields without the regulariser."""
    from ..config import IL_PRESETS, TOY_VARIANTS

    if job == "toy":
        t_range = TOY_VARIANTS.get(preset)
        on = t_range is not None
    elif job == "il":
        on = bool(IL_PRESETS.get(preset, (None,) * 5)[4])
        t_range = None
    else:
        on = preset.startswith("cdp")
        t_range = None
    c = _get(config, ("policy", "contraction")) or {}
    if not on or not c or float(c.get("weight", 0.0)) <= 0:
        return {"weight": 0.0, "t_range": "", "loss": "", "margin": ""}
    lo, hi = t_range if t_range is not None else tuple(c.get("t_range", (0.0, 1.0)))
    return {"weight": float(c["weight"]), "t_range": f"{float(lo):g}-{float(hi):g}", "loss": str(c.get("loss", "")),
            "margin": float(c.get("margin", 0.0))}


def ablation_rows(spec: Spec) -> list[dict[str, Any]]:
    """The long-format rows of every finished cell of ``spec`` (see the module docstring)."""
    from ..config import load_yaml

    rows = []
    for c in expand(spec):
        p = c.out / RESULT_FILE[spec.job]
        if not p.exists():
            continue
        res = json.loads(p.read_text())
        cfg_path = c.out / "config.yaml"
        cfg = load_yaml(cfg_path, "config") if cfg_path.exists() else (res.get("config") or {})
        settings = contraction_settings(spec.job, c.preset, cfg)
        task = "toy" if spec.job == "toy" else c.dataset
        for name, path in METRICS[spec.job]:
            v = _get(res, tuple(c.preset if k == "{preset}" else k for k in path))
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                rows.append({"task": task, "variant": c.algo, **settings, "fraction": c.fraction, "seed": c.seed,
                             "metric": name, "value": float(v)})
    return rows


def write_ablation_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows (``COLUMNS``) to ``path`` (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return path
