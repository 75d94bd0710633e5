"""Optional run-folder logging (cdp.runs.RunDir): Weights & Biases (offline) and the TensorBoard HParams entry."""

import builtins
import glob
import json
import struct
import time

import numpy as np
import pytest

from cdp.cli import main
from cdp.runs import WANDB_MISSING, RunDir, flat_hparams


def _wandb_records(run_dir, timeout=20.0):
    """:func:`_read_wandb` once wandb-core has written the run's exit record (``finish()`` can return before the
    offline file is complete)."""
    deadline = time.time() + timeout
    while True:
        out = _read_wandb(run_dir)
        if out[3] or time.time() > deadline:
            return out[:3]
        time.sleep(0.2)


def _read_wandb(run_dir):
    """(config, history, summary, exited) read back from the single offline W&B run under ``run_dir/wandb``: the ``.wandb``
    file is a LevelDB-style log (7-byte header, 32 KiB blocks, records of crc32 / length / type + protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    data = open(files[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    config, history, summary, exited = {}, [], {}, False
    key = lambda i: i.key or "/".join(i.nested_key)  # noqa: E731
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # still being written
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind not in (1, 4):  # FULL / LAST completes a record
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b""
        t = rec.WhichOneof("record_type")
        exited = exited or t == "exit"
        if t == "run":
            config.update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif t == "config":
            config.update({key(i): json.loads(i.value_json) for i in rec.config.update})
        elif t == "history":
            history.append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif t == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in rec.summary.update})
    return config, history, summary, exited


def _hparams(tb_dir):
    """(hparam values, metric names) and the scalars of the TensorBoard events under ``tb_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: (v.string_value if v.HasField("string_value") else v.bool_value if v.HasField("bool_value")
                  else v.number_value) for k, v in start.hparams.items()}
    metrics = {m.name.tag for m in exp.metric_infos}
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    return values, metrics, scalars


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no stdout/stderr wrapping inside pytest's capture
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


CONFIG = {"job": "toy", "train": {"lr": 1e-3, "steps": 2, "device": "cpu", "compile": False},
          "algo": {"variants": ["standard"], "eta": None}}


def test_flat_hparams_keeps_scalar_leaves():
    assert flat_hparams(CONFIG) == {"job": "toy", "train.lr": 1e-3, "train.steps": 2, "train.device": "cpu",
                                    "train.compile": False}


def test_tensorboard_hparams_with_final_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path, config=CONFIG)
    run.log(1, {"loss": 2.0}, prefix="train/")
    run.summary(5, {"score": 0.75, "nan": float("nan"), "text": "x"}, prefix="eval/")
    run.close()
    values, metrics, scalars = _hparams(tmp_path / "tb")
    assert values == {"job": "toy", "train.lr": pytest.approx(1e-3), "train.steps": 2, "train.device": "cpu",
                      "train.compile": False}
    assert metrics == {"final/eval/score"}
    assert scalars["final/eval/score"] == [(5, 0.75)] and scalars["train/loss"] == [(1, 2.0)]


def test_missing_tensorboard_logs_jsonl_only(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    run = RunDir(tmp_path, config=CONFIG)
    run.log(1, {"loss": 1.0})
    run.summary(1, {"loss": 1.0})
    run.close()
    assert run.read_metrics()[0]["loss"] == 1.0 and not (tmp_path / "tb").exists()


def test_wandb_offline_run_holds_config_and_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path, config=CONFIG, tensorboard=False, wandb=True, wandb_project="cdp-test")
    run.log(1, {"loss": 2.0}, prefix="train/")
    run.log(2, {"loss": 1.0}, prefix="train/")
    run.summary(2, {"score": 0.5})
    run.close()
    config, history, summary = _wandb_records(tmp_path)
    assert config["train"] == CONFIG["train"] and config["job"] == "toy"
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 2.0), (2, 1.0)]
    assert summary["score"] == 0.5 and summary["train/loss"] == 1.0
    first = (tmp_path / "wandb_id").read_text().strip()
    assert first and first in glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0]


def test_toy_cli_with_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "toy"
    argv = ["toy", "--out", str(out), "--train.steps", "4", "--train.progress", "False", "--eval.snapshots", "1",
            "--data.n_data", "64", "--eval.n_samples", "20", "--policy.network.hidden", "8",
            "--policy.schedule.num_steps", "3", "--train.batch_size", "16", "--algo.variants", "standard",
            "--log.tensorboard", "True", "--log.wandb", "True", "--log.wandb_project", "cdp-test"]
    assert main(argv) == 0
    config, history, summary = _wandb_records(out)
    assert config["train"]["steps"] == 4 and config["log"]["wandb"] is True and config["log"]["wandb_mode"] == "offline"
    assert any(h.get("_step") == 4 and "standard/off_support" in h for h in history)
    assert 0 <= summary["standard/off_support"] <= 1 and "standard/frac_contractive" in summary
    if __import__("importlib").util.find_spec("tensorboard"):
        values, metrics, _ = _hparams(out / "tb")
        assert values["train.steps"] == 4 and values["log.wandb"] == 1  # torch writes bools as numbers
        assert "final/standard/frac_contractive" in metrics


def test_wandb_mode_is_checked():
    assert main(["toy", "--out", "/nonexistent/x", "--log.wandb_mode", "cloud"]) == 2


def test_missing_wandb_is_one_clear_line(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError) as err:
        RunDir(tmp_path / "run", config=CONFIG, wandb=True, lock=True)
    assert str(err.value) == WANDB_MISSING and "pip install" in WANDB_MISSING and "\n" not in WANDB_MISSING
    assert not (tmp_path / "run" / "config.yaml").exists()
    RunDir(tmp_path / "run", lock=True).close()  # the lock was released
    with pytest.raises(ImportError, match="pip install"):
        main(["eval", "--checkpoint", str(tmp_path), "--log.wandb", "True"])


def test_eval_logs_rollout_gifs_to_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("PIL")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import cdp.experiments.il as il
    from cdp.video import write_gif

    def fake_eval(checkpoint, *args, video_dir=None, **kw):
        frames = [np.full((8, 8, 3), i * 40, np.uint8) for i in range(4)]
        gif = write_gif(frames, tmp_path / "vid" / "pusht_seed1000.gif", size=None)
        return {"mean_max_coverage": 0.5, "success_rate": 0.0, "mean_max_reward": 0.4, "max_coverage": [0.5],
                "seconds": 0.1, "videos": [str(gif)]}

    monkeypatch.setattr(il, "eval_checkpoint", fake_eval)
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--eval.episodes", "1", "--eval.video_dir",
                 str(tmp_path / "vid"), "--log.wandb", "True"]) == 0
    config, history, summary = _wandb_records(tmp_path / "vid")
    assert config["job"] == "eval" and summary["eval/mean_max_coverage"] == 0.5
    video = {k.rsplit("/", 1)[1]: v for k, v in history[0].items() if k.startswith("eval/video/pusht_seed1000/")}
    assert video["_type"] == "video-file" and video["path"].endswith(".gif")
    assert glob.glob(str(tmp_path / "vid" / "wandb" / "offline-run-*" / "files" / video["path"]))
