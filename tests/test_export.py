"""``cdp export``: TorchScript / ONNX policies from tiny IL checkpoints equal ``policy.sample`` and run without cdp."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdp.cli import main
from cdp.export import ExportedPolicy, export_policy
from cdp.runs import load_policy
from cdp.samplers import sample as run_sampler

from demo_data import make_pusht_zarr
from test_il_job import quiet, tiny


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """preset → checkpoint folder of a 4-step tiny IL run on a synthetic PushT zarr (DBC: MLP, dp_unet: UNet)."""
    root = tmp_path_factory.mktemp("export")
    p = make_pusht_zarr(root / "p.zarr")
    from cdp.experiments.il import run_il
    out = {}
    for name, sampler in (("dbc", "ddim"), ("dp_unet", "dpmsolver++")):
        cfg = tiny(p, name, out=root / name, **{"train.steps": 4, "eval.episodes": 0, "policy.sampler": sampler})
        run_il(cfg, log=quiet)
        out[name] = root / name / "checkpoints" / "last"
    return out


def inputs(policy, batch=3, seed=0):
    c = policy.config
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(batch, c.n_obs_steps, c.obs_dim, generator=g) * 400 + 50
    return obs, torch.randn((batch,) + policy.action_shape, generator=g)


@pytest.mark.parametrize("name", ["dbc", "dp_unet"])
def test_torchscript_equals_sample_and_runs_without_cdp(checkpoints, name, tmp_path):
    ckpt = checkpoints[name]
    out = tmp_path / "policy.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    policy = load_policy(ckpt)
    m = torch.jit.load(str(out))
    for batch in (1, 3, 7):  # traced at batch 2: the batch size is free
        obs, noise = inputs(policy, batch, seed=batch)
        ref = policy.sample(obs, noise=noise)
        got = m(obs, noise)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # a fresh interpreter that cannot import cdp (-I -S: no PYTHONPATH, cwd, user or site .pth files, so cdp's
    # editable install is invisible; only torch's site-packages folder on sys.path) gives the same actions
    obs, noise = inputs(policy, 4, seed=11)
    torch.save({"obs": obs, "noise": noise}, tmp_path / "in.pt")
    site = str(Path(torch.__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.append({site!r})\n"
        # the parent's thread count: another one reorders the convolutions' float32 sums
        "try:\n    import cdp\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('cdp is importable')\n"
        f"import torch; torch.set_num_threads({torch.get_num_threads()})\n"
        f"d = torch.load({str(tmp_path / 'in.pt')!r})\n"
        f"m = torch.jit.load({str(out)!r})\n"
        f"torch.save(m(d['obs'], d['noise']), {str(tmp_path / 'out.pt')!r})\n")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    scale = policy.action_normalizer.scale  # PushT actions are pixels (~100s): 1e-5 there is below float32's ulp
    torch.testing.assert_close(torch.load(tmp_path / "out.pt") / scale, policy.sample(obs, noise=noise) / scale,
                               rtol=0, atol=1e-5)


def test_ddpm_export_takes_the_step_noise(checkpoints):
    policy = load_policy(checkpoints["dbc"])
    mod = ExportedPolicy(policy, sampler="ddpm", num_inference_steps=3)
    traced = torch.jit.trace(mod, mod.example_inputs(), check_trace=False)
    obs, noise = inputs(policy, 5)
    steps = torch.randn((3, 5) + policy.action_shape)
    s = policy.get_sampler("ddpm", 3)
    a = run_sampler(policy.net, s, noise, policy.condition(obs), noises=list(steps))
    ref = policy.action_normalizer.unnormalize(a.clamp(-1, 1))
    torch.testing.assert_close(traced(obs, noise, steps), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["dbc", "dp_unet"])
def test_onnx_equals_sample(checkpoints, name, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (pip install onnx)")
    policy = load_policy(checkpoints[name])
    out = export_policy(policy, tmp_path / "policy.onnx", "onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["obs", "noise"]
    scale = policy.action_normalizer.scale
    for batch in (1, 4):
        obs, noise = inputs(policy, batch, seed=batch)
        ref = policy.sample(obs, noise=noise)
        got = torch.from_numpy(sess.run(["action"], {"obs": obs.numpy(), "noise": noise.numpy()})[0])
        # in normalised action units ([-1, 1]); onnxruntime's float32 conv / group-norm kernels round differently and
        # four DPM-Solver++ UNet steps amplify it to 5e-5-2e-4 depending on the CPU (the MLP stays under 1e-5; opset
        # 17-21 and graph optimisation on / off measured alike)
        tol = 1e-5 if name == "dbc" else 5e-4
        torch.testing.assert_close(got / scale, ref / scale, rtol=0, atol=tol)


def test_export_errors(checkpoints, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.pt")]) == 2
    assert "cdp export: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format"):
        export_policy(load_policy(checkpoints["dbc"]), tmp_path / "p.x", "tflite")
