"""The ``cdp`` command line. Each job lives in its own module and registers a sub-command here.

    cdp toy    [--out DIR] [--steps N] ...    the 2-D four-mode study (standard vs contractive)
    cdp train  --task pusht --policy ...      imitation learning on PushT (Diffusion Policy / diffusion BC, +CDP)
    cdp eval   --checkpoint DIR               evaluate an imitation-learning checkpoint in gym-pusht
    cdp rl     [--algo bc|edp|cdp|dql|idql|...]  offline RL on a generated PointMaze dataset
    cdp bench  SPEC.yaml [--workers N]         an experiment grid on Ray, aggregated over seeds
    cdp data   mujoco|maze --out ...          make D4RL-recipe datasets (SAC for Hopper/Walker2d/HalfCheetah)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

import torch


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads (default: min(2, cores)); oversubscription makes small networks crawl."""
    n = n or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)


def _add_toy(sub) -> None:
    from .toy import ToyConfig

    p = sub.add_parser("toy", help="train standard and contractive diffusion policies on a 2-D four-mode mixture",
                       description="Trains each variant from the same seed on the same batches and writes "
                                   "toy_samples.png, toy_lambda.png, toy_table.md and toy_results.json into --out.")
    p.add_argument("--out", default="runs/toy", help="run folder (default: runs/toy)")
    defaults = ToyConfig()
    for f in fields(ToyConfig):
        v = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, list):
            p.add_argument(flag, nargs="+", default=v, help=f"(default: {' '.join(v)})")
        else:
            p.add_argument(flag, type=type(v), default=v, help=f"(default: {v})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_toy)


def _run_toy(args) -> int:
    from .toy import ToyConfig, run_toy

    set_threads(args.threads)
    cfg = ToyConfig(**{f.name: getattr(args, f.name) for f in fields(ToyConfig)})
    res = run_toy(cfg, args.out, progress=not args.no_progress)
    print(open(os.path.join(args.out, "toy_table.md")).read())
    print(f"wrote {args.out}/toy_samples.png, toy_lambda.png, toy_table.md, toy_results.json")
    return 0 if res["variants"] else 1


REGISTRY = [_add_toy]
from .cli_il import add_eval, add_train  # noqa: E402  (IL jobs: cdp train / cdp eval)
from .cli_rl import add_rl  # noqa: E402  (offline RL: cdp rl)
REGISTRY += [add_train, add_eval, add_rl]
from .cli_bench import add_bench  # noqa: E402  (experiment grids on Ray: cdp bench)
REGISTRY += [add_bench]
from .cli_data import add_data  # noqa: E402  (dataset generation: cdp data)
REGISTRY += [add_data]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cdp", description="Contractive Diffusion Policies (ICLR 2026): train, "
                                     "evaluate and study contraction-regularised diffusion policies.")
    parser.add_argument("--version", action="version", version=f"cdp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in REGISTRY:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: one clear line, no traceback
        print(f"cdp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
