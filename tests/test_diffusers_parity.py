"""Parity with diffusers: ``NoiseSchedule.from_diffusers`` and cdp's DDPM / DDIM / DPM-Solver++(2M) steps against
``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler.step()`` on the same inputs, model outputs
(fixed tensors, no network) and noise.

Timestep mapping: cdp step k (1..T) is diffusers timestep k − 1. Where the two can differ, the settings under
which they agree are stated (and, for the differences, tested as differences):

* spacing: ``set_timesteps(n)`` is diffusers' ``timestep_spacing="trailing"``; any other spacing ("leading",
  "linspace", ``steps_offset``) is reproduced by ``set_timesteps(timesteps=(scheduler.timesteps + 1).tolist())``.
  DDIMScheduler steps from t to t − T // n rather than to the next chosen timestep, so with "trailing" it agrees
  when n divides T (otherwise its chosen timesteps are not evenly spaced by T // n and the two differ).
* DDIM's last step goes to ᾱ = 1 in cdp (returns x̂0): diffusers' ``set_alpha_to_one=True`` (its default).
* clipping (``clip_sample``): cdp re-derives ε̂ from the clipped x̂0 in DDIM, i.e. diffusers'
  ``step(..., use_clipped_model_output=True)``; with the default ``False`` diffusers keeps the unclipped ε̂.
  DDPM uses only x̂0, so its clipping agrees as is. DPMSolverMultistep has no ``clip_sample`` (only dynamic
  ``thresholding``, which cdp does not implement); it is tested without clipping.
* DPM-Solver++(2M) (``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``): the first
  step and the last, to σ = 0 (``final_sigmas_type="zero"``, the default), are first order in both, whatever
  ``lower_order_final`` (it changes only the last step, and at order 2 ``lower_order_second`` keeps order 2).
  ``final_sigmas_type="sigma_min"``, Karras / Lu / exponential sigmas, ``lambda_min_clipped`` and
  ``thresholding`` have no cdp counterpart.
* precision: diffusers computes DDPM/DDIM coefficients in the dtype of its ``alphas_cumprod`` (float32), where
  ``1 - ᾱ_t / ᾱ_{t-1}`` loses ~3 digits at small t for T = 100 steps; cdp computes them in float64 from the same
  values. The DDPM/DDIM tests therefore promote the scheduler's ``alphas_cumprod`` to float64 (the same numbers)
  and compare float64 steps to 1e-9; DPMSolverMultistep builds its sigmas in float32, so it is compared in
  float32 (relative 2e-5).
* DDPM's last step: cdp returns x̂0; diffusers, when that timestep is > 0 (any spacing but n = T), adds
  ``sqrt(1e-20)·z`` (its variance, 0 there, is clamped at 1e-20), a 1e-10-sized difference.
* ``v_prediction`` has no cdp counterpart; the tests cover ``epsilon`` and ``sample``.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from cdp.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler  # noqa: E402
from cdp.schedules import NoiseSchedule, ScheduleConfig  # noqa: E402

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "sample")
T = 100
SHAPE = (4, 3, 2)  # (B, horizon, action dim)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # x̂0 of an ε-network at ᾱ ≈ 1e-7 (cosine, k = T) is ~1e3 in size, so the tolerance is relative to the scale
    tol = 1e-9 if b.dtype == torch.float64 else 2e-5
    scale = max(1.0, float(b.abs().max()))
    assert a.dtype == b.dtype, what
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _inputs(n: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]
    outs = [torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]
    return xs, outs


def _float64(sch):
    """The scheduler computing in float64 on its own alphas_cumprod values (see the module docstring)."""
    sch.alphas_cumprod = sch.alphas_cumprod.to(torch.float64)
    return sch


# ----------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("num_train", [100, 1000])
def test_schedule_values_equal(beta_schedule, num_train):
    sch = DDPMScheduler(num_train_timesteps=num_train, beta_schedule=beta_schedule)
    s = NoiseSchedule.from_diffusers(sch)
    ref = sch.alphas_cumprod.to(torch.float64)
    assert s.num_steps == num_train
    assert torch.equal(s.alphas_cumprod, ref)
    # cdp step k ↔ diffusers timestep k − 1, for the discrete chain and the continuous time t = k / T alike
    k = torch.arange(1, num_train + 1)
    al, si = s.discrete_alpha_sigma(k, torch.float64)
    assert torch.equal(al, ref.sqrt()) and torch.equal(si, (1 - ref).sqrt())
    t = k.to(torch.float64) / num_train
    torch.testing.assert_close(s.alpha(t), ref.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sigma(t), (1 - ref).sqrt(), rtol=1e-12, atol=0)
    # cdp's betas are 1 - ᾱ_k / ᾱ_{k-1} of the float32 ᾱ: diffusers' betas up to float32 round-off of ᾱ
    torch.testing.assert_close(s.betas, sch.betas.to(torch.float64), rtol=0, atol=2e-7)
    # β(t) on segment k is -T log(1 - β_k), the slope of the interpolated log ᾱ
    torch.testing.assert_close(s.beta(t), -num_train * torch.log1p(-s.betas), rtol=1e-12, atol=0)
    # forward process
    g = torch.Generator().manual_seed(1)
    a0, eps = torch.randn((8, 5), generator=g), torch.randn((8, 5), generator=g)
    kb = torch.randint(1, num_train + 1, (8,), generator=g)
    _close(s.add_noise(a0, eps, kb), sch.add_noise(a0, eps, kb - 1), "add_noise")
    # the config round-trips (policy.json stores it)
    s2 = NoiseSchedule(ScheduleConfig(**{**s.config.__dict__, "alphas_cumprod": list(s.config.alphas_cumprod)}))
    assert torch.equal(s2.alphas_cumprod, s.alphas_cumprod)


def test_schedule_from_diffusers_rejects():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_diffusers(object())
    with pytest.raises(ValueError, match="tabulated"):
        ScheduleConfig(name="linear", alphas_cumprod=(0.5,), num_steps=1)
    with pytest.raises(ValueError, match="non-increasing"):
        ScheduleConfig(name="tabulated", alphas_cumprod=(0.5, 0.6), num_steps=2)


# ----------------------------------------------------------------------------------------------------- samplers
def _check_steps(sampler, sch, xs, outs, step_kwargs=None, ddpm_seed=None):
    """Each step on the same (sample, model output); multistep history accumulates in both from the same inputs."""
    step_kwargs = step_kwargs or {}
    assert sampler.timesteps.tolist() == (sch.timesteps + 1).tolist()
    for i, td in enumerate(sch.timesteps):
        if ddpm_seed is not None:
            ref = sch.step(outs[i], td, xs[i], generator=torch.Generator().manual_seed(ddpm_seed + i),
                           **step_kwargs).prev_sample
            got = sampler.step(outs[i], i, xs[i], generator=torch.Generator().manual_seed(ddpm_seed + i))
        else:
            ref = sch.step(outs[i], td, xs[i], **step_kwargs).prev_sample
            got = sampler.step(outs[i], i, xs[i])
        _close(got, ref, f"step {i} (diffusers t={int(td)})")


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing,n", [("trailing", 10), ("trailing", T), ("leading", 16), ("linspace", 7)])
def test_ddpm_step_parity(beta_schedule, prediction, clip, spacing, n):
    sch = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction,
                        clip_sample=clip, timestep_spacing=spacing)
    sch.set_timesteps(n)
    sampler = DDPMSampler(NoiseSchedule.from_diffusers(sch), prediction, clip_sample=1.0 if clip else None)
    if spacing == "trailing":
        sampler.set_timesteps(n)
    else:
        sampler.set_timesteps(timesteps=(sch.timesteps + 1).tolist())
    xs, outs = _inputs(len(sch.timesteps), dtype=torch.float64)
    _float64(sch)
    _check_steps(sampler, sch, xs, outs, ddpm_seed=100)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing,n", [("trailing", 10), ("trailing", 25), ("leading", 16)])
def test_ddim_step_parity(beta_schedule, prediction, clip, spacing, n):
    sch = DDIMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction,
                        clip_sample=clip, set_alpha_to_one=True, timestep_spacing=spacing)
    sch.set_timesteps(n)
    sampler = DDIMSampler(NoiseSchedule.from_diffusers(sch), prediction, clip_sample=1.0 if clip else None)
    if spacing == "trailing":
        sampler.set_timesteps(n)
    else:
        sampler.set_timesteps(timesteps=(sch.timesteps + 1).tolist())
    xs, outs = _inputs(n, dtype=torch.float64)
    _float64(sch)
    _check_steps(sampler, sch, xs, outs, step_kwargs={"use_clipped_model_output": True})


def test_ddim_clipping_convention_differs_without_use_clipped_model_output():
    """cdp's DDIM re-derives ε̂ from the clipped x̂0; diffusers' default step() keeps the model's ε̂."""
    sch = DDIMScheduler(num_train_timesteps=T, clip_sample=True, timestep_spacing="trailing")
    sch.set_timesteps(10)
    sampler = DDIMSampler(NoiseSchedule.from_diffusers(sch), "epsilon", clip_sample=1.0)
    sampler.set_timesteps(10)
    x, out = 3 * torch.ones(SHAPE), -torch.ones(SHAPE)  # x̂0 far outside [-1, 1]: clipping is active
    got = sampler.step(out, 3, x)
    _close(got, sch.step(out, sch.timesteps[3], x, use_clipped_model_output=True).prev_sample, "clipped")
    assert not torch.allclose(got, sch.step(out, sch.timesteps[3], x).prev_sample, atol=1e-3)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("n,lower_order_final", [(10, True), (10, False), (20, True), (1, True)])
def test_dpmsolver_pp_2m_step_parity(beta_schedule, prediction, n, lower_order_final):
    sch = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction,
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                      timestep_spacing="trailing", lower_order_final=lower_order_final,
                                      final_sigmas_type="zero")
    sch.set_timesteps(n)
    sampler = DPMSolverPP2MSampler(NoiseSchedule.from_diffusers(sch), prediction)
    sampler.set_timesteps(n)
    xs, outs = _inputs(n)
    _check_steps(sampler, sch, xs, outs)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmsolver_pp_2m_other_spacings_via_timesteps(spacing):
    sch = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)  # defaults: 2M, ++, zero
    sch.set_timesteps(20)
    sampler = DPMSolverPP2MSampler(NoiseSchedule.from_diffusers(sch), "epsilon")
    sampler.set_timesteps(timesteps=(sch.timesteps + 1).tolist())
    xs, outs = _inputs(20)
    _check_steps(sampler, sch, xs, outs)


def test_set_timesteps_validation():
    s = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=T))
    sampler = DDIMSampler(s)
    with pytest.raises(ValueError, match="exactly one"):
        sampler.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="descending"):
        sampler.set_timesteps(timesteps=[1, 5])
    with pytest.raises(ValueError, match="descending"):
        sampler.set_timesteps(timesteps=[T + 1, 5])
    sampler.set_timesteps(timesteps=[91, 61, 1])
    assert sampler.timesteps.tolist() == [91, 61, 1] and sampler.prev_timesteps.tolist() == [61, 1, 0]


def test_regularizer_on_a_diffusers_schedule_uses_the_discrete_chain():
    """The regulariser's r(t) = σ_t at t = k / T is diffusers' sqrt(1 - ᾱ_{k-1}) (ε-prediction)."""
    from cdp.contraction import ContractionConfig, ContractionRegularizer, sign_and_ratio

    sch = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    s = NoiseSchedule.from_diffusers(sch)
    k = torch.arange(1, T + 1)
    _, r = sign_and_ratio(s, k.to(torch.float64) / T, "epsilon")
    torch.testing.assert_close(r, (1 - sch.alphas_cumprod.to(torch.float64)).sqrt(), rtol=1e-12, atol=0)
    reg = ContractionRegularizer(ContractionConfig(weight=0.1), s)
    net = torch.nn.Linear(2, 2)
    loss, metrics = reg.loss_from_clean(lambda x, t, c: net(x), torch.randn(8, 2), None)
    assert torch.isfinite(loss) and "lambda_max_mean" in metrics
