"""Sanity checks for the DBC grid (docs/results_il.md): idle-policy baseline on the eval seeds and open-loop
action error of a trained checkpoint on training windows vs. a mean-action baseline."""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from cdp.envs.pusht import evaluate_pusht
from cdp.il import ILConfig, load_demos, make_windows
from cdp.runs import load_policy

out = {}
# idle: command the agent to stay where it is (action = current agent position = obs[-2:])
idle = evaluate_pusht(lambda o: o[:, -1:, 18:20].copy(), n_episodes=25, seed_start=100000, max_steps=300,
                      n_obs_steps=2, n_action_steps=1)
out["idle"] = {k: idle[k] for k in ("mean_max_coverage", "success_rate", "mean_max_reward")}
for run in sys.argv[1:]:
    pol = load_policy(f"runs/il/{run}/checkpoints/last", use_ema=True).eval()
    cfg = ILConfig.from_dict({k: (tuple(v) if isinstance(v, list) else v) for k, v in
                              json.load(open(f"runs/il/{run}/results.json"))["config"].items()})
    obs, act = make_windows(load_demos(cfg), pol.config)
    idx = torch.randperm(obs.shape[0], generator=torch.Generator().manual_seed(0))[:512]
    with torch.no_grad():
        a = pol.sample(obs[idx], generator=torch.Generator().manual_seed(0))
    err = (a - act[idx]).norm(dim=-1)
    base = (act[idx] - act.mean(0)).norm(dim=-1)
    stay = (obs[idx, -1, 18:20] - act[idx]).norm(dim=-1)
    out[run] = {"open_loop_err_px_median": float(err.median()), "mean_action_err_px_median": float(base.median()),
                "stay_err_px_median": float(stay.median())}
print(json.dumps(out, indent=1))
