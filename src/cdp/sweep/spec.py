"""Experiment specs of ``cdp bench`` (format: the :mod:`cdp.sweep` docstring): validation against the job's
config tree, and their expansion into grid cells (one ``cdp`` command each)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
                     "cdp_dit": "dp_dit", "cdp_all": "standard", "cdp_low10": "standard",
                     "cdp_low50": "standard"}
SPEC_KEYS = {"name", "job", "out", "algos", "datasets", "fractions", "seeds", "overrides", "baselines", "workers",
             "description", "shared_dataset", "algo_overrides", "data", "variants"}
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
    variants: dict[str, str] = field(default_factory=dict)  # variant name → the job's preset it runs

    def preset(self, algo: str) -> str:
        """The job preset (``--algo.name`` / toy variant) a grid algo runs: itself, or a variant's ``algo``."""
        return self.variants.get(algo, algo)

    def env_for(self, dataset: str) -> str:
        """The ``--env`` of a grid dataset: ``hopper-medium-replay`` → ``Hopper-v5``; other names are env ids."""
        m = LOCOMOTION_NAME.fullmatch(dataset) if self.job == "rl" else None
        return _ROBOT_ENV[m.group(1)] if m else dataset

    def mujoco_data(self, dataset: str):
        """(MujocoDataConfig, folder) that makes a D4RL-named rl dataset, or None for other names."""
        m = LOCOMOTION_NAME.fullmatch(dataset) if self.job == "rl" else None
        if not m:
            return None
        from ..datagen.mujoco import MujocoDataConfig

        d = {k: v for k, v in self.data.items() if k != "root"}
        kinds = tuple(sorted({m.group(2)} | set(d.pop("kinds", ()))))
        cfg = MujocoDataConfig(env_id=_ROBOT_ENV[m.group(1)], kinds=kinds, **d)
        return cfg, (Path(self.data.get("root", "runs/data")) / m.group(1)).absolute()

    def il_demos(self, task: str) -> Path | None:
        """il, robosuite tasks (lift / can): the scripted-demo file every cell reads
        (``--data.path``), ``<data.root>/<task><n_demos>_seed<seed>.hdf5``, made before the grid by
        :func:`cdp.datagen.robosuite.generate_robosuite_demos` when missing."""
        if self.job != "il" or task not in ("lift", "can") or self.overrides.get("data.path"):
            return None
        d = self.data
        name = f"{task}{int(d.get('n_demos', 200))}_seed{int(d.get('seed', 0))}.hdf5"
        return (Path(d.get("root", "runs/data")) / name).absolute()

    def rl_dataset(self, env: str) -> Path | None:
        """rl with ``shared_dataset`` (default): the one dataset every cell of ``env``
        reads (``--data.path``), made once before the grid — a D4RL-named MuJoCo dataset (``hopper-medium-replay``) by
        :func:`cdp.datagen.mujoco.generate_mujoco_datasets`, otherwise the PointMaze dataset ``cdp rl`` would generate
        (from the ``data.size`` / ``data.action_noise`` / ``data.seed`` overrides)."""
        if self.job != "rl" or not self.shared_dataset or self.overrides.get("data.path"):
            return None
        md = self.mujoco_data(env)
        if md is not None:
            from ..datagen.mujoco import dataset_path

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
    from ..config import apply, base_config, resolve

    cfg = apply(base_config(job, algo if job != "toy" else None), overrides)
    cfg = apply(cfg, {"algo.variants": [algo]} if job == "toy" else {"algo.name": algo})  # as the cell's flag does
    resolve(job, cfg)


def _valid_algos(job: str) -> set[str]:
    if job == "rl":
        from ..rl import ALGOS
        return set(ALGOS)
    from ..config import IL_PRESETS, TOY_VARIANTS
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
    """Validate a spec mapping (see the :mod:`cdp.sweep` docstring) → :class:`Spec`. Raises ValueError on any problem."""
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
    variants_in = data.get("variants") or {}
    if not isinstance(variants_in, dict) or not all(isinstance(v, dict) for v in variants_in.values()):
        raise ValueError(f"{where}: 'variants' must map a name → {{algo: <preset>, <config key>: <value>, ...}}")
    variants: dict[str, str] = {}
    variant_keys: dict[str, dict[str, Any]] = {}
    for vname, vdef in variants_in.items():
        vname = str(vname)
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", vname):
            raise ValueError(f"{where}: variant name {vname!r} must be a plain name (letters, digits, _ . + -)")
        if vname in _valid_algos(job):
            raise ValueError(f"{where}: variant {vname!r} has the name of a {job} preset; choose another name")
        base = vdef.get("algo")
        if base not in _valid_algos(job):
            raise ValueError(f"{where}: variant {vname!r} needs 'algo', one of {sorted(_valid_algos(job))}; got {base!r}")
        variants[vname] = str(base)
        variant_keys[vname] = {k: v for k, v in vdef.items() if k != "algo"}
    bad = sorted(set(algos) - _valid_algos(job) - set(variants))
    if bad:
        raise ValueError(f"{where}: unknown {job} algos {bad}; choose from {sorted(_valid_algos(job))} "
                         f"or a name under 'variants'")
    datasets = _as_list(data, "datasets", str, where) if "datasets" in data or job != "toy" else ["fourmode"]
    for d in datasets:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", d):
            raise ValueError(f"{where}: dataset {d!r} must be a plain name (letters, digits, _ . + -)")
    if job == "il":
        from ..experiments.il import TASKS
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
    from ..config import flatten, unflatten

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
    for vname, keys in variant_keys.items():  # a variant's keys sit under its algo_overrides (which win)
        if vname in algos:
            per_algo[vname] = {**flatten(unflatten(keys)), **per_algo.get(vname, {})}
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
                _check_overrides(job, variants.get(a, a), {**overrides, **per_algo.get(a, {})})
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
        raise ValueError(f"{where}: 'data' must be a mapping (root + cdp.datagen.mujoco.MujocoDataConfig fields)")
    spec = Spec(name=name, job=job, out=str(out), algos=algos, datasets=datasets, fractions=fractions, seeds=seeds,
                overrides=overrides, baselines={str(k): str(v) for k, v in baselines.items()}, workers=workers,
                description=str(data.get("description", "")), shared_dataset=shared,
                algo_overrides=per_algo, data=mdata, variants={v: b for v, b in variants.items() if v in algos})
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
    """Read and validate a spec file (:func:`parse_spec`). Raises FileNotFoundError / ValueError."""
    from ..config import load_yaml

    return parse_spec(load_yaml(path, "spec"), where=str(path), check_flags=check_flags)


# ----------------------------------------------------------------------------------------------------------- grid
@dataclass
class Cell:
    job: str
    algo: str  # the grid's name for it: a preset, or a variant of one
    dataset: str
    fraction: float
    seed: int
    out: Path
    args: list[str]  # sub-command and flags, without the interpreter
    preset: str = ""  # the preset it runs (= algo unless a variant)

    def __post_init__(self) -> None:
        self.preset = self.preset or self.algo

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
                    args = [COMMAND[spec.job], ALGO_FLAG[spec.job], spec.preset(algo)]
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
                    cells.append(Cell(spec.job, algo, ds, frac, seed, out, args, spec.preset(algo)))
    return cells
