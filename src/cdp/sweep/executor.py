"""Running a ``cdp bench`` grid: the shared datasets / demos made once before it, then one Ray task per
unfinished cell (a ``cdp`` subprocess), locally or on a cluster."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .spec import Spec, expand


# ------------------------------------------------------------------------------------------------------ execution
def cell_resources(spec: Spec, algo: str) -> dict[str, float]:
    """Ray resources of one cell: one CPU, plus one GPU when the cell's ``train.device`` is cuda."""
    dev = str({**spec.overrides, **spec.algo_overrides.get(algo, {})}.get("train.device", "cpu"))
    return {"num_cpus": 1, "num_gpus": 1 if dev.startswith("cuda") else 0}


def _remote_runner():
    """A ``@ray.remote`` task running one cell (resources per cell: :func:`cell_resources`); defined in a closure
    so that Ray ships it by value (cluster workers need ``cdp`` importable by their ``python`` but not this
    module's path)."""
    import ray

    @ray.remote(num_cpus=1)
    def run_cell(args: list[str], out: str, src: str | None, cwd: str | None) -> dict:
        import os
        import subprocess
        import sys
        import time

        env = os.environ.copy()
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        if src and os.path.isdir(src):
            env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        os.makedirs(out, exist_ok=True)
        argv = [sys.executable, "-m", "cdp.cli", *args]
        t0 = time.time()
        with open(os.path.join(out, "bench.log"), "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd if cwd and os.path.isdir(cwd) else None).returncode
        import ray as _ray
        return {"rc": rc, "seconds": time.time() - t0, "host": os.uname().nodename,
                "node": _ray.get_runtime_context().get_node_id()}

    return run_cell


def prepare_il_demos(spec: Spec, tasks, log=print) -> None:
    """Make each missing scripted-demo file of the il grid's robosuite tasks once (see :meth:`Spec.il_demos`)."""
    for task in sorted(tasks):
        path = spec.il_demos(task)
        if path is None or path.exists():
            continue
        from ..datagen.robosuite import generate_robosuite_demos

        d = spec.data
        log(f"generating {int(d.get('n_demos', 200))} scripted {task} demos into {path}")
        r = generate_robosuite_demos(task, int(d.get("n_demos", 200)), path, seed=int(d.get("seed", 0)),
                                     noise=float(d.get("noise", 0.05)), progress=False)
        log(f"  {r['demos']} demos ({r['attempts']} attempts) in {r['seconds']:.0f} s")


def prepare_rl_datasets(spec: Spec, envs, log=print) -> None:
    """Generate each missing shared rl dataset once (same call and file name as ``cdp rl`` uses for its cache)."""
    for env in sorted(envs):
        path = spec.rl_dataset(env)
        if path is None or path.exists():
            continue
        md = spec.mujoco_data(env)
        if md is not None:  # SAC: hours on 2 cores, resumable (re-running the bench continues it)
            from ..datagen.mujoco import generate_mujoco_datasets

            log(f"making the D4RL-recipe datasets {md[0].kinds} of {md[0].env_id} in {md[1]} (SAC; resumable)")
            generate_mujoco_datasets(md[0], md[1], progress=False, log=lambda s: log("  " + s))
            continue
        from ..datagen.maze import generate_maze_dataset

        o = spec.overrides
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"generating the shared dataset {path}")
        t0 = time.time()
        generate_maze_dataset(env, n_steps=int(o.get("data.size", 50_000)), seed=int(o.get("data.seed", 0)),
                              action_noise=float(o.get("data.action_noise", 0.0)), path=path, ref_episodes=0,
                              progress=False)
        log(f"  done in {time.time() - t0:.0f} s")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` / ``ray://host:port`` address nobody listens on (Ray itself retries for minutes)."""
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if not m:  # "auto", "local", ...: leave it to Ray
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


def run_grid(spec: Spec, workers: int | None = None, address: str | None = None, log=print) -> dict:
    """Run the unfinished cells of ``spec`` as Ray tasks (one CPU each).

    ``address``: an existing Ray cluster (``host:port`` or ``ray://host:10001``; cells go to whichever node has a
    free CPU, and every node needs ``cdp`` installed and the same paths); None: a local Ray with ``workers`` CPUs.
    Returns {"ran", "skipped", "failed": [labels], "nodes": {label: Ray node id that ran it}}."""
    cells = expand(spec)
    todo = [c for c in cells if not c.done]
    # seed-major order, so an interrupted grid leaves whole seeds (every algo and fraction) rather than whole algos
    order = {a: i for i, a in enumerate(spec.algos)}
    todo.sort(key=lambda c: (spec.seeds.index(c.seed), spec.datasets.index(c.dataset),
                             spec.fractions.index(c.fraction), order[c.algo]))
    skipped = len(cells) - len(todo)
    log(f"cdp bench {spec.name}: {len(cells)} cells, {skipped} finished (skipped), {len(todo)} to run")
    if not todo:
        return {"ran": 0, "skipped": skipped, "failed": [], "nodes": {}}
    if address:
        _check_reachable(address)
    prepare_rl_datasets(spec, {c.dataset for c in todo}, log)
    prepare_il_demos(spec, {c.dataset for c in todo}, log)
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, OSError) as e:
                raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
        else:
            ray.init(num_cpus=workers or spec.workers or os.cpu_count() or 1, include_dashboard=False,
                     log_to_driver=False)
    try:
        run_cell = _remote_runner()
        src = str(Path(__file__).resolve().parents[2])
        pending = {}
        for c in todo:
            args = c.argv()[3:]  # drop "python -m cdp.cli"
            task = run_cell.options(**cell_resources(spec, c.algo))
            pending[task.remote(args, str(c.out), src, os.getcwd())] = c
        failed, nodes = [], {}
        t0 = time.time()
        n = len(pending)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(ready[0])
            try:
                r = ray.get(ready[0])
            except Exception as e:  # the task itself died (worker lost, ...)
                r = {"rc": -1, "seconds": float("nan"), "error": str(e)}
            ok = r["rc"] == 0 and c.done
            if not ok:
                failed.append(c.label())
            if r.get("node"):
                nodes[c.label()] = r["node"]
            where = f" on {r.get('host', '?')}/{str(r['node'])[:8]}" if r.get("node") else ""
            log(f"[{n - len(pending)}/{n}] {c.label()}: {'ok' if ok else 'FAILED rc=' + str(r['rc'])} "
                f"in {r['seconds']:.1f} s{where} (elapsed {time.time() - t0:.0f} s)"
                f"{'' if ok else '; see ' + str(c.out / 'bench.log')}")
    finally:
        if started_here:
            ray.shutdown()
    return {"ran": len(todo), "skipped": skipped, "failed": failed, "nodes": nodes}
