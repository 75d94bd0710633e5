import pytest
import torch

from cdp.samplers import integrate_ode, make_sampler, sample, split_prediction
from cdp.schedules import NoiseSchedule
from gaussian import exact_eps, exact_x0

MU, S = 0.3, 0.5


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddim", 100), ("dpmsolver++", 20)])
def test_samplers_reproduce_gaussian_mean_and_variance(name, steps):
    sch = NoiseSchedule(name="linear", num_steps=1000)
    sm = make_sampler(name, sch, "epsilon", num_inference_steps=steps)
    g = torch.Generator().manual_seed(0)
    x = sample(exact_eps(sch, MU, S), sm, torch.randn(20000, 1, generator=g, dtype=torch.float64), generator=g)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - S) < 0.02


def test_x0_prediction_gives_same_ddim_path_as_epsilon():
    sch = NoiseSchedule(name="vp", num_steps=50)
    a = torch.randn(64, 2, dtype=torch.float64)
    xs = [sample(f(sch, MU, S), make_sampler("ddim", sch, p), a) for f, p in ((exact_eps, "epsilon"), (exact_x0, "sample"))]
    assert torch.allclose(xs[0], xs[1], atol=1e-8)


def test_dpmsolver_is_more_accurate_than_ddim_at_few_steps():
    sch = NoiseSchedule(name="linear", num_steps=1000)
    a = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t1 = torch.tensor(1.0, dtype=torch.float64)
    exact = MU + S * (a - sch.alpha(t1) * MU) / torch.sqrt(sch.alpha(t1) ** 2 * S**2 + sch.sigma(t1) ** 2)
    ref = integrate_ode(exact_eps(sch, MU, S), sch, a, t_start=1.0, t_end=1e-3, n_steps=2000)
    assert (ref - exact).abs().mean() < 1e-3  # RK4 reference vs the closed-form flow map
    err = {}
    for name in ("ddim", "dpmsolver++"):
        x = sample(exact_eps(sch, MU, S), make_sampler(name, sch, num_inference_steps=20), a)
        err[name] = (x - exact).abs().mean().item()
    assert err["dpmsolver++"] < 0.5 * err["ddim"]  # measured: 0.017 vs 0.054


def test_rk4_matches_torchdiffeq_and_closed_form():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    sch = NoiseSchedule(name="vp", num_steps=5)
    eps = exact_eps(sch, MU, S)
    a1 = torch.randn(16, 1, dtype=torch.float64)
    ours = integrate_ode(eps, sch, a1, t_start=1.0, t_end=0.01, n_steps=400)

    def rhs(tau, a):  # sampling time tau = 1 - t
        t = (1 - tau).reshape(1).expand(a.shape[0]).to(torch.float64)
        ca, cn = sch.ode_coefficients(t, "epsilon")
        return ca[:, None] * a + cn[:, None] * eps(a, t)

    ref = torchdiffeq.odeint(rhs, a1, torch.tensor([0.0, 0.99], dtype=torch.float64), rtol=1e-9, atol=1e-9, method="dopri5")[-1]
    assert torch.allclose(ours, ref, atol=1e-7)
    # closed form: the flow maps standardised marginals, a_t = αμ + m(t) z
    m = lambda t: torch.sqrt(sch.alpha(t) ** 2 * S**2 + sch.sigma(t) ** 2)  # noqa: E731
    t1, t0 = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)
    z = (a1 - sch.alpha(t1) * MU) / m(t1)
    assert torch.allclose(ours, sch.alpha(t0) * MU + m(t0) * z, atol=1e-7)


def test_determinism_and_injected_noise():
    sch = NoiseSchedule(name="vp", num_steps=5)
    eps = exact_eps(sch, MU, S)
    a = torch.randn(8, 2)
    x1 = sample(eps, make_sampler("ddpm", sch), a, generator=torch.Generator().manual_seed(3))
    x2 = sample(eps, make_sampler("ddpm", sch), a, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2)
    noises = [torch.zeros(8, 2) for _ in range(5)]
    x3 = sample(eps, make_sampler("ddpm", sch), a, noises=noises)
    x4 = sample(eps, make_sampler("ddpm", sch), a, noises=[n.clone() for n in noises])
    assert torch.equal(x3, x4)
    assert not torch.equal(x1, x3)


def test_sampler_errors():
    sch = NoiseSchedule(name="vp", num_steps=5)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", sch)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("ddim", sch, num_inference_steps=6)
    with pytest.raises(ValueError, match="prediction"):
        make_sampler("ddim", sch, prediction="v")
    with pytest.raises(ValueError, match="prediction"):
        split_prediction(torch.zeros(1), torch.zeros(1), 1.0, 1.0, "v")
    with pytest.raises(ValueError, match="t_end"):
        integrate_ode(lambda a, t, c: a, sch, torch.zeros(1, 1), t_start=0.5, t_end=0.6)
