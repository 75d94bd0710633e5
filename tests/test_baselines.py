"""Tests for the BC baselines (Gaussian MLP, BC-GMM)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from cdp.policies import GaussianMLPPolicy, GaussianPolicyConfig, GMMPolicy, GMMPolicyConfig

torch.set_num_threads(1)

DO, DA = 4, 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(n=64):
    obs = torch.randn(n, DO)
    act = torch.tanh(obs[:, :DA] + 0.3 * obs[:, DA:])  # a deterministic function of obs, inside (-1, 1)
    return obs, act


def _policies():
    small = dict(obs_dim=DO, action_dim=DA, hidden_dims=(32, 32))
    return {
        "gauss_tanh": GaussianMLPPolicy(GaussianPolicyConfig(**small, squash="tanh")),
        "gauss_plain": GaussianMLPPolicy(GaussianPolicyConfig(**small, squash="none")),
        "gauss_fixed_std": GaussianMLPPolicy(GaussianPolicyConfig(**small, squash="none", state_dependent_std=False)),
        "gmm": GMMPolicy(GMMPolicyConfig(**small)),
    }


@pytest.mark.parametrize("name", ["gauss_tanh", "gauss_plain", "gauss_fixed_std", "gmm"])
def test_loss_decreases(name):
    pol = _policies()[name]
    obs, act = _batch()
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    first = pol.loss(obs, act).item()
    for _ in range(50):
        loss = pol.loss(obs, act)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = pol.loss(obs, act).item()
    assert math.isfinite(first) and last < first - 0.1, (first, last)


@pytest.mark.parametrize("name", ["gauss_tanh", "gauss_plain", "gauss_fixed_std", "gmm"])
def test_act_shapes(name):
    pol = _policies()[name]
    obs = torch.randn(7, DO)
    a_det = pol.act(obs, deterministic=True)
    a_sto = pol.act(obs, deterministic=False)
    assert a_det.shape == (7, DA) and a_sto.shape == (7, DA)
    torch.testing.assert_close(pol.act(obs, deterministic=True), a_det)
    if name == "gauss_tanh":
        assert a_det.abs().max() < 1 and a_sto.abs().max() < 1


def test_tanh_log_prob_matches_transformed_distribution():
    pol = _policies()["gauss_tanh"]
    obs, act = _batch(16)
    base = pol.distribution(obs).base_dist
    ref = D.TransformedDistribution(base, [D.TanhTransform()]).log_prob(act).sum(-1)
    torch.testing.assert_close(pol.log_prob(obs, act), ref, rtol=1e-4, atol=1e-4)


def test_gmm_fits_two_modes_better_than_gaussian():
    n = 256
    obs = torch.zeros(n, 1)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    act = (0.6 * sign + 0.05 * torch.randn(n)).unsqueeze(-1)
    gmm = GMMPolicy(GMMPolicyConfig(obs_dim=1, action_dim=1, hidden_dims=(16,)))
    gau = GaussianMLPPolicy(GaussianPolicyConfig(obs_dim=1, action_dim=1, hidden_dims=(16,), squash="none"))
    for pol in (gmm, gau):
        opt = torch.optim.Adam(pol.parameters(), lr=1e-2)
        for _ in range(300):
            loss = pol.loss(obs, act)
            opt.zero_grad()
            loss.backward()
            opt.step()
    ll_gmm = gmm.log_prob(obs, act).mean().item()
    ll_gau = gau.log_prob(obs, act).mean().item()
    # optimal single Gaussian: about -0.5*log(2*pi*e*0.3625) = -0.91; two-mode GMM about +0.88
    assert ll_gau < -0.7
    assert ll_gmm > ll_gau + 1.0, (ll_gmm, ll_gau)
    # the deterministic action is one of the two modes
    a = gmm.act(obs[:1]).item()
    assert abs(abs(a) - 0.6) < 0.1


def test_gmm_std_floor():
    pol = GMMPolicy(GMMPolicyConfig(obs_dim=DO, action_dim=DA, hidden_dims=(8,), num_modes=3))
    with torch.no_grad():
        for p in pol.parameters():
            p.fill_(-50.0)  # drives softplus(raw_std) to ~0
    _, stds, logits = pol._params(torch.ones(2, DO))
    assert stds.min() >= 1e-4 and logits.shape == (2, 3)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (GaussianPolicyConfig, dict(obs_dim=0, action_dim=2)),
        (GaussianPolicyConfig, dict(obs_dim=2, action_dim=2, squash="sigmoid")),
        (GaussianPolicyConfig, dict(obs_dim=2, action_dim=2, log_std_min=1.0, log_std_max=0.0)),
        (GaussianPolicyConfig, dict(obs_dim=2, action_dim=2, activation="swish3")),
        (GMMPolicyConfig, dict(obs_dim=2, action_dim=2, num_modes=0)),
        (GMMPolicyConfig, dict(obs_dim=2, action_dim=2, min_std=0.0)),
        (GMMPolicyConfig, dict(obs_dim=2, action_dim=0)),
        (GMMPolicyConfig, dict(obs_dim=2, action_dim=2, hidden_dims=(8, 0))),
    ],
)
def test_config_validation(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_bad_shapes_raise():
    pol = _policies()["gmm"]
    with pytest.raises(ValueError):
        pol.loss(torch.randn(4, DO + 1), torch.randn(4, DA))
    with pytest.raises(ValueError):
        pol.loss(torch.randn(4, DO), torch.randn(3, DA))


def test_gmm_defaults_follow_robomimic():
    cfg = GMMPolicyConfig(obs_dim=DO, action_dim=DA)
    assert cfg.num_modes == 5 and cfg.min_std == 1e-4
