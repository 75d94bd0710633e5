"""Small datasets written by the tests (no downloads). (Not named ``datasets``: that would shadow Hugging Face's
``datasets`` package, which LeRobot imports, for every test.)"""

import json
from pathlib import Path

import numpy as np
import zarr


def make_pusht_zarr(path, lengths=(24, 30, 20, 26), seed=0):
    """A replay buffer in the PushT layout: data/action (N, 2), data/state (N, 5), data/keypoint (N, 9, 2), px."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    st = np.concatenate([rng.uniform(50, 450, (n, 4)), rng.uniform(0, 6.28, (n, 1))], 1).astype(np.float32)
    kp = (st[:, None, 2:4] + rng.normal(0, 20, (n, 9, 2))).astype(np.float32)
    act = (st[:, :2] + rng.normal(0, 5, (n, 2))).astype(np.float32)
    root = zarr.open_group(str(path), mode="w")
    root.create_dataset("data/action", data=act)
    root.create_dataset("data/state", data=st)
    root.create_dataset("data/keypoint", data=kp)
    root.create_dataset("meta/episode_ends", data=np.cumsum(lengths).astype(np.int64))
    return str(path)


# ------------------------------------------------------------------------------------------------ LeRobotDataset
def _lerobot_episodes(lengths, state_dim, action_dim, seed):
    rng = np.random.default_rng(seed)
    return [{"observation.state": rng.normal(size=(n, state_dim)).astype(np.float32),
             "observation.environment_state": rng.normal(size=(n, 4)).astype(np.float32),
             "action": np.tanh(rng.normal(size=(n, action_dim))).astype(np.float32)} for n in lengths]


def _lerobot_info(version, lengths, state_dim, action_dim, data_path, chunks_size):
    vec = lambda d: {"dtype": "float32", "shape": [d], "names": [f"x{i}" for i in range(d)]}  # noqa: E731
    scalar = lambda dt: {"dtype": dt, "shape": [1], "names": None}  # noqa: E731
    return {"codebase_version": version, "robot_type": "toy", "total_episodes": len(lengths),
            "total_frames": int(sum(lengths)), "total_tasks": 1, "chunks_size": chunks_size, "fps": 10,
            "splits": {"train": f"0:{len(lengths)}"}, "data_path": data_path, "video_path": None,
            "features": {"observation.state": vec(state_dim), "observation.environment_state": vec(4),
                         "action": vec(action_dim), "timestamp": scalar("float32"), "frame_index": scalar("int64"),
                         "episode_index": scalar("int64"), "index": scalar("int64"), "task_index": scalar("int64")}}


def _lerobot_table(eps, ids, offsets, fixed):
    import pyarrow as pa
    cols = {}
    for key in ("observation.state", "observation.environment_state", "action"):
        x = np.concatenate([e[key] for e in eps])
        d = x.shape[1]
        values = pa.array(x.reshape(-1), pa.float32())
        cols[key] = (pa.FixedSizeListArray.from_arrays(values, d) if fixed else
                     pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, d), pa.int32()), values))
    n = [len(e["action"]) for e in eps]
    frame = np.concatenate([np.arange(k) for k in n])
    cols["timestamp"] = pa.array((frame / 10).astype(np.float32))
    cols["frame_index"] = pa.array(frame.astype(np.int64))
    cols["episode_index"] = pa.array(np.repeat(ids, n).astype(np.int64))
    cols["index"] = pa.array(np.concatenate([o + np.arange(k) for o, k in zip(offsets, n)]).astype(np.int64))
    cols["task_index"] = pa.array(np.zeros(sum(n), np.int64))
    return pa.table(cols)


def make_lerobot_v2(path, lengths=(12, 9, 15), state_dim=3, action_dim=2, seed=0, chunks_size=2):
    """A LeRobotDataset v2.1 folder: meta/info.json, meta/episodes.jsonl, one parquet per episode under
    data/chunk-{episode_index // chunks_size:03d}/episode_{episode_index:06d}.parquet (variable-length list columns).
    Returns (root, episodes): episodes[i] maps each vector feature to its (L_i, d) float32 array."""
    import pyarrow.parquet as pq
    root = Path(path)
    eps = _lerobot_episodes(lengths, state_dim, action_dim, seed)
    tmpl = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(_lerobot_info("v2.1", lengths, state_dim, action_dim, tmpl,
                                                                      chunks_size), indent=2))
    with open(root / "meta" / "episodes.jsonl", "w") as f:
        for i, n in enumerate(lengths):
            f.write(json.dumps({"episode_index": i, "tasks": ["reach"], "length": int(n)}) + "\n")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, e in enumerate(eps):
        file = root / tmpl.format(episode_chunk=i // chunks_size, episode_index=i)
        file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_lerobot_table([e], [i], [offsets[i]], fixed=False), file)
    return str(root), eps


def make_lerobot_v3(path, lengths=(12, 9, 15, 7), state_dim=3, action_dim=2, seed=1, files=((0, 1, 2), (3,))):
    """A LeRobotDataset v3.0 folder: meta/info.json, meta/episodes/chunk-000/file-000.parquet and the episodes'
    frames in data/chunk-000/file-{j:03d}.parquet, file j holding the episodes ``files[j]`` (fixed-size list
    columns). Returns (root, episodes) as :func:`make_lerobot_v2`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = Path(path)
    eps = _lerobot_episodes(lengths, state_dim, action_dim, seed)
    tmpl = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(_lerobot_info("v3.0", lengths, state_dim, action_dim, tmpl,
                                                                      1000), indent=2))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    file_of = {i: j for j, ids in enumerate(files) for i in ids}
    for j, ids in enumerate(files):
        file = root / tmpl.format(chunk_index=0, file_index=j)
        file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_lerobot_table([eps[i] for i in ids], list(ids), [offsets[i] for i in ids], fixed=True), file)
    ids = list(range(len(lengths)))
    meta = pa.table({"episode_index": pa.array(ids, pa.int64()),
                     "tasks": pa.array([["reach"]] * len(ids), pa.list_(pa.string())),
                     "length": pa.array(list(lengths), pa.int64()),
                     "data/chunk_index": pa.array([0] * len(ids), pa.int64()),
                     "data/file_index": pa.array([file_of[i] for i in ids], pa.int64()),
                     "dataset_from_index": pa.array(offsets, pa.int64()),
                     "dataset_to_index": pa.array(offsets + np.asarray(lengths), pa.int64())})
    pq.write_table(meta, root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    return str(root), eps
