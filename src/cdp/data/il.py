"""Imitation-learning data: episodic demonstration buffers, sequence windows, min-max normalisation.

Formats read
------------
* Diffusion-Policy zarr replay buffers (Chi et al., RSS 2023, github.com/real-stanford/diffusion_policy):
  a zarr v2 directory store with ``data/<key>`` arrays (leading dim = total steps N) and ``meta/episode_ends``
  (exclusive end index of each episode, int).
* robomimic hdf5 files (Mandlekar et al., CoRL 2021, github.com/ARISE-Initiative/robomimic): groups
  ``data/demo_<i>/obs/<key>``, ``data/demo_<i>/actions`` and the JSON string attribute ``data.attrs["env_args"]``.

Everything is loaded into memory as float32 numpy arrays held by :class:`EpisodicDataset`; only the requested keys
are read (the PushT zarr also contains a 2.8 GB image array which is never touched by the low-dim loaders).

Windowing follows Diffusion Policy's ``SequenceSampler`` convention (diffusion_policy/common/sampler.py), see
:class:`SequenceWindows`. Normalisation follows DP's ``LinearNormalizer`` "limits" mode, done by
:class:`cdp.normalization.Normalizer` (mode ``"minmax"``), which travels inside the policy's checkpoint. No code
is taken from either project; they were read for conventions only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._optional import optional

if TYPE_CHECKING:
    from cdp.normalization import Normalizer

__all__ = [
    "EpisodicDataset",
    "load_zarr_replay",
    "load_pusht_lowdim",
    "load_robomimic_hdf5",
    "subsample_episodes",
    "SequenceWindows",
    "PUSHT_LOWDIM_OBS_KEYS",
    "default_pusht_zarr_path",
]

#: Diffusion Policy's PushT low-dim observation: 9 block keypoints (18 values, x0, y0, x1, y1, ...) followed by the
#: agent position ``state[:, :2]`` -> 20-D, pixels in the 512x512 workspace.
PUSHT_LOWDIM_OBS_KEYS: tuple = ("keypoint", ("state", slice(0, 2)))



# --------------------------------------------------------------------------------------------------------------------
# Episodic container
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EpisodicDataset:
    """Demonstrations stored as flat step arrays plus episode boundaries.

    Attributes:
        obs: (N, Do) float32 observations, all episodes concatenated in order.
        actions: (N, Da) float32 actions; ``actions[t]`` is the action taken at observation ``obs[t]``.
        episode_ends: (E,) int64 exclusive end index of each episode (strictly increasing, last == N).
        meta: free-form metadata (source path, format, obs layout, robomimic ``env_args`` dict, kept episode ids).

    Raises:
        ValueError: wrong ranks, mismatched lengths, bad ``episode_ends`` or non-finite values (checked on creation).
    """

    obs: np.ndarray
    actions: np.ndarray
    episode_ends: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.obs = np.ascontiguousarray(self.obs, dtype=np.float32)
        self.actions = np.ascontiguousarray(self.actions, dtype=np.float32)
        self.episode_ends = np.asarray(self.episode_ends)
        if self.obs.ndim != 2:
            raise ValueError(f"obs must have shape (N, Do), got {self.obs.shape}")
        if self.actions.ndim != 2:
            raise ValueError(f"actions must have shape (N, Da), got {self.actions.shape}")
        if self.obs.shape[0] != self.actions.shape[0]:
            raise ValueError(
                f"obs and actions have different numbers of steps: {self.obs.shape[0]} vs {self.actions.shape[0]}"
            )
        self.episode_ends = _check_episode_ends(self.episode_ends, self.obs.shape[0])
        _check_finite(self.obs, "obs")
        _check_finite(self.actions, "actions")

    # -- sizes -------------------------------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) int64 inclusive start index of each episode."""
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 number of steps in each episode."""
        return (self.episode_ends - self.episode_starts).astype(np.int64)

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(obs (L, Do), actions (L, Da))`` views of episode ``i`` (negative indices allowed)."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode index {i} out of range for {self.n_episodes} episodes")
        i = i % self.n_episodes
        s, e = int(self.episode_starts[i]), int(self.episode_ends[i])
        return self.obs[s:e], self.actions[s:e]

    def select_episodes(self, idx: Iterable[int]) -> "EpisodicDataset":
        """New dataset holding the given episodes (in the order given); ``meta['episode_ids']`` tracks origins."""
        idx = [int(i) for i in idx]
        if len(idx) == 0:
            raise ValueError("select_episodes needs at least one episode index")
        starts, ends = self.episode_starts, self.episode_ends
        for i in idx:
            if not 0 <= i < self.n_episodes:
                raise ValueError(f"episode index {i} out of range for {self.n_episodes} episodes")
        obs = np.concatenate([self.obs[starts[i] : ends[i]] for i in idx])
        act = np.concatenate([self.actions[starts[i] : ends[i]] for i in idx])
        new_ends = np.cumsum([ends[i] - starts[i] for i in idx]).astype(np.int64)
        meta = dict(self.meta)
        old_ids = np.asarray(self.meta.get("episode_ids", np.arange(self.n_episodes)))
        meta["episode_ids"] = old_ids[idx].copy()
        return EpisodicDataset(obs=obs, actions=act, episode_ends=new_ends, meta=meta)


def _check_episode_ends(ends: np.ndarray, n: int) -> np.ndarray:
    ends = np.asarray(ends)
    if ends.ndim != 1 or ends.shape[0] == 0:
        raise ValueError(f"episode_ends must be a non-empty 1-D array, got shape {ends.shape}")
    if not np.issubdtype(ends.dtype, np.integer):
        if not np.all(np.isfinite(ends)) or np.any(ends != np.round(ends)):
            raise ValueError("episode_ends must hold integers")
    ends = ends.astype(np.int64)
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise ValueError(f"episode_ends must be strictly increasing positive exclusive ends, got {ends[:10]}...")
    if ends[-1] != n:
        raise ValueError(f"episode_ends[-1] = {ends[-1]} does not match the number of steps N = {n}")
    return ends


def _check_finite(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"{name} contains NaN/inf at {bad.sum()} entries (first rows: {rows[:5].tolist()})")


def _parse_obs_key(k) -> tuple[str, Any]:
    if isinstance(k, str):
        return k, None
    if isinstance(k, (tuple, list)) and len(k) == 2 and isinstance(k[0], str):
        return k[0], k[1]
    raise ValueError(f"obs key must be 'name' or ('name', slice_or_indices), got {k!r}")


def _take_obs(arr: np.ndarray, name: str, sel, n: int | None) -> np.ndarray:
    """Flatten trailing dims of ``arr`` (N, ...) to (N, D) and apply the optional column selection."""
    if arr.ndim < 1:
        raise ValueError(f"obs array '{name}' must have a leading step dimension, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"obs array '{name}' has {arr.shape[0]} steps, expected {n} (length of the action array)")
    flat = arr.reshape(arr.shape[0], -1)
    if sel is not None:
        flat = flat[:, sel]
        if flat.ndim == 1:
            flat = flat[:, None]
    return flat


# --------------------------------------------------------------------------------------------------------------------
# zarr (Diffusion Policy replay buffer)
# --------------------------------------------------------------------------------------------------------------------
def load_zarr_replay(
    path: str | os.PathLike,
    obs_keys: Sequence = PUSHT_LOWDIM_OBS_KEYS,
    action_key: str = "action",
) -> EpisodicDataset:
    """Load a Diffusion-Policy zarr v2 replay buffer into an :class:`EpisodicDataset`.

    Args:
        path: directory store holding ``data/<key>`` arrays of leading dim N and ``meta/episode_ends`` (E,)
            exclusive ends.
        obs_keys: observation parts, concatenated in order after flattening trailing dims. Each entry is a key
            name (``"keypoint"``: (N, 9, 2) -> 18 columns) or ``(name, selection)`` where ``selection`` (slice or
            index list) picks flattened columns, e.g. ``("state", slice(0, 2))`` = agent position of PushT.
            The default is the PushT low-dim preset (20-D).
        action_key: name of the (N, Da) action array.

    Returns:
        EpisodicDataset with ``meta = {"source", "format": "zarr", "obs_keys", "obs_layout"}`` where
        ``obs_layout`` maps each part name to its ``(start, stop)`` column range in ``obs``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a zarr group / missing ``data`` or ``meta/episode_ends`` / missing keys (the message lists
            the keys present) / wrong shapes / bad episode ends / NaN or inf.
    """
    zarr = optional("zarr", "il", "reading Diffusion-Policy zarr files")

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"zarr replay buffer not found: {path}")
    try:
        root = zarr.open(path, mode="r")
    except Exception as e:  # zarr raises several types for non-stores
        raise ValueError(f"could not open {path} as a zarr store ({_one_line(e)}); pass the folder of a zarr replay "
                         f"buffer (--data.path)") from None
    if not hasattr(root, "keys"):
        raise ValueError(f"{path} is a zarr array, expected a group with 'data' and 'meta'")
    top = sorted(root.keys())
    if "data" not in top or "meta" not in top:
        raise ValueError(f"zarr store {path} must contain groups 'data' and 'meta'; found {top}")
    data, meta = root["data"], root["meta"]
    if "episode_ends" not in meta:
        raise ValueError(f"zarr store {path} has no meta/episode_ends; meta contains {sorted(meta.keys())}")
    available = sorted(data.keys())
    parsed = [_parse_obs_key(k) for k in obs_keys]
    if len(parsed) == 0:
        raise ValueError("obs_keys must name at least one array")
    missing = [k for k in [action_key] + [p[0] for p in parsed] if k not in available]
    if missing:
        raise ValueError(f"zarr store {path}: missing data keys {missing}; available keys: {available}")

    actions = _read_zarr_array(data, action_key, path)
    if actions.ndim != 2:
        raise ValueError(f"data/{action_key} must have shape (N, Da), got {actions.shape}")
    n = actions.shape[0]
    parts, layout, col = [], {}, 0
    cache: dict[str, np.ndarray] = {}
    for name, sel in parsed:
        if name not in cache:
            cache[name] = _read_zarr_array(data, name, path)
        part = _take_obs(cache[name], f"data/{name}", sel, n)
        label = name if sel is None else f"{name}[{_sel_repr(sel)}]"
        layout[label] = (col, col + part.shape[1])
        col += part.shape[1]
        parts.append(part.astype(np.float32))
    obs = np.concatenate(parts, axis=1)
    ends = _read_zarr_array(meta, "episode_ends", path, "meta")
    return EpisodicDataset(
        obs=obs,
        actions=actions,
        episode_ends=ends,
        meta={"source": path, "format": "zarr", "obs_keys": list(obs_keys), "obs_layout": layout},
    )


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _read_zarr_array(group, name: str, path: str, where: str = "data") -> np.ndarray:
    """``group[name][:]`` after checking that every chunk file is present (zarr would fill a missing chunk with the
    fill value, i.e. silently read zeros); a missing or damaged chunk is one ValueError naming the array."""
    label = f"{where}/{name}"
    fix = "the replay buffer is incomplete or damaged: re-download or regenerate it, or pass another --data.path"
    arr = group[name]
    try:
        total, present = int(arr.nchunks), int(arr.nchunks_initialized)
    except (AttributeError, TypeError):  # a zarr version without these counters: no completeness check
        total = present = 0
    if present < total:
        raise ValueError(f"zarr store {path}: {label} has {total - present} of {total} chunk files missing; {fix}")
    try:
        return np.asarray(arr[:])
    except Exception as e:  # numcodecs / blosc RuntimeError or ValueError for a truncated chunk, OSError
        raise ValueError(f"zarr store {path}: {label} cannot be decoded ({type(e).__name__}: {_one_line(e)}); "
                         f"{fix}") from None


def _sel_repr(sel) -> str:
    if isinstance(sel, slice):
        a = "" if sel.start is None else str(sel.start)
        b = "" if sel.stop is None else str(sel.stop)
        return f"{a}:{b}" + ("" if sel.step is None else f":{sel.step}")
    return ",".join(str(int(i)) for i in sel)


def default_pusht_zarr_path(repo_root: str | os.PathLike | None = None) -> str:
    """Where the PushT zarr is expected: ``$CDP_PUSHT_ZARR`` if set, else ``<repo_root>/../shared/data/pusht/
    pusht_cchi_v7_replay.zarr`` (repo_root defaults to the checkout containing this file). The path may not exist."""
    env = os.environ.get("CDP_PUSHT_ZARR")
    if env:
        return env
    if repo_root is None:
        repo_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    return os.path.normpath(os.path.join(os.fspath(repo_root), "..", "shared", "data", "pusht",
                                         "pusht_cchi_v7_replay.zarr"))


def load_pusht_lowdim(
    path: str | os.PathLike | None = None,
    max_episodes: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> EpisodicDataset:
    """PushT low-dim preset of Diffusion Policy: obs = [keypoint (9x2 flattened, px), agent_pos = state[:, :2] (px)]
    -> (N, 20); actions (N, 2) = commanded agent target (px). Optional episode subsampling (see
    :func:`subsample_episodes`; DP trains on at most 90 episodes).

    Raises: as :func:`load_zarr_replay` and :func:`subsample_episodes`.
    """
    ds = load_zarr_replay(path if path is not None else default_pusht_zarr_path(), PUSHT_LOWDIM_OBS_KEYS, "action")
    if ds.obs_dim != 20 or ds.action_dim != 2:
        raise ValueError(f"PushT preset expects obs dim 20 and action dim 2, got {ds.obs_dim} and {ds.action_dim}")
    ds.meta["preset"] = "pusht_lowdim"
    if max_episodes is not None or fraction is not None:
        ds = subsample_episodes(ds, fraction=fraction, max_episodes=max_episodes, seed=seed)
    return ds


# --------------------------------------------------------------------------------------------------------------------
# robomimic hdf5
# --------------------------------------------------------------------------------------------------------------------
_DEMO_RE = re.compile(r"^demo_(\d+)$")


def load_robomimic_hdf5(
    path: str | os.PathLike,
    obs_keys: Sequence,
    action_key: str = "actions",
    filter_key: str | None = None,
) -> EpisodicDataset:
    """Load a robomimic-format hdf5 file.

    Layout: ``data/demo_<i>/obs/<key>`` (L_i, ...) and ``data/demo_<i>/<action_key>`` (L_i, Da); demos are sorted
    numerically by ``i`` (``demo_2`` before ``demo_10``). ``data.attrs["env_args"]`` (JSON string) is parsed into
    ``meta["env_args"]`` (``None`` if absent). With ``filter_key``, only the demos listed in ``mask/<filter_key>``
    are loaded (robomimic's train/valid split convention).

    Args:
        obs_keys: observation parts concatenated in order (same syntax as :func:`load_zarr_replay`).

    Returns:
        EpisodicDataset with ``meta = {"source", "format": "robomimic_hdf5", "demo_names", "env_args",
        "obs_keys", "obs_layout"}``.

    Raises:
        FileNotFoundError: missing file.
        ValueError: no ``data`` group / no demos / missing obs or action keys (lists what exists) / shapes
            inconsistent across demos / invalid env_args JSON / NaN or inf / bad filter key.
    """
    h5py = optional("h5py", "il", "reading robomimic hdf5 files")

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"robomimic hdf5 file not found: {path}")
    parsed = [_parse_obs_key(k) for k in obs_keys]
    if len(parsed) == 0:
        raise ValueError("obs_keys must name at least one observation")
    fix = f"regenerate it (cdp data lift / cdp data can --out {path}) or pass another --data.path"
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is an empty file, not a robomimic hdf5; {fix}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable hdf5 file ({_one_line(e)}); {fix}") from None
    try:
        with f:
            if "data" not in f:
                raise ValueError(f"{path}: no 'data' group; top-level keys: {sorted(f.keys())}")
            grp = f["data"]
            demos = []
            for name in grp.keys():
                m = _DEMO_RE.match(name)
                if m:
                    demos.append((int(m.group(1)), name))
            demos = [n for _, n in sorted(demos)]
            if filter_key is not None:
                if "mask" not in f or filter_key not in f["mask"]:
                    have = sorted(f["mask"].keys()) if "mask" in f else []
                    raise ValueError(f"{path}: filter key '{filter_key}' not found under mask/; available: {have}")
                wanted = {x.decode() if isinstance(x, bytes) else str(x) for x in f["mask"][filter_key][:]}
                demos = [d for d in demos if d in wanted]
            if not demos:
                raise ValueError(f"{path}: no 'demo_<i>' groups under data/; found {sorted(grp.keys())[:20]}")

            env_args = None
            if "env_args" in grp.attrs:
                raw = grp.attrs["env_args"]
                if isinstance(raw, bytes):
                    raw = raw.decode()
                try:
                    env_args = json.loads(raw)
                except (TypeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}: data.attrs['env_args'] is not valid JSON: {e}") from e

            obs_list, act_list, lengths = [], [], []
            layout: dict[str, tuple[int, int]] = {}
            for di, d in enumerate(demos):
                g = grp[d]
                if action_key not in g:
                    raise ValueError(f"{path}: data/{d} has no '{action_key}'; keys: {sorted(g.keys())}")
                if "obs" not in g:
                    raise ValueError(f"{path}: data/{d} has no 'obs' group; keys: {sorted(g.keys())}")
                og = g["obs"]
                missing = [n for n, _ in parsed if n not in og]
                if missing:
                    raise ValueError(f"{path}: data/{d}/obs is missing keys {missing}; available: {sorted(og.keys())}")
                a = np.asarray(g[action_key][:])
                if a.ndim != 2:
                    raise ValueError(f"{path}: data/{d}/{action_key} must have shape (L, Da), got {a.shape}")
                parts, col = [], 0
                for name, sel in parsed:
                    p = _take_obs(np.asarray(og[name][:]), f"data/{d}/obs/{name}", sel, a.shape[0])
                    if di == 0:
                        label = name if sel is None else f"{name}[{_sel_repr(sel)}]"
                        layout[label] = (col, col + p.shape[1])
                    col += p.shape[1]
                    parts.append(p.astype(np.float32))
                o = np.concatenate(parts, axis=1)
                if obs_list and (o.shape[1] != obs_list[0].shape[1] or a.shape[1] != act_list[0].shape[1]):
                    raise ValueError(
                        f"{path}: data/{d} has obs/action dims {o.shape[1]}/{a.shape[1]}, but the first demo has "
                        f"{obs_list[0].shape[1]}/{act_list[0].shape[1]}"
                    )
                if a.shape[0] == 0:
                    raise ValueError(f"{path}: data/{d} is empty")
                obs_list.append(o)
                act_list.append(a)
                lengths.append(a.shape[0])
    except OSError as e:  # a truncated file fails when its data is read
        raise ValueError(f"{path} is damaged: reading it failed ({_one_line(e)}); {fix}") from None
    return EpisodicDataset(
        obs=np.concatenate(obs_list),
        actions=np.concatenate(act_list),
        episode_ends=np.cumsum(lengths).astype(np.int64),
        meta={
            "source": path,
            "format": "robomimic_hdf5",
            "demo_names": demos,
            "env_args": env_args,
            "obs_keys": list(obs_keys),
            "obs_layout": layout,
        },
    )


# --------------------------------------------------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------------------------------------------------
def subsample_episodes(
    ds: EpisodicDataset,
    fraction: float | None = None,
    max_episodes: int | None = None,
    seed: int = 0,
) -> EpisodicDataset:
    """Keep a random subset of whole episodes (demo-level subsampling), original order preserved.

    The number kept is ``max(1, round(fraction * E))`` (Python ``round``, half to even), then capped at
    ``max_episodes``. Episodes are drawn without replacement with ``numpy.random.default_rng(seed)``, so the result
    is deterministic in ``seed``; ``meta['episode_ids']`` records the original indices. With neither argument the
    dataset is returned unchanged.

    Raises:
        ValueError: ``fraction`` outside (0, 1] or ``max_episodes`` < 1.
    """
    n = ds.n_episodes
    k = n
    if fraction is not None:
        fraction = float(fraction)
        if not (0.0 < fraction <= 1.0) or not np.isfinite(fraction):
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = max(1, round(fraction * n))
    if max_episodes is not None:
        if int(max_episodes) < 1:
            raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
        k = min(k, int(max_episodes))
    if k == n:
        return ds
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(n, size=k, replace=False))
    out = ds.select_episodes(keep)
    out.meta["subsample"] = {"fraction": fraction, "max_episodes": max_episodes, "seed": seed}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------------------
class SequenceWindows(Dataset):
    """Fixed-length (observation history, action chunk) windows, Diffusion-Policy style.

    For a window whose *current* step is ``t`` (index within its episode, length L):

    * ``obs``    = ``obs[t-To+1 .. t]`` -> (To, Do)
    * ``action`` = ``actions[t-To+1 .. t-To+H]`` -> (H, Da) with ``align="dp"`` (Diffusion Policy: the chunk starts
      with the oldest observed step, ``H >= To`` required; DP executes ``chunk[To-1 : To-1+Ta]`` at test time), or
      ``actions[t .. t+H-1]`` with ``align="current"`` (chunk starts at the current step; with ``H=1, To=2`` this
      is single-action diffusion BC: two observations -> the action at ``t``).

    Out-of-episode indices are padded by repeating the episode's first/last frame (never crossing episodes), as
    DP's ``SequenceSampler``. Internally each window spans ``S`` steps (``S = H`` for "dp", ``To-1+H`` for
    "current") starting at ``s = t-To+1``; ``s`` ranges over ``[-pad_before, L - S + pad_after]`` with both pads
    clipped to ``[0, S-1]`` (DP's ``create_indices``). Defaults: ``pad_before = To-1`` (first window has t = 0);
    ``pad_after = n_action_steps-1`` when ``n_action_steps`` is given (DP's PushT setting: H=16, To=2, Ta=8 ->
    pad_after=7), else ``S-To`` (the last window has t = L-1, so every step is a current step exactly once).
    Episodes shorter than ``S - pad_before - pad_after`` contribute no windows.

    Attributes:
        indices: (M, S) int64 global step indices gathered for each window (padding already applied).
        current: (M,) int64 global index of each window's current step ``t`` (before clipping).

    Returns per item: ``{"obs": (To, Do) float32, "action": (H, Da) float32}`` tensors, normalised when normalisers
    are given (any object with ``normalize(tensor)``, e.g. a fitted :class:`cdp.normalization.Normalizer`).

    Raises:
        ValueError: To < 1, H < 1, H < To with ``align="dp"``, unknown ``align``, or negative pads.
    """

    def __init__(
        self,
        ds: EpisodicDataset,
        n_obs_steps: int = 2,
        horizon: int = 16,
        n_action_steps: int | None = None,
        pad_before: int | None = None,
        pad_after: int | None = None,
        align: str = "dp",
        obs_normalizer: "Normalizer | None" = None,
        action_normalizer: "Normalizer | None" = None,
    ) -> None:
        To, H = int(n_obs_steps), int(horizon)
        if To < 1 or H < 1:
            raise ValueError(f"n_obs_steps and horizon must be >= 1, got {To}, {H}")
        if align == "dp":
            if H < To:
                raise ValueError(f"align='dp' needs horizon >= n_obs_steps (got H={H}, To={To}); use align='current'")
            S, a0 = H, 0
        elif align == "current":
            S, a0 = To - 1 + H, To - 1
        else:
            raise ValueError(f"align must be 'dp' or 'current', got {align!r}")
        if pad_before is None:
            pad_before = To - 1
        if pad_after is None:
            pad_after = (int(n_action_steps) - 1) if n_action_steps is not None else S - To
        if pad_before < 0 or pad_after < 0:
            raise ValueError(f"pads must be >= 0, got pad_before={pad_before}, pad_after={pad_after}")
        pad_before, pad_after = min(pad_before, S - 1), min(pad_after, S - 1)

        self.ds = ds
        self.n_obs_steps, self.horizon, self.align = To, H, align
        self.seq_len, self.action_offset = S, a0
        self.pad_before, self.pad_after = pad_before, pad_after
        self.obs_normalizer, self.action_normalizer = obs_normalizer, action_normalizer

        rows, cur = [], []
        ar = np.arange(S, dtype=np.int64)
        for start, end in zip(ds.episode_starts, ds.episode_ends):
            L = int(end - start)
            s = np.arange(-pad_before, L - S + pad_after + 1, dtype=np.int64)
            if s.size == 0:
                continue
            rows.append(start + np.clip(s[:, None] + ar[None, :], 0, L - 1))
            cur.append(start + s + To - 1)
        self.indices = np.concatenate(rows) if rows else np.zeros((0, S), dtype=np.int64)
        self.current = np.concatenate(cur) if cur else np.zeros((0,), dtype=np.int64)
        self._obs = torch.from_numpy(ds.obs)
        self._act = torch.from_numpy(ds.actions)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(self.indices[i])
        To, H, a0 = self.n_obs_steps, self.horizon, self.action_offset
        obs = self._obs[idx[:To]]
        act = self._act[idx[a0 : a0 + H]]
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer.normalize(obs)
        if self.action_normalizer is not None:
            act = self.action_normalizer.normalize(act)
        return {"obs": obs, "action": act}
