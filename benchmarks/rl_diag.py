"""Diagnostics of an EDP/CDP checkpoint on the PointMaze UMaze dataset (docs/results_rl.md).

    python benchmarks/rl_diag.py runs/rl/probe/edp_s0/checkpoints/last argmax,n1,online

Prints the action MSE of EMA / online actor samples vs dataset actions (3 samplers x 15/50/100 steps), min Q of
dataset vs sampled actions, then evaluates (20 episodes) with the listed modes applied cumulatively:
argmax (argmax-Q candidate pick), n1 (one candidate, no Q pick), online (online actor instead of EMA).
The checkpoint is a ``cdp rl --algo.name edp|cdp`` run's (``cdp.experiments.rl.load_agent``).
"""
import argparse

import torch

from cdp.data.rl import load_d4rl_hdf5
from cdp.experiments.rl import dataset_tensors, evaluate_agent, load_agent

MODES = ("argmax", "n1", "online")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint folder of an EDP / CDP run, e.g. runs/rl/probe/edp_s0/checkpoints/last")
    ap.add_argument("modes", nargs="?", default="", help=f"comma list of evaluation modes, applied cumulatively: {','.join(MODES)}")
    ap.add_argument("--dataset", default="runs/rl/dataset_umaze_n50000_seed0.hdf5", help="D4RL-layout hdf5 (default: %(default)s)")
    ap.add_argument("--states", type=int, default=512, help="dataset states for the MSE / Q checks (default: 512)")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per mode (default: 20)")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; expected {', '.join(MODES)}")
    torch.set_num_threads(1)

    ds = load_d4rl_hdf5(a.dataset)
    ds.env_id = ds.env_id or "PointMaze_UMaze-v3"
    agent, _ = load_agent(a.checkpoint)
    d = dataset_tensors(ds)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds.rewards), generator=g)[:a.states]
    obs, act = d["observations"][idx], d["actions"][idx]
    for name, pol in [("ema", agent.ema.model), ("online", agent.policy)]:
        for steps in (15, 50, 100):
            for smp in ("dpmsolver++", "ddim", "ddpm"):
                s = pol.sample(obs, generator=torch.Generator().manual_seed(1), sampler=smp, num_inference_steps=steps)
                print(name, smp, steps, "action mse", float(((s - act) ** 2).mean()))
    with torch.no_grad():
        q_data = agent.critic.q_min(agent._obs(obs), act)
        s = agent.ema.model.sample(obs, generator=torch.Generator().manual_seed(1))
        q_pol = agent.critic.q_min(agent._obs(obs), s)
    print("Q data", float(q_data.mean()), "Q policy", float(q_pol.mean()))
    for m in modes:
        if m == "argmax":
            agent.config.selection = "argmax"
        if m == "n1":
            agent.config.num_candidates = 1
        if m == "online":
            agent.ema.model = agent.policy
        r = evaluate_agent(agent, ds, a.episodes)
        print("eval", m, r["normalized_score_mean"], r["success_rate"])


if __name__ == "__main__":
    main()
