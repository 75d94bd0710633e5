"""LeRobotDataset reader (cdp.data.lerobot): v2.1 and v3.0 folders written by the tests, bad inputs, and `cdp train`
on one (task lerobot: no evaluation environment)."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from cdp.cli import main  # noqa: E402
from cdp.data.lerobot import is_lerobot_dataset, load_lerobot_dataset  # noqa: E402
from demo_data import make_lerobot_v2, make_lerobot_v3  # noqa: E402


def check_episodes(ds, eps, obs_keys=("observation.state",)):
    assert ds.n_episodes == len(eps)
    for i, e in enumerate(eps):
        obs, act = ds.episode(i)
        assert np.array_equal(obs, np.concatenate([e[k] for k in obs_keys], 1))
        assert np.array_equal(act, e["action"])


@pytest.mark.parametrize("make", [make_lerobot_v2, make_lerobot_v3])
def test_reader_returns_the_written_episodes(tmp_path, make):
    root, eps = make(tmp_path / "ds")
    assert is_lerobot_dataset(root) and not is_lerobot_dataset(tmp_path)
    ds = load_lerobot_dataset(root)
    check_episodes(ds, eps)
    assert ds.obs.dtype == np.float32 and ds.actions.dtype == np.float32
    assert ds.meta["format"] == "lerobot" and ds.meta["lerobot_episode_index"] == list(range(len(eps)))
    assert ds.meta["codebase_version"] == ("v2.1" if make is make_lerobot_v2 else "v3.0")
    both = ("observation.environment_state", "observation.state")
    ds2 = load_lerobot_dataset(root, obs_keys=both)
    check_episodes(ds2, eps, both)
    assert ds2.meta["obs_layout"] == {"observation.environment_state": (0, 4), "observation.state": (4, 7)}


def test_v3_rows_out_of_order_are_sorted_by_episode_and_frame(tmp_path):
    import pyarrow.parquet as pq
    root, eps = make_lerobot_v3(tmp_path / "ds")
    f = Path(root) / "data/chunk-000/file-000.parquet"
    t = pq.read_table(f)
    pq.write_table(t.take(np.random.default_rng(0).permutation(t.num_rows)), f)
    check_episodes(load_lerobot_dataset(root), eps)


def test_v3_without_episode_metadata_reads_every_data_file(tmp_path):
    root, eps = make_lerobot_v3(tmp_path / "ds")
    (Path(root) / "meta/episodes/chunk-000/file-000.parquet").unlink()
    check_episodes(load_lerobot_dataset(root), eps)


# ------------------------------------------------------------------------------------------------ bad inputs
def _edit_info(root, fn):
    p = Path(root) / "meta" / "info.json"
    info = json.loads(p.read_text())
    fn(info)
    p.write_text(json.dumps(info))


def _rewrite(file, column, fn):
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = pq.read_table(file)
    i = t.schema.get_field_index(column)
    pq.write_table(t.set_column(i, column, pa.array(fn(t.column(column).to_pylist()))) if fn else t.drop([column]),
                   file)


def test_bad_datasets_are_one_clear_error(tmp_path):
    v2, _ = make_lerobot_v2(tmp_path / "v2")
    ep1 = Path(v2) / "data/chunk-000/episode_000001.parquet"
    cases = []

    root, _ = make_lerobot_v2(tmp_path / "nocol")
    _rewrite(Path(root) / "data/chunk-000/episode_000001.parquet", "action", None)
    cases.append((root, r"episode_000001.parquet has no column\(s\) \['action'\]"))

    root, _ = make_lerobot_v2(tmp_path / "dims")
    _edit_info(root, lambda i: i["features"]["observation.state"].update(shape=[5]))
    cases.append((root, r"row 0 has 3 values, but meta/info.json gives shape \[5\]"))

    root, _ = make_lerobot_v3(tmp_path / "nan")
    _rewrite(Path(root) / "data/chunk-000/file-000.parquet", "action",
             lambda rows: [r if k != 14 else [float("nan"), 0.0] for k, r in enumerate(rows)])
    cases.append((root, r"column 'action' holds NaN/inf \(episode 1, row 14\)"))

    root, _ = make_lerobot_v2(tmp_path / "empty")
    (Path(root) / "meta/episodes.jsonl").write_text(
        (Path(root) / "meta/episodes.jsonl").read_text().replace('"length": 9', '"length": 0'))
    cases.append((root, "episode 1 is empty"))

    root, _ = make_lerobot_v2(tmp_path / "gone")
    (Path(root) / "data/chunk-001/episode_000002.parquet").unlink()
    cases.append((root, "data file data/chunk-001/episode_000002.parquet is missing"))

    root, _ = make_lerobot_v3(tmp_path / "short")
    _edit_info(root, lambda i: i.update(total_frames=i["total_frames"] + 1))
    cases.append((root, "total_frames=44 but the data files hold 43"))

    root, _ = make_lerobot_v2(tmp_path / "version")
    _edit_info(root, lambda i: i.update(codebase_version="v1.6"))
    cases.append((root, "codebase_version 'v1.6' is not a LeRobotDataset v2.x or v3.x"))

    root, _ = make_lerobot_v2(tmp_path / "feature")
    _edit_info(root, lambda i: i["features"].pop("observation.state"))
    cases.append((root, "no feature 'observation.state'"))

    root, _ = make_lerobot_v3(tmp_path / "damaged")
    f = Path(root) / "data/chunk-000/file-001.parquet"
    f.write_bytes(f.read_bytes()[:100])
    cases.append((root, "file-001.parquet cannot be read as parquet"))

    for root, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            load_lerobot_dataset(root)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_lerobot_dataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a LeRobotDataset folder"):
        load_lerobot_dataset(ep1.parent)


# ------------------------------------------------------------------------------------------------ cdp train
TRAIN = ["train", "--data.task", "lerobot", "--train.steps", "6", "--train.batch_size", "16",
         "--policy.network.hidden", "32", "--policy.schedule.num_steps", "10", "--policy.num_inference_steps", "4",
         "--eval.diag_obs", "1", "--eval.diag_samples", "1", "--train.progress", "False", "--train.threads", "1"]


def test_cdp_train_on_a_lerobot_dataset(tmp_path, capsys):
    root, eps = make_lerobot_v3(tmp_path / "ds")
    out = tmp_path / "run"
    assert main(TRAIN + ["--algo.name", "cdp_dbc", "--data.path", root, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "eval: skipped (task lerobot has no evaluation environment)" in text
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["episodes"] == len(eps) and res["data"]["steps"] == sum(len(e["action"]) for e in eps)
    assert res["train"]["steps_run"] == 6 and np.isfinite(res["train"]["final_loss"])
    pc = res["policy_config"]
    assert (pc["obs_dim"], pc["action_dim"]) == (3, 2) and pc["contraction"] is not None
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("train/contraction/lambda_max_mean", np.nan)) for r in rows)
    assert "lambda_hat_mean" in res["diagnostics"]  # the contraction diagnostics run on the dataset's observations
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last")]) == 2  # no environment to evaluate in
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "task 'lerobot', which has no evaluation environment" in err[0], err
