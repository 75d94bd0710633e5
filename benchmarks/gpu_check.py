"""Short RL and IL training runs on one device, with and without CDP: steps/s and the CDP/base ratio.

Runs the real trainer (:func:`cdp.training.trainer.fit`) on synthetic data at the benchmark shapes — RL: Hopper
(obs 11, action 3), batch 256, EDP vs CDP (EDP + contraction); IL: PushT low-dim (obs 20, To 2, chunk 16 × 2),
DP-UNet vs CDP-UNet at the CPU grid's UNet size (down_dims 32/64/128, 4 regularised samples), batch 64 — in fp32 and,
on CUDA, bf16. Each configuration first runs ``--warmup`` steps (CUDA kernels, allocator), then ``--steps`` timed
steps; base and CDP alternate over ``--rounds`` rounds and the table reports medians. Prints a markdown table.

    python benchmarks/gpu_check.py --device cuda            # what benchmarks/gpu_check.sh runs
    python benchmarks/gpu_check.py --device cpu --steps 5 --warmup 1 --rounds 1   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdp.config import apply, base_config
from cdp.devices import check_precision, make_generator, resolve_device
from cdp.experiments.il import policy_config
from cdp.experiments.rl import agent_config, place
from cdp.policy import DiffusionPolicy
from cdp.rl import make_agent
from cdp.training.agents import DiffusionBC
from cdp.training.trainer import fit


def rl_case(algo: str, device: torch.device):
    cfg = apply(base_config("rl", algo), {"algo.name": algo})
    agent = make_agent(algo, 11, 3, agent_config(cfg), seed=0)
    place(agent, device, 0)
    n = 20_000
    g = torch.Generator().manual_seed(0)
    data = {"observations": torch.randn(n, 11, generator=g), "actions": torch.rand(n, 3, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_observations": torch.randn(n, 11, generator=g),
            "terminals": torch.zeros(n)}
    return agent, data, 256, None


def il_case(name: str, device: torch.device):
    cfg = apply(base_config("il", name), {"algo.name": name, "policy.network.unet_down_dims": [32, 64, 128],
                                          "policy.contraction.max_samples": 4})
    torch.manual_seed(0)
    pol = DiffusionPolicy(policy_config(cfg, 20, 2)).to(device)
    gen = make_generator(0, device)
    agent = DiffusionBC(pol, steps=10_000, lr=1e-3, generator=gen)
    n = 5000
    g = torch.Generator().manual_seed(0)
    data = {"observations": torch.randn(n, 2, 20, generator=g), "actions": torch.rand(n, 16, 2, generator=g) * 2 - 1}
    return agent, data, 64, gen


def time_case(make, name, device, precision, steps, warmup):
    agent, data, batch, gen = make(name, device)
    fit(agent, data, steps=warmup, batch_size=batch, device=device, precision=precision, generator=gen,
        progress=False, log_every=max(warmup, 1))

    def run():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        start = getattr(agent, "num_updates", None)
        fit(agent, data, steps=steps, batch_size=batch, device=device, precision=precision, generator=gen,
            progress=False, log_every=steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps / (time.perf_counter() - t0), start
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", default=None, help="comma list (default: fp32, plus bf16 on CUDA)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    precisions = args.precisions.split(",") if args.precisions else (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    for p in precisions:
        check_precision(p, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.steps} timed steps x {args.rounds} rounds\n")
    print("| job | base | CDP | precision | base steps/s | CDP steps/s | CDP/base step time |")
    print("|---|---|---|---|---|---|---|")
    for job, make, base, cdp in (("RL (Hopper shapes, batch 256)", rl_case, "edp", "cdp"),
                                 ("IL (PushT chunk 16x2, batch 64)", il_case, "dp_unet", "cdp_unet")):
        for p in precisions:
            runs = {a: time_case(make, a, device, p, args.steps, args.warmup) for a in (base, cdp)}
            sps = {base: [], cdp: []}
            for _ in range(args.rounds):
                for a in (base, cdp):
                    sps[a].append(runs[a]()[0])
            b, c = statistics.median(sps[base]), statistics.median(sps[cdp])
            print(f"| {job} | {base} | {cdp} | {p} | {b:.1f} | {c:.1f} | {b / c:.2f} |", flush=True)


if __name__ == "__main__":
    main()
