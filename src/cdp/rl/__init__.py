"""Offline RL on the D4RL protocol: BC, EDP and CDP (= EDP + contraction regulariser).

``make_agent(algo, obs_dim, action_dim, config=None, seed=0)`` builds one; see :mod:`cdp.rl.trainer` for the loop
and ``cdp rl`` (:mod:`cdp.cli_rl`) for the end-to-end job.
"""

from __future__ import annotations

from typing import Any

from .bc import BC, BCConfig
from .edp import EDP, EDPConfig

ALGOS = ("bc", "edp", "cdp")
#: CDP's default contraction settings: the paper's hinge loss, γ = 0.1, at every diffusion step; to keep a CPU step
#: cheap it is evaluated on 64 samples of each batch (an unbiased estimate of the batch mean, more variance).
CDP_CONTRACTION: dict[str, Any] = {"loss": "hinge", "weight": 0.1, "max_samples": 64}


def make_config(algo: str, overrides: dict[str, Any] | None = None):
    """The config dataclass of ``algo`` with ``overrides`` applied (``cdp``: EDP + :data:`CDP_CONTRACTION`)."""
    kw = dict(overrides or {})
    if algo == "bc":
        return BCConfig(**kw)
    if algo == "edp":
        return EDPConfig(**kw)
    if algo == "cdp":
        kw.setdefault("contraction", dict(CDP_CONTRACTION))
        if kw["contraction"] is None:
            raise ValueError("algo 'cdp' needs a contraction config (use 'edp' for none)")
        return EDPConfig(**kw)
    raise ValueError(f"unknown algorithm {algo!r}; expected one of {ALGOS}")


def make_agent(algo: str, obs_dim: int, action_dim: int, config: Any = None, seed: int = 0):
    """Build a BC or EDP/CDP agent; ``config`` may be the dataclass, a dict of overrides, or None."""
    if config is None or isinstance(config, dict):
        config = make_config(algo, config)
    cls = BC if algo == "bc" else EDP
    return cls(obs_dim, action_dim, config, seed=seed)


__all__ = ["ALGOS", "BC", "BCConfig", "EDP", "EDPConfig", "CDP_CONTRACTION", "make_config", "make_agent"]
