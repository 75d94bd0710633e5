"""Batch-1 action latency of the default MLP policy (Da=3, obs 17) with DPM-Solver++ at 15 steps on a T=100 vp schedule.

    python benchmarks/bench_latency.py
"""
import torch, time, statistics
torch.set_num_threads(1)
from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
p = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=17, action_dim=3, schedule={"name":"vp","num_steps":100}, sampler="dpmsolver++", num_inference_steps=15)).eval()
p.fit_normalizers(torch.randn(100,17), torch.rand(100,3))
o = torch.randn(1,17)
for _ in range(20): p.sample(o)
ts=[]
for _ in range(200):
    t0=time.perf_counter(); p.sample(o); ts.append(time.perf_counter()-t0)
print("median ms", statistics.median(ts)*1e3)
import torch.profiler
with torch.inference_mode():
    ts=[]
    for _ in range(200):
        t0=time.perf_counter(); p.sample(o); ts.append(time.perf_counter()-t0)
print("inference_mode median ms", statistics.median(ts)*1e3)
