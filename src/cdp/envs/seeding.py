"""Per-episode sampling noise for closed-loop evaluation.

The evaluators (:func:`cdp.envs.pusht.evaluate`, :func:`cdp.envs.robosuite_tasks.evaluate`,
:func:`cdp.envs.maze.evaluate`, :func:`cdp.envs.mujoco.evaluate`) run episodes side by side and query the policy
once per decision for the batch of running episodes. A callback that takes a ``seeds`` keyword is told the env seed
of every row (``policy_fn(obs, seeds=[...])``); drawing each row's noise from its own generator
(:class:`EpisodeGenerators`, seeded from the pair (sampling seed, env seed)) makes an episode's result a function of
those two seeds only, not of how many episodes run beside it. Callbacks without the keyword get ``policy_fn(obs)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..devices import make_generator

__all__ = ["episode_seed", "EpisodeGenerators", "takes_seeds", "call_policy"]


def episode_seed(seed: int, env_seed: int) -> int:
    """A 63-bit generator seed determined by (sampling ``seed``, ``env_seed``) only (numpy ``SeedSequence``)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(env_seed) % 2**63]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpisodeGenerators:
    """One ``torch.Generator`` per env seed on ``device``, made on first use with :func:`episode_seed` and kept
    for the rest of the episode (each decision of the episode continues its stream)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed, self.device = int(seed), torch.device(device)
        self._gens: dict[int, torch.Generator] = {}

    def __call__(self, env_seed: int) -> torch.Generator:
        env_seed = int(env_seed)
        if env_seed not in self._gens:
            self._gens[env_seed] = make_generator(episode_seed(self.seed, env_seed), self.device)
        return self._gens[env_seed]


def takes_seeds(policy_fn: Callable) -> bool:
    """True when ``policy_fn`` accepts a ``seeds`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(policy_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seeds" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_policy(policy_fn: Callable, obs: np.ndarray, seeds: Sequence[int]) -> Any:
    """``policy_fn(obs, seeds=list(seeds))`` when it takes ``seeds``, else ``policy_fn(obs)``."""
    if takes_seeds(policy_fn):
        return policy_fn(obs, seeds=[int(s) for s in seeds])
    return policy_fn(obs)
