"""Policies.  Currently the behaviour-cloning baselines (Gaussian MLP, BC-GMM)."""

from cdp.policies.baselines import GaussianMLPPolicy, GaussianPolicyConfig, GMMPolicy, GMMPolicyConfig

__all__ = ["GaussianMLPPolicy", "GaussianPolicyConfig", "GMMPolicy", "GMMPolicyConfig"]
