"""Batch-1 action latency of the default MLP policy (Da = 3, obs 17) with DPM-Solver++ at 15 steps on a T = 100 vp
schedule: ``DiffusionPolicy.sample`` (no_grad), the same under ``torch.inference_mode``, and the runtime API
``select_action`` (inference_mode; H = 1, so every call samples). Medians of 200 calls, 1 thread.

    python benchmarks/bench_latency.py
"""
import torch

from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
from cdp.runs import median_call_ms

torch.set_num_threads(1)


def main() -> None:
    p = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=17, action_dim=3, schedule={"name": "vp", "num_steps": 100},
                                              sampler="dpmsolver++", num_inference_steps=15)).eval()
    p.fit_normalizers(torch.randn(100, 17), torch.rand(100, 3))
    o = torch.randn(1, 17)

    kw = dict(n=200, warmup=20)
    print(f"sample (no_grad)          median ms {median_call_ms(lambda: p.sample(o), inference_mode=False, **kw):.2f}")
    print(f"sample (inference_mode)   median ms {median_call_ms(lambda: p.sample(o), **kw):.2f}")
    p.reset()
    print(f"select_action             median ms {median_call_ms(lambda: p.select_action(o), inference_mode=False, **kw):.2f}")


if __name__ == "__main__":
    main()
