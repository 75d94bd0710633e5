"""The one config tree (cdp.config) and its command line: shared dotted flags, presets declared once, YAML round
trips, precedence and clear errors."""

import dataclasses

import pytest
import yaml

from cdp.cli import main, parse_job
from cdp.config import (IL_PRESETS, JOB_PRESETS, ExperimentConfig, apply, base_config, flatten, from_dict,
                        load_yaml, preset, save_yaml, unflatten)
from cdp.rl import ALGOS, DQLConfig, EDPConfig, IDQLConfig

COMMANDS = ["toy", "train", "rl", "eval"]


@pytest.mark.parametrize("command", COMMANDS)
def test_shared_settings_have_one_flag_in_every_job(command):
    cfg = parse_job(command, ["--train.device", "cpu", "--train.seed", "3", "--train.threads", "1"])
    assert (cfg.train.device, cfg.train.seed, cfg.train.threads) == ("cpu", 3, 1)
    if command != "toy":  # the toy study has no simulator episodes
        assert parse_job(command, ["--eval.episodes", "2"]).eval.episodes == 2
    assert parse_job(command, ["--device", "cpu"]).train.device == "cpu"  # --device is --train.device


@pytest.mark.parametrize("command", ["toy", "train", "rl"])
def test_contraction_weight_is_one_dotted_flag(command):
    args = ["--policy.contraction.weight", "0.3"] + (["--algo.name", "cdp_dbc"] if command == "train" else [])
    assert parse_job(command, args).policy.contraction.weight == 0.3
    keys = flatten(parse_job(command, []).to_dict())
    assert not [k for k in keys if k.split(".")[-1] == "gamma"]  # gamma is the RL discount's name elsewhere


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_dotted_flags(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--train.device", "--policy.contraction.weight", "--data.fraction", "--eval.episodes"):
        assert flag in out, flag


@pytest.mark.parametrize("job,algo", [("toy", None), ("eval", None)] + [("il", p) for p in IL_PRESETS] +
                         [("rl", a) for a in ALGOS])
def test_saved_yaml_round_trips(tmp_path, job, algo):
    cfg = base_config(job, algo)
    save_yaml(cfg, tmp_path / "config.yaml")
    back = from_dict(ExperimentConfig, load_yaml(tmp_path / "config.yaml"))
    assert back == cfg


def test_rl_presets_are_read_off_the_algorithm_classes():
    dql, edp, idql = base_config("rl", "dql"), base_config("rl", "edp"), base_config("rl", "cdp_idql")
    assert dql.policy.schedule.num_steps == DQLConfig.num_diffusion_steps == 5
    assert edp.policy.schedule.num_steps == EDPConfig.num_diffusion_steps == 100
    assert idql.policy.ema_decay == IDQLConfig.ema_decay and idql.algo.selection == IDQLConfig.selection
    assert dql.algo.num_candidates == DQLConfig.num_candidates and edp.algo.num_candidates == EDPConfig.num_candidates
    assert base_config("rl", "cdp").policy.contraction.max_samples == 64


def test_every_preset_key_exists():
    for job in JOB_PRESETS:
        apply(ExperimentConfig(), preset(job))  # raises on an unknown key
    with pytest.raises(ValueError, match="unknown job"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown RL algorithm"):
        preset("rl", "sac")


def test_precedence_preset_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"steps": 123, "batch_size": 7}, "algo.name": "dql"}))
    cfg = parse_job("rl", ["--config", str(f), "--train.batch_size", "9"])
    assert (cfg.train.steps, cfg.train.batch_size) == (123, 9)  # file over preset, flag over file
    assert cfg.algo.name == "dql" and cfg.policy.schedule.num_steps == 5  # the file's algo picks its preset
    assert parse_job("rl", ["--config", str(f), "--algo.name", "edp"]).policy.schedule.num_steps == 100


def test_config_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stepz: 3}\n")
    with pytest.raises(ValueError, match="unknown config key train.stepz"):
        parse_job("rl", ["--config", str(bad)])
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_job("rl", ["--config", str(bad)])
    bad.write_text("train: {steps: abc}\n")
    with pytest.raises(ValueError, match="train.steps.*integer"):
        parse_job("rl", ["--config", str(bad)])
    bad.write_text("job: il\n")
    with pytest.raises(ValueError, match="cdp train"):
        parse_job("rl", ["--config", str(bad)])
    with pytest.raises(FileNotFoundError):
        parse_job("rl", ["--config", str(tmp_path / "missing.yaml")])


def test_keys_a_job_does_not_read_are_refused():
    with pytest.raises(ValueError, match="--algo.eta does not apply to cdp rl with algo.name idql"):
        parse_job("rl", ["--algo.name", "idql", "--algo.eta", "2"])
    with pytest.raises(ValueError, match="--policy.contraction.weight does not apply"):
        parse_job("rl", ["--algo.name", "edp", "--policy.contraction.weight", "0.3"])
    with pytest.raises(ValueError, match="--policy.network.unet_down_dims does not apply"):
        parse_job("train", ["--algo.name", "cdp_dbc", "--policy.network.unet_down_dims", "8", "16"])
    with pytest.raises(ValueError, match="finite"):
        parse_job("rl", ["--data.fraction", "nan"])


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stepz: 3}\n")
    assert main(["rl", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdp rl: error: unknown config key train.stepz")
    assert not (tmp_path / "run").exists()


def test_dotted_and_nested_keys_are_the_same():
    assert unflatten({"a.b": 1, "a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    c1 = apply(base_config("il"), {"policy.contraction.weight": 0.2})
    c2 = apply(base_config("il"), {"policy": {"contraction": {"weight": 0.2}}})
    assert c1 == c2 and dataclasses.is_dataclass(c1.policy.contraction)
