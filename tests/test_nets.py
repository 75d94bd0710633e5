"""Tests for cdp.nets: shapes, t/cond dependence, torch.func compatibility.

All AD checks run in float64 on tiny networks so that finite differences are
accurate and the whole file stays well under a minute on one core.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacfwd, jvp, vjp, vmap

from cdp.nets import (
    ConditionalUnet1D,
    DiTConfig,
    DiTDenoiser,
    MLPDenoiser,
    MLPDenoiserConfig,
    SinusoidalTimeEmbedding,
    UNet1DConfig,
)

torch.set_num_threads(1)

B, H, DA, DC = 3, 4, 2, 3


def _perturb_(net: torch.nn.Module, scale: float = 0.1) -> None:
    """Add noise to every parameter (DiT's adaLN-Zero init makes it output exactly 0)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def _make(name: str, dtype=torch.float64, cond: bool = True):
    """Return ``(net, x_shape)`` for a tiny instance of the named denoiser."""
    dc = DC if cond else 0
    if name == "unet":
        net, shape = ConditionalUnet1D(DA, dc, down_dims=(16, 32), time_embed_dim=16), (B, H, DA)
    elif name == "dit_chunk":
        net, shape = DiTDenoiser(DA, dc, max_horizon=8, d_model=16, n_layers=2, n_heads=2, time_embed_dim=16), (B, H, DA)
    elif name == "dit_single":
        net, shape = DiTDenoiser(DA, dc, max_horizon=1, d_model=16, n_layers=2, n_heads=2, time_embed_dim=16), (B, DA)
    elif name == "mlp":
        net, shape = MLPDenoiser(DA, dc, hidden=32), (B, DA)
    elif name == "mlp_chunk":
        net, shape = MLPDenoiser(DA, dc, hidden=32, horizon=H), (B, H, DA)
    else:
        raise KeyError(name)
    net = net.to(dtype)
    if name.startswith("dit"):
        _perturb_(net)
    return net, shape


NAMES = ["unet", "dit_chunk", "dit_single", "mlp", "mlp_chunk"]


def _inputs(shape, dtype=torch.float64, cond: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype)
    c = torch.randn(shape[0], DC, generator=g, dtype=dtype) if cond else None
    return x, t, c


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- embedding


def test_time_embedding_shape_and_values():
    emb = SinusoidalTimeEmbedding(8)
    t = torch.tensor([0.0, 0.5, 1.0])
    e = emb(t)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    # first frequency is 1: sin(1000 * t)
    torch.testing.assert_close(e[1, 0], torch.sin(torch.tensor(500.0)))
    # distinct discrete steps k/T give distinct embeddings
    k = torch.arange(100) / 100.0
    ek = emb(k)
    assert torch.cdist(ek, ek).add(torch.eye(100) * 10).min() > 1e-3
    assert emb(torch.tensor(0.3)).shape == (1, 8)
    assert emb.to(torch.float64)(t.double()).dtype == torch.float64


@pytest.mark.parametrize("dim", [0, 3, -2])
def test_time_embedding_bad_dim(dim):
    with pytest.raises(ValueError):
        SinusoidalTimeEmbedding(dim)


# ----------------------------------------------------------------------------- shapes & dependence


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_float32(name):
    net, shape = _make(name, torch.float32)
    x, t, c = _inputs(shape, torch.float32)
    y = net(x, t, c)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_unconditional_accepts_none(name):
    net, shape = _make(name, cond=False)
    x, t, _ = _inputs(shape, cond=False)
    assert net(x, t, None).shape == x.shape
    with pytest.raises(ValueError):
        net(x, t, torch.zeros(shape[0], DC, dtype=x.dtype))


@pytest.mark.parametrize("name", NAMES)
def test_conditional_requires_cond(name):
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    with pytest.raises(ValueError):
        net(x, t, None)
    with pytest.raises(ValueError):
        net(x, t, c[:, :-1])


@pytest.mark.parametrize("name", NAMES)
def test_t_dependence(name):
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    y1 = net(x, t, c)
    y2 = net(x, (t + 0.3) % 1.0, c)
    assert (y1 - y2).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_cond_dependence(name):
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    assert (net(x, t, c) - net(x, t, c + 1.0)).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence(name):
    """Sample i's output depends only on sample i (no batch mixing, e.g. via norms)."""
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    y = net(x, t, c)
    x2 = x.clone()
    x2[1:] = x2[1:] + 1.0
    torch.testing.assert_close(net(x2, t, c)[0], y[0])


# ----------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("name", NAMES)
def test_jvp_matches_finite_differences(name):
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    v = torch.randn_like(x)
    y, jv = jvp(lambda xx: net(xx, t, c), (x,), (v,))
    torch.testing.assert_close(y, net(x, t, c))
    eps = 1e-6
    fd = (net(x + eps * v, t, c) - net(x - eps * v, t, c)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=1e-5, atol=1e-7)
    assert jv.abs().max() > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_jvp_equals_jacfwd_column_and_vjp(name):
    net, shape = _make(name)
    x, t, c = _inputs(shape)

    def f_single(xi, ti, ci):
        return net(xi[None], ti[None], ci[None])[0]

    jac = vmap(jacfwd(f_single))(x, t, c)  # (B, *out, *in)
    n = x[0].numel()
    jac = jac.reshape(shape[0], n, n)
    # column j of the per-sample Jacobian == JVP with the j-th basis vector
    j = n - 1
    e = torch.zeros(shape[0], n, dtype=x.dtype)
    e[:, j] = 1.0
    _, jv = jvp(lambda xx: net(xx, t, c), (x,), (e.reshape(shape),))
    torch.testing.assert_close(jv.reshape(shape[0], n), jac[:, :, j])
    # VJP with a random cotangent == u^T J
    u = torch.randn_like(x)
    _, pullback = vjp(lambda xx: net(xx, t, c), x)
    (ju,) = pullback(u)
    torch.testing.assert_close(ju.reshape(shape[0], n), torch.einsum("bo,boi->bi", u.reshape(shape[0], n), jac))


@pytest.mark.parametrize("name", NAMES)
def test_param_gradient_of_jvp_objective(name):
    """d/dθ ||J_x f_θ v||^2 via autograd through torch.func.jvp + functional_call, checked by FD."""
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    v = torch.randn_like(x)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def objective(p):
        state = {**p, **buffers}
        _, jv = jvp(lambda xx: functional_call(net, state, (xx, t, c)), (x,), (v,))
        return (jv**2).sum()

    loss = objective(params)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    total = sum(g.abs().sum() for g in grads if g is not None)
    assert total > 0
    # finite-difference check: the largest-gradient entry of every parameter tensor
    gmap = dict(zip(params, grads))
    eps = 1e-6
    checked = 0
    for key, g in gmap.items():
        if g is None or g.abs().max() == 0:
            continue
        idx = torch.unravel_index(g.abs().argmax(), g.shape)
        with torch.no_grad():
            p_plus = {k: p.detach().clone() for k, p in params.items()}
            p_minus = {k: p.detach().clone() for k, p in params.items()}
            p_plus[key][idx] += eps
            p_minus[key][idx] -= eps
            fd = (objective(p_plus) - objective(p_minus)) / (2 * eps)
        torch.testing.assert_close(g[idx], fd, rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")
        checked += 1
    assert checked >= len(params) // 2


@pytest.mark.parametrize("name", ["unet", "dit_chunk", "mlp"])
def test_jvp_wrt_time(name):
    """Forward-mode AD through the time embedding (d out / d t) agrees with FD."""
    net, shape = _make(name)
    x, t, c = _inputs(shape)
    _, dt = jvp(lambda tt: net(x, tt, c), (t,), (torch.ones_like(t),))
    eps = 1e-7
    fd = (net(x, t + eps, c) - net(x, t - eps, c)) / (2 * eps)
    torch.testing.assert_close(dt, fd, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- net-specific


@pytest.mark.parametrize("bad_h", [1, 3, 5, 6])
def test_unet_bad_horizon_raises(bad_h):
    net = ConditionalUnet1D(DA, DC, down_dims=(16, 32, 64), time_embed_dim=16)  # needs H % 4 == 0
    x = torch.randn(2, bad_h, DA)
    with pytest.raises(ValueError, match="horizon"):
        net(x, torch.rand(2), torch.randn(2, DC))
    assert net(torch.randn(2, 8, DA), torch.rand(2), torch.randn(2, DC)).shape == (2, 8, DA)


def test_unet_rejects_2d_input():
    net = ConditionalUnet1D(DA, DC, down_dims=(16, 32), time_embed_dim=16)
    with pytest.raises(ValueError):
        net(torch.randn(2, DA), torch.rand(2), torch.randn(2, DC))


def test_unet_default_dims_and_structure():
    cfg = UNet1DConfig(action_dim=DA, cond_dim=DC)
    assert cfg.down_dims == (256, 512, 1024) and cfg.kernel_size == 5 and cfg.n_groups == 8
    assert cfg.horizon_multiple == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(action_dim=0),
        dict(action_dim=2, down_dims=(12, 32)),  # not a multiple of n_groups
        dict(action_dim=2, down_dims=()),
        dict(action_dim=2, kernel_size=4),
        dict(action_dim=2, time_embed_dim=7),
        dict(action_dim=2, cond_dim=-1),
    ],
)
def test_unet_config_validation(kwargs):
    with pytest.raises(ValueError):
        UNet1DConfig(**kwargs)


def test_dit_layernorm_matches_torch():
    from cdp.nets.dit import _LayerNorm

    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(x, (16,), eps=1e-6)
    torch.testing.assert_close(_LayerNorm(1e-6)(x), ref)


def test_dit_zero_init_outputs_zero_but_trains():
    net = DiTDenoiser(DA, DC, max_horizon=8, d_model=16, n_layers=2, n_heads=2, time_embed_dim=16)
    x, t, c = _inputs((B, H, DA), torch.float32)
    y = net(x, t, c)
    assert torch.count_nonzero(y) == 0
    (y - torch.ones_like(y)).pow(2).sum().backward()
    assert net.out_proj.weight.grad.abs().sum() > 0


def test_dit_shorter_horizon_and_bounds():
    net, _ = _make("dit_chunk")
    x, t, c = _inputs((B, 2, DA))
    assert net(x, t, c).shape == (B, 2, DA)
    with pytest.raises(ValueError, match="horizon"):
        net(*_inputs((B, 9, DA)))


@pytest.mark.parametrize(
    "kwargs",
    [dict(action_dim=2, d_model=10, n_heads=4), dict(action_dim=2, n_layers=0), dict(action_dim=2, max_horizon=0)],
)
def test_dit_config_validation(kwargs):
    with pytest.raises(ValueError):
        DiTConfig(**kwargs)


def test_mlp_shape_checks_and_config():
    net = MLPDenoiser(DA, DC, hidden=32)
    with pytest.raises(ValueError):
        net(torch.randn(B, H, DA), torch.rand(B), torch.randn(B, DC))  # horizon=1 net, chunk input
    chunk = MLPDenoiser(DA, DC, hidden=32, horizon=H)
    with pytest.raises(ValueError):
        chunk(torch.randn(B, DA), torch.rand(B), torch.randn(B, DC))
    with pytest.raises(ValueError):
        MLPDenoiserConfig(action_dim=2, time_dim=15)
    with pytest.raises(ValueError):
        MLPDenoiserConfig(action_dim=2, n_layers=0)
    # Diffusion-QL layout: 3 hidden Linear layers of 256 with Mish
    d = MLPDenoiser(6, 17)
    lins = [m for m in d.trunk if isinstance(m, torch.nn.Linear)]
    assert [l.out_features for l in lins] == [256, 256, 256] and lins[0].in_features == 6 + 16 + 17


def test_config_kwarg_constructor():
    net = ConditionalUnet1D(config=UNet1DConfig(action_dim=DA, down_dims=(16, 32), time_embed_dim=16))
    assert net(torch.randn(2, 4, DA), torch.rand(2)).shape == (2, 4, DA)
    with pytest.raises(ValueError):
        ConditionalUnet1D()


# ----------------------------------------------------------------------------------------------- fast Mish
def test_fast_mish_matches_torch_mish_and_its_derivative():
    import torch.nn.functional as F

    from cdp.nets.activations import Mish, mish, mish_and_grad

    x = torch.cat([torch.linspace(-60, 60, 4001, dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 5])
    from cdp.nets.activations import SMALL
    assert x.numel() >= SMALL  # the 5-op form is what is compared below
    assert torch.allclose(mish(x), F.mish(x), rtol=1e-12, atol=1e-13)
    y, dy = mish_and_grad(x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.mish(xr).sum(), xr)
    assert torch.allclose(y, F.mish(x), rtol=1e-12, atol=1e-13)
    assert torch.allclose(dy, g, rtol=1e-10, atol=1e-12)
    xf = x.float()
    assert (Mish()(xf) - F.mish(xf)).abs().max() < 2e-5
    assert torch.isfinite(mish(torch.tensor([1e4, -1e4]))).all()
    # first and second derivatives through autograd agree with finite differences
    z = (torch.randn(SMALL, dtype=torch.float64) * 3)[:64].requires_grad_()  # small: F.mish path
    zz = (torch.randn(SMALL, dtype=torch.float64) * 3).requires_grad_()  # large: 5-op path
    assert torch.autograd.gradcheck(mish, (z,)) and torch.autograd.gradgradcheck(mish, (z,))
    assert torch.autograd.gradcheck(lambda u: mish(u)[:50], (zz,), nondet_tol=0)
    assert torch.autograd.gradcheck(lambda u: mish_and_grad(u)[1], (z,))
    # mish' is one autograd node with a closed-form mish'': its gradient and second gradient match finite differences
    from cdp.nets.activations import mish_grad
    assert torch.autograd.gradcheck(mish_grad, (zz[:200],)) and torch.autograd.gradgradcheck(mish_grad, (z,))
    (g2,) = torch.autograd.grad(mish_grad(zz).sum(), zz)
    (gref,) = torch.autograd.grad(torch.autograd.grad(F.mish(zz).sum(), zz, create_graph=True)[0].sum(), zz)
    assert torch.allclose(g2, gref, rtol=1e-9, atol=1e-12)


def test_fused_mish_node_first_and_second_derivatives_and_transform_paths():
    """Under plain autograd a large Mish is one node (_MishFused) keeping mish' from the forward; its first and
    second derivatives equal F.mish's (float64), and inside torch.func transforms / without grad the composite ops
    give the same values."""
    import torch.nn.functional as F

    from cdp.nets.activations import SMALL, mish

    x = (torch.randn(SMALL, dtype=torch.float64) * 4).requires_grad_()
    y = mish(x)
    assert type(y.grad_fn).__name__ == "_MishFusedBackward"
    assert torch.allclose(y, F.mish(x), rtol=1e-12, atol=1e-13)
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((w * y).sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((w * F.mish(x)).sum(), x, create_graph=True)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)
    (h,) = torch.autograd.grad(g.sum(), x)  # double backward: w · mish''
    (h_ref,) = torch.autograd.grad(g_ref.sum(), x)
    assert torch.allclose(h, h_ref, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        assert mish(x).grad_fn is None and torch.allclose(mish(x), F.mish(x), rtol=1e-12, atol=1e-13)
    tangent = torch.randn_like(x)
    out, jv = torch.func.jvp(mish, (x.detach(),), (tangent,))
    assert torch.allclose(jv, g_ref.detach() / w * tangent, rtol=1e-8, atol=1e-10)


def test_mish_parts_and_second_derivative_match_autograd_of_torch_mish():
    """mish_parts (one exponential) = (F.mish, its autograd derivative), mish_second = the autograd second
    derivative, tanh_softplus_and_sigmoid = (tanh∘softplus, σ), in float64 over a wide range; ``out`` is written."""
    import torch.nn.functional as F

    from cdp.nets.activations import mish_parts, mish_second, tanh_softplus_and_sigmoid

    x = torch.cat([torch.linspace(-40, 40, 801, dtype=torch.float64), torch.randn(500, dtype=torch.float64) * 3])
    xr = x.clone().requires_grad_()
    (d1,) = torch.autograd.grad(F.mish(xr).sum(), xr, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), xr)
    out = torch.empty_like(x)
    y, g = mish_parts(x, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.allclose(y, F.mish(x), rtol=1e-12, atol=1e-13)
    assert torch.allclose(g, d1.detach(), rtol=1e-10, atol=1e-12)
    t, s = tanh_softplus_and_sigmoid(x)
    assert torch.allclose(t, torch.tanh(F.softplus(x)), rtol=1e-12, atol=1e-13)
    low = x <= 20  # above the exponent clamp s = 1 − 2e-9 instead of 1 (there it only meets 1 − t² ≈ 0)
    assert torch.allclose(s[low], torch.sigmoid(x[low]), rtol=1e-12, atol=1e-13)
    assert torch.allclose(s, torch.sigmoid(x), rtol=0, atol=3e-9)
    assert torch.allclose(mish_second(x, t, s), d2, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("horizon,cond_dim", [(1, 5), (4, 0)])
def test_mlp_fused_trunk_equals_autograd(horizon, cond_dim):
    """MLPDenoiser.train_forward (one node, written-out backward) = forward: values and the gradients of every
    parameter and of cond, float64; a double backward through it raises."""
    from cdp.nets.mlp import MLPDenoiser

    torch.manual_seed(0)
    net = MLPDenoiser(action_dim=2, cond_dim=cond_dim, hidden=40, n_layers=3, horizon=horizon).double()
    shape = (30, 2) if horizon == 1 else (30, horizon, 2)
    x, t = torch.randn(shape, dtype=torch.float64), torch.rand(30, dtype=torch.float64)
    c = torch.randn(30, cond_dim, dtype=torch.float64).requires_grad_() if cond_dim else None
    w = torch.randn(shape, dtype=torch.float64)
    inputs = list(net.parameters()) + ([c] if c is not None else [])
    out = net.train_forward(x, t, c)
    ref = net(x, t, c)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-12, atol=1e-13)
    g = torch.autograd.grad((w * out).sum(), inputs)
    g_ref = torch.autograd.grad((w * ref).sum(), inputs)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g, g_ref))
    (gx,) = torch.autograd.grad((w * net.train_forward(x, t, c)).sum(), net.out.weight, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), net.out.weight)
