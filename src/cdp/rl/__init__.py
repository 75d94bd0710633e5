"""Offline RL on the D4RL protocol: BC, EDP, Diffusion-QL, IDQL, and CDP (= the contraction regulariser) on the
diffusion ones.

=============  ==========================================================  =====================
``algo``       what                                                        config
=============  ==========================================================  =====================
``bc``         Gaussian-MLP behaviour cloning (:mod:`cdp.rl.bc`)            :class:`BCConfig`
``edp``        Efficient Diffusion Policies, TD3-style (:mod:`cdp.rl.edp`)  :class:`EDPConfig`
``cdp``        EDP + contraction (:data:`CDP_CONTRACTION`)                  :class:`EDPConfig`
``dql``        Diffusion-QL (:mod:`cdp.rl.dql`)                             :class:`DQLConfig`
``cdp_dql``    Diffusion-QL + contraction                                   :class:`DQLConfig`
``idql``       IDQL (:mod:`cdp.rl.idql`)                                    :class:`IDQLConfig`
``cdp_idql``   IDQL + contraction on the behaviour policy                   :class:`IDQLConfig`
=============  ==========================================================  =====================

``make_agent(algo, obs_dim, action_dim, config=None, seed=0)`` builds one; see :func:`cdp.training.trainer.fit` for the
loop and ``cdp rl`` (:mod:`cdp.experiments.rl`) for the end-to-end job.
"""

from __future__ import annotations

from typing import Any

from .bc import BC, BCConfig
from .dql import DQL, DQL_HPARAMS, DQLConfig, dql_overrides
from .edp import EDP, EDPConfig
from .idql import IDQL, IDQLConfig

ALGOS = ("bc", "edp", "cdp", "dql", "cdp_dql", "idql", "cdp_idql")
#: CDP's default contraction settings: the paper's hinge loss, γ = 0.1, at every diffusion step; to keep a CPU step
#: cheap it is evaluated on 64 samples of each batch (an unbiased estimate of the batch mean, more variance).
CDP_CONTRACTION: dict[str, Any] = {"loss": "hinge", "weight": 0.1, "max_samples": 64}
#: algo → (agent class, config class, base algo without contraction or None for a plain algo)
_REGISTRY: dict[str, tuple[type, type, str | None]] = {
    "bc": (BC, BCConfig, None), "edp": (EDP, EDPConfig, None), "cdp": (EDP, EDPConfig, "edp"),
    "dql": (DQL, DQLConfig, None), "cdp_dql": (DQL, DQLConfig, "dql"),
    "idql": (IDQL, IDQLConfig, None), "cdp_idql": (IDQL, IDQLConfig, "idql"),
}


def algo_config_class(algo: str) -> type:
    """The config dataclass of ``algo``. Raises ValueError for an unknown algorithm."""
    if algo not in _REGISTRY:
        raise ValueError(f"unknown algorithm {algo!r}; expected one of {ALGOS}")
    return _REGISTRY[algo][1]


def make_config(algo: str, overrides: dict[str, Any] | None = None):
    """The config dataclass of ``algo`` with ``overrides`` applied (the ``cdp*`` algos default ``contraction`` to
    :data:`CDP_CONTRACTION`).

    Raises:
        ValueError: unknown ``algo``, a ``cdp*`` algo with ``contraction=None``, or a bad config value.
    """
    if algo not in _REGISTRY:
        raise ValueError(f"unknown algorithm {algo!r}; expected one of {ALGOS}")
    _, cfg_cls, base = _REGISTRY[algo]
    kw = dict(overrides or {})
    if base is not None:
        kw.setdefault("contraction", dict(CDP_CONTRACTION))
        if kw["contraction"] is None:
            raise ValueError(f"algo {algo!r} needs a contraction config (use {base!r} for none)")
    return cfg_cls(**kw)


def make_agent(algo: str, obs_dim: int, action_dim: int, config: Any = None, seed: int = 0):
    """Build the agent of ``algo``; ``config`` may be its config dataclass, a dict of overrides, or None.

    Raises:
        ValueError: unknown ``algo`` or a config dataclass of another algorithm.
    """
    if algo not in _REGISTRY:
        raise ValueError(f"unknown algorithm {algo!r}; expected one of {ALGOS}")
    cls, cfg_cls, _ = _REGISTRY[algo]
    if config is None or isinstance(config, dict):
        config = make_config(algo, config)
    elif type(config) is not cfg_cls:
        raise ValueError(f"algo {algo!r} takes a {cfg_cls.__name__}, got {type(config).__name__}")
    return cls(obs_dim, action_dim, config, seed=seed)


__all__ = ["ALGOS", "BC", "BCConfig", "EDP", "EDPConfig", "DQL", "DQLConfig", "DQL_HPARAMS", "dql_overrides",
           "IDQL", "IDQLConfig", "CDP_CONTRACTION", "algo_config_class", "make_config", "make_agent"]
