"""``cdp train`` and ``cdp eval``: the imitation-learning sub-commands (registered in :data:`cdp.cli.REGISTRY`).

    cdp train --task pusht --policy cdp_unet --fraction 0.1 --steps 2000 --seed 0 --out runs/x [--zarr PATH]
    cdp train --task lift --hdf5 data/lift.hdf5 --max-episodes none --policy dbc --out runs/lift   # robosuite Lift
    cdp train --config il.yaml --steps 500 --out runs/x          # YAML file, command-line flags override it
    cdp train --out runs/x --steps 4000 --resume                 # continue runs/x from checkpoints/last
    cdp eval --checkpoint runs/x/checkpoints/last --episodes 50

Every :class:`cdp.il.ILConfig` field is a flag (``--eval-episodes``, ``--cdp-weight``, ...). Precedence:
ILConfig defaults < ``--config`` YAML (flat mapping of ILConfig fields, or the ``il:`` section of a run's
config.yaml) < flags given on the command line. Optional fields accept ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

#: ILConfig fields holding sequences (nargs="+") → element type
_SEQ = {"unet_down_dims": int, "cdp_t_range": float}
#: ILConfig fields whose default is None → value type
_OPTIONAL = {"zarr": str, "hdf5": str, "eval_max_steps": int, "fraction": float,
             "max_episodes": int, "grad_clip": float, "horizon": int,
             "n_obs_steps": int, "n_action_steps": int, "cdp_max_samples": int, "diag_obs": int,
             "diag_samples": int, "ema_power": float}


def _bool(s: str) -> bool:
    v = s.lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v in ("true", "1", "yes")


def _opt(tp):
    def conv(s: str):
        return None if s.lower() in ("none", "null") else tp(s)
    conv.__name__ = tp.__name__
    return conv


def _field_defaults() -> dict:
    from .il import ILConfig

    return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(ILConfig)}


def add_train(sub) -> None:
    """Register ``cdp train``."""
    from .il import PRESETS, TASKS

    p = sub.add_parser("train", help="train (and evaluate) an imitation-learning policy on PushT / Lift / Can",
                       description="Loads the demonstrations (PushT replay buffer, or a robomimic hdf5 for "
                                   "--task lift / can), trains the preset policy, evaluates the EMA "
                                   "policy closed loop and writes config.yaml, metrics.jsonl, tb/, "
                                   "checkpoints/last and results.json into --out.")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", default=None, help="YAML file of ILConfig fields (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/last")
    for name, default in _field_defaults().items():
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: an absent flag leaves no attribute, so an explicit "none" (→ None) still overrides the default
        kw: dict = {"default": argparse.SUPPRESS, "dest": name}
        if name in _SEQ:
            kw.update(nargs="+", type=_SEQ[name], help=f"(default: {' '.join(map(str, default))})")
        elif name in _OPTIONAL:
            kw.update(type=_opt(_OPTIONAL[name]), help=f"(default: {default}; 'none' allowed)")
        elif name == "task":
            kw.update(choices=list(TASKS), help=f"(default: {default})")
        elif name == "policy":
            kw.update(choices=sorted(PRESETS), help=f"preset (default: {default})")
        elif isinstance(default, bool):
            kw.update(type=_bool, metavar="{true,false}", help=f"(default: {str(default).lower()})")
        else:
            kw.update(type=type(default), help=f"(default: {default})")
        p.add_argument(flag, **kw)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_train)


def config_from_args(args) -> "ILConfig":  # noqa: F821
    """Merge ILConfig defaults < ``--config`` YAML < explicit flags into a validated ILConfig."""
    from .il import ILConfig

    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of ILConfig fields")
        values.update(loaded["il"] if isinstance(loaded.get("il"), dict) else loaded)
    given = vars(args)
    for name in _field_defaults():
        if name in given:  # flags that were given, including an explicit "none"
            values[name] = given[name]
    return ILConfig.from_dict(values)


def _run_train(args) -> int:
    from .cli import set_threads
    from .il import run_il, summary_line

    set_threads(args.threads)
    cfg = config_from_args(args)
    res = run_il(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    tr = res["train"]
    spk = f"{tr['sec_per_1k_steps']:.0f} s/1k steps" if tr["sec_per_1k_steps"] else "no new steps"
    print(f"{cfg.policy}: {res['data']['episodes']} episodes, {res['data']['windows']} windows, "
          f"{res['n_params'] / 1e6:.2f} M params; trained {tr['steps_run']} steps in {tr['seconds']:.1f} s ({spk}), "
          f"final loss {tr['final_loss']}")
    ev = res["eval"]
    print("eval: " + (f"skipped ({ev['skipped']})" if "skipped" in ev else summary_line(ev)))
    dg = res["diagnostics"]
    if "skipped" not in dg:
        print(f"contraction: mean lambda_hat {dg['lambda_hat_mean']:.3f} (t<=0.1: {dg['lambda_hat_mean_low_noise']:.3f}), "
              f"frac contractive {dg['frac_contractive']:.2f}, divergence ratio {dg['div_ratio_median']:.3g} "
              f"(bound {dg['div_bound_median']:.3g})")
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return 0


def add_eval(sub) -> None:
    """Register ``cdp eval``."""
    from .il import TASKS

    p = sub.add_parser("eval", help="evaluate a trained IL checkpoint on PushT / Lift / Can",
                       description="Loads the EMA weights of a checkpoint folder and runs closed-loop episodes "
                                   "(seeds seed-start, seed-start+1, ...) of the run's task.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/x/checkpoints/last")
    p.add_argument("--episodes", type=int, default=50, help="(default: 50)")
    p.add_argument("--task", default=None, choices=list(TASKS),
                   help="(default: the task in the run's config.yaml, else pusht)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="env steps per episode (default: the task's, PushT 300, Lift / Can 400)")
    p.add_argument("--seed-start", type=int, default=100000, help="first env seed (default: 100000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "dpmsolver++"],
                   help="(default: the checkpoint's)")
    p.add_argument("--inference-steps", type=int, default=None, help="(default: the checkpoint's)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--video", default=None, metavar="DIR",
                   help="write GIFs of the first --video-episodes episodes here (PushT only)")
    p.add_argument("--video-episodes", type=int, default=4, help="episodes to record with --video (default: 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .cli import set_threads
    from .il import eval_checkpoint, summary_line

    set_threads(args.threads)
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    if args.video and args.video_episodes < 1:
        raise ValueError(f"--video-episodes must be >= 1, got {args.video_episodes}")
    res = eval_checkpoint(args.checkpoint, args.episodes, args.max_steps, args.seed_start, args.seed, args.sampler,
                          args.inference_steps, task=args.task, video_dir=args.video,
                          video_episodes=args.video_episodes if args.video else 0)
    print(summary_line(res) + f" in {res['seconds']:.1f} s")
    for v in res.get("videos", []):
        print(f"wrote {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0
