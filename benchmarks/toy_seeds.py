"""Aggregate `cdp toy` runs over seeds: mean ± std of each metric per variant, as a markdown table.

    for s in 0 1 2; do cdp toy --out runs/toy_seed$s --seed $s; done
    python benchmarks/toy_seeds.py runs/toy_seed0 runs/toy_seed1 runs/toy_seed2

The same study as one reproducible, parallel command (one cell per variant and seed, mean ± std / IQM / bootstrap CI):
``cdp bench configs/experiments/toy_seeds.yaml`` (see docs/protocol.md).
"""
import argparse
import json
import statistics
from pathlib import Path

COLS = [("off_support", "off-support"), ("mode_share_tv", "mode-share TV"), ("within_mode_var", "within-mode var"),
        ("div_ratio_median", "div. ratio"), ("div_ratio_t1_median", "div. ratio at t_1"),
        ("div_bound_median", "bound at t_1"), ("lambda_hat_mean_high_noise", "λ̂ t>0.5"),
        ("lambda_hat_mean_low_noise", "λ̂ t≤0.5"), ("frac_contractive", "frac λ̂<0"), ("train_seconds", "train s")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="toy run folders (each with toy_results.json)")
    args = ap.parse_args()
    res = [json.loads((Path(r) / "toy_results.json").read_text()) for r in args.runs]
    variants = list(res[0]["variants"])
    print(f"n = {len(res)} seeds ({', '.join(str(r['config']['seed']) for r in res)}); mean ± std\n")
    print("| variant | " + " | ".join(c[1] for c in COLS) + " |")
    print("|---|" + "---|" * len(COLS))
    for v in variants:
        cells = []
        for key, _ in COLS:
            xs = [r["variants"][v][key] for r in res]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.3g} ± {sd:.2g}")
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
