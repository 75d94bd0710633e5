"""``cdp data``: make D4RL-recipe offline-RL datasets here (no download).

    cdp data mujoco --env Hopper-v5 --out data/hopper      # SAC → random / medium / medium-replay (hours; resumable)
    cdp data maze --env PointMaze_UMaze-v3 --out data/maze.hdf5   # maze2d recipe with the waypoint expert (minutes)

Files are D4RL-layout hdf5 (plus ``next_observations``) with ``env_id`` and reference scores as attributes; read them
with ``cdp rl --dataset FILE`` or :func:`cdp.data.rl.load_d4rl_hdf5`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path


def add_data(sub) -> None:
    from .data.mujoco import KINDS, MujocoDataConfig

    p = sub.add_parser("data", help="generate D4RL-recipe datasets (MuJoCo locomotion via SAC, PointMaze)",
                       description=__doc__.split("\n\n")[0])
    dsub = p.add_subparsers(dest="data_command", required=True)
    m = dsub.add_parser("mujoco", help="Hopper / Walker2d / HalfCheetah via SAC (D4RL recipe, scaled; resumable)",
                        description="Trains SAC until the medium score, then writes the medium-replay buffer and "
                                    "random / medium (/ expert / medium-expert) rollouts. Re-run to resume.")
    d = MujocoDataConfig()
    m.add_argument("--env", dest="env_id", default=d.env_id, help=f"(default: {d.env_id})")
    m.add_argument("--out", required=True, help="output folder (SAC checkpoints in OUT/sac; re-using it resumes)")
    for f in fields(MujocoDataConfig):
        if f.name in ("env_id", "kinds"):
            continue
        v = getattr(d, f.name)
        m.add_argument("--" + f.name.replace("_", "-"), type=type(v), default=v, help=f"(default: {v:g})")
    m.add_argument("--kinds", nargs="+", choices=KINDS, default=list(d.kinds), help=f"(default: {' '.join(d.kinds)})")
    m.add_argument("--threads", type=int, default=1, help="torch CPU threads for SAC (default: 1)")
    m.add_argument("--no-progress", action="store_true", help="hide progress bars")
    m.set_defaults(func=run_data_mujoco)

    z = dsub.add_parser("maze", help="PointMaze with the waypoint expert (D4RL maze2d recipe)")
    z.add_argument("--env", default="PointMaze_UMaze-v3", help="(default: PointMaze_UMaze-v3)")
    z.add_argument("--out", required=True, help="output hdf5 file")
    z.add_argument("--steps", type=int, default=50_000, help="transitions (default: 50000)")
    z.add_argument("--action-noise", type=float, default=0.0, help="std of Gaussian noise on expert actions (default: 0)")
    z.add_argument("--seed", type=int, default=0, help="(default: 0)")
    z.add_argument("--ref-episodes", type=int, default=50,
                   help="episodes per policy for the reference scores (default: 50; 0 = built-in table)")
    z.add_argument("--no-progress", action="store_true", help="hide progress bars")
    z.set_defaults(func=run_data_maze)


def run_data_mujoco(args) -> int:
    from .cli import set_threads
    from .data.mujoco import MujocoDataConfig, generate_mujoco_datasets

    set_threads(args.threads)
    cfg = MujocoDataConfig(**{f.name: getattr(args, f.name) for f in fields(MujocoDataConfig)})
    paths = generate_mujoco_datasets(cfg, args.out, progress=not args.no_progress)
    for k, pth in paths.items():
        print(f"{k}: {pth}")
    return 0


def run_data_maze(args) -> int:
    from .data.maze import generate_maze_dataset

    out = Path(args.out)
    ds = generate_maze_dataset(args.env, n_steps=args.steps, seed=args.seed, action_noise=args.action_noise, path=out,
                               ref_episodes=args.ref_episodes, progress=not args.no_progress)
    print(f"wrote {out}: {len(ds)} transitions, {ds.n_trajectories} trajectories, "
          f"reference scores {ds.ref_min_score} / {ds.ref_max_score}")
    return 0
