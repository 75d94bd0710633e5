"""User errors end in one line (exit code 2) naming the file and the fix, with no file changed; --debug / CDP_DEBUG
shows the traceback; SIGTERM during training checkpoints after the step and exits 143 (issue 15, item 7)."""

import hashlib
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp.cli import main
from demo_data import make_pusht_zarr

h5py = pytest.importorskip("h5py")

RL = ["rl", "--algo.name", "bc", "--train.steps", "2", "--eval.episodes", "0", "--train.progress", "False",
      "--data.env", "Hopper-v5", "--train.threads", "1"]
IL = ["train", "--algo.name", "dbc", "--train.batch_size", "16", "--policy.network.hidden", "32",
      "--policy.schedule.num_steps", "10", "--policy.num_inference_steps", "4", "--eval.episodes", "0",
      "--eval.diag_obs", "0", "--train.progress", "False", "--train.threads", "1"]
EVAL = ["eval", "--eval.episodes", "1", "--eval.max_steps", "4"]
LIBRARY_NOISE = ("[robosuite", "AdroitHand")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def refused(tmp_path, capsys, argv, *needles, command=None):
    """Run ``cdp ARGV``: exit code 2, exactly one stderr line holding every needle, no existing file changed."""
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(LIBRARY_NOISE)]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cdp {command or argv[0]}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    return lines[0]


# ------------------------------------------------------------------------------------------------ hdf5 datasets
def _d4rl(path, n=300, **kw):
    from cdp.data.rl import OfflineDataset, write_d4rl_hdf5
    rng = np.random.default_rng(0)
    ds = OfflineDataset(rng.normal(size=(n, 11)).astype(np.float32), rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                        rng.normal(size=n).astype(np.float32), rng.normal(size=(n, 11)).astype(np.float32),
                        np.zeros(n, bool), (np.arange(n) % 100) == 99, env_id="Hopper-v5")
    return write_d4rl_hdf5(ds, path, compression=None)


def test_empty_file_as_rl_dataset(tmp_path, capsys):
    (tmp_path / "empty.hdf5").write_bytes(b"")
    refused(tmp_path, capsys, RL + ["--data.path", str(tmp_path / "empty.hdf5"), "--out", str(tmp_path / "o")],
            "empty.hdf5 is an empty file", "cdp data")


def test_empty_file_as_robomimic_demos(tmp_path, capsys):
    (tmp_path / "empty.hdf5").write_bytes(b"")
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.task", "lift", "--data.path",
                                    str(tmp_path / "empty.hdf5"), "--out", str(tmp_path / "o")],
            "empty.hdf5 is an empty file", "cdp data lift")


def test_text_file_named_hdf5(tmp_path, capsys):
    (tmp_path / "text.hdf5").write_text("observations,actions\n1,2\n")
    refused(tmp_path, capsys, RL + ["--data.path", str(tmp_path / "text.hdf5"), "--out", str(tmp_path / "o")],
            "text.hdf5 is not a readable hdf5 file", "--data.path")


def test_text_file_named_hdf5_as_robomimic_demos(tmp_path, capsys):
    (tmp_path / "text.hdf5").write_text("not hdf5\n")
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.task", "can", "--data.path",
                                    str(tmp_path / "text.hdf5"), "--out", str(tmp_path / "o")],
            "text.hdf5 is not a readable hdf5 file")


def test_truncated_hdf5(tmp_path, capsys):
    good = _d4rl(tmp_path / "good.hdf5")
    b = good.read_bytes()
    (tmp_path / "trunc.hdf5").write_bytes(b[: len(b) // 2])
    refused(tmp_path, capsys, RL + ["--data.path", str(tmp_path / "trunc.hdf5"), "--out", str(tmp_path / "o")],
            "trunc.hdf5 is not a readable hdf5 file", "truncated")


def test_zero_length_arrays(tmp_path, capsys):
    with h5py.File(tmp_path / "zero.hdf5", "w") as f:
        for k, shape in [("observations", (0, 11)), ("actions", (0, 3)), ("rewards", (0,)), ("terminals", (0,)),
                         ("timeouts", (0,))]:
            f.create_dataset(k, data=np.zeros(shape, np.float32))
        f.attrs["env_id"] = "Hopper-v5"
    refused(tmp_path, capsys, RL + ["--data.path", str(tmp_path / "zero.hdf5"), "--out", str(tmp_path / "o")],
            "zero.hdf5 holds no transitions")


# ------------------------------------------------------------------------------------------------ zarr
def _chunks(array_dir: Path) -> list[Path]:
    return sorted(p for p in array_dir.iterdir() if not p.name.startswith("."))


def test_truncated_zarr_chunk(tmp_path, capsys):
    pytest.importorskip("zarr")
    z = Path(make_pusht_zarr(tmp_path / "p.zarr"))
    c = _chunks(z / "data" / "action")[0]
    c.write_bytes(c.read_bytes()[:20])
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.path", str(z), "--out", str(tmp_path / "o")],
            "p.zarr", "data/action cannot be decoded", "regenerate")


def test_zarr_with_a_missing_chunk_is_not_read_as_zeros(tmp_path, capsys):
    pytest.importorskip("zarr")
    z = Path(make_pusht_zarr(tmp_path / "p.zarr"))
    _chunks(z / "data" / "state")[0].unlink()
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.path", str(z), "--out", str(tmp_path / "o")],
            "p.zarr", "data/state has 1 of 1 chunk files missing")


def test_zarr_chunk_check_on_a_multi_chunk_array(tmp_path):
    zarr = pytest.importorskip("zarr")
    from cdp.data.il import load_zarr_replay
    root = zarr.open_group(str(tmp_path / "m.zarr"), mode="w")
    root.create_dataset("data/action", data=np.ones((40, 2), np.float32), chunks=(10, 2))
    root.create_dataset("data/state", data=np.ones((40, 5), np.float32), chunks=(10, 5))
    root.create_dataset("data/keypoint", data=np.ones((40, 9, 2), np.float32), chunks=(10, 9, 2))
    root.create_dataset("meta/episode_ends", data=np.array([20, 40]))
    assert load_zarr_replay(tmp_path / "m.zarr").n_steps == 40
    (tmp_path / "m.zarr" / "data" / "action" / "2.0").unlink()
    with pytest.raises(ValueError, match="data/action has 1 of 4 chunk files missing"):
        load_zarr_replay(tmp_path / "m.zarr")


# ------------------------------------------------------------------------------------------------ LeRobotDataset
def test_lerobot_task_without_a_folder(tmp_path, capsys):
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.task", "lerobot", "--out", str(tmp_path / "o")],
            "task 'lerobot' needs a LeRobotDataset folder", "--data.path")


def test_lerobot_dataset_with_nan_actions(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from demo_data import make_lerobot_v2
    root, _ = make_lerobot_v2(tmp_path / "ds")
    f = Path(root) / "data" / "chunk-000" / "episode_000001.parquet"
    t = pq.read_table(f)
    rows = t.column("action").to_pylist()
    rows[3] = [0.0, float("nan")]
    pq.write_table(t.set_column(t.schema.get_field_index("action"), "action", pa.array(rows)), f)
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.task", "lerobot", "--data.path", root,
                                    "--out", str(tmp_path / "o")],
            "episode_000001.parquet column 'action' holds NaN/inf (episode 1, row 3)")


def test_lerobot_dataset_of_other_dims_than_the_task(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from demo_data import make_lerobot_v3
    root, _ = make_lerobot_v3(tmp_path / "ds")
    refused(tmp_path, capsys, IL + ["--train.steps", "2", "--data.path", root, "--out", str(tmp_path / "o")],
            "observation.state 3-D and action 2-D, but --data.task pusht needs 20-D and 2-D", "--data.task lerobot")


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture
def pusht_run(tmp_path):
    z = make_pusht_zarr(tmp_path / "p.zarr")
    assert main(IL + ["--train.steps", "2", "--data.path", z, "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run"


def _copy(run: Path, name: str) -> Path:
    d = run.parent / name
    shutil.copytree(run, d)
    return d / "checkpoints" / "last"


def test_truncated_safetensors(pusht_run, tmp_path, capsys):
    ck = _copy(pusht_run, "trunc")
    b = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(b[: len(b) // 2])
    refused(tmp_path, capsys, EVAL + ["--checkpoint", str(ck)],
            "trunc/checkpoints/last/model.safetensors is damaged or not a safetensors file", "retrain")


def test_truncated_safetensors_on_resume(pusht_run, tmp_path, capsys):
    ck = pusht_run / "checkpoints" / "last"
    b = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(b[: len(b) // 2])
    refused(tmp_path, capsys, IL + ["--train.steps", "4", "--data.path", str(tmp_path / "p.zarr"), "--out",
                                    str(pusht_run)], "model.safetensors is damaged")


def test_tampered_safetensors(pusht_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    ck = _copy(pusht_run, "tampered")
    t = load_file(ck / "model.safetensors")
    t[next(k for k in t if k.startswith("ema."))] = torch.zeros(3, 3)
    save_file(t, ck / "model.safetensors")
    refused(tmp_path, capsys, EVAL + ["--checkpoint", str(ck)], "model.safetensors does not match", "policy.json",
            "size mismatch")


def test_nan_weights_name_the_checkpoint(pusht_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    ck = _copy(pusht_run, "nan")
    t = load_file(ck / "model.safetensors")
    save_file({k: v * float("nan") if v.is_floating_point() else v for k, v in t.items()}, ck / "model.safetensors")
    refused(tmp_path, capsys, EVAL + ["--checkpoint", str(ck)], f"checkpoint {ck} holds NaN/inf weights")


def test_pusht_checkpoint_evaluated_as_lift(pusht_run, tmp_path, capsys):
    ck = pusht_run / "checkpoints" / "last"
    refused(tmp_path, capsys, EVAL + ["--checkpoint", str(ck), "--data.task", "lift"],
            "is a pusht policy (obs 20-D, actions 2-D)", "--data.task lift needs obs 19-D, actions 7-D",
            "drop --data.task")


# ------------------------------------------------------------------------------------------------ messages, --debug
def test_no_literal_percent_r_in_messages():
    src = Path(__file__).resolve().parent.parent / "src" / "cdp"
    hits = [f"{p}:{i}" for p in src.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if "%r" in line]
    assert hits == []


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.hdf5").write_bytes(b"")
    argv = RL + ["--data.path", str(tmp_path / "empty.hdf5"), "--out", str(tmp_path / "o")]
    line = refused(tmp_path, capsys, argv, "--debug shows the traceback")
    assert "Traceback" not in line
    with pytest.raises(ValueError, match="is an empty file"):
        main(argv[:1] + ["--debug"] + argv[1:])
    with pytest.raises(ValueError, match="is an empty file"):
        main(argv + ["--debug"])
    monkeypatch.setenv("CDP_DEBUG", "1")
    with pytest.raises(ValueError, match="is an empty file"):
        main(argv)


# ------------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_checkpoints_after_the_step_and_exits_143(tmp_path, capsys, monkeypatch):
    from cdp.runs import load_checkpoint
    from cdp.training.agents import DiffusionBC

    z = make_pusht_zarr(tmp_path / "p.zarr")
    argv = IL + ["--train.steps", "8", "--train.log_every", "1", "--data.path", z, "--out", str(tmp_path / "run")]
    update, calls = DiffusionBC.update, []

    def update_then_term(self, batch):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return update(self, batch)

    monkeypatch.setattr(DiffusionBC, "update", update_then_term)
    assert main(argv) == 143
    assert "terminated" in capsys.readouterr().err
    _, meta, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert meta["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    monkeypatch.setattr(DiffusionBC, "update", update)
    assert main(argv) == 0
    _, meta, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert meta["step"] == 8


def test_inference_steps_above_the_diffusion_steps_name_the_flag():
    from cdp.cli import parse_job
    from cdp.experiments.rl import agent_config
    cfg = parse_job("rl", ["--algo.name", "edp", "--policy.schedule.num_steps", "5"])
    with pytest.raises(ValueError, match=r"num_inference_steps must be in 1\.\.5, got 15 .*--policy\.num_inference_steps"):
        agent_config(cfg)
