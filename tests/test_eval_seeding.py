"""Closed-loop evaluation is reproducible per episode: an episode's result depends on (sampling seed, env seed)
only, not on how many episodes run beside it (cdp.envs.seeding)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cdp.envs.seeding import EpisodeGenerators, call_policy, episode_seed, takes_seeds


def test_episode_generators_depend_on_the_pair_only():
    assert episode_seed(0, 100001) == episode_seed(0, 100001)
    assert len({episode_seed(0, 100001), episode_seed(1, 100001), episode_seed(0, 100002)}) == 3
    a, b = EpisodeGenerators(3), EpisodeGenerators(3)
    b(7)  # another episode first: no effect on episode 8's stream
    assert torch.equal(torch.randn(4, generator=a(8)), torch.randn(4, generator=b(8)))
    assert takes_seeds(lambda obs, seeds: obs) and not takes_seeds(lambda obs: obs)
    assert call_policy(lambda obs: "plain", None, [1]) == "plain"
    assert call_policy(lambda obs, seeds=None: seeds, None, [np.int64(1)]) == [1]


def _il_policy(sampler: str):
    from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
    cfg = DiffusionPolicyConfig(obs_dim=20, action_dim=2, horizon=8, n_obs_steps=2, n_action_steps=4, network="mlp",
                                network_kwargs={"hidden": 32, "n_layers": 2}, sampler=sampler,
                                num_inference_steps=4, schedule={"name": "cosine", "num_steps": 20})
    torch.manual_seed(0)
    pol = DiffusionPolicy(cfg)
    g = torch.Generator().manual_seed(0)
    pol.fit_normalizers(torch.rand(64, 2, 20, generator=g) * 512, torch.rand(64, 8, 2, generator=g) * 512)
    return pol.eval()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_pusht_episode_100001_does_not_depend_on_the_number_of_episodes(sampler):
    pytest.importorskip("gym_pusht")
    from cdp.experiments.il import evaluate_policy
    pol = _il_policy(sampler)
    res = {n: evaluate_policy(pol, n, max_steps=24, seed_start=100000, seed=0) for n in (2, 3, 4)}
    for n, r in res.items():
        assert r["seeds"][1] == 100001
    ref = (res[2]["max_coverage"][1], res[2]["n_steps"][1])
    assert all((r["max_coverage"][1], r["n_steps"][1]) == ref for r in res.values())
    assert res[3]["max_coverage"][:3] == res[4]["max_coverage"][:3]


def test_robosuite_episode_does_not_depend_on_the_number_of_episodes():
    pytest.importorskip("robosuite")
    from cdp.envs import robosuite_tasks

    def fn(obs, seeds):  # noise from each episode's generator only
        gens = EpisodeGenerators(0)
        return np.stack([torch.rand(1, 7, generator=gens(s)).numpy() * 2 - 1 for s in seeds])

    a = robosuite_tasks.evaluate(fn, "lift", n_episodes=2, max_steps=3, n_envs=2)
    b = robosuite_tasks.evaluate(fn, "lift", n_episodes=3, max_steps=3, n_envs=3)
    assert a["seeds"][1] == b["seeds"][1] == 100001 and a["episode_lengths"][1] == b["episode_lengths"][1]


@pytest.mark.parametrize("algo", ["edp", "idql"])
def test_rl_episode_does_not_depend_on_the_number_of_episodes(algo):
    pytest.importorskip("gymnasium_robotics")
    from cdp.experiments.rl import evaluate_agent
    from cdp.rl import make_agent
    small = {"edp": {"hidden": 16, "n_layers": 2, "num_diffusion_steps": 5, "num_inference_steps": 2,
                     "num_candidates": 3, "selection": "softmax"},
             "idql": {"hidden": 16, "n_layers": 2, "critic_hidden": 16, "num_diffusion_steps": 3,
                      "num_candidates": 3}}
    agent = make_agent(algo, 6, 2, small[algo], seed=0)
    g = torch.Generator().manual_seed(0)
    agent.fit_normalizers(torch.randn(64, 6, generator=g), torch.rand(64, 2, generator=g) * 2 - 1)
    ds = SimpleNamespace(env_id="PointMaze_UMazeDense-v3", ref_min_score=0.0, ref_max_score=1.0, meta={})
    res = {n: evaluate_agent(agent, ds, n_episodes=n, seed=100000) for n in (2, 3)}
    assert res[2]["returns"][1] == res[3]["returns"][1]
    assert res[2]["returns"].tolist() == res[3]["returns"][:2].tolist()
    assert len(set(res[3]["returns"].tolist())) == 3  # dense returns: distinct episodes
