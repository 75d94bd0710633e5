"""Small datasets written by the tests (no downloads)."""

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
