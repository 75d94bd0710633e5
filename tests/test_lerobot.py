"""The LeRobot adapter (cdp.integrations.lerobot) on LeRobot's diffusion policy.

The three checks run twice: on the real ``lerobot.policies.diffusion.modeling_diffusion.DiffusionPolicy`` of lerobot
0.4.4 (skipped, with the reason, when lerobot does not import: not installed, or its torchvision cannot load — the
torchvision wheels on PyPI are linked against CUDA torch, so they fail beside the CPU build of torch) and on
:class:`SignaturePolicy`, a small stand-in with the call contract of lerobot 0.4.4 read from that file
(``unet(x (B, horizon, action_dim), timestep (B,) int64, global_cond=(B, cond_dim))``, ``noise_scheduler`` a diffusers
DDPM / DDIM scheduler, ``_prepare_global_conditioning``, ``compute_loss``), whose UNet asserts that contract.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from cdp.contraction import ContractionConfig, ContractionRegularizer  # noqa: E402
from cdp.integrations.lerobot import (LEROBOT_VERSION, diffusion_model_of, lerobot_contraction_loss,  # noqa: E402
                                      lerobot_denoiser, lerobot_global_cond, lerobot_prediction, lerobot_regularizer,
                                      lerobot_schedule)
from cdp.schedules import NoiseSchedule  # noqa: E402

B, TO, H, DS, DE, DA, T = 6, 2, 8, 3, 4, 2, 100  # batch, n_obs_steps, horizon, state / env-state / action dims, steps


# ------------------------------------------------------------------------------------------ the LeRobot 0.4.4 contract
class SignatureUnet(nn.Module):
    """``DiffusionConditionalUnet1d.forward(x, timestep, global_cond=None)`` of lerobot 0.4.4: x (B, T, input_dim),
    timestep (B,) = the diffusers timestep, global_cond (B, global_cond_dim) -> (B, T, input_dim). A sinusoidal
    timestep embedding + FiLM-conditioned 1-D convolutions (GroupNorm, Mish), as LeRobot's, at toy size."""

    def __init__(self, action_dim: int, cond_dim: int, num_train_timesteps: int, hidden: int = 16, embed: int = 8):
        super().__init__()
        self.cond_dim, self.T, self.embed = cond_dim, num_train_timesteps, embed
        self.step = nn.Sequential(nn.Linear(embed, 4 * embed), nn.Mish(), nn.Linear(4 * embed, embed))
        self.film = nn.Linear(embed + cond_dim, 2 * hidden)
        self.inp = nn.Conv1d(action_dim, hidden, 3, padding=1)
        self.mid = nn.Sequential(nn.GroupNorm(4, hidden), nn.Mish(), nn.Conv1d(hidden, hidden, 3, padding=1))
        self.out = nn.Conv1d(hidden, action_dim, 1)

    def forward(self, x, timestep, global_cond=None):
        assert x.dim() == 3 and x.shape[2] == self.out.out_channels, x.shape
        assert timestep.dtype == torch.long and timestep.shape == (x.shape[0],), (timestep.dtype, timestep.shape)
        assert int(timestep.min()) >= 0 and int(timestep.max()) < self.T, timestep
        assert global_cond is not None and global_cond.shape == (x.shape[0], self.cond_dim), global_cond.shape
        half = self.embed // 2
        freqs = torch.exp(torch.arange(half, device=x.device) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        emb = timestep[:, None] * freqs[None, :]
        emb = self.step(torch.cat([emb.sin(), emb.cos()], -1))
        scale, bias = self.film(torch.cat([emb, global_cond], -1)).chunk(2, -1)
        h = self.inp(x.transpose(1, 2))
        h = self.mid(h) * (1 + scale[..., None]) + bias[..., None]
        return self.out(torch.tanh(h)).transpose(1, 2)


class SignatureModel(nn.Module):
    """``DiffusionModel`` of lerobot 0.4.4, low-dim inputs: the attributes the adapter uses and ``compute_loss``."""

    def __init__(self, scheduler: str = "DDPM", prediction: str = "epsilon"):
        super().__init__()
        self.config = SimpleNamespace(horizon=H, n_obs_steps=TO, prediction_type=prediction, image_features={},
                                      do_mask_loss_for_padding=False)
        kind = {"DDPM": diffusers.DDPMScheduler, "DDIM": diffusers.DDIMScheduler}[scheduler]
        self.noise_scheduler = kind(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                    prediction_type=prediction)
        self.unet = SignatureUnet(DA, TO * (DS + DE), T)

    def _prepare_global_conditioning(self, batch):
        return torch.cat([batch["observation.state"], batch["observation.environment_state"]], -1).flatten(1)

    def compute_loss(self, batch):
        global_cond = self._prepare_global_conditioning(batch)
        trajectory = batch["action"]
        eps = torch.randn(trajectory.shape, device=trajectory.device)
        timesteps = torch.randint(0, T, (trajectory.shape[0],), device=trajectory.device).long()
        pred = self.unet(self.noise_scheduler.add_noise(trajectory, eps, timesteps), timesteps, global_cond=global_cond)
        target = eps if self.config.prediction_type == "epsilon" else trajectory
        return nn.functional.mse_loss(pred, target)


class SignaturePolicy(nn.Module):
    """``DiffusionPolicy`` of lerobot 0.4.4: ``.diffusion`` and ``forward(batch) -> (loss, None)``."""

    def __init__(self, scheduler: str = "DDPM", prediction: str = "epsilon"):
        super().__init__()
        self.diffusion = SignatureModel(scheduler, prediction)

    def forward(self, batch):
        return self.diffusion.compute_loss(batch), None


# ------------------------------------------------------------------------------------------ the real one, if it imports
@functools.lru_cache(maxsize=1)
def _lerobot():
    """(modules, None) or (None, why lerobot does not import here)."""
    try:
        from lerobot.configs.types import FeatureType, PolicyFeature
        from lerobot.policies.diffusion import modeling_diffusion
        from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    except Exception as e:  # ImportError, or torchvision's RuntimeError "operator torchvision::nms does not exist"
        text = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"lerobot {LEROBOT_VERSION} does not import here ({type(e).__name__}: {text})"
    return SimpleNamespace(FeatureType=FeatureType, PolicyFeature=PolicyFeature, DiffusionConfig=DiffusionConfig,
                           modeling=modeling_diffusion), None


def real_policy(scheduler: str = "DDPM", prediction: str = "epsilon"):
    lr, why = _lerobot()
    if lr is None:
        pytest.skip(why)
    F, P = lr.FeatureType, lr.PolicyFeature
    cfg = lr.DiffusionConfig(
        input_features={"observation.state": P(F.STATE, (DS,)), "observation.environment_state": P(F.ENV, (DE,))},
        output_features={"action": P(F.ACTION, (DA,))}, n_obs_steps=TO, horizon=H, n_action_steps=4,
        down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4, kernel_size=3, noise_scheduler_type=scheduler,
        num_train_timesteps=T, prediction_type=prediction, device="cpu", push_to_hub=False)
    return lr.modeling.DiffusionPolicy(cfg)


def make_policy(kind: str, scheduler: str = "DDPM", prediction: str = "epsilon"):
    torch.manual_seed(0)
    return real_policy(scheduler, prediction) if kind == "lerobot" else SignaturePolicy(scheduler, prediction)


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"observation.state": torch.randn(B, TO, DS, generator=g),
            "observation.environment_state": torch.randn(B, TO, DE, generator=g),
            "action": torch.tanh(torch.randn(B, H, DA, generator=g)),
            "action_is_pad": torch.zeros(B, H, dtype=torch.bool)}


KINDS = ["lerobot", "signature"]


def explicit_lambda_hat(denoiser, schedule_abar: torch.Tensor, x, t, c, prediction: str) -> torch.Tensor:
    """λ_max of the normalised sampling-drift Jacobian Ĵ = r I + s J^sym (cdp.contraction's docstring) per point,
    from the full Jacobian by torch.autograd.functional.jacobian and eigvalsh; α, σ from the diffusers scheduler's
    ᾱ at timestep k − 1."""
    out = []
    for i in range(x.shape[0]):
        shape = (1,) + tuple(x.shape[1:])
        J = torch.autograd.functional.jacobian(
            lambda a: denoiser(a.reshape(shape), t[i:i + 1], c[i:i + 1]).reshape(-1), x[i].reshape(-1).detach())
        Js = 0.5 * (J + J.T).double()
        k = int(round(float(t[i]) * T))
        abar = schedule_abar[k - 1].double()
        eye = torch.eye(Js.shape[0], dtype=torch.float64)
        Jhat = (1 - abar).sqrt() * eye - Js if prediction == "epsilon" else -abar.sqrt() * eye + Js
        out.append(torch.linalg.eigvalsh(Jhat)[-1])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", KINDS)
def test_denoiser_is_the_unet_at_diffusers_timestep_k_minus_1(kind):
    policy = make_policy(kind)
    model = diffusion_model_of(policy)
    assert diffusion_model_of(model) is model
    batch = make_batch()
    cond = lerobot_global_cond(policy, batch)
    assert torch.equal(cond, torch.cat([batch["observation.state"], batch["observation.environment_state"]], -1)
                       .flatten(1))  # (B, n_obs_steps · (state + env-state)), LeRobot's layout
    ks = torch.tensor([1, 2, 17, 50, 99, 100])  # cdp steps k = 1..T at t = k / T
    x = torch.randn(B, H, DA)
    with torch.no_grad():
        got = lerobot_denoiser(policy)(x, ks.float() / T, cond)
        ref = model.unet(x, ks - 1, global_cond=cond)
        other = model.unet(x, ks.clamp(max=T - 1), global_cond=cond)  # off by one step: a different output
    assert got.shape == (B, H, DA)
    assert torch.equal(got, ref)
    assert not torch.allclose(got, other)
    sched = lerobot_schedule(policy)
    assert sched.num_steps == T
    assert torch.equal(sched.alphas_cumprod, model.noise_scheduler.alphas_cumprod.double())
    if kind == "lerobot":  # the stand-in's UNet has the real one's signature
        real = inspect.signature(_lerobot()[0].modeling.DiffusionConditionalUnet1d.forward)
        assert list(real.parameters) == list(inspect.signature(SignatureUnet.forward).parameters)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheduler,prediction", [("DDPM", "epsilon"), ("DDIM", "sample")])
def test_lambda_hat_equals_eigvalsh_of_the_explicit_jacobian(kind, scheduler, prediction):
    policy = make_policy(kind, scheduler, prediction)
    model = diffusion_model_of(policy)
    batch = make_batch(1)
    reg = lerobot_regularizer(policy, weight=1.0, max_samples=None)
    assert reg.config.prediction == prediction == lerobot_prediction(policy)
    den = lerobot_denoiser(policy)
    cond = lerobot_global_cond(policy, batch).detach()
    a_t, t, c = reg.sample_points(batch["action"], cond, torch.Generator().manual_seed(3))
    want = explicit_lambda_hat(den, model.noise_scheduler.alphas_cumprod, a_t, t, c, prediction)
    for i in range(B):  # one point at a time: the metric is that point's λ̂
        _, m = reg(den, a_t[i:i + 1], t[i:i + 1], c[i:i + 1])
        assert m["lambda_max_mean"] == pytest.approx(float(want[i]), rel=1e-4, abs=1e-4)
    _, m = reg(den, a_t, t, c)
    assert m["lambda_max_mean"] == pytest.approx(float(want.mean()), rel=1e-4, abs=1e-4)
    assert m["lambda_max_max"] == pytest.approx(float(want.max()), rel=1e-4, abs=1e-4)
    # the one-call adapter draws the same points from the same generator state and conditions them the same way
    _, m2 = lerobot_contraction_loss(policy, batch, reg, generator=torch.Generator().manual_seed(3))
    assert m2["lambda_max_mean"] == pytest.approx(m["lambda_max_mean"], rel=1e-5, abs=1e-6)
    assert m2["lambda_max_max"] == pytest.approx(m["lambda_max_max"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_reaches_the_unet_and_one_training_step_runs(kind):
    policy = make_policy(kind)
    policy.train()
    batch = make_batch(2)
    reg = lerobot_regularizer(policy, weight=0.1)
    loss_c, metrics = lerobot_contraction_loss(policy, batch, reg)
    assert loss_c.dim() == 0 and torch.isfinite(loss_c)
    assert set(metrics) >= {"loss_c", "lambda_max_mean", "lambda_max_max", "frac_contractive"}
    assert float(loss_c) == pytest.approx(0.1 * metrics["loss_c"], rel=1e-5, abs=1e-7)
    unet = diffusion_model_of(policy).unet
    grads = torch.autograd.grad(loss_c, [p for p in unet.parameters()], allow_unused=True)
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in policy.parameters()]
    loss_c, _ = lerobot_contraction_loss(policy, batch, reg)
    loss = policy.forward(batch)[0] + loss_c
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = list(policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_bad_inputs_are_one_clear_error():
    policy = SignaturePolicy()
    batch = make_batch()
    reg = lerobot_regularizer(policy)
    with pytest.raises(TypeError, match="not a LeRobot DiffusionPolicy"):
        lerobot_regularizer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no 'action'"):
        lerobot_contraction_loss(policy, {k: v for k, v in batch.items() if k != "action"}, reg)
    with pytest.raises(ValueError, match=r"\(B, horizon, action_dim\)"):
        lerobot_contraction_loss(policy, {**batch, "action": batch["action"][:, 0]}, reg)
    with pytest.raises(ValueError, match="global_cond has batch size 2"):
        lerobot_contraction_loss(policy, batch, reg, global_cond=torch.zeros(2, TO * (DS + DE)))
    other = ContractionRegularizer(ContractionConfig(), NoiseSchedule(name="linear", num_steps=T))
    with pytest.raises(ValueError, match="not the LeRobot policy's noise schedule"):
        lerobot_contraction_loss(policy, batch, other)
    sample_reg = lerobot_regularizer(SignaturePolicy(prediction="sample"))
    with pytest.raises(ValueError, match="prediction 'sample' but the LeRobot policy predicts 'epsilon'"):
        lerobot_contraction_loss(policy, batch, sample_reg)
    with pytest.raises(ValueError, match="prediction='sample' given"):
        lerobot_regularizer(policy, prediction="sample")
    v = SignaturePolicy()
    v.diffusion.noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction")
    v.diffusion.config.prediction_type = "v_prediction"
    with pytest.raises(ValueError, match="'v_prediction'"):
        lerobot_regularizer(v)
