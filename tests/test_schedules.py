import math

import pytest
import torch

from cdp.schedules import NoiseSchedule, ScheduleConfig
from gaussian import exact_eps, exact_score, exact_x0, marginal_std


def test_vp_matches_diffusion_ql_closed_form():
    T, bmin, bmax = 5, 0.1, 10.0
    sch = NoiseSchedule(name="vp", num_steps=T)
    k = torch.arange(1, T + 1, dtype=torch.float64)
    betas = 1 - torch.exp(-bmin / T - 0.5 * (bmax - bmin) * (2 * k - 1) / T**2)
    assert torch.allclose(sch.betas, betas, atol=1e-12)
    assert torch.allclose(sch.alphas_cumprod, torch.cumprod(1 - betas, 0), atol=1e-12)


def test_linear_discrete_is_close_to_ddpm_linspace_at_T1000():
    sch = NoiseSchedule(name="linear", num_steps=1000)
    ddpm = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert (sch.alphas_cumprod - ddpm).abs().max() < 2e-3


def test_cosine_matches_improved_ddpm():
    T, s = 100, 0.008
    sch = NoiseSchedule(name="cosine", num_steps=T)
    f = lambda x: math.cos((x + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    assert torch.allclose(sch.alphas_cumprod, torch.cumprod(1 - betas, 0), atol=1e-10)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(sch.alpha(t) ** 2, torch.tensor([f(x) / f(0) for x in t.tolist()], dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "vp", "cosine"])
def test_beta_is_minus_two_dlogalpha_dt_and_vp(name):
    sch = NoiseSchedule(name=name, num_steps=10)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    fd = -2 * (sch.log_alpha(t + h) - sch.log_alpha(t - h)) / (2 * h)
    assert torch.allclose(sch.beta(t), fd, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t))
    # the discrete chain is the continuous schedule read at t_k = k/T (away from the cosine's clipped end)
    k = torch.arange(1, 10)
    al, si = sch.discrete_alpha_sigma(k, torch.float64)
    assert torch.allclose(al, sch.alpha(k.double() / 10), atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "vp", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "score"])
def test_ode_coefficients_give_the_exact_gaussian_flow(name, prediction):
    """For N(mu, s^2) data the PF-ODE flow is a_t = αμ + m(t) z, so da/dτ = -(d/dt) of it. Compare."""
    sch = NoiseSchedule(name=name, num_steps=10)
    mu, s = 0.3, 0.7
    net = {"epsilon": exact_eps, "sample": exact_x0, "score": exact_score}[prediction](sch, mu, s)
    t = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    a = torch.randn(9, 1, dtype=torch.float64)
    ca, cn = sch.ode_coefficients(t, prediction)
    drift = ca[:, None] * a + cn[:, None] * net(a, t)
    h = 1e-6
    m = lambda tt: marginal_std(sch, s, tt)  # noqa: E731
    dm = (m(t + h) - m(t - h)) / (2 * h)
    dal = (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h)
    z = (a[:, 0] - sch.alpha(t) * mu) / m(t)
    expected = -(dal * mu + dm * z)
    assert torch.allclose(drift[:, 0], expected, rtol=1e-5, atol=1e-6)
    if prediction == "epsilon":
        assert (cn < 0).all()  # h(t) < 0 in sampling time
    else:
        assert (cn > 0).all()


def test_add_noise_and_errors():
    sch = NoiseSchedule(name="vp", num_steps=5)
    a0, n = torch.randn(4, 3), torch.randn(4, 3)
    k = torch.tensor([1, 2, 3, 5])
    al, si = sch.discrete_alpha_sigma(k)
    assert torch.allclose(sch.add_noise(a0, n, k), al[:, None] * a0 + si[:, None] * n)
    with pytest.raises(ValueError, match="same shape"):
        sch.add_noise(a0, n[:, :2], k)
    with pytest.raises(ValueError, match="0..5"):
        sch.discrete_alpha_sigma(torch.tensor([6]))
    with pytest.raises(ValueError, match="unknown schedule"):
        ScheduleConfig(name="quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        ScheduleConfig(num_steps=0)
    with pytest.raises(ValueError, match="prediction"):
        sch.ode_coefficients(torch.tensor(0.5), "v")
