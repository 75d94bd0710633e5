"""Device placement: a training step on every device this machine has leaves no tensor on another device
(networks, EMA, normalisers, critics, optimiser state, generators, sampled actions); device and precision settings
are validated with one clear error."""

import pytest
import torch

from cdp.config import apply, base_config
from cdp.devices import available_devices, check_precision, make_generator, resolve_device
from cdp.experiments.rl import agent_config, place
from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
from cdp.rl import make_agent
from cdp.training.agents import DiffusionBC
from cdp.training.trainer import fit

DEVICES = [str(d) for d in available_devices()]


def _misplaced(device: torch.device, modules: dict, optimizers: dict) -> list[str]:
    bad = []
    for name, m in modules.items():
        for k, v in list(m.named_parameters()) + list(m.named_buffers()):
            if v.device.type != device.type:
                bad.append(f"{name}.{k} on {v.device}")
    for name, opt in optimizers.items():
        for st in opt.state.values():
            for k, v in st.items():
                # Adam keeps its step counter on the CPU unless capturable/fused
                if isinstance(v, torch.Tensor) and k != "step" and v.device.type != device.type:
                    bad.append(f"optimizer {name}.{k} on {v.device}")
    return bad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", ["mlp", "unet"])
def test_bc_step_keeps_every_tensor_on_the_device(device, network):
    dev = torch.device(device)
    H = 1 if network == "mlp" else 4
    kw = {"hidden": 16, "n_layers": 2} if network == "mlp" else {"down_dims": [8, 16], "time_embed_dim": 8}
    pol = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=3, action_dim=2, horizon=H, n_obs_steps=2,
                                                n_action_steps=1 if H == 1 else 2, network=network,
                                                network_kwargs=kw, schedule={"name": "cosine", "num_steps": 10},
                                                sampler="ddim", num_inference_steps=3,
                                                contraction={"weight": 0.1, "max_samples": 4})).to(dev)
    gen = make_generator(0, dev)
    agent = DiffusionBC(pol, steps=2, lr=1e-3, generator=gen)
    obs = torch.randn(32, 2, 3)
    act = torch.rand((32, 2) if H == 1 else (32, H, 2)) * 2 - 1
    res = fit(agent, {"observations": obs, "actions": act}, steps=2, batch_size=8, device=dev, generator=gen,
              progress=False)
    assert res["step"] == 2 and gen.device.type == dev.type
    assert _misplaced(dev, agent.modules(), agent.optimizers()) == []
    a = agent.eval_policy.sample(obs[:3].to(dev), generator=make_generator(1, dev))
    assert a.device.type == dev.type and torch.isfinite(a).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["bc", "cdp", "cdp_dql", "cdp_idql"])
def test_rl_step_keeps_every_tensor_on_the_device(device, algo):
    dev = torch.device(device)
    over = {"algo.name": algo, "policy.network.hidden": 16, "policy.network.layers": 2}
    if algo == "cdp":
        over.update({"policy.schedule.num_steps": 5, "policy.num_inference_steps": 2, "algo.num_candidates": 2})
    cfg = apply(base_config("rl", algo), over)
    agent = make_agent(algo, 4, 2, agent_config(cfg), seed=0)
    place(agent, dev, 0)
    n = 64
    data = {"observations": torch.randn(n, 4), "actions": torch.rand(n, 2) * 2 - 1, "rewards": torch.randn(n),
            "next_observations": torch.randn(n, 4), "terminals": torch.zeros(n)}
    fit(agent, data, steps=2, batch_size=16, device=dev, progress=False)
    assert _misplaced(dev, agent.modules(), agent.optimizers()) == []
    assert agent.generator.device.type == dev.type
    a = agent.act(data["observations"][:3].to(dev), generator=make_generator(2, dev))
    assert a.device.type == dev.type and a.shape == (3, 2)


def test_device_and_precision_errors_are_one_clear_line():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
        with pytest.raises(ValueError, match="bf16 uses CUDA autocast"):
            check_precision("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="train.precision"):
        check_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_keeps_the_contraction_jacobian_fp32():
    dev = torch.device("cuda")
    pol = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=3, action_dim=2, network_kwargs={"hidden": 16, "n_layers": 2},
                                                contraction={"weight": 0.1, "max_samples": 4})).to(dev)
    pol.fit_normalizers(torch.randn(32, 3, device=dev), torch.rand(32, 2, device=dev) * 2 - 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        d = pol.loss_terms(torch.randn(8, 3, device=dev), torch.rand(8, 2, device=dev) * 2 - 1,
                           generator=make_generator(0, dev))
    assert d["loss_c"].dtype == torch.float32 and torch.isfinite(d["loss_d"])
