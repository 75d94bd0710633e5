"""Interleaved step-time comparison: base diffusion policy vs CDP vs lazy CDP (apply_prob=0.25), MLP 3x256, batch 256, Da=3.

    python benchmarks/bench_lazy.py
"""
import torch, time, statistics
torch.set_num_threads(1)
from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
def make(c):
    torch.manual_seed(0)
    p = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=17, action_dim=3, contraction=c))
    p.fit_normalizers(torch.randn(1000,17), torch.rand(1000,3)*2-1)
    return p, torch.optim.AdamW(p.net.parameters(), 3e-4)
variants = {"base": None, "cdp": {"weight":0.1}, "cdp_lazy0.25": {"weight":0.1, "apply_prob":0.25}}
pols = {k: make(v) for k,v in variants.items()}
obs, act = torch.randn(256,17), torch.rand(256,3)*2-1
g = torch.Generator().manual_seed(0)
times = {k: [] for k in variants}
for rep in range(7):
    for k,(p,opt) in pols.items():
        t0=time.perf_counter()
        for _ in range(40):
            loss,_ = p.compute_loss(obs, act, generator=g); opt.zero_grad(); loss.backward(); opt.step()
        times[k].append((time.perf_counter()-t0)/40)
med = {k: statistics.median(v) for k,v in times.items()}
for k,v in med.items(): print(f"{k}: {v*1e3:.2f} ms/step, ratio {v/med['base']:.2f}")
