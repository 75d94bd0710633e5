"""Closed-form denoisers for Gaussian data a_0 ~ N(mu, s^2 I), used as exact references in the tests."""
import torch


def exact_eps(schedule, mu: float, s: float):
    """ε(a, t) = σ (a − α μ) / (α² s² + σ²), the exact ε-prediction for N(mu, s² I) data."""
    def f(a, t, cond=None):
        al = schedule.alpha(t.double()).to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
        si = schedule.sigma(t.double()).to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
        return si * (a - al * mu) / (al**2 * s**2 + si**2)
    return f


def exact_x0(schedule, mu: float, s: float):
    """E[a_0 | a_t] = μ + α s² (a − α μ) / (α² s² + σ²)."""
    def f(a, t, cond=None):
        al = schedule.alpha(t.double()).to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
        si = schedule.sigma(t.double()).to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
        return mu + al * s**2 * (a - al * mu) / (al**2 * s**2 + si**2)
    return f


def exact_score(schedule, mu: float, s: float):
    """∇ log p_t(a) = −(a − α μ) / (α² s² + σ²)."""
    def f(a, t, cond=None):
        al = schedule.alpha(t.double()).to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
        si = schedule.sigma(t.double()).to(a.dtype).view((-1,) + (1,) * (a.dim() - 1))
        return -(a - al * mu) / (al**2 * s**2 + si**2)
    return f


def marginal_std(schedule, s: float, t):
    return torch.sqrt(schedule.alpha(t) ** 2 * s**2 + schedule.sigma(t) ** 2)
