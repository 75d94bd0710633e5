"""``cdp data``: make datasets here (no download): D4RL-recipe offline-RL data and scripted robosuite demos.

    cdp data mujoco --env Hopper-v5 --out data/hopper      # SAC → random / medium / medium-replay (hours; resumable)
    cdp data maze --env PointMaze_UMaze-v3 --out data/maze.hdf5   # maze2d recipe with the waypoint expert (minutes)
    cdp data lift --n-demos 200 --out data/lift.hdf5         # robosuite Lift, scripted expert, robomimic layout
    cdp data can --n-demos 200 --out data/can.hdf5           # robosuite PickPlaceCan, same

The mujoco / maze files are D4RL-layout hdf5 (plus ``next_observations``) with ``env_id`` and reference scores as attributes; read them
with ``cdp rl --dataset FILE`` or :func:`cdp.data.rl.load_d4rl_hdf5`. The lift / can files are robomimic-layout
hdf5 (:mod:`cdp.data.robosuite_demos`) for ``cdp train --task lift --hdf5 FILE``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path


def add_data(sub) -> None:
    from .data.mujoco import KINDS, MujocoDataConfig

    p = sub.add_parser("data", help="generate datasets: D4RL-recipe MuJoCo locomotion (SAC) and PointMaze, scripted robosuite Lift / Can demos",
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

    for task, env in (("lift", "Lift"), ("can", "PickPlaceCan")):
        r = dsub.add_parser(task, help=f"robosuite {env} demos from a scripted expert (robomimic hdf5; needs robosuite)",
                            description=f"Rolls out a waypoint expert on robosuite {env} (Panda, OSC_POSE, low-dim "
                                        "robomimic observations), keeps the successful demos and writes them in "
                                        "robomimic's hdf5 layout.")
        r.add_argument("--out", required=True, help="output hdf5 file")
        r.add_argument("--n-demos", type=int, default=200, help="successful demos to keep (default: 200)")
        r.add_argument("--seed", type=int, default=0, help="attempt k resets with seed+k (default: 0)")
        r.add_argument("--noise", type=float, default=0.05, help="expert action-noise std (default: 0.05)")
        r.add_argument("--horizon", type=int, default=400, help="steps per attempt (default: 400, robomimic's)")
        r.add_argument("--max-attempts", type=int, default=None, help="(default: 4 * n-demos + 10)")
        r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        r.set_defaults(func=run_data_robosuite, task=task)


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


def run_data_robosuite(args) -> int:
    from .data.robosuite_demos import generate_robosuite_demos

    res = generate_robosuite_demos(args.task, args.n_demos, args.out, seed=args.seed, noise=args.noise,
                                   horizon=args.horizon, max_attempts=args.max_attempts, progress=not args.no_progress)
    print(f"scripted {args.task}: {res['demos']} successful demos in {res['attempts']} attempts "
          f"(scripted success rate {res['success_rate']:.3f}), {res['total_steps']} steps "
          f"(mean length {res['mean_length']:.1f}), {res['seconds']:.1f} s")
    print(f"wrote {res['path']}")
    return 0
