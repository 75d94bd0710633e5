"""Loss-scale diagnostics against closed-form Gaussian denoisers (tests/gaussian.py)."""
import math

import pytest
import torch

from cdp.diagnostics import T_BINS, loss_scale_diagnostics
from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
from cdp.schedules import NoiseSchedule
from gaussian import exact_eps


class ExactEps(torch.nn.Module):
    """The exact ε-network of N(0, s² I) data in the policy's normalised action space (ignores the condition)."""

    def __init__(self, schedule: NoiseSchedule, s: float):
        super().__init__()
        self.f = exact_eps(schedule, 0.0, s)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x, t, cond=None):
        return self.f(x, t)


def policy_with_exact_eps(s: float, contraction):
    torch.manual_seed(0)
    pol = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=3, action_dim=2, contraction=contraction,
                                                schedule={"name": "vp", "num_steps": 50}))
    pol.net = ExactEps(pol.schedule, s)
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(200, 3, generator=g), torch.rand(200, 2, generator=g) * 2 - 1
    pol.fit_normalizers(obs, act)
    return pol, obs, act


def test_lambda_hat_profile_is_the_closed_form():
    """For N(0, s² I) data the exact ε-network has J = σ/(α² s² + σ²) I, so λ̂ = σ − σ/(α² s² + σ²): 0 at every noise
    level for s = 1 (VP: α² + σ² = 1), > 0 for s = 2 (the flow expands), < 0 for s = 0.5; a sign error in λ̂ would
    give 2σ at s = 1."""
    for s, check in ((1.0, lambda v: abs(v) < 1e-5), (2.0, lambda v: v > 0), (0.5, lambda v: v < 0)):
        pol, obs, act = policy_with_exact_eps(s, None)
        out = loss_scale_diagnostics(pol, obs, act, n_points=128, seed=1)
        bins = [k for k in out if k.startswith("lambda_hat_t")]
        assert len(bins) == len(T_BINS) - 1
        assert sum(math.isfinite(out[k]) for k in bins) >= len(bins) - 1  # T = 50: every bin but maybe the first
        assert all(check(out[k]) for k in bins if math.isfinite(out[k])), (s, out)
        assert out["loss_c_weighted"] == 0.0 and out["loss_ratio"] == 0.0 and math.isnan(out["hinge_active_frac"])


def test_loss_scale_of_the_hinge():
    """The hinge's weighted loss, its ratio to L_d and the fraction of points where it is active: with a margin so
    large that every point is active, γ·L_c = γ·mean λ̂; for contracting data (s = 0.5, λ̂ < 0) with β = 0 no point is
    active and γ·L_c = 0."""
    pol, obs, act = policy_with_exact_eps(2.0, {"weight": 0.3, "margin": 100.0})
    out = loss_scale_diagnostics(pol, obs, act, n_points=64, seed=2)
    assert out["hinge_active_frac"] == 1.0
    assert out["loss_c_weighted"] > 0 and out["loss_ratio"] == pytest.approx(out["loss_c_weighted"] / out["loss_d"])
    pol, obs, act = policy_with_exact_eps(0.5, {"weight": 0.3, "margin": 0.0})
    out = loss_scale_diagnostics(pol, obs, act, n_points=64, seed=2)
    assert out["hinge_active_frac"] == 0.0 and out["loss_c_weighted"] == 0.0
    with pytest.raises(ValueError, match="bins"):
        loss_scale_diagnostics(pol, obs, act, bins=(0.0, 0.5, 0.4))
    with pytest.raises(ValueError, match="n_points"):
        loss_scale_diagnostics(pol, obs, act, n_points=0)
