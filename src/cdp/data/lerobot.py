"""LeRobotDataset folders (low-dim features) as an :class:`~cdp.data.il.EpisodicDataset`.

Layouts read (facts taken from lerobot 0.4.4, ``src/lerobot/datasets/utils.py`` and
``datasets/v30/convert_dataset_v21_to_v30.py``; no code taken from it):

* every version: ``meta/info.json`` with ``codebase_version``, ``features`` (name → ``{"dtype", "shape", "names"}``;
  a vector feature has ``shape [d]``), ``data_path`` (a ``str.format`` template), ``chunks_size``, ``total_episodes``,
  ``total_frames``, ``fps``. Frames are parquet rows with one column per feature (a vector as a list of d numbers, a
  ``shape [1]`` feature possibly as a plain number) and the columns ``episode_index``, ``frame_index`` (0..L-1 within
  the episode), ``index`` (global) and ``timestamp``.
* ``v2.x`` (``v2.0``, ``v2.1``): one file per episode, ``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``
  with ``episode_chunk = episode_index // chunks_size``; episodes listed in ``meta/episodes.jsonl``
  (``{"episode_index", "length", "tasks"}`` per line).
* ``v3.0``: many episodes per file, ``data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet``; episodes listed in
  ``meta/episodes/chunk-*/file-*.parquet`` with ``episode_index``, ``length``, ``data/chunk_index``,
  ``data/file_index`` (the data file holding the episode), ``dataset_from_index`` / ``dataset_to_index``.

Images and videos are not read (cdp's IL policies are low-dim). Parquet files are read with pyarrow (the ``il`` extra).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from .._optional import optional
from .il import EpisodicDataset

__all__ = ["is_lerobot_dataset", "load_lerobot_dataset", "LEROBOT_OBS_KEYS"]

#: the observation features the IL job reads by default (LeRobot's proprioceptive state)
LEROBOT_OBS_KEYS: tuple[str, ...] = ("observation.state",)
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
_NUMERIC = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
            "bool")


def is_lerobot_dataset(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder holding ``meta/info.json`` (a LeRobotDataset root)."""
    return path is not None and os.path.isfile(os.path.join(os.fspath(path), "meta", "info.json"))


def load_lerobot_dataset(path: str | os.PathLike, obs_keys: Sequence[str] = LEROBOT_OBS_KEYS,
                         action_key: str = "action") -> EpisodicDataset:
    """Read the low-dim features of a local LeRobotDataset folder (``v2.x`` or ``v3.0``).

    Args:
        path: the dataset root (holding ``meta/info.json`` and ``data/``).
        obs_keys: vector features concatenated, in order, into the observation (default ``observation.state``;
            e.g. ``("observation.environment_state", "observation.state")``).
        action_key: the action feature.
    Returns:
        EpisodicDataset with obs (N, Do), actions (N, Da) float32, episodes in ascending ``episode_index`` with
        their frames in ``frame_index`` order, and ``meta = {"source", "format": "lerobot", "codebase_version",
        "fps", "robot_type", "obs_keys", "obs_layout", "lerobot_episode_index"}`` (the LeRobot index of each episode).
    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError (one line naming the file and what is wrong): not a LeRobotDataset folder, unreadable
            ``info.json``, an unknown ``codebase_version``, a feature missing from ``info.json`` or not a numeric
            vector, a data file missing or unreadable, a column missing, rows whose length differs from the
            feature's shape, null / NaN / inf values, an episode with no frames or a length other than the
            episode metadata's, frame indices that are not 0..L-1, or a frame count other than ``total_frames``.
    """
    pq = optional("pyarrow.parquet", "il", "reading LeRobot datasets")
    root = os.fspath(path)
    if not os.path.exists(root):
        raise FileNotFoundError(f"LeRobot dataset not found: {root}")
    info_path = os.path.join(root, "meta", "info.json")
    if not os.path.isfile(info_path):
        raise ValueError(f"{root} is not a LeRobotDataset folder (no meta/info.json); pass its root as --data.path")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{info_path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_path} must hold a JSON object")
    version = str(info.get("codebase_version", ""))
    if not (version.startswith("v2.") or version.startswith("v3.")):
        raise ValueError(f"{info_path}: codebase_version {version or None!r} is not a LeRobotDataset v2.x or v3.x")
    keys = list(obs_keys)
    if not keys:
        raise ValueError("obs_keys must name at least one feature")
    dims = {k: _vector_dim(info, k, info_path) for k in [*keys, action_key]}

    if version.startswith("v2."):
        files, expected = _v2_files(root, info)
    else:
        files, expected = _v3_files(root, info, pq)
    columns = list(dict.fromkeys([*keys, action_key, "episode_index", "frame_index"]))
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for file in files:
        rel = os.path.relpath(file, root)
        if not os.path.isfile(file):
            raise ValueError(f"{root}: data file {rel} is missing; the dataset is incomplete (re-download or "
                             f"re-convert it)")
        names = _read(pq.read_schema, file, rel, root).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{root}: {rel} has no column(s) {missing}; columns: {names}")
        table = _read(lambda f: pq.read_table(f, columns=columns), file, rel, root)
        ep = _column(table, "episode_index", 1, rel, root, np.int64)[:, 0]
        for c in columns:
            if c in ("episode_index", "frame_index"):
                parts[c].append(_column(table, c, 1, rel, root, np.int64)[:, 0])
            else:
                parts[c].append(_column(table, c, dims[c], rel, root, np.float32, ep))

    data = {c: np.concatenate(v) for c, v in parts.items()}  # files is never empty
    ep, frame = data["episode_index"], data["frame_index"]
    if ep.size == 0:
        raise ValueError(f"{root}: the data files hold no frames")
    order = np.lexsort((frame, ep))
    ep, frame = ep[order], frame[order]
    ids, starts, lengths = np.unique(ep, return_index=True, return_counts=True)
    for i, s, n in zip(ids, starts, lengths):
        if not np.array_equal(frame[s:s + n], np.arange(n)):
            raise ValueError(f"{root}: episode {int(i)} has frame_index values that are not 0..{n - 1} "
                             "(duplicated or missing frames)")
    if expected is not None:
        got = dict(zip(ids.tolist(), lengths.tolist()))
        for i, n in expected.items():
            if n <= 0:
                raise ValueError(f"{root}: episode {i} is empty (length {n} in the episode metadata)")
            if i not in got:
                raise ValueError(f"{root}: episode {i} (length {n} in the episode metadata) has no frames in data/")
            if got[i] != n:
                raise ValueError(f"{root}: episode {i} has {got[i]} frames in data/ but length {n} in the episode "
                                 "metadata")
        extra = sorted(set(got) - set(expected))
        if extra:
            raise ValueError(f"{root}: data/ holds episodes {extra[:5]} that the episode metadata does not list")
    total = info.get("total_frames")
    if isinstance(total, int) and total != ep.size:
        raise ValueError(f"{root}: meta/info.json says total_frames={total} but the data files hold {ep.size} frames "
                         "(missing or extra data files)")
    obs = np.concatenate([data[k][order] for k in keys], axis=1)
    layout, col = {}, 0
    for k in keys:
        layout[k] = (col, col + dims[k])
        col += dims[k]
    return EpisodicDataset(
        obs=obs, actions=data[action_key][order], episode_ends=np.cumsum(lengths).astype(np.int64),
        meta={"source": root, "format": "lerobot", "codebase_version": version, "fps": info.get("fps"),
              "robot_type": info.get("robot_type"), "obs_keys": keys, "obs_layout": layout,
              "lerobot_episode_index": ids.astype(np.int64).tolist()})


# ------------------------------------------------------------------------------------------------------------ helpers
def _one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _read(fn, file: str, rel: str, root: str):
    """``fn(file)`` (a pyarrow read); any failure (pyarrow.ArrowInvalid, OSError: a damaged or non-parquet file) is
    one ValueError naming the file."""
    try:
        return fn(file)
    except Exception as e:
        raise ValueError(f"{root}: {rel} cannot be read as parquet ({type(e).__name__}: {_one_line(e)}); the dataset "
                         "is damaged (re-download or re-convert it)") from None


def _vector_dim(info: dict, key: str, info_path: str) -> int:
    features = info.get("features")
    if not isinstance(features, dict):
        raise ValueError(f"{info_path} has no 'features' object")
    if key not in features:
        have = sorted(k for k, v in features.items() if isinstance(v, dict) and v.get("dtype") in _NUMERIC)
        raise ValueError(f"{info_path}: no feature {key!r}; numeric features: {have}")
    ft = features[key]
    dtype, shape = (ft.get("dtype"), ft.get("shape")) if isinstance(ft, dict) else (None, None)
    if dtype not in _NUMERIC:
        raise ValueError(f"{info_path}: feature {key!r} has dtype {dtype!r}; cdp reads numeric vector features only")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise ValueError(f"{info_path}: feature {key!r} has shape {shape!r}; cdp reads vectors (shape [d])")
    return int(shape[0])


def _v2_files(root: str, info: dict) -> tuple[list[str], dict[int, int] | None]:
    """Per-episode files of a v2.x dataset and {episode_index: length} from meta/episodes.jsonl (None if absent)."""
    template = info.get("data_path") or V2_DATA_PATH
    chunks = int(info.get("chunks_size") or 1000)
    listing = os.path.join(root, "meta", "episodes.jsonl")
    expected: dict[int, int] | None = None
    if os.path.isfile(listing):
        expected = {}
        with open(listing, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    expected[int(row["episode_index"])] = int(row["length"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{listing}: line {n} is not an episode record with episode_index and length "
                                     f"({_one_line(e)})") from None
        episodes = sorted(expected)
    else:
        total = info.get("total_episodes")
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"{root}: no meta/episodes.jsonl and no total_episodes in meta/info.json")
        episodes = list(range(total))
    if not episodes:
        raise ValueError(f"{listing}: lists no episodes")
    try:
        files = [os.path.join(root, template.format(episode_chunk=i // chunks, episode_index=i)) for i in episodes]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{root}: meta/info.json data_path {template!r} is not a v2 template ({_one_line(e)})") from None
    return files, expected


def _v3_files(root: str, info: dict, pq) -> tuple[list[str], dict[int, int] | None]:
    """Data files of a v3.x dataset (from meta/episodes/, else every data/chunk-*/*.parquet) and the episode
    lengths of meta/episodes/ (None if absent)."""
    template = info.get("data_path") or V3_DATA_PATH
    meta_files = sorted(glob.glob(os.path.join(root, "meta", "episodes", "chunk-*", "*.parquet")))
    if not meta_files:
        files = sorted(glob.glob(os.path.join(root, "data", "chunk-*", "*.parquet")))
        if not files:
            raise ValueError(f"{root}: no parquet files under data/chunk-*/")
        return files, None
    cols = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    expected: dict[int, int] = {}
    pairs: set[tuple[int, int]] = set()
    for mf in meta_files:
        rel = os.path.relpath(mf, root)
        names = _read(pq.read_schema, mf, rel, root).names
        missing = [c for c in cols if c not in names]
        if missing:
            raise ValueError(f"{root}: episode metadata {rel} has no column(s) {missing}")
        t = _read(lambda f: pq.read_table(f, columns=cols), mf, rel, root)
        arr = {c: _column(t, c, 1, rel, root, np.int64)[:, 0] for c in cols}
        for i, n, ch, fi in zip(*(arr[c].tolist() for c in cols)):
            expected[int(i)] = int(n)
            pairs.add((int(ch), int(fi)))
    if not expected:
        raise ValueError(f"{root}: meta/episodes/ lists no episodes")
    try:
        files = [os.path.join(root, template.format(chunk_index=c, file_index=f)) for c, f in sorted(pairs)]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{root}: meta/info.json data_path {template!r} is not a v3 template ({_one_line(e)})") from None
    return files, expected


def _column(table, name: str, dim: int, rel: str, root: str, dtype, episodes: np.ndarray | None = None) -> np.ndarray:
    """Column ``name`` of a pyarrow table as an (n, dim) array: a list column (each row d values) or, for dim 1, a
    plain number column. Raises ValueError for nulls, rows of another length, non-numeric values, NaN / inf."""
    pa = optional("pyarrow", "il", "reading LeRobot datasets")
    pc = optional("pyarrow.compute", "il", "reading LeRobot datasets")
    col = table.column(name).combine_chunks()
    n = len(col)
    where = f"{root}: {rel} column {name!r}"
    if col.null_count:
        raise ValueError(f"{where} has {col.null_count} null rows")
    typ = col.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = np.nonzero(lengths != dim)[0]
        if bad.size:
            raise ValueError(f"{where}: row {int(bad[0])} has {int(lengths[bad[0]])} values, but meta/info.json gives "
                             f"shape [{dim}]")
        values = col.flatten()
        if values.null_count:
            raise ValueError(f"{where} has {values.null_count} null values")
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)):
            raise ValueError(f"{where} holds {values.type} values, not numbers")
        arr = values.to_numpy(zero_copy_only=False).reshape(n, dim)
    elif dim == 1 and (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        arr = col.to_numpy(zero_copy_only=False).reshape(n, 1)
    else:
        raise ValueError(f"{where} has type {typ}, expected a list of {dim} numbers")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            row = int(np.nonzero(~finite.all(1))[0][0])
            at = f" (episode {int(episodes[row])}, row {row})" if episodes is not None else f" (row {row})"
            raise ValueError(f"{where} holds NaN/inf{at}")
        if np.issubdtype(dtype, np.integer):
            raise ValueError(f"{where} holds floats, expected integers")
    return arr.astype(dtype, copy=False)
