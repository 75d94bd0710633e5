"""Offline-RL datasets: D4RL hdf5 / Minari loading, subsampling, normalisation.

All arrays are numpy; conversion to torch happens in the training code.

Conventions (shapes use ``N`` transitions, ``E`` trajectories):

* ``observations``       (N, Do) float32
* ``actions``            (N, Da) float32
* ``rewards``            (N,)    float32
* ``next_observations``  (N, Do) float32 -- the observation *after* ``actions[i]``
* ``terminals``          (N,)    bool    -- true MDP termination (no bootstrap)
* ``timeouts``           (N,)    bool    -- trajectory cut here without termination
* ``episode_starts``     (E,)    int64   -- first row of each trajectory; trajectory
  ``e`` is the row range ``[episode_starts[e], episode_starts[e+1])`` (last one ends at N)

Sources (read for facts only, no code copied):

* D4RL, Fu et al. 2020, https://github.com/Farama-Foundation/D4RL --
  ``d4rl/__init__.py::qlearning_dataset`` (next-observation construction,
  dropping the final step of timed-out trajectories) and ``d4rl/infos.py``
  (reference min/max scores).
* IQL, Kostrikov et al. 2022 (and EDP, Kang et al. 2023) -- locomotion reward
  scaling ``r * 1000 / (max_return - min_return)`` and antmaze ``r - 1``.
* Diffusion-QL, Wang et al. 2023 -- ``reward_tune`` options
  (``normalize``, ``iql_antmaze``, ``iql_locomotion``, ``cql_antmaze``, ``antmaze``).
* CQL, Kumar et al. 2020 -- antmaze ``(r - 0.5) * 4``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .._optional import optional

__all__ = [
    "OfflineDataset",
    "D4RL_REF_SCORES",
    "load_d4rl_hdf5",
    "write_d4rl_hdf5",
    "load_minari",
    "subsample_trajectories",
    "trajectory_return_range",
    "normalize_rewards",
    "normalized_score",
    "ref_scores",
    "check_matches_env",
    "episode_starts_from_flags",
]

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
_EPISODE_STARTS_KEY = "cdp/episode_starts"


# --------------------------------------------------------------------------
# Dataset type
# --------------------------------------------------------------------------


def episode_starts_from_flags(terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """Trajectory start rows implied by ``terminals | timeouts``.

    A trajectory ends at every row with a terminal or timeout flag; the rows after
    the last flag (if any) form a final, possibly incomplete, trajectory.

    Args:
        terminals: (N,) bool.
        timeouts: (N,) bool.

    Returns:
        (E,) int64 start indices, ``[0, ...]`` (empty for N == 0).
    """
    n = len(terminals)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(np.logical_or(terminals, timeouts))
    starts = np.concatenate([[0], ends + 1])
    return starts[starts < n].astype(np.int64)


@dataclass
class OfflineDataset:
    """Flat transition dataset with trajectory boundaries.

    Attributes:
        observations: (N, Do) float32.
        actions: (N, Da) float32.
        rewards: (N,) float32.
        next_observations: (N, Do) float32.
        terminals: (N,) bool, true environment termination after row i.
        timeouts: (N,) bool, trajectory truncated after row i (time limit or
            dropped last step); ``next_observations[i]`` is still valid.
        episode_starts: (E,) int64 start row of each trajectory; derived from
            ``terminals | timeouts`` when ``None``.
        env_id: environment / dataset name when known (e.g. ``"hopper-medium-v2"``).
        ref_min_score, ref_max_score: reference returns for the normalized
            score (D4RL convention) when known.
        meta: free-form extra metadata (strings / numbers).

    Raises:
        ValueError: on mismatched lengths, wrong ranks, NaN/inf, or invalid
            ``episode_starts``.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    episode_starts: np.ndarray | None = None
    env_id: str | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations, dtype=np.float32)
        self.actions = np.asarray(self.actions, dtype=np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32)
        self.next_observations = np.asarray(self.next_observations, dtype=np.float32)
        self.terminals = np.asarray(self.terminals).astype(bool)
        self.timeouts = np.asarray(self.timeouts).astype(bool)
        _validate_arrays(
            {
                "observations": self.observations,
                "actions": self.actions,
                "rewards": self.rewards,
                "next_observations": self.next_observations,
                "terminals": self.terminals,
                "timeouts": self.timeouts,
            }
        )
        if self.episode_starts is None:
            self.episode_starts = episode_starts_from_flags(self.terminals, self.timeouts)
        else:
            s = np.asarray(self.episode_starts, dtype=np.int64).reshape(-1)
            n = len(self.rewards)
            if n > 0 and (len(s) == 0 or s[0] != 0):
                raise ValueError("episode_starts must begin with 0 for a non-empty dataset")
            if len(s) and (np.any(np.diff(s) <= 0) or s[-1] >= n):
                raise ValueError(
                    f"episode_starts must be strictly increasing and < N={n}; got {s[:10]}..."
                )
            self.episode_starts = s
        if self.ref_min_score is not None:
            self.ref_min_score = float(self.ref_min_score)
        if self.ref_max_score is not None:
            self.ref_max_score = float(self.ref_max_score)

    # -- sizes -------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def n_trajectories(self) -> int:
        return int(len(self.episode_starts))

    # -- trajectories -------------------------------------------------------
    def trajectory_slices(self) -> list[slice]:
        """Row slices of the trajectories, in order."""
        ends = np.append(self.episode_starts[1:], len(self))
        return [slice(int(a), int(b)) for a, b in zip(self.episode_starts, ends)]

    def iter_trajectories(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield each trajectory as a dict of array views (keys as the fields, length T_e)."""
        for sl in self.trajectory_slices():
            yield {k: getattr(self, k)[sl] for k in _ARRAY_FIELDS}

    def trajectory_lengths(self) -> np.ndarray:
        """(E,) int64 number of transitions per trajectory."""
        return np.diff(np.append(self.episode_starts, len(self))).astype(np.int64)

    def trajectory_returns(self) -> np.ndarray:
        """(E,) float64 undiscounted return of each trajectory."""
        if len(self) == 0:
            return np.zeros(0)
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)

    def select_trajectories(self, indices: Sequence[int] | np.ndarray) -> "OfflineDataset":
        """New dataset with only the given trajectories (in the given order)."""
        sls = self.trajectory_slices()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = (
            np.concatenate([np.arange(sls[i].start, sls[i].stop) for i in idx])
            if len(idx)
            else np.zeros(0, dtype=np.int64)
        )
        lens = np.array([sls[i].stop - sls[i].start for i in idx], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if len(idx) else None
        return dataclasses.replace(
            self,
            **{k: getattr(self, k)[rows] for k in _ARRAY_FIELDS},
            episode_starts=starts,
            meta=dict(self.meta),
        )

    def with_rewards(self, rewards: np.ndarray) -> "OfflineDataset":
        """Copy with replaced (N,) rewards."""
        return dataclasses.replace(self, rewards=rewards, meta=dict(self.meta))

    def with_observations(self, observations: np.ndarray, next_observations: np.ndarray) -> "OfflineDataset":
        """Copy with replaced (N, Do') observations / next observations."""
        return dataclasses.replace(
            self, observations=observations, next_observations=next_observations, meta=dict(self.meta)
        )


_ARRAY_FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def _validate_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    """Rank / length / finiteness checks shared by the dataset and the loaders."""
    ranks = {"observations": 2, "actions": 2, "next_observations": 2, "rewards": 1, "terminals": 1, "timeouts": 1}
    problems = []
    for k, a in arrays.items():
        want = ranks.get(k)
        if want is not None and a.ndim != want:
            problems.append(f"{k} has shape {a.shape}, expected rank {want}")
    if problems:
        raise ValueError("; ".join(problems))
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"mismatched lengths along axis 0: {lengths}")
    if "observations" in arrays and "next_observations" in arrays:
        if arrays["observations"].shape[1:] != arrays["next_observations"].shape[1:]:
            raise ValueError(
                f"observations {arrays['observations'].shape} and next_observations "
                f"{arrays['next_observations'].shape} have different feature shapes"
            )
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in arrays:
            a = arrays[k]
            if a.size and not np.all(np.isfinite(a)):
                bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                raise ValueError(f"{k} contains {bad} NaN/inf value(s)")


# --------------------------------------------------------------------------
# D4RL hdf5
# --------------------------------------------------------------------------


def _qlearning_transitions(raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Build next_observations like D4RL ``qlearning_dataset(terminate_on_end=False)``.

    For i in 0..N-2: next_obs[i] = obs[i+1]; rows with ``timeouts[i]`` are dropped
    (their successor is the next trajectory's first state), and the final row N-1 is
    dropped (no successor). Terminal rows are kept. Unlike D4RL, which returns only
    (obs, act, next_obs, rew, term), we keep trajectory identity: the last kept row
    of every trajectory that did not end in a terminal gets ``timeouts=True`` so the
    boundaries survive.
    """
    obs = raw["observations"]
    n = obs.shape[0]
    term = raw["terminals"].astype(bool)
    tout = raw["timeouts"].astype(bool)
    # trajectory id of every original row (ends at terminal or timeout)
    ends = np.logical_or(term, tout)
    traj_id = np.concatenate([[0], np.cumsum(ends)[:-1]]) if n else np.zeros(0, np.int64)
    keep = np.zeros(n, dtype=bool)
    keep[: max(n - 1, 0)] = ~tout[: max(n - 1, 0)]
    rows = np.flatnonzero(keep)
    out = {
        "observations": obs[rows],
        "actions": raw["actions"][rows],
        "rewards": raw["rewards"][rows],
        "next_observations": obs[rows + 1],
        "terminals": term[rows],
    }
    tid = traj_id[rows]
    last_of_traj = np.ones(len(rows), dtype=bool)
    last_of_traj[:-1] = tid[1:] != tid[:-1]
    out["timeouts"] = last_of_traj & ~out["terminals"]
    starts = np.flatnonzero(np.concatenate([[True], tid[1:] != tid[:-1]])) if len(rows) else np.zeros(0)
    out["episode_starts"] = starts.astype(np.int64)
    return out


def load_d4rl_hdf5(
    path: str | os.PathLike,
    env_id: str | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
) -> OfflineDataset:
    """Load a dataset in D4RL's hdf5 layout.

    Keys read: ``observations`` (N, Do), ``actions`` (N, Da), ``rewards`` (N,),
    ``terminals`` (N,), ``timeouts`` (N,), optional ``next_observations`` (N, Do).
    Without ``next_observations`` the D4RL ``qlearning_dataset`` rule is applied
    (see :func:`_qlearning_transitions`), so the result has fewer rows than the
    file. Metadata: file attributes ``env_id``, ``ref_min_score``,
    ``ref_max_score`` (written by :func:`write_d4rl_hdf5`) or, failing that, the
    D4RL reference table via ``env_id`` when it is a known D4RL name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KeyError: required keys missing (the message lists the keys present).
        ValueError: an empty, truncated or non-hdf5 file; no rows; mismatched lengths / ranks, NaN or inf (one
            line naming the file).
    """
    h5py = optional("h5py", "rl", "D4RL hdf5 files")

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"D4RL hdf5 file not found: {path}")
    fix = "regenerate it (cdp data mujoco / cdp data maze) or pass another --data.path"
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is an empty file, not an hdf5 dataset; {fix}")
    try:
        with h5py.File(path, "r") as f:
            present: list[str] = []
            f.visit(lambda name: present.append(name) if isinstance(f[name], h5py.Dataset) else None)
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise KeyError(f"{path}: missing key(s) {missing}; keys present: {sorted(present)}")
            raw = {k: np.asarray(f[k][()]) for k in REQUIRED_KEYS}
            has_next = "next_observations" in f
            if has_next:
                raw["next_observations"] = np.asarray(f["next_observations"][()])
            starts = np.asarray(f[_EPISODE_STARTS_KEY][()]) if _EPISODE_STARTS_KEY in f else None
            attrs = {k: _attr(v) for k, v in f.attrs.items()}
    except OSError as e:  # not hdf5 (signature), truncated (eof), damaged chunks
        raise ValueError(f"{path} is not a readable hdf5 file ({one_line(e)}); {fix}") from None
    for k in ("rewards", "terminals", "timeouts"):
        if raw[k].ndim == 2 and raw[k].shape[1] == 1:
            raw[k] = raw[k][:, 0]
    try:
        _validate_arrays(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; {fix}") from None
    if raw["observations"].shape[0] == 0:
        raise ValueError(f"{path} holds no transitions (observations has 0 rows); {fix}")

    if has_next:
        arrays = dict(raw)
        arrays["episode_starts"] = starts
    else:
        arrays = _qlearning_transitions(raw)

    env_id = env_id or attrs.get("env_id")
    rmin = ref_min_score if ref_min_score is not None else attrs.get("ref_min_score")
    rmax = ref_max_score if ref_max_score is not None else attrs.get("ref_max_score")
    if (rmin is None or rmax is None) and env_id:
        try:
            rmin, rmax = ref_scores(env_id)
        except KeyError:
            pass
    meta = {k: v for k, v in attrs.items() if k not in ("env_id", "ref_min_score", "ref_max_score")}
    meta["source"] = str(path)
    return OfflineDataset(**arrays, env_id=env_id, ref_min_score=rmin, ref_max_score=rmax, meta=meta)


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), for one-line user errors."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_d4rl_hdf5(ds: OfflineDataset, path: str | os.PathLike, compression: str | None = "gzip") -> Path:
    """Write ``ds`` in D4RL layout (plus ``next_observations`` and ``cdp/episode_starts``).

    Written atomically: a temporary file in the same directory is filled and then
    moved over ``path`` with :func:`os.replace`, so readers never see a partial
    file. Metadata (``env_id``, ``ref_min_score``, ``ref_max_score`` and scalar
    entries of ``ds.meta``) become file attributes.

    Returns:
        The final path.
    """
    h5py = optional("h5py", "rl", "D4RL hdf5 files")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for k in _ARRAY_FIELDS:
                f.create_dataset(k, data=getattr(ds, k), compression=compression)
            f.create_dataset(_EPISODE_STARTS_KEY, data=ds.episode_starts)
            if ds.env_id is not None:
                f.attrs["env_id"] = ds.env_id
            if ds.ref_min_score is not None:
                f.attrs["ref_min_score"] = float(ds.ref_min_score)
            if ds.ref_max_score is not None:
                f.attrs["ref_max_score"] = float(ds.ref_max_score)
            for k, v in ds.meta.items():
                if k == "source":
                    continue
                if isinstance(v, (str, int, float, bool, np.generic)):
                    f.attrs[k] = v
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# --------------------------------------------------------------------------
# Minari
# --------------------------------------------------------------------------


def _flatten_obs(obs: Any, keys: Sequence[str] | None) -> np.ndarray:
    """(T, Do) array from a Minari observation array or dict of arrays.

    Dicts: ``keys`` in the given order; default ``("observation", "desired_goal")``
    when both exist (goal-conditioned convention, e.g. PointMaze), otherwise all
    keys sorted. Nested dicts are not supported.
    """
    if isinstance(obs, Mapping):
        if keys is None:
            keys = ["observation", "desired_goal"] if {"observation", "desired_goal"} <= set(obs) else sorted(obs)
        parts = []
        for k in keys:
            if k not in obs:
                raise KeyError(f"observation key {k!r} not in {sorted(obs)}")
            a = np.asarray(obs[k])
            if isinstance(obs[k], Mapping):
                raise ValueError(f"nested dict observation under {k!r} is not supported")
            parts.append(a.reshape(a.shape[0], -1))
        return np.concatenate(parts, axis=1)
    a = np.asarray(obs)
    return a.reshape(a.shape[0], -1)


def load_minari(
    dataset_id_or_path: str | os.PathLike,
    obs_keys: Sequence[str] | None = None,
) -> OfflineDataset:
    """Load a Minari dataset from the local store (by id) or from a directory.

    Never downloads. ``dataset_id_or_path`` is either a dataset id known to the
    local store (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``), loaded with
    ``minari.load_dataset(id, download=False)``, or a path to a dataset directory
    (the one holding ``data/``, or ``data/`` itself).

    Each Minari episode with T steps has T+1 observations; row i gets
    ``observations[i]`` and ``next_observations = observations[i+1]``.
    ``terminals``/``timeouts`` come from ``terminations``/``truncations``; episode
    boundaries are the Minari episodes. Dict observations are flattened (see
    ``obs_keys``). ``ref_min_score``/``ref_max_score`` come from the dataset
    metadata when present.

    Raises:
        ImportError: minari not installed.
        FileNotFoundError: id not in the local store / path missing.
        ValueError: empty dataset, NaN/inf, inconsistent shapes.
    """
    try:
        import minari
        from minari.dataset.minari_dataset import MinariDataset
    except ImportError as e:  # pragma: no cover - depends on env
        raise ImportError("load_minari needs the 'minari' package (pip install 'cdp[rl]')") from e

    p = Path(dataset_id_or_path)
    if p.is_dir():
        data_dir = p / "data" if (p / "data").is_dir() else p
        if not (data_dir / "metadata.json").is_file():
            raise FileNotFoundError(f"{p} is not a Minari dataset directory (no metadata.json in {data_dir})")
        mds = MinariDataset(data_dir)
    else:
        try:
            mds = minari.load_dataset(str(dataset_id_or_path), download=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"Minari dataset {str(dataset_id_or_path)!r} is neither a directory nor in the local store: {e}"
            ) from e

    obs_l, nobs_l, act_l, rew_l, term_l, trunc_l, lens = [], [], [], [], [], [], []
    for ep in mds.iterate_episodes():
        o = _flatten_obs(ep.observations, obs_keys)
        t = len(ep.rewards)
        if o.shape[0] != t + 1:
            raise ValueError(f"episode {ep.id}: {o.shape[0]} observations for {t} steps (expected T+1)")
        if t == 0:
            continue
        obs_l.append(o[:-1])
        nobs_l.append(o[1:])
        act_l.append(np.asarray(ep.actions).reshape(t, -1))
        rew_l.append(np.asarray(ep.rewards).reshape(t))
        term_l.append(np.asarray(ep.terminations).reshape(t))
        trunc_l.append(np.asarray(ep.truncations).reshape(t))
        lens.append(t)
    if not lens:
        raise ValueError(f"Minari dataset {dataset_id_or_path} has no non-empty episodes")
    md = dict(mds.storage.metadata)
    env_id = md.get("dataset_id") or str(dataset_id_or_path)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return OfflineDataset(
        observations=np.concatenate(obs_l),
        actions=np.concatenate(act_l),
        rewards=np.concatenate(rew_l),
        next_observations=np.concatenate(nobs_l),
        terminals=np.concatenate(term_l),
        timeouts=np.concatenate(trunc_l),
        episode_starts=starts,
        env_id=env_id,
        ref_min_score=md.get("ref_min_score"),
        ref_max_score=md.get("ref_max_score"),
        meta={"source": f"minari:{dataset_id_or_path}"},
    )


# --------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------


def subsample_trajectories(ds: OfflineDataset, fraction: float, seed: int) -> OfflineDataset:
    """Keep a random subset of whole trajectories (the "10% data" regime).

    Keeps ``max(1, round(fraction * E))`` trajectories chosen uniformly without
    replacement by ``numpy.random.default_rng(seed)``; their original order is
    preserved. Same (ds, fraction, seed) -> same result.

    Raises:
        ValueError: ``fraction`` not in (0, 1] or the dataset has no trajectories.
    """
    if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    e = ds.n_trajectories
    if e == 0:
        raise ValueError("cannot subsample an empty dataset")
    k = max(1, int(round(fraction * e)))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(e, size=k, replace=False))
    out = ds.select_trajectories(idx)
    out.meta["subsample"] = f"fraction={fraction},seed={seed},kept={k}/{e}"
    return out


# --------------------------------------------------------------------------
# Reward / observation normalisation
# --------------------------------------------------------------------------


def trajectory_return_range(ds: OfflineDataset) -> tuple[float, float]:
    """(min, max) undiscounted trajectory return over ``ds``'s trajectories."""
    r = ds.trajectory_returns()
    if len(r) == 0:
        raise ValueError("empty dataset has no trajectory returns")
    return float(r.min()), float(r.max())


REWARD_MODES = ("none", "iql_locomotion", "iql_antmaze", "normalize", "cql_antmaze", "antmaze", "scale_bias")


def normalize_rewards(
    ds: OfflineDataset,
    mode: str,
    scale: float = 1.0,
    bias: float = 0.0,
) -> OfflineDataset:
    """Return a copy of ``ds`` with transformed rewards.

    Modes (all element-wise on (N,) rewards ``r``):

    * ``"none"``: unchanged.
    * ``"iql_locomotion"`` (IQL/EDP Gym-MuJoCo): ``r * 1000 / (R_max - R_min)`` with
      R over the dataset's trajectories (:func:`trajectory_return_range`).
    * ``"iql_antmaze"`` (IQL antmaze; Diffusion-QL ``iql_antmaze``): ``r - 1``.
    * ``"normalize"`` (Diffusion-QL): ``(r - mean) / std`` with the unbiased std
      (ddof=1, as ``torch.Tensor.std``).
    * ``"cql_antmaze"`` (CQL / Diffusion-QL): ``(r - 0.5) * 4``.
    * ``"antmaze"`` (Diffusion-QL): ``(r - 0.25) * 2``.
    * ``"scale_bias"`` (CQL's reward_scale / reward_bias): ``r * scale + bias``.

    Raises:
        ValueError: unknown mode, zero return range or zero std.
    """
    r = ds.rewards.astype(np.float64)
    if mode == "none":
        out = r
    elif mode == "iql_locomotion":
        lo, hi = trajectory_return_range(ds)
        if hi - lo <= 0:
            raise ValueError(f"trajectory returns have zero range ({lo}); cannot IQL-normalise")
        out = r * 1000.0 / (hi - lo)
    elif mode == "iql_antmaze":
        out = r - 1.0
    elif mode == "normalize":
        sd = r.std(ddof=1) if len(r) > 1 else 0.0
        if sd == 0:
            raise ValueError("rewards have zero std; cannot standardise")
        out = (r - r.mean()) / sd
    elif mode == "cql_antmaze":
        out = (r - 0.5) * 4.0
    elif mode == "antmaze":
        out = (r - 0.25) * 2.0
    elif mode == "scale_bias":
        out = r * scale + bias
    else:
        raise ValueError(f"unknown reward normalisation mode {mode!r}; choose from {REWARD_MODES}")
    new = ds.with_rewards(out.astype(np.float32))
    new.meta["reward_mode"] = mode
    return new


# --------------------------------------------------------------------------
# Normalised score
# --------------------------------------------------------------------------

#: D4RL reference returns (min = random policy, max = expert), from ``d4rl/infos.py``.
#: Gym-MuJoCo entries apply to all -v0/-v1/-v2 datasets of the robot.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "halfcheetah": (-280.178953, 12135.0),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "maze2d-open-v0": (0.01, 20.66),
    "maze2d-umaze-v1": (23.85, 161.86),
    "maze2d-medium-v1": (13.13, 277.39),
    "maze2d-large-v1": (6.7, 273.99),
    "maze2d-open-dense-v0": (11.17817, 27.166538620695782),
    "maze2d-umaze-dense-v1": (68.537689, 193.66285642381482),
    "maze2d-medium-dense-v1": (44.264742, 297.4552547777125),
    "maze2d-large-dense-v1": (30.569041, 303.4857382709002),
}


def ref_scores(env_name: str) -> tuple[float, float]:
    """(ref_min, ref_max) for a D4RL name.

    Accepts exact maze2d names, and for the locomotion robots / antmaze any name
    starting with the robot (``"hopper-medium-v2"``, ``"hopper"``, ``"antmaze-umaze-v2"``).

    Raises:
        KeyError: unknown name (message lists the known names).
    """
    key = env_name.strip().lower()
    if key in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[key]
    if key.startswith("maze2d"):
        raise KeyError(
            f"no D4RL reference scores for {env_name!r}; maze2d names must match exactly: "
            f"{sorted(k for k in D4RL_REF_SCORES if k.startswith('maze2d'))}"
        )
    robot = key.split("-")[0]
    if robot in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[robot]
    raise KeyError(f"no D4RL reference scores for {env_name!r}; known: {sorted(D4RL_REF_SCORES)}")


def vector_rollout(venv, policy_fn: Callable[[np.ndarray], Any], n_episodes: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the first episode of every sub-env of a Gymnasium vector env in lock-step, sub-env i seeded ``seed + i``.

    Rewards after an episode's end are masked (whatever the vector env's autoreset mode), so each sub-env
    contributes exactly one episode. Used by the PointMaze and MuJoCo evaluations.

    Args:
        venv: a ``gymnasium.vector`` env with ``n_episodes`` sub-envs (closed by the caller).
        policy_fn: (B, Do) float32 observations → (B, Da) actions (numpy or torch); one with a ``seeds``
            keyword also gets the env seed of every row (:mod:`cdp.envs.seeding`).
    Returns:
        (returns (n,), lengths (n,) int64, success (n,) bool — ``info["success"]`` at each episode's last step,
        False where the env reports none).
    """
    from ..envs.seeding import call_policy

    seeds = [seed + i for i in range(n_episodes)]
    obs, _ = venv.reset(seed=seeds)
    returns = np.zeros(n_episodes)
    lengths = np.zeros(n_episodes, dtype=np.int64)
    success = np.zeros(n_episodes, dtype=bool)
    done = np.zeros(n_episodes, dtype=bool)
    while not done.all():
        act = call_policy(policy_fn, obs.astype(np.float32), seeds)
        if hasattr(act, "detach"):
            act = act.detach().cpu().numpy()
        obs, rew, term, trunc, info = venv.step(np.asarray(act, dtype=np.float32).reshape(n_episodes, -1))
        returns += np.where(done, 0.0, rew)
        lengths += ~done
        fin = (term | trunc) & ~done
        if fin.any() and "success" in info:
            success[fin] = np.asarray(info["success"], dtype=bool)[fin]
        done |= term | trunc
    return returns, lengths, success


def normalized_score(
    env_name: str | None,
    returns: float | np.ndarray | Sequence[float],
    ref_min: float | None = None,
    ref_max: float | None = None,
) -> float | np.ndarray:
    """D4RL normalised score ``100 * (R - ref_min) / (ref_max - ref_min)``.

    Reference scores come from ``ref_min``/``ref_max`` when both are given (e.g.
    from a dataset's metadata), else from :data:`D4RL_REF_SCORES` via ``env_name``.
    Returns a float for scalar input, an array otherwise.

    Raises:
        KeyError: unknown ``env_name`` and no explicit references.
        ValueError: ``ref_max == ref_min``.
    """
    if ref_min is None or ref_max is None:
        if env_name is None:
            raise KeyError("normalized_score needs env_name or both ref_min and ref_max")
        ref_min, ref_max = ref_scores(env_name)
    if ref_max == ref_min:
        raise ValueError(f"degenerate reference scores min == max == {ref_min}")
    r = np.asarray(returns, dtype=np.float64)
    s = 100.0 * (r - ref_min) / (ref_max - ref_min)
    return float(s) if s.ndim == 0 else s


# --------------------------------------------------------------------------
# Env compatibility
# --------------------------------------------------------------------------


def _flat_dim(space: Any, obs_keys: Sequence[str] | None = None) -> int:
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        keys = obs_keys
        if keys is None:
            keys = (
                ["observation", "desired_goal"]
                if {"observation", "desired_goal"} <= set(space.spaces)
                else sorted(space.spaces)
            )
        return sum(_flat_dim(space.spaces[k]) for k in keys)
    if isinstance(space, spaces.Discrete):
        return 1
    shape = getattr(space, "shape", None)
    if shape is None:
        raise ValueError(f"unsupported space {space}")
    return int(np.prod(shape))


def check_matches_env(ds: OfflineDataset, env: Any, obs_keys: Sequence[str] | None = None) -> None:
    """Check the dataset's (Do, Da) against ``env.observation_space`` / ``action_space``.

    Dict observation spaces are measured with the same flattening rule as
    :func:`load_minari`. Also checks that dataset actions lie in a Box action
    space's bounds (with 1e-5 tolerance).

    Raises:
        ValueError: naming the mismatching dimension(s) or out-of-bound actions.
    """
    problems = []
    do = _flat_dim(env.observation_space, obs_keys)
    da = _flat_dim(env.action_space)
    if ds.obs_dim != do:
        problems.append(f"observation dim {ds.obs_dim} != env's {do} ({env.observation_space})")
    if ds.act_dim != da:
        problems.append(f"action dim {ds.act_dim} != env's {da} ({env.action_space})")
    if not problems and hasattr(env.action_space, "low") and len(ds):
        lo = np.asarray(env.action_space.low, dtype=np.float64).reshape(-1)
        hi = np.asarray(env.action_space.high, dtype=np.float64).reshape(-1)
        if np.any(ds.actions < lo - 1e-5) or np.any(ds.actions > hi + 1e-5):
            problems.append(
                f"actions outside env bounds [{lo.min()}, {hi.max()}]: "
                f"data range [{ds.actions.min()}, {ds.actions.max()}]"
            )
    if problems:
        name = getattr(getattr(env, "spec", None), "id", type(env).__name__)
        raise ValueError(f"dataset {ds.env_id!r} does not match env {name}: " + "; ".join(problems))
