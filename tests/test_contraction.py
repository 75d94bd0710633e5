"""The contraction maths against exact answers: eigvalsh, finite differences, closed-form Gaussian flows."""
import pytest
import torch
from torch.func import functional_call

from cdp.contraction import (ContractionConfig, ContractionRegularizer, jacobian, lambda_max, sign_and_ratio,
                             symmetric_jacobian_eigvals)
from cdp.samplers import integrate_ode
from cdp.schedules import NoiseSchedule, ScheduleConfig
from gaussian import exact_eps, exact_score, exact_x0


def linear_fn(W):
    return lambda x, t, c: x @ W.T


def tiny_net(d=3, cond=2, hidden=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d + 1 + cond, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d)).double()


def net_fn(net):
    return lambda x, t, c: net(torch.cat([x, t[:, None], c], -1))


def test_jacobian_of_linear_denoiser_is_its_weight():
    W = torch.randn(4, 4, dtype=torch.float64)
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    J = jacobian(linear_fn(W), x, t)
    assert torch.allclose(J, W.expand(3, 4, 4))


def test_jacobian_matches_central_finite_differences():
    net = tiny_net()
    f = net_fn(net)
    x, t, c = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    J = jacobian(f, x, t, c)
    h = 1e-6
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = h
        col = (f(x + e, t, c) - f(x - e, t, c)) / (2 * h)
        assert torch.allclose(J[:, :, j], col, atol=1e-8)


@pytest.mark.parametrize("symmetric", [True, False])
def test_estimators_vs_eigvalsh_when_the_most_negative_eigenvalue_dominates(symmetric):
    d = 6
    torch.manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    evals = torch.tensor([-5.0, -3.0, -1.0, 0.2, 0.8, 1.5], dtype=torch.float64)  # |λ_min| > λ_max
    S = Q @ torch.diag(evals) @ Q.T
    A = torch.randn(d, d, dtype=torch.float64)
    W = S + (0.5 * (A - A.T) if not symmetric else 0)  # antisymmetric part does not change J^sym
    x, t = torch.randn(8, d, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    true = torch.linalg.eigvalsh(0.5 * (W + W.T))[-1]
    assert abs(true - 1.5) < 1e-10
    g = torch.Generator().manual_seed(0)
    for est, iters in (("exact", 1), ("power", 300), ("lanczos", d)):
        lam = lambda_max(linear_fn(W), x, t, estimator=est, iters=iters, generator=g)
        assert torch.allclose(lam, true.expand(8), atol=1e-6), est
    unshifted = lambda_max(linear_fn(W), x, t, estimator="power_unshifted", iters=60, generator=g)
    assert torch.allclose(unshifted, torch.full((8,), -5.0, dtype=torch.float64), atol=1e-3)  # |λ|-largest, not λ_max
    # sign = -1 gives -λ_min
    lam = lambda_max(linear_fn(W), x, t, sign=-1.0, estimator="lanczos", iters=d, generator=g)
    assert torch.allclose(lam, torch.full((8,), 5.0, dtype=torch.float64), atol=1e-8)


def test_estimators_on_random_matrices_and_a_network():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        W = torch.randn(5, 5, dtype=torch.float64, generator=g)
        x, t = torch.randn(4, 5, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
        true = torch.linalg.eigvalsh(0.5 * (W + W.T))[-1]
        for est, iters in (("power", 200), ("lanczos", 5)):
            assert torch.allclose(lambda_max(linear_fn(W), x, t, estimator=est, iters=iters, generator=g), true.expand(4), atol=1e-5)
    net = tiny_net()
    f = net_fn(net)
    x, t, c = torch.randn(16, 3, dtype=torch.float64), torch.rand(16, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    exact = symmetric_jacobian_eigvals(f, x, t, c)[:, -1]
    for est, iters in (("exact", 1), ("power", 100), ("lanczos", 3)):
        lam = lambda_max(f, x, t, c, estimator=est, iters=iters, generator=g)
        assert torch.allclose(lam, exact, atol=1e-6), est


@pytest.mark.parametrize("s,contracts", [(0.5, True), (2.0, False)])
def test_gaussian_condition_predicts_measured_divergence(s, contracts):
    """Exact ε for N(0, s² I): the derived condition λ_max(Ĵ) < 0 ⟺ s < 1, and nearby ODE flows agree."""
    sch = NoiseSchedule(name="linear", num_steps=1000)
    eps = exact_eps(sch, 0.0, s)
    t = torch.linspace(0.02, 1.0, 50, dtype=torch.float64)
    x = torch.randn(50, 2, dtype=torch.float64)
    sg, r = sign_and_ratio(sch, t, "epsilon")
    lam_hat = r + lambda_max(eps, x, t, estimator="exact", sign=sg)
    assert bool((lam_hat < 0).all()) == contracts and bool((lam_hat > 0).all()) == (not contracts)
    # the same sign for every parametrisation, and the same λ_max(J_F) = |c_n| λ̂
    lamF = {}
    for pred, net in (("epsilon", eps), ("sample", exact_x0(sch, 0.0, s)), ("score", exact_score(sch, 0.0, s))):
        sg, r = sign_and_ratio(sch, t, pred)
        _, cn = sch.ode_coefficients(t, pred)
        lamF[pred] = cn.abs() * (r + lambda_max(net, x, t, estimator="exact", sign=sg))
    assert torch.allclose(lamF["epsilon"], lamF["sample"], rtol=1e-8)
    assert torch.allclose(lamF["epsilon"], lamF["score"], rtol=1e-8)
    # measured divergence of two nearby trajectories of the exact ODE
    a = torch.randn(32, 2, dtype=torch.float64)
    delta = 1e-4 * torch.randn(32, 2, dtype=torch.float64)
    t_end = 0.02
    fa = integrate_ode(eps, sch, a, t_start=1.0, t_end=t_end, n_steps=300)
    fb = integrate_ode(eps, sch, a + delta, t_start=1.0, t_end=t_end, n_steps=300)
    ratio = (fa - fb).norm(dim=1) / delta.norm(dim=1)
    assert bool((ratio < 1).all()) == contracts and bool((ratio > 1).all()) == (not contracts)
    # Corollary 3.1.1: ratio = exp(∫ λ_max(J_F^sym) dτ) exactly for this isotropic flow
    ts = torch.linspace(t_end, 1.0, 4001, dtype=torch.float64)
    _, cn = sch.ode_coefficients(ts, "epsilon")
    sg, r = sign_and_ratio(sch, ts, "epsilon")
    lam_eps = sch.sigma(ts) / (sch.alpha(ts) ** 2 * s**2 + sch.sigma(ts) ** 2)  # J_ε = this × I
    integrand = cn.abs() * (r - lam_eps)
    bound = torch.exp(torch.trapezoid(integrand, ts))
    assert torch.allclose(ratio, bound.expand(32), rtol=1e-4)


def _param_loss(net, cfg, name, seed=0):
    sch = NoiseSchedule(name="vp", num_steps=5)
    reg = ContractionRegularizer(cfg, sch)
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 1.0], dtype=torch.float64)
    params = dict(net.named_parameters())

    def f(p):
        fn = lambda xx, tt, cc: functional_call(net, {**params, name: p}, (torch.cat([xx, tt[:, None], cc], -1),))  # noqa: E731
        loss, _ = reg(fn, x, t, c, generator=torch.Generator().manual_seed(seed))
        return loss

    return f, params[name].detach().clone().requires_grad_(True)


@pytest.mark.parametrize("cfg", [
    ContractionConfig(loss="hinge", estimator="exact", margin=10.0),
    ContractionConfig(loss="hinge", estimator="lanczos", iters=3, margin=10.0),
    ContractionConfig(loss="hinge", estimator="power", iters=60, margin=10.0),
    ContractionConfig(loss="frobenius", estimator="exact", margin=0.1),
    ContractionConfig(loss="frobenius", estimator="hutchinson", n_probes=3, margin=0.1),
    ContractionConfig(loss="authors"),
], ids=["hinge-exact", "hinge-lanczos", "hinge-power", "frob-exact", "frob-hutchinson", "authors"])
def test_gradients_reach_the_parameters(cfg):
    net = tiny_net()
    f, p = _param_loss(net, cfg, "2.weight" if cfg.estimator == "power" else "0.weight")
    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-5)
    (g,) = torch.autograd.grad(f(p), p)
    assert g.abs().sum() > 0


def test_gradgradcheck_through_the_exact_hinge():
    net = tiny_net()
    f, p = _param_loss(net, ContractionConfig(loss="frobenius", estimator="exact"), "2.weight")
    assert torch.autograd.gradgradcheck(f, (p,), eps=1e-6, atol=1e-5)


def test_hutchinson_is_unbiased_for_the_exact_frobenius():
    net = tiny_net()
    sch = NoiseSchedule(name="vp", num_steps=5)
    x, c, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), torch.full((6,), 0.4, dtype=torch.float64)
    exact, _ = ContractionRegularizer(ContractionConfig(loss="frobenius", estimator="exact", weight=1.0), sch)(net_fn(net), x, t, c)
    hut, _ = ContractionRegularizer(ContractionConfig(loss="frobenius", estimator="hutchinson", n_probes=2000, weight=1.0), sch)(
        net_fn(net), x, t, c, generator=torch.Generator().manual_seed(0))
    assert abs(float(hut.detach()) - float(exact.detach())) < 0.05 * float(exact.detach())


def test_hinge_value_margin_and_metrics():
    sch = NoiseSchedule(name="vp", num_steps=5)
    W = torch.diag(torch.tensor([0.1, 2.0], dtype=torch.float64))  # J_ε = W, λ_min = 0.1
    x, t = torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)
    reg = ContractionRegularizer(ContractionConfig(loss="hinge", estimator="exact", margin=0.05, weight=0.1), sch)
    loss, m = reg(linear_fn(W), x, t)
    lam = sch.sigma(t) - 0.1  # λ_max(Ĵ) = σ − λ_min(J_ε)
    assert torch.allclose(loss, 0.1 * torch.clamp(lam, min=-0.05).mean())
    assert m["frac_contractive"] == float((lam < 0).double().mean())
    # a strongly contracting field sits at the floor −β: no gradient
    big = ContractionRegularizer(ContractionConfig(loss="hinge", estimator="exact", margin=0.05), sch)
    W2 = torch.eye(2, dtype=torch.float64).mul(5.0).requires_grad_(True)
    loss2, _ = big(lambda a, tt, c: a @ W2.T, x, t)
    loss2.backward()
    assert float(loss2) == pytest.approx(-0.1 * 0.05) and W2.grad.abs().sum() == 0


def test_t_range_selects_steps_and_sample_points():
    sch = NoiseSchedule(name="cosine", num_steps=100)
    reg = ContractionRegularizer(ContractionConfig(t_range=(0.0, 0.1), max_samples=7), sch)
    assert reg.steps.tolist() == list(range(1, 11))
    a_t, t, c = reg.sample_points(torch.randn(20, 2), torch.randn(20, 3), torch.Generator().manual_seed(0))
    assert a_t.shape == (7, 2) and c.shape == (7, 3) and bool((t <= 0.1 + 1e-6).all())
    reg5 = ContractionRegularizer(ContractionConfig(t_range=(0.0, 0.1)), NoiseSchedule(name="vp", num_steps=5))
    assert reg5.steps.tolist() == [1]  # none inside (0, 0.1]: the lowest-noise step


def test_config_errors():
    with pytest.raises(ValueError, match="unknown contraction loss"):
        ContractionConfig(loss="spectral")
    with pytest.raises(ValueError, match="does not apply"):
        ContractionConfig(loss="frobenius", estimator="power")
    with pytest.raises(ValueError, match="margin"):
        ContractionConfig(margin=-1)
    with pytest.raises(ValueError, match="t_range"):
        ContractionConfig(t_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="estimator"):
        lambda_max(lambda x, t, c: x, torch.zeros(1, 2), torch.zeros(1), estimator="arnoldi")
    reg = ContractionRegularizer(ContractionConfig(), NoiseSchedule())
    with pytest.raises(ValueError, match="t must have shape"):
        reg(lambda x, t, c: x, torch.zeros(3, 2), torch.zeros(2))


def test_fast_jacobian_equals_vmap_jacfwd():
    """jacobian_fast: MLP closed form (input_jacobian) and the generic tangent-vmapped JVP both equal jacobian()."""
    from cdp.contraction import jacobian_fast
    from cdp.nets.mlp import MLPDenoiser
    torch.manual_seed(0)
    for horizon, da in ((1, 3), (4, 2)):
        net = MLPDenoiser(action_dim=da, cond_dim=5, hidden=32, n_layers=3, horizon=horizon).double()
        shape = (6, da) if horizon == 1 else (6, horizon, da)
        x, t, c = torch.randn(shape, dtype=torch.float64), torch.rand(6, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        ref = jacobian(net, x, t, c)
        assert torch.allclose(jacobian_fast(net, x, t, c), ref, atol=1e-10, rtol=0)  # closed form
        assert torch.allclose(jacobian_fast(net.forward, x, t, c), ref, atol=1e-10, rtol=0)  # generic path
        # parameter gradients agree too
        for J in (jacobian_fast(net, x, t, c), ref):
            g = torch.autograd.grad(torch.linalg.eigvalsh(0.5 * (J + J.transpose(1, 2)))[:, -1].sum(), net.out.weight)[0]
            if J is ref:
                assert torch.allclose(g, g_fast, atol=1e-10)
            g_fast = g
    f = net_fn(tiny_net())
    x, t, c = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(jacobian_fast(f, x, t, c), jacobian(f, x, t, c), atol=1e-10, rtol=0)


def test_forward_and_jacobian_equals_forward_and_jacobian():
    """MLPDenoiser.forward_and_jacobian: outputs = forward, J of the first n rows = jacobian(), same parameter grads."""
    from cdp.nets.mlp import MLPDenoiser
    torch.manual_seed(0)
    for horizon, da in ((1, 3), (4, 2)):
        net = MLPDenoiser(action_dim=da, cond_dim=5, hidden=32, n_layers=3, horizon=horizon).double()
        shape = (9, da) if horizon == 1 else (9, horizon, da)
        x, t, c = torch.randn(shape, dtype=torch.float64), torch.rand(9, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
        out, J = net.forward_and_jacobian(x, t, c, 4)
        assert torch.allclose(out, net(x, t, c), atol=1e-12, rtol=0)
        ref = jacobian(net, x[:4], t[:4], c[:4])
        assert J.shape == ref.shape and torch.allclose(J, ref, atol=1e-12, rtol=0)

        def grads(o, jac):
            loss = (o ** 2).mean() + torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))[:, -1].sum()
            return torch.autograd.grad(loss, list(net.parameters()))
        g1 = grads(out, J)
        g2 = grads(net(x, t, c), net.input_jacobian(x[:4], t[:4], c[:4]))
        assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(g1, g2))
        assert net.forward_and_jacobian(x, t, c, 0)[1].shape[0] == 0
        with pytest.raises(ValueError, match="n_jac"):
            net.forward_and_jacobian(x, t, c, 10)


@pytest.mark.parametrize("loss", ["hinge", "frobenius", "authors"])
def test_loss_from_jacobian_equals_the_generic_exact_path(loss):
    """The exact loss from a given Jacobian = __call__ with a denoiser that has no closed form (functorch path)."""
    torch.manual_seed(0)
    net = tiny_net()
    reg = ContractionRegularizer(ContractionConfig(loss=loss, estimator="exact", margin=0.05, weight=0.3),
                                 NoiseSchedule())
    f = net_fn(net)
    x, t, c = torch.randn(6, 3, dtype=torch.float64), torch.rand(6, dtype=torch.float64) * 0.9 + 0.05, torch.randn(6, 2, dtype=torch.float64)
    l1, m1 = reg(f, x, t, c)
    l2, m2 = reg.loss_from_jacobian(jacobian(f, x, t, c), t)
    assert torch.allclose(l1, l2, atol=1e-12) and m1 == pytest.approx(m2)
    with pytest.raises(ValueError, match="need J"):
        reg.loss_from_jacobian(torch.zeros(6, 3, 2), t)


def test_closed_form_matvecs_match_the_functorch_path():
    """power / lanczos / hutchinson on an MLPDenoiser (closed-form products) equal the generic JVP/VJP path."""
    from cdp.nets.mlp import MLPDenoiser
    torch.manual_seed(0)
    net = MLPDenoiser(action_dim=4, cond_dim=3, hidden=32).double()
    x, t, c = torch.randn(7, 4, dtype=torch.float64), torch.rand(7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    for est in ("power", "lanczos", "power_unshifted"):
        a = lambda_max(net, x, t, c, sign=-1.0, estimator=est, iters=3, generator=torch.Generator().manual_seed(1))
        b = lambda_max(net.forward, x, t, c, sign=-1.0, estimator=est, iters=3, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(a, b, atol=1e-10), est
    sch = NoiseSchedule(name="vp", num_steps=5)
    reg = ContractionRegularizer(ContractionConfig(loss="frobenius", estimator="hutchinson"), sch)
    l1, _ = reg(net, x, t, c, generator=torch.Generator().manual_seed(2))
    l2, _ = reg(net.forward, x, t, c, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(l1, l2, atol=1e-10)


def test_auto_estimator_uses_exact_up_to_128():
    from cdp.nets.mlp import MLPDenoiser
    reg = ContractionRegularizer(ContractionConfig(), NoiseSchedule(name="vp", num_steps=5))
    net = MLPDenoiser(action_dim=14, cond_dim=2, hidden=8)
    assert reg._estimator(14, net) == "exact" and reg._estimator(128, net) == "exact"
    assert reg._estimator(129, net) == "power" and reg._estimator(112, net.forward) == "exact"
    small = ContractionRegularizer(ContractionConfig(auto_exact_max_dim=8), NoiseSchedule(name="vp", num_steps=5))
    assert small._estimator(8, net) == "exact" and small._estimator(9, net) == "power"
    frob = ContractionRegularizer(ContractionConfig(loss="frobenius"), NoiseSchedule(name="vp", num_steps=5))
    assert frob._estimator(129, net) == "hutchinson"


def test_lazy_regularisation_is_unbiased_and_skips():
    sch = NoiseSchedule(name="vp", num_steps=5)
    W = torch.diag(torch.tensor([0.1, 2.0], dtype=torch.float64))
    a0 = torch.randn(8, 2, dtype=torch.float64)
    full = ContractionRegularizer(ContractionConfig(estimator="exact", margin=0.5, max_samples=None, t_range=(0.9, 1.0)), sch)
    lazy = ContractionRegularizer(ContractionConfig(estimator="exact", margin=0.5, max_samples=None, t_range=(0.9, 1.0),
                                                    apply_prob=0.25), sch)
    ref, _ = full.loss_from_clean(linear_fn(W), a0)  # linear field: the loss does not depend on the points
    g = torch.Generator().manual_seed(0)
    vals = [float(lazy.loss_from_clean(linear_fn(W), a0, generator=g)[0]) for _ in range(400)]
    applied = [v != 0 for v in vals]
    assert 0.15 < sum(applied) / 400 < 0.35
    assert all(abs(v - float(ref) / 0.25) < 1e-12 for v, a in zip(vals, applied) if a)
    assert abs(sum(vals) / 400 - float(ref)) < 0.25 * abs(float(ref))
    with pytest.raises(ValueError, match="apply_prob"):
        ContractionConfig(apply_prob=0.0)


def test_rayleigh_exact_path_equals_eigvalsh_path_for_a_generic_network():
    """ContractionRegularizer.__call__ with exact_grad="rayleigh" (no closed form: functorch JVP) = "full": value,
    metrics and parameter gradients (Hellmann–Feynman), and the eigenvector really is λ_max's."""
    torch.manual_seed(0)
    net = tiny_net(d=4, hidden=16)
    f = net_fn(net)
    x, t, c = torch.randn(7, 4, dtype=torch.float64), torch.rand(7, dtype=torch.float64) * 0.9 + 0.05, torch.randn(7, 2, dtype=torch.float64)
    out = []
    for exact_grad in ("rayleigh", "full"):
        reg = ContractionRegularizer(ContractionConfig(estimator="exact", margin=2.0, weight=0.3, exact_grad=exact_grad,
                                                       fd_step=None), NoiseSchedule())
        loss, m = reg(f, x, t, c)
        out.append((loss, m, torch.autograd.grad(loss, list(net.parameters())[:3])))  # the output bias has no J
    (l1, m1, g1), (l2, m2, g2) = out
    assert float(l1) == pytest.approx(float(l2), rel=1e-12) and m1 == pytest.approx(m2)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g1, g2))
    assert any(float(a.abs().max()) > 1e-6 for a in g1)
    J = jacobian(f, x, t, c)
    v = reg.top_direction(J, t)  # ε-prediction: s = −1, the top eigenvector of −J^sym is λ_min's of J^sym
    evals, evecs = torch.linalg.eigh(0.5 * (J + J.transpose(1, 2)))
    assert torch.allclose((v * evecs[:, :, 0]).sum(-1).abs(), torch.ones(7, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="exact_grad"):
        ContractionConfig(exact_grad="nope")
    with pytest.raises(ValueError, match="hinge"):
        ContractionRegularizer(ContractionConfig(loss="frobenius"), NoiseSchedule()).loss_from_eigenvalue(t, t)


def test_forward_and_jvp_equals_forward_and_jacobian_times_direction():
    """MLPDenoiser.forward_and_jvp: out = forward, the direction sees the true Jacobian, Jv = J v with the same
    parameter gradients as (J v) from forward_and_jacobian; bad n_jac / direction shapes raise."""
    from cdp.nets.mlp import MLPDenoiser
    torch.manual_seed(0)
    for horizon, da in ((1, 3), (4, 2)):
        net = MLPDenoiser(action_dim=da, cond_dim=5, hidden=32, n_layers=3, horizon=horizon).double()
        shape = (9, da) if horizon == 1 else (9, horizon, da)
        x, t, c = torch.randn(shape, dtype=torch.float64), torch.rand(9, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
        seen = {}

        def direction(J):
            seen["J"] = J
            return torch.nn.functional.normalize(J.sum(1), dim=-1)  # any J-dependent direction
        out, v, jv = net.forward_and_jvp(x, t, c, 4, direction)
        out2, J = net.forward_and_jacobian(x, t, c, 4)
        assert torch.allclose(out, out2, atol=1e-12, rtol=0) and not v.requires_grad
        assert torch.allclose(seen["J"], J.detach(), atol=1e-12, rtol=0)
        jv_ref = torch.bmm(J, v.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(jv, jv_ref, atol=1e-12, rtol=0)
        w = torch.randn_like(jv)
        g1 = torch.autograd.grad((out ** 2).mean() + (w * jv).sum(), list(net.parameters()))
        g2 = torch.autograd.grad((out2 ** 2).mean() + (w * jv_ref).sum(), list(net.parameters()))
        assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(g1, g2))
        with pytest.raises(ValueError, match="n_jac"):
            net.forward_and_jvp(x, t, c, 0, direction)
        with pytest.raises(ValueError, match="direction must return"):
            net.forward_and_jvp(x, t, c, 4, lambda J: J[:, 0, :1])


def test_sym_matvec_operator_equals_symmetric_jacobian_products():
    """The reverse-mode-only product operator (one forward, then double-vjp) = 0.5 (J + Jᵀ) v, repeatedly."""
    from cdp.contraction import sym_matvec_operator
    net = tiny_net(d=5, hidden=16)
    f = net_fn(net)
    g = torch.Generator().manual_seed(0)
    x, t, c = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64),
               torch.randn(4, 2, generator=g, dtype=torch.float64))
    J = jacobian(f, x, t, c)
    A = 0.5 * (J + J.transpose(1, 2))
    op = sym_matvec_operator(f, x, t, c)
    for _ in range(3):
        v = torch.randn(4, 5, generator=g, dtype=torch.float64)
        with torch.no_grad():
            got = op(v)
        assert torch.allclose(got, torch.bmm(A, v.unsqueeze(-1)).squeeze(-1), atol=1e-12, rtol=0)
        assert not got.requires_grad


def test_forward_and_rayleigh_equals_forward_and_jvp():
    """MLPDenoiser.forward_and_rayleigh (fused trunk) = forward_and_jvp's out and vᵀ(J v): values, the direction
    sees the same J, and the parameter gradients of any combination of out and q agree (float64); bad n_jac /
    direction shapes raise."""
    from cdp.nets.mlp import MLPDenoiser
    torch.manual_seed(1)
    for horizon, da, cond_dim in ((1, 3, 5), (4, 2, 0), (1, 7, 5)):
        net = MLPDenoiser(action_dim=da, cond_dim=cond_dim, hidden=32, n_layers=3, horizon=horizon).double()
        shape = (11, da) if horizon == 1 else (11, horizon, da)
        x, t = torch.randn(shape, dtype=torch.float64), torch.rand(11, dtype=torch.float64)
        c = torch.randn(11, cond_dim, dtype=torch.float64) if cond_dim else None
        seen = []

        def direction(J):
            seen.append(J)
            _, vecs = torch.linalg.eigh(-0.5 * (J + J.transpose(1, 2)))
            return vecs[:, :, -1]
        out, v, q = net.forward_and_rayleigh(x, t, c, 6, direction)
        out2, v2, jv = net.forward_and_jvp(x, t, c, 6, direction)
        assert torch.allclose(seen[0], seen[1], atol=1e-12, rtol=0) and not v.requires_grad
        assert torch.allclose(out, out2, atol=1e-12, rtol=0) and torch.allclose(v, v2, atol=1e-12, rtol=0)
        q2 = (v2 * jv).sum(-1)
        assert q.shape == (6,) and torch.allclose(q, q2, atol=1e-12, rtol=0)
        w, wq = torch.randn_like(out), torch.randn(6, dtype=torch.float64)
        g1 = torch.autograd.grad((w * out).sum() + (wq * q).sum(), list(net.parameters()))
        g2 = torch.autograd.grad((w * out2).sum() + (wq * q2).sum(), list(net.parameters()))
        assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(g1, g2))
        # only q used: the trunk's batch rows get no gradient except through the regularised rows' slopes
        q = net.forward_and_rayleigh(x, t, c, 6, direction)[2]
        q2 = (lambda o: (o[1] * o[2]).sum(-1))(net.forward_and_jvp(x, t, c, 6, direction))
        g3 = torch.autograd.grad(q.sum(), list(net.parameters()), allow_unused=True)
        g4 = torch.autograd.grad(q2.sum(), list(net.parameters()), allow_unused=True)
        zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731 (unused = zero gradient)
        assert all(torch.allclose(zero(a, p), zero(b, p), atol=1e-10, rtol=0)
                   for a, b, p in zip(g3, g4, net.parameters()))
    with pytest.raises(ValueError, match="n_jac"):
        net.forward_and_rayleigh(x, t, c, 0, direction)
    with pytest.raises(ValueError, match="direction must return"):
        net.forward_and_rayleigh(x, t, c, 4, lambda J: J[:, 0, :1])


@pytest.mark.parametrize("prediction,margin", [("epsilon", 0.0), ("sample", 0.3)])
def test_hinge_of_rayleigh_equals_loss_from_eigenvalue(prediction, margin):
    """The graph-free hinge closure applied inside the fused MLP pass = loss_from_eigenvalue(s·q, t): loss value,
    metrics and parameter gradients (float64), for ε- and x0-prediction, with a margin that makes some rows inactive."""
    from cdp.contraction import prediction_sign
    from cdp.nets.mlp import MLPDenoiser
    torch.manual_seed(2)
    sched = NoiseSchedule(ScheduleConfig(name="vp", num_steps=10))
    reg = ContractionRegularizer(ContractionConfig(prediction=prediction, margin=margin, weight=0.3), sched)
    net = MLPDenoiser(action_dim=3, cond_dim=4, hidden=24, n_layers=3).double()
    x, c = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    t = torch.randint(1, 11, (12,)).double() / 10
    t_c = t[:7]
    direction = lambda J: reg.top_direction(J, t_c)  # noqa: E731
    metrics = {}
    out, _, loss = net.forward_and_rayleigh(x, t, c, 7, direction, q_loss=reg.hinge_of_rayleigh(t_c, metrics))
    out2, _, q = net.forward_and_rayleigh(x, t, c, 7, direction)
    loss2, metrics2 = reg.loss_from_eigenvalue(prediction_sign(prediction) * q, t_c)
    assert loss.shape == () and float(loss) == pytest.approx(float(loss2), rel=1e-12, abs=1e-14)
    assert metrics.keys() == metrics2.keys() and all(metrics[k] == pytest.approx(metrics2[k], rel=1e-12, abs=1e-14)
                                                     for k in metrics)
    w = torch.randn_like(out)
    g1 = torch.autograd.grad((w * out).sum() + loss, list(net.parameters()))
    g2 = torch.autograd.grad((w * out2).sum() + loss2, list(net.parameters()))
    assert all(torch.allclose(a, b, atol=1e-12, rtol=1e-10) for a, b in zip(g1, g2))
    if margin > 0:
        assert 0 < metrics["frac_contractive"]  # some rows below the floor: their gradient is zero in both
    with pytest.raises(ValueError, match="hinge"):
        ContractionRegularizer(ContractionConfig(loss="frobenius"), sched).hinge_of_rayleigh(t_c, {})


def _sym_batch(evals, seed=0):
    """(B, d, d) symmetric matrices Q diag(evals) Qᵀ with random orthogonal Q (float64)."""
    g = torch.Generator().manual_seed(seed)
    evals = torch.as_tensor(evals, dtype=torch.float64)
    B, d = evals.shape
    Q, _ = torch.linalg.qr(torch.randn(B, d, d, generator=g, dtype=torch.float64))
    return Q @ torch.diag_embed(evals) @ Q.transpose(1, 2)


def _batched_linear(W):
    return lambda x, t, c: torch.einsum("bij,bj->bi", W, x)


@pytest.mark.parametrize("est,iters", [("power", 8), ("lanczos", 4)])
@pytest.mark.parametrize("evals", [[-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0, -2.0], [0.7, 0.7, 0.7, 0.7], [-3.0],
                                   [2.0], [0.0, 0.0, 0.0]])
@pytest.mark.parametrize("rotate,dtype", [(True, torch.float64), (False, torch.float32)])
def test_estimators_on_repeated_and_degenerate_spectra(est, iters, evals, rotate, dtype):
    """−ρI, d = 1, a repeated top eigenvalue above a smaller one, the zero matrix — rotated, and as exact diagonal
    float32 matrices (where the shifted iterate and the Lanczos residual become exactly zero): the estimates equal
    eigvalsh's largest eigenvalue."""
    W = (_sym_batch([evals] * 3) if rotate else torch.diag_embed(torch.tensor([evals] * 3, dtype=torch.float64)))
    W = W.to(dtype)
    x = torch.randn(3, len(evals), dtype=dtype, generator=torch.Generator().manual_seed(1))
    lam = lambda_max(_batched_linear(W), x, torch.zeros(3), estimator=est, iters=iters,
                     generator=torch.Generator().manual_seed(2))
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    assert torch.allclose(lam, torch.linalg.eigvalsh(W)[:, -1], atol=tol), (lam, evals)


@pytest.mark.parametrize("seed", range(4))
def test_estimators_on_clustered_spectra_match_eigvalsh(seed):
    """Random symmetric matrices whose eigenvalues sit in tight clusters (gaps 1e-3 inside, O(1) between): Lanczos
    with K = d is exact; shifted power iteration with enough steps reaches λ_max within the cluster width."""
    g = torch.Generator().manual_seed(seed)
    d, B = 8, 6
    centres = torch.tensor([-2.0, -0.5, 0.8])[torch.randint(0, 3, (B, d), generator=g)]
    evals = centres + 1e-3 * torch.rand(B, d, generator=g, dtype=torch.float64)
    W = _sym_batch(evals, seed)
    x = torch.zeros(B, d, dtype=torch.float64)
    true = torch.linalg.eigvalsh(W)[:, -1]
    lz = lambda_max(_batched_linear(W), x, torch.zeros(B), estimator="lanczos", iters=d,
                    generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(lz, true, atol=1e-9)
    pw = lambda_max(_batched_linear(W), x, torch.zeros(B), estimator="power", iters=200,
                    generator=torch.Generator().manual_seed(seed))
    assert (pw <= true + 1e-9).all() and torch.allclose(pw, true, atol=2e-3)


def test_central_difference_quadratic_form_converges_at_second_order():
    """q_h = vᵀ(f(x+hv) − f(x−hv))/(2h) → vᵀJv (eigvalsh's Rayleigh quotient) with error O(h²): halving h quarters the
    error of the value and of the parameter gradient (float64, against the exact Jacobian and autograd)."""
    from cdp.contraction import central_difference_quadratic_form, quadratic_form

    torch.manual_seed(0)
    net = tiny_net(d=4, hidden=16)
    f = net_fn(net)
    x, t, c = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    J = jacobian(f, x, t, c)
    q_exact = (v * (J @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)
    params = list(net.parameters())[:3]
    g_exact = torch.autograd.grad(quadratic_form(f, x, t, c, v).sum(), params)
    errs, gerrs = [], []
    for h in (4e-2, 2e-2, 1e-2):
        q = central_difference_quadratic_form(f, x, t, c, v, h)
        g = torch.autograd.grad(q.sum(), params)
        errs.append(float((q - q_exact).abs().max()))
        gerrs.append(max(float((a - b).abs().max()) for a, b in zip(g, g_exact)))
    assert errs[-1] < 1e-4 and gerrs[-1] < 1e-3
    for e in (errs, gerrs):
        assert 3.0 < e[0] / e[1] < 5.0 and 3.0 < e[1] / e[2] < 5.0, e  # second order
    with pytest.raises(ValueError, match="step"):
        central_difference_quadratic_form(f, x, t, c, v, 0.0)


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_central_difference_gradient_keeps_the_exact_value(prediction):
    """fd_step = h: the loss value and the λ̂ metrics are exactly those of the autograd route (fd_step=None), and the
    parameter gradients agree to O(h²) (h = 1e-4 → ~1e-8 relative in float64)."""
    torch.manual_seed(0)
    net = tiny_net(d=4, hidden=16)
    f = net_fn(net)
    x, t, c = torch.randn(7, 4, dtype=torch.float64), torch.rand(7, dtype=torch.float64) * 0.9 + 0.05, torch.randn(7, 2, dtype=torch.float64)
    out = []
    for fd in (None, 1e-4):
        reg = ContractionRegularizer(ContractionConfig(estimator="exact", margin=5.0, weight=0.3, fd_step=fd,
                                                       prediction=prediction), NoiseSchedule())
        loss, m = reg(f, x, t, c)
        out.append((loss, m, torch.autograd.grad(loss, list(net.parameters())[:3])))
    (l1, m1, g1), (l2, m2, g2) = out
    assert float(l1) == pytest.approx(float(l2), rel=1e-12) and m1 == pytest.approx(m2, rel=1e-12)
    lam = m1["lambda_max_mean"]
    s, r = sign_and_ratio(NoiseSchedule(), t, prediction)
    exact = (r + torch.linalg.eigvalsh(s * 0.5 * (lambda J: J + J.transpose(1, 2))(jacobian(f, x, t, c)))[:, -1]).mean()
    assert lam == pytest.approx(float(exact), rel=1e-10)
    for a, b in zip(g1, g2):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-14
    assert any(float(a.abs().max()) > 1e-6 for a in g1)
    with pytest.raises(ValueError, match="fd_step"):
        ContractionConfig(fd_step=0.0)
    with pytest.raises(ValueError, match="fd_step"):
        ContractionConfig(fd_step=float("nan"))


def _trajectory_reference(reg, f, a_init, cond, s):
    """Λ and the loss rebuilt independently: own DDIM loop over the grid, λ̂ from eigvalsh of the vmap(jacfwd)
    Jacobian (differentiated through eigvalsh, not through the Hellmann–Feynman route)."""
    sch = reg.schedule
    T = sch.num_steps
    ks, dts = reg.trajectory_grid()
    n = min(reg.config.trajectory_steps, T)
    grid = torch.round(torch.arange(n, 0, -1, dtype=torch.float64) * T / n).long().tolist()
    a, lams = a_init, []
    for i, k in enumerate(grid):
        t = torch.full((a.shape[0],), k / T, dtype=a.dtype)
        if k in ks:
            J = jacobian(f, a.detach(), t, cond)
            sg, r = sign_and_ratio(sch, t, "epsilon")
            ev = torch.linalg.eigvalsh(sg * 0.5 * (J + J.transpose(1, 2)))[:, -1]
            _, cn = sch.ode_coefficients(t, "epsilon")
            lams.append(cn.abs() * (r + ev) * dts[ks.index(k)])
        if k == ks[-1]:
            break
        with torch.no_grad():  # DDIM step (ε-prediction, no clipping)
            al, si = sch.discrete_alpha_sigma(torch.tensor(k), torch.float64)
            kp = grid[i + 1] if i + 1 < len(grid) else 0
            alp, sip = sch.discrete_alpha_sigma(torch.tensor(kp), torch.float64)
            eps = f(a, t, cond)
            a = alp * (a - si * eps) / al + sip * eps
    big = torch.stack(lams).sum(0)
    return big, torch.clamp(big, min=-reg.config.margin).mean()


@pytest.mark.parametrize("t_range", [(0.0, 1.0), (0.0, 0.5)])
def test_trajectory_loss_equals_an_independent_eigvalsh_computation(t_range):
    """The trajectory loss (Λ = Σ |c_n| λ̂ Δτ along DDIM trajectories, hinge at −β): value, Λ and parameter gradient
    equal an independent float64 computation that differentiates eigvalsh of full Jacobians at the same points
    (Hellmann–Feynman), with the autograd and the central-difference Rayleigh routes."""
    net = tiny_net(d=3, hidden=16)
    f = net_fn(net)
    g = torch.Generator().manual_seed(0)
    a0, cond = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randn(6, 2, dtype=torch.float64, generator=g)
    a_init = torch.randn(6, 3, dtype=torch.float64, generator=g)
    sch = NoiseSchedule(ScheduleConfig(name="vp", num_steps=20))
    params = list(net.parameters())[:3]
    for fd in (None, 1e-4):
        reg = ContractionRegularizer(ContractionConfig(loss="trajectory", margin=50.0, weight=0.4, t_range=t_range,
                                                       trajectory_steps=5, max_samples=None, fd_step=fd), sch)
        loss, m = reg.trajectory_loss(f, a0, cond, a_init=a_init)
        big, ref = _trajectory_reference(reg, f, a_init, cond, None)
        assert float(loss) == pytest.approx(0.4 * float(ref), rel=1e-10)
        assert m["log_bound_mean"] == pytest.approx(float(big.mean()), rel=1e-10)
        g1 = torch.autograd.grad(loss, params)
        g2 = torch.autograd.grad(0.4 * ref, params)
        for x, y in zip(g1, g2):
            assert float((x - y).norm()) <= 1e-6 * float(y.norm()) + 1e-12
        assert any(float(x.abs().max()) > 1e-6 for x in g1)
    assert len(reg.trajectory_grid()[0]) == (5 if t_range == (0.0, 1.0) else 2)  # k = 20..4, or k = 8, 4


def test_trajectory_log_bound_of_the_gaussian_flow_is_closed_form():
    """For N(0, s² I) data the exact ε-network gives λ̂(t) = σ − σ/(α² s² + σ²) at every point, so
    Λ = Σ_i |c_n(t_i)| λ̂(t_i) Δτ_i is known in closed form: 0 for s = 1, and the hinge with β = 0 is inactive for
    contracting data (s = 0.5: Λ < 0, loss 0, no trajectory active)."""
    sch = NoiseSchedule(ScheduleConfig(name="vp", num_steps=50))
    for s_data in (1.0, 0.5, 2.0):
        f = exact_eps(sch, 0.0, s_data)
        reg = ContractionRegularizer(ContractionConfig(loss="trajectory", margin=0.0, trajectory_steps=10,
                                                       max_samples=None), sch)
        a0 = torch.zeros(4, 2, dtype=torch.float64)
        loss, m = reg.trajectory_loss(f, a0, None, generator=torch.Generator().manual_seed(0))
        ks, dts = reg.trajectory_grid()
        t = torch.tensor(ks, dtype=torch.float64) / 50
        al, si = sch.alpha(t), sch.sigma(t)
        lam = si - si / (al**2 * s_data**2 + si**2)
        _, cn = sch.ode_coefficients(t, "epsilon")
        want = float((cn.abs() * lam * torch.tensor(dts, dtype=torch.float64)).sum())
        assert m["log_bound_mean"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        if s_data == 0.5:
            assert want < 0 and float(loss) == 0.0 and m["hinge_active_frac"] == 0.0
        if s_data == 2.0:
            assert want > 0 and float(loss) == pytest.approx(0.1 * want, rel=1e-9)


def test_trajectory_loss_settings_are_checked():
    sch = NoiseSchedule(ScheduleConfig(name="vp", num_steps=20))
    with pytest.raises(ValueError, match="trajectory_steps"):
        ContractionConfig(loss="trajectory", trajectory_steps=0)
    with pytest.raises(ValueError, match="does not apply"):
        ContractionConfig(loss="trajectory", estimator="power")
    reg = ContractionRegularizer(ContractionConfig(loss="trajectory", t_range=(0.0, 0.05), trajectory_steps=4), sch)
    with pytest.raises(ValueError, match="trajectory_steps"):  # grid k = 20, 15, 10, 5: none at t <= 0.05
        reg.trajectory_loss(lambda x, t, c: x, torch.zeros(2, 2), None)
    with pytest.raises(ValueError, match="own"):
        reg(lambda x, t, c: x, torch.zeros(2, 2), torch.full((2,), 0.5))
