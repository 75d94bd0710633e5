"""``cdp bench``: run an experiment grid from a YAML spec as Ray tasks and aggregate it over seeds.

    cdp bench configs/experiments/toy_seeds.yaml                    # Ray local mode, one worker per core
    cdp bench configs/experiments/rl_maze_cpu.yaml --workers 2
    cdp bench configs/experiments/rl_maze_cpu.yaml --address auto   # an existing Ray cluster (or ray://host:10001)
    cdp bench SPEC.yaml --dry-run                                   # list the cells and their commands
    cdp bench SPEC.yaml --aggregate-only                            # tables + plots from finished cells
    cdp bench configs/experiments/{toy_seeds,rl_hopper_cpu}.yaml    # several studies, one after the other
    cdp bench configs/experiments/*.yaml --publish docs/results.md  # and write each table into its marked block

Re-running the same command skips finished cells and resumes interrupted ones (see :mod:`cdp.bench`).
"""

from __future__ import annotations

import shlex
import sys


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run an experiment grid (YAML spec) on Ray and aggregate it over seeds",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="+", help="experiment spec(s), e.g. configs/experiments/toy_seeds.yaml; several "
                                           "run one after the other (all are validated first)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (ray://host:10001 or 'auto'); default: a local Ray with --workers CPUs")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel cells in local mode (default: the spec's 'workers', else the number of cores)")
    p.add_argument("--out", default=None, help="override the spec's 'out' folder")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their commands; run nothing")
    p.add_argument("--aggregate-only", action="store_true", help="only aggregate the finished cells")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--publish", default=None, metavar="FILE.md",
                   help="write each spec's tables (and plots) between its markers '<!-- cdp bench: NAME -->' and "
                        "'<!-- /cdp bench: NAME -->' in this markdown file (checked before anything runs)")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from .bench import load_spec

    specs = [load_spec(p) for p in args.spec]  # every spec is validated before anything runs
    if args.out and len(specs) > 1:
        raise ValueError("--out applies to a single spec")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.publish:
        from .bench import check_publish_target
        check_publish_target(args.publish, [s.name for s in specs])
    rc = 0
    for path, spec in zip(args.spec, specs):
        if args.out:
            spec.out = args.out
        rc = max(rc, _run_one(spec, args, path))
    return rc


def _command_args(path: str, args) -> list[str]:
    """The command line that reproduces one spec's block (its spec file, workers and --publish)."""
    out = [path]
    if args.out:
        out += ["--out", args.out]
    if args.workers:
        out += ["--workers", str(args.workers)]
    return out + ["--publish", str(args.publish)]


def _run_one(spec, args, path: str) -> int:
    from .bench import aggregate, expand, run_grid

    if args.dry_run:
        cells = expand(spec)
        for c in cells:
            state = "done" if c.done else "todo"
            print(f"[{state}] {c.label()}: {shlex.join(c.argv('python'))}")
        print(f"{len(cells)} cells, {sum(c.done for c in cells)} finished; out {spec.root}")
        return 0
    failed = []
    if not args.aggregate_only:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("cdp bench: error: ray is not installed (pip install 'cdp[bench]')", file=sys.stderr)
            return 2
        res = run_grid(spec, workers=args.workers, address=args.address)
        failed = res["failed"]
    agg = aggregate(spec, plots=not args.no_plots)
    print(agg["markdown"])
    print("wrote " + ", ".join(str(f) for f in agg["files"]))
    if args.publish:
        from .bench import publish
        publish(args.publish, spec, agg, "cdp bench " + " ".join(shlex.quote(a) for a in _command_args(path, args)))
        print(f"published {spec.name} into {args.publish}")
    if failed:
        print(f"cdp bench {spec.name}: {len(failed)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
