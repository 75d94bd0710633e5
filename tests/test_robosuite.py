"""robosuite Lift / Can: env wrapper, scripted demos in robomimic layout, IL job wiring (skipped without robosuite)."""

import json

import h5py
import numpy as np
import pytest

pytest.importorskip("robosuite")

from cdp.cli import main  # noqa: E402
from cdp.data.il import load_robomimic_hdf5  # noqa: E402
from cdp.datagen.robosuite import generate_robosuite_demos  # noqa: E402
from cdp.envs import robosuite_tasks  # noqa: E402
from cdp.envs.robosuite_tasks import OBS_KEYS, RobosuiteLowDim  # noqa: E402
from cdp.config import apply, base_config  # noqa: E402
from cdp.experiments.il import load_demos, max_steps_of, task_of_checkpoint, validate  # noqa: E402


@pytest.fixture(scope="module")
def lift_env():
    env = RobosuiteLowDim("lift", horizon=150)
    yield env
    env.close()


@pytest.fixture(scope="module")
def lift_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lift") / "lift2.hdf5"
    res = generate_robosuite_demos("lift", 2, path, seed=0, horizon=150, max_attempts=6, progress=False)
    return path, res


def test_env_keys_shapes_and_seeded_reset(lift_env):
    o1 = lift_env.reset(seed=3)
    assert {k: v.shape for k, v in o1.items()} == {"object": (10,), "robot0_eef_pos": (3,), "robot0_eef_quat": (4,),
                                                    "robot0_gripper_qpos": (2,)}
    assert lift_env.flat(o1).shape == (19,) and lift_env.obs_dim == 19
    lift_env.step(np.full(7, 0.5))
    o2 = lift_env.reset(seed=3)
    o3 = lift_env.reset(seed=4)
    np.testing.assert_allclose(o1["object"], o2["object"])
    other = RobosuiteLowDim("lift", horizon=5)  # same construction seed → same cube size → same start state
    np.testing.assert_array_equal(other.reset(seed=3)["object"], o1["object"])
    other.close()
    assert not np.allclose(o1["object"][:3], o3["object"][:3])  # cube placement differs across seeds
    obs, r, done, info = lift_env.step(np.zeros(7))
    assert r == 0.0 and not done and info["success"] is False and lift_env.t == 1
    with pytest.raises(ValueError, match="7 entries"):
        lift_env.step(np.zeros(6))
    with pytest.raises(ValueError, match="unknown robosuite task"):
        RobosuiteLowDim("square")


def test_can_env_obs_dim():
    env = RobosuiteLowDim("can", horizon=5)
    o = env.reset(seed=0)
    assert o["object"].shape == (14,) and env.obs_dim == 23
    env.close()


def test_generated_file_roundtrips(lift_file):
    path, res = lift_file
    assert res["demos"] == 2 and res["attempts"] <= 6 and 0 < res["success_rate"] <= 1
    assert not path.with_name(path.name + ".tmp").exists()
    ds = load_robomimic_hdf5(path, OBS_KEYS)
    assert ds.n_episodes == 2 and ds.obs_dim == 19 and ds.action_dim == 7
    assert ds.meta["env_args"]["env_name"] == "Lift" and ds.meta["env_args"]["type"] == 1
    assert np.all(np.abs(ds.actions) <= 1.0)
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert int(data.attrs["total"]) == ds.n_steps
        assert json.loads(data.attrs["env_args"])["env_kwargs"]["controller"] == "OSC_POSE"
        for i, L in enumerate(ds.episode_lengths):
            g = data[f"demo_{i}"]
            assert int(g.attrs["num_samples"]) == L
            assert g["actions"].shape == (L, 7) and g["rewards"].shape == (L,) and g["dones"].shape == (L,)
            assert g["dones"][-1] == 1 and g["dones"][:-1].sum() == 0 and g["rewards"][-1] == 1.0
            assert g["states"].ndim == 2 and g["states"].shape[0] == L
            for k in OBS_KEYS:
                np.testing.assert_allclose(g["next_obs"][k][:-1], g["obs"][k][1:])
        assert sorted(x.decode() for x in f["mask/train"][:]) == ["demo_0", "demo_1"]


def test_generator_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        generate_robosuite_demos("square", 1, tmp_path / "x.hdf5", progress=False)
    with pytest.raises(ValueError, match="n_demos"):
        generate_robosuite_demos("lift", 0, tmp_path / "x.hdf5", progress=False)
    with pytest.raises(RuntimeError, match="nothing written"):  # 3 steps are too few to lift the cube
        generate_robosuite_demos("lift", 1, tmp_path / "x.hdf5", horizon=3, max_attempts=1, progress=False)
    assert not (tmp_path / "x.hdf5").exists()


def il_config(**over):
    return apply(base_config("il", "cdp_dbc"), {"algo.name": "cdp_dbc", **over})


def test_bad_files_give_clear_errors(tmp_path, lift_file):
    with pytest.raises(FileNotFoundError, match="--data.path"):
        load_demos(il_config(**{"data.task": "lift"}))
    with pytest.raises(FileNotFoundError, match="cdp data lift"):
        load_demos(il_config(**{"data.task": "lift", "data.path": str(tmp_path / "none.hdf5")}))
    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("data/demo_0/actions", data=np.zeros((3, 7)))
        f.create_dataset("data/demo_0/obs/robot0_eef_pos", data=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="missing keys"):
        load_demos(il_config(**{"data.task": "lift", "data.path": str(bad)}))
    with pytest.raises(ValueError, match="'Lift' demos, but task 'can'"):
        load_demos(il_config(**{"data.task": "can", "data.path": str(lift_file[0])}))
    assert max_steps_of(il_config(**{"data.task": "lift"})) == 400 and max_steps_of(il_config()) == 300
    assert max_steps_of(il_config(**{"data.task": "can", "eval.max_steps": 7})) == 7
    with pytest.raises(ValueError, match="data.task"):
        validate(il_config(**{"data.task": "square"}))


def test_cli_missing_hdf5_gives_one_clear_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data.task", "lift", "--algo.name", "cdp_dbc", "--out", str(out),
                 "--train.progress", "False"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cdp train: error: ") and "--data.path" in err
    assert not out.exists()


def test_robosuite_evaluate_checks_policy_output():
    with pytest.raises(ValueError, match="expected"):
        robosuite_tasks.evaluate(lambda o: np.zeros((o.shape[0], 1, 2)), "lift", n_episodes=1, max_steps=2)
    res = robosuite_tasks.evaluate(lambda o: np.zeros((o.shape[0], 2, 7)), "lift", n_episodes=2, max_steps=3,
                                   n_action_steps=2, n_envs=1)
    assert res["successes"] == [0, 0] and res["episode_lengths"] == [3, 3] and res["seeds"] == [100000, 100001]


def test_cli_train_and_eval_lift(tmp_path, lift_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data.task", "lift", "--data.path", str(lift_file[0]), "--data.max_episodes", "none",
               "--algo.name", "cdp_dbc", "--train.steps", "3", "--train.batch_size", "16",
               "--policy.network.hidden", "32", "--policy.schedule.num_steps", "10",
               "--policy.num_inference_steps", "2", "--eval.episodes", "1", "--eval.max_steps", "5",
               "--eval.diag_obs", "1", "--eval.diag_samples", "1", "--out", str(out), "--train.progress", "False",
               "--train.threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["episodes"] == 2 and res["data_path"] == str(lift_file[0])
    assert "hdf5" not in res and "zarr" not in res
    assert res["config"]["data"]["task"] == "lift" and res["config"]["data"]["max_episodes"] is None
    assert res["eval"]["task"] == "lift" and len(res["eval"]["successes"]) == 1
    assert res["policy_config"]["obs_dim"] == 19 and res["policy_config"]["action_dim"] == 7
    assert "success rate" in capsys.readouterr().out
    ckpt = out / "checkpoints" / "last"
    assert task_of_checkpoint(ckpt) == "lift"  # cdp eval reads the task from the run's config.yaml
    assert main(["eval", "--checkpoint", str(ckpt), "--eval.episodes", "1", "--eval.max_steps", "4",
                 "--train.threads", "1"]) == 0
    assert "/1 episodes)" in capsys.readouterr().out
    # the run's config.yaml re-runs it: resumed, nothing retrained
    assert main(["train", "--config", str(out / "config.yaml")]) == 0
    assert json.loads((out / "results.json").read_text())["train"]["steps_run"] == 0
