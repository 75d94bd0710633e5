"""Diagnostics of an EDP/CDP checkpoint on the PointMaze UMaze dataset (docs/results_rl.md).

    python benchmarks/rl_diag.py runs/rl/probe/edp_s0/checkpoints/last argmax,n1,online

Prints the action MSE of EMA / online actor samples vs dataset actions (3 samplers x 15/50/100 steps), min Q of
dataset vs sampled actions, then evaluates (20 episodes) with the listed modes applied cumulatively:
argmax (argmax-Q candidate pick), n1 (one candidate, no Q pick), online (online actor instead of EMA).
"""
import sys, torch, numpy as np
from cdp.rl.trainer import load_agent, evaluate_agent, dataset_tensors
from cdp.data.rl import load_d4rl_hdf5
torch.set_num_threads(1)
ck = sys.argv[1]
ds = load_d4rl_hdf5('runs/rl/dataset_umaze_n50000_seed0.hdf5'); ds.env_id = ds.env_id or 'PointMaze_UMaze-v3'
agent, meta = load_agent(ck)
d = dataset_tensors(ds)
g = torch.Generator().manual_seed(0)
idx = torch.randperm(len(ds.rewards), generator=g)[:512]
obs, act = d['observations'][idx], d['actions'][idx]
for name, pol in [('ema', agent.ema.model), ('online', agent.policy)]:
    for steps in (15, 50, 100):
        for smp in ('dpmsolver++', 'ddim', 'ddpm'):
            a = pol.sample(obs, generator=torch.Generator().manual_seed(1), sampler=smp, num_inference_steps=steps)
            print(name, smp, steps, 'action mse', float(((a - act) ** 2).mean()))
q_data = agent.critic.q_min(agent._obs(obs), act)
a = agent.ema.model.sample(obs, generator=torch.Generator().manual_seed(1))
q_pol = agent.critic.q_min(agent._obs(obs), a)
print('Q data', float(q_data.mean()), 'Q policy', float(q_pol.mean()))
modes = sys.argv[2].split(',') if len(sys.argv) > 2 else []
for m in modes:
    if m == 'argmax': agent.config.selection = 'argmax'
    if m == 'n1': agent.config.num_candidates = 1
    if m == 'online': agent.ema.model = agent.policy
    r = evaluate_agent(agent, ds, 20)
    print('eval', m, r['normalized_score_mean'], r['success_rate'])
