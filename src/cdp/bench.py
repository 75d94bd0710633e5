"""Experiment grids (``cdp bench``): a YAML spec → one ``cdp`` subprocess per grid cell, run as Ray tasks, then
aggregated over seeds into markdown/CSV tables and PNG plots.

A spec (``configs/experiments/*.yaml``)::

    name: rl_maze_cpu
    job: rl                         # rl (cdp rl) | il (cdp train) | toy (cdp toy)
    out: runs/bench/rl_maze_cpu     # root of the run folders (relative: to the current directory)
    algos: [bc, edp, cdp]           # --algo.name: rl bc|edp|cdp|dql|cdp_dql|idql|cdp_idql; il presets;
                                    # toy: --algo.variants (one variant per cell)
    datasets: [PointMaze_UMaze-v3]  # rl: --data.env, or a D4RL name hopper-medium-replay (made by cdp data mujoco);
                                    # il: --data.task; toy: a label only (the 2-D four-mode mixture)
    fractions: [1.0, 0.1]           # --data.fraction (toy: 1.0 only)
    seeds: [0, 1, 2]                # --train.seed
    overrides: {train.steps: 2000, eval.episodes: 10, train.threads: 1}   # any other key of the config tree
    algo_overrides: {cdp: {policy.contraction.weight: 0.3}}   # optional: keys for one algo only (win over 'overrides')
    baselines: {cdp: edp}           # optional: algo → its base, for the CDP/base compute ratio
    workers: 2                      # optional default of --workers
    shared_dataset: true            # rl only (default): generate the PointMaze dataset once for all cells
    data: {root: runs/data, max_steps: 300000}   # rl, D4RL-named datasets: where and how `cdp data mujoco` makes
                                    # them (cdp.data.mujoco.MujocoDataConfig fields) before the grid starts;
                                    # il, lift / can: {root, n_demos, seed, noise} of the scripted demos

Each cell runs ``python -m cdp.cli <job> ... --out <out>/<job>/<algo>/<dataset>/frac<f>/seed<s>`` (stdout+stderr in
``bench.log`` there). Overrides use the dotted keys of :class:`cdp.config.ExperimentConfig` (or nested mappings)
and are validated against the job's config tree before anything runs. A cell whose results file exists is skipped;
any other cell is (re)started with the same ``--out``, which resumes it from its checkpoint (toy runs are short and
restart). With ``train.device`` cuda (an override), each cell asks Ray for one GPU, so a cluster of GPU nodes runs
one cell per GPU. Aggregates go to ``<out>/<job>/summary/``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

JOBS = ("rl", "il", "toy")
#: sub-command of each job
COMMAND = {"rl": "rl", "il": "train", "toy": "toy"}
#: file that marks a finished cell
RESULT_FILE = {"rl": "results.json", "il": "results.json", "toy": "toy_results.json"}
#: flag that receives the algo / dataset of a cell (None: not passed)
ALGO_FLAG = {"rl": "--algo.name", "il": "--algo.name", "toy": "--algo.variants"}
DATASET_FLAG = {"rl": "--data.env", "il": "--data.task", "toy": None}
#: main metric per job: (label, higher is better)
MAIN_METRIC = {"rl": ("normalized score", True), "il": ("mean max-coverage (PushT) or success rate (Lift / Can)", True),
               "toy": ("off-support", False)}
#: flags fixed by the grid: not allowed in ``overrides``
GRID_FLAGS = {"out", "job", "checkpoint", "train.seed", "data.fraction", "algo.name", "algo.variants", "data.env",
              "data.task", "data.path", "train.progress"}
#: rl keys that make the shared generated dataset (:meth:`Spec.rl_dataset`): one value per spec, in ``overrides``
SHARED_DATA_KEYS = {"data.size", "data.action_noise", "data.seed"}
DEFAULT_BASELINES = {"cdp": "edp", "cdp_dql": "dql", "cdp_idql": "idql", "cdp_dbc": "dbc", "cdp_unet": "dp_unet",
                     "cdp_dit": "dp_dit", "cdp_all": "standard", "cdp_low10": "standard"}
SPEC_KEYS = {"name", "job", "out", "algos", "datasets", "fractions", "seeds", "overrides", "baselines", "workers",
             "description", "shared_dataset", "algo_overrides", "data"}
#: rl dataset names made by ``cdp data mujoco``: <robot>-<kind> → env Hopper-v5 etc.
LOCOMOTION_NAME = re.compile(r"(hopper|walker2d|halfcheetah)-(random|medium|medium-replay|expert|medium-expert)")
_ROBOT_ENV = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}


# ----------------------------------------------------------------------------------------------------------- spec
@dataclass
class Spec:
    name: str
    job: str
    out: str
    algos: list[str]
    datasets: list[str]
    fractions: list[float]
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)
    workers: int | None = None
    description: str = ""
    shared_dataset: bool = True
    algo_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def env_for(self, dataset: str) -> str:
        """The ``--env`` of a grid dataset: ``hopper-medium-replay`` → ``Hopper-v5``; other names are env ids."""
        m = LOCOMOTION_NAME.fullmatch(dataset) if self.job == "rl" else None
        return _ROBOT_ENV[m.group(1)] if m else dataset

    def mujoco_data(self, dataset: str):
        """(MujocoDataConfig, folder) that makes a D4RL-named rl dataset, or None for other names."""
        m = LOCOMOTION_NAME.fullmatch(dataset) if self.job == "rl" else None
        if not m:
            return None
        from .data.mujoco import MujocoDataConfig

        d = {k: v for k, v in self.data.items() if k != "root"}
        kinds = tuple(sorted({m.group(2)} | set(d.pop("kinds", ()))))
        cfg = MujocoDataConfig(env_id=_ROBOT_ENV[m.group(1)], kinds=kinds, **d)
        return cfg, (Path(self.data.get("root", "runs/data")) / m.group(1)).absolute()

    def il_demos(self, task: str) -> Path | None:
        """il, robosuite tasks (lift / can): the scripted-demo file every cell reads
        (``--data.path``), ``<data.root>/<task><n_demos>_seed<seed>.hdf5``, made before the grid by
        :func:`cdp.data.robosuite_demos.generate_robosuite_demos` when missing."""
        if self.job != "il" or task not in ("lift", "can") or self.overrides.get("data.path"):
            return None
        d = self.data
        name = f"{task}{int(d.get('n_demos', 200))}_seed{int(d.get('seed', 0))}.hdf5"
        return (Path(d.get("root", "runs/data")) / name).absolute()

    def rl_dataset(self, env: str) -> Path | None:
        """rl with ``shared_dataset`` (default): the one dataset every cell of ``env``
        reads (``--data.path``), made once before the grid — a D4RL-named MuJoCo dataset (``hopper-medium-replay``) by
        :func:`cdp.data.mujoco.generate_mujoco_datasets`, otherwise the PointMaze dataset ``cdp rl`` would generate
        (from the ``data.size`` / ``data.action_noise`` / ``data.seed`` overrides)."""
        if self.job != "rl" or not self.shared_dataset or self.overrides.get("data.path"):
            return None
        md = self.mujoco_data(env)
        if md is not None:
            from .data.mujoco import dataset_path

            cfg, folder = md
            return dataset_path(folder, cfg.env_id, LOCOMOTION_NAME.fullmatch(env).group(2))
        o = self.overrides
        name = (f"dataset_{env}_n{int(o.get('data.size', 50_000))}_noise{float(o.get('data.action_noise', 0.0)):g}"
                f"_seed{int(o.get('data.seed', 0))}.hdf5")
        return (self.root / "_data" / name).absolute()

    @property
    def root(self) -> Path:
        """Folder holding this job's cells: ``<out>/<job>``."""
        return Path(self.out) / self.job


def _check_overrides(job: str, algo: str, overrides: dict[str, Any]) -> None:
    """Build the cell's config tree (job and algo presets + ``overrides``) as the sub-command would; raises
    ValueError for an unknown key, a wrong type or a key the job / algo does not read."""
    from .config import apply, base_config, resolve

    cfg = apply(base_config(job, algo if job != "toy" else None), overrides)
    cfg = apply(cfg, {"algo.variants": [algo]} if job == "toy" else {"algo.name": algo})  # as the cell's flag does
    resolve(job, cli=cfg)


def _valid_algos(job: str) -> set[str]:
    if job == "rl":
        from .rl import ALGOS
        return set(ALGOS)
    from .config import IL_PRESETS, TOY_VARIANTS
    return set(IL_PRESETS) if job == "il" else set(TOY_VARIANTS)


def _as_list(d: dict, key: str, tp, where: str) -> list:
    v = d.get(key)
    if v is None:
        raise ValueError(f"{where}: missing '{key}'")
    if not isinstance(v, list):
        v = [v]
    if not v:
        raise ValueError(f"{where}: '{key}' is empty")
    out = []
    for x in v:
        if tp is float and isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))
        elif tp is int and isinstance(x, int) and not isinstance(x, bool):
            out.append(x)
        elif tp is str and isinstance(x, (str, int, float)) and not isinstance(x, bool):
            out.append(str(x))
        else:
            raise ValueError(f"{where}: '{key}' entries must be {tp.__name__}, got {x!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: '{key}' has duplicates: {out}")
    return out


def parse_spec(data: dict, where: str = "spec", check_flags: bool = True) -> Spec:
    """Validate a spec mapping (see the module docstring) → :class:`Spec`. Raises ValueError on any problem."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a mapping")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    job = data.get("job")
    if job not in JOBS:
        raise ValueError(f"{where}: 'job' must be one of {list(JOBS)}, got {job!r}")
    name = str(data.get("name") or Path(where).stem)
    algos = _as_list(data, "algos", str, where)
    bad = sorted(set(algos) - _valid_algos(job))
    if bad:
        raise ValueError(f"{where}: unknown {job} algos {bad}; choose from {sorted(_valid_algos(job))}")
    datasets = _as_list(data, "datasets", str, where) if "datasets" in data or job != "toy" else ["fourmode"]
    for d in datasets:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", d):
            raise ValueError(f"{where}: dataset {d!r} must be a plain name (letters, digits, _ . + -)")
    if job == "il":
        from .experiments.il import TASKS
        bad = sorted(set(datasets) - set(TASKS))
        if bad:
            raise ValueError(f"{where}: unknown il tasks {bad}; choose from {list(TASKS)}")
    fractions = _as_list(data, "fractions", float, where) if "fractions" in data else [1.0]
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{where}: fractions must be in (0, 1], got {f}")
    if job == "toy" and fractions != [1.0]:
        raise ValueError(f"{where}: the toy job has no data fraction (use fractions: [1.0])")
    seeds = _as_list(data, "seeds", int, where)
    if any(s < 0 for s in seeds):
        raise ValueError(f"{where}: seeds must be >= 0")
    from .config import flatten, unflatten

    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: 'overrides' must be a mapping of config key → value")
    overrides = flatten(unflatten(overrides))
    per_algo = data.get("algo_overrides") or {}
    if not isinstance(per_algo, dict) or not all(isinstance(v, dict) for v in per_algo.values()):
        raise ValueError(f"{where}: 'algo_overrides' must map algo → mapping of config key → value")
    bad = sorted(set(map(str, per_algo)) - set(algos))
    if bad:
        raise ValueError(f"{where}: 'algo_overrides' names algos not in 'algos': {bad}")
    per_algo = {str(a): flatten(unflatten(d)) for a, d in per_algo.items()}
    for what, ov in [("overrides", overrides)] + [(f"algo_overrides.{a}", d) for a, d in per_algo.items()]:
        fixed = sorted(set(ov) & GRID_FLAGS)
        if fixed:
            raise ValueError(f"{where}: {what} may not set {fixed}: the grid sets them")
    shared_keys = sorted({k for d in per_algo.values() for k in d} & SHARED_DATA_KEYS)
    if job == "rl" and data.get("shared_dataset", True) and shared_keys:
        raise ValueError(f"{where}: algo_overrides may not set {shared_keys}: the shared dataset of each env is made "
                         f"once from 'overrides' (or set shared_dataset: false)")
    if check_flags:
        for a in algos:
            try:
                _check_overrides(job, a, {**overrides, **per_algo.get(a, {})})
            except ValueError as e:
                raise ValueError(f"{where}: overrides for {a}: {e}") from None
    baselines = data.get("baselines") or {}
    if not isinstance(baselines, dict):
        raise ValueError(f"{where}: 'baselines' must be a mapping algo → base algo")
    workers = data.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"{where}: 'workers' must be a positive integer")
    out = data.get("out") or f"runs/bench/{name}"
    shared = data.get("shared_dataset", True)
    if not isinstance(shared, bool):
        raise ValueError(f"{where}: 'shared_dataset' must be true or false")
    mdata = data.get("data") or {}
    if not isinstance(mdata, dict):
        raise ValueError(f"{where}: 'data' must be a mapping (root + cdp.data.mujoco.MujocoDataConfig fields)")
    spec = Spec(name=name, job=job, out=str(out), algos=algos, datasets=datasets, fractions=fractions, seeds=seeds,
                overrides=overrides, baselines={str(k): str(v) for k, v in baselines.items()}, workers=workers,
                description=str(data.get("description", "")), shared_dataset=shared,
                algo_overrides=per_algo, data=mdata)
    if job == "il":
        bad = sorted(set(mdata) - {"root", "n_demos", "seed", "noise"})
        if bad:
            raise ValueError(f"{where}: il 'data' keys are root, n_demos, seed, noise (scripted robosuite demos); got {bad}")
    for d in datasets:  # build each MuJoCo data config now: bad 'data' fields fail before anything runs
        try:
            spec.mujoco_data(d)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: 'data' does not make dataset {d!r}: {e}") from None
    return spec


def load_spec(path: str | os.PathLike, check_flags: bool = True) -> Spec:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    return parse_spec(data, where=str(path), check_flags=check_flags)


# ----------------------------------------------------------------------------------------------------------- grid
@dataclass
class Cell:
    job: str
    algo: str
    dataset: str
    fraction: float
    seed: int
    out: Path
    args: list[str]  # sub-command and flags, without the interpreter

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.algo, self.dataset, self.fraction)

    @property
    def done(self) -> bool:
        return (self.out / RESULT_FILE[self.job]).exists()

    def argv(self, python: str = sys.executable) -> list[str]:
        """The full command (re-running a cell's command resumes it from its checkpoint)."""
        return [python, "-m", "cdp.cli", *self.args]

    def label(self) -> str:
        return f"{self.algo}/{self.dataset}/frac{self.fraction:g}/seed{self.seed}"


def _flag_values(name: str, v: Any) -> list[str]:
    flag = "--" + name
    if isinstance(v, bool):
        return [flag, str(v)]
    if v is None:
        return [flag, "None"]
    if isinstance(v, (list, tuple)):
        return [flag, *map(str, v)]
    return [flag, str(v)]


def cell_dir(root: Path, algo: str, dataset: str, fraction: float, seed: int) -> Path:
    return Path(root) / algo / dataset / f"frac{fraction:g}" / f"seed{seed}"


def expand(spec: Spec) -> list[Cell]:
    """The grid algos × datasets × fractions × seeds (in that nesting order) as cells."""
    cells = []
    for algo in spec.algos:
        for ds in spec.datasets:
            for frac in spec.fractions:
                for seed in spec.seeds:
                    out = cell_dir(spec.root, algo, ds, frac, seed).absolute()
                    args = [COMMAND[spec.job], ALGO_FLAG[spec.job], algo]
                    if DATASET_FLAG[spec.job]:
                        args += [DATASET_FLAG[spec.job], spec.env_for(ds)]
                    if spec.rl_dataset(ds) is not None:
                        args += ["--data.path", str(spec.rl_dataset(ds))]
                    if spec.il_demos(ds) is not None:
                        args += ["--data.path", str(spec.il_demos(ds))]
                    if spec.job != "toy":
                        args += ["--data.fraction", f"{frac:g}"]
                    args += ["--train.seed", str(seed), "--out", str(out), "--train.progress", "False"]
                    for k, v in {**spec.overrides, **spec.algo_overrides.get(algo, {})}.items():
                        args += _flag_values(k, v)
                    cells.append(Cell(spec.job, algo, ds, frac, seed, out, args))
    return cells


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
        from .data.robosuite_demos import generate_robosuite_demos

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
            from .data.mujoco import generate_mujoco_datasets

            log(f"making the D4RL-recipe datasets {md[0].kinds} of {md[0].env_id} in {md[1]} (SAC; resumable)")
            generate_mujoco_datasets(md[0], md[1], progress=False, log=lambda s: log("  " + s))
            continue
        from .data.maze import generate_maze_dataset

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
        src = str(Path(__file__).resolve().parents[1])
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
    ``lambda_mean``, ``frac_contractive`` (nan when absent)."""
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
                "lambda_mean": _num(diag.get("lambda_hat_mean")), "frac_contractive": _num(diag.get("frac_contractive"))}
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
    from scipy.stats import trim_mean

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
                     **extract(spec.job, c.algo, res), "path": str(c.out)})
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
                out.append(row)
    return out


def _baseline(spec: Spec, algo: str) -> str | None:
    b = spec.baselines.get(algo, DEFAULT_BASELINES.get(algo))
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
             f"{label} ({'higher' if higher else 'lower'} is better). Checkpoint evaluated: the final one.", ""]
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
    import matplotlib
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
    """Write ``summary.md``, ``summary.csv`` (per group), ``cells.csv`` (per cell) and the plots into
    ``<out>/<job>/summary/``; returns {"rows", "summary", "markdown", "files"}."""
    rows = collect(spec)
    summary = summarize(spec, rows)
    out_dir = spec.root / "summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = tables_markdown(spec, rows, summary)
    (out_dir / "summary.md").write_text(md)
    _write_csv(out_dir / "summary.csv", summary)
    _write_csv(out_dir / "cells.csv", rows)
    files = [out_dir / "summary.md", out_dir / "summary.csv", out_dir / "cells.csv"]
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
