"""Speed benchmark: CDP training-step overhead per estimator and action dim, estimator accuracy, sampling latency.

Everything is timed side by side, interleaved round-robin in one process with ``torch.set_num_threads(1)``, and
reported as medians over repeats, so that the ratios survive a noisy shared CPU (absolute ms do not).

Usage::

    PYTHONPATH=src python benchmarks/bench_speed.py --out docs/speed_table.md          # full run
    PYTHONPATH=src python benchmarks/bench_speed.py --quick --out /tmp/speed.md        # a fast smoke run

Options: ``--dims 2,3,6``, ``--repeats``, ``--max-samples`` (override the config default; ``all`` = no subsample),
``--compare-full`` (also time every estimator on the whole batch, ``max_samples=None``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdp.contraction import ContractionConfig, ContractionRegularizer, jacobian, lambda_max, sign_and_ratio
from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig

OBS_DIM, BATCH = 17, 256
ESTIMATORS = {  # label -> contraction config fields
    "default": dict(),  # ContractionConfig() as shipped (auto estimator, shared forward pass, every step)
    "default, exact_grad=full": dict(exact_grad="full"),  # differentiate eigvalsh of the full J
    "default, separate pass": dict(share_forward=False),
    "default, lazy p=0.5": dict(apply_prob=0.5),
    "lazy p=0.5, 32 samples": dict(apply_prob=0.5, max_samples=32),  # as many regularised samples per step
    "exact": dict(loss="hinge", estimator="exact"),
    "power K=3": dict(loss="hinge", estimator="power", iters=3),
    "power K=4": dict(loss="hinge", estimator="power", iters=4),
    "lanczos K=4": dict(loss="hinge", estimator="lanczos", iters=4),
    "frob-hutch": dict(loss="frobenius", estimator="hutchinson"),
    "authors": dict(loss="authors", estimator="exact"),
}


def make_policy(d: int, contraction: dict | None, seed: int = 0, **kw) -> DiffusionPolicy:
    torch.manual_seed(seed)
    cfg = DiffusionPolicyConfig(obs_dim=OBS_DIM, action_dim=d, contraction=contraction,
                                network_kwargs=dict(hidden=256, n_layers=3), **kw)
    p = DiffusionPolicy(cfg)
    g = torch.Generator().manual_seed(1)
    p.fit_normalizers(torch.randn(1024, OBS_DIM, generator=g), torch.rand(1024, d, generator=g) * 2 - 1)
    return p


def time_fn(fn, n_inner: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n_inner):
        fn()
    return (time.perf_counter() - t0) / n_inner * 1e3


def interleaved(fns: dict, repeats: int, warmup: int = 2, n_inner: int = 1, raw: bool = False):
    """Median ms per call of each fn, timed round-robin (the order rotates every repeat); with ``raw`` also the
    per-repeat times (for ratios paired within a round, which cancel slow drifts of a shared machine's load)."""
    keys = list(fns)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    times = {k: [] for k in keys}
    for r in range(repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            times[k].append(time_fn(fns[k], n_inner))
    med = {k: statistics.median(v) for k, v in times.items()}
    return (med, times) if raw else med


def paired_ratio(times: dict, key: str, base: str = "base") -> float:
    """Median over repeats of time[key] / time[base] measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[key], times[base]))


def step_closure(policy: DiffusionPolicy, obs: torch.Tensor, act: torch.Tensor, g: torch.Generator):
    """A function doing one training step (compute_loss + backward + AdamW) on the fixed batch (obs, act)."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = policy.compute_loss(obs, act, generator=g)
        loss.backward()
        opt.step()
    return step


def train_step_fn(policy: DiffusionPolicy, d: int):
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(BATCH, OBS_DIM, generator=g)
    act = torch.rand(BATCH, d, generator=g) * 2 - 1
    return step_closure(policy, obs, act, g)


def contraction_dict(label: str, max_samples) -> dict:
    kw = dict(ESTIMATORS[label])
    if max_samples != "default":
        kw["max_samples"] = max_samples
    return kw


def unfused_base(d: int):
    """The base step with the MLP's plain autograd forward (nn.Linear + Mish nodes) instead of its fused trunk."""
    p = make_policy(d, None)
    p.net.train_forward = p.net.forward  # instance attribute: compute_loss picks it up
    return train_step_fn(p, d)


def bench_steps(dims, repeats, max_samples, compare_full) -> list[str]:
    rows = ["| d | base ms | base, unfused ms (ratio) | " + " | ".join(f"{e} ms (ratio)" for e in ESTIMATORS) + " |",
            "|---:|---:|---:|" + "---:|" * len(ESTIMATORS)]
    for d in dims:
        fns = {"base": train_step_fn(make_policy(d, None), d), "base, unfused": unfused_base(d)}
        for e in ESTIMATORS:
            fns[e] = train_step_fn(make_policy(d, contraction_dict(e, max_samples)), d)
            if compare_full:
                fns[e + " (all)"] = train_step_fn(make_policy(d, contraction_dict(e, None)), d)
        # mean of 10 steps per sample (lazy steps are bimodal); ratios paired within each round
        med, times = interleaved(fns, repeats, n_inner=10, raw=True)
        b = med["base"]
        cells = [f"{med['base, unfused']:.1f} ({paired_ratio(times, 'base, unfused'):.2f})"]
        for e in ESTIMATORS:
            c = f"{med[e]:.1f} ({paired_ratio(times, e):.2f})"
            if compare_full:
                c += f"; all 256: {med[e + ' (all)']:.1f} ({paired_ratio(times, e + ' (all)'):.2f})"
            cells.append(c)
        rows.append(f"| {d} | {b:.1f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def bench_compile(dims, repeats) -> list[str]:
    """Base and default-CDP steps eager vs ``DiffusionPolicyConfig(compile=True)`` (torch.compile of the training
    pass), after the compiling warm-up steps."""
    cols = ("base", "default", "base, compiled", "default, compiled")
    rows = ["| d | " + " | ".join(f"{c} ms" for c in cols) + " | CDP/base eager | CDP/base compiled | "
            "compiled CDP / eager base |", "|---:|" + "---:|" * (len(cols) + 3)]
    for d in dims:
        fns = {"base": train_step_fn(make_policy(d, None), d), "default": train_step_fn(make_policy(d, {}), d),
               "base, compiled": train_step_fn(make_policy(d, None, compile=True), d),
               "default, compiled": train_step_fn(make_policy(d, {}, compile=True), d)}
        med, times = interleaved(fns, repeats, warmup=3, n_inner=10, raw=True)
        rows.append(f"| {d} | " + " | ".join(f"{med[c]:.2f}" for c in cols)
                    + f" | {paired_ratio(times, 'default'):.2f} | {paired_ratio(times, 'default, compiled', 'base, compiled'):.2f}"
                    + f" | {paired_ratio(times, 'default, compiled'):.2f} |")
        print(rows[-1], flush=True)
    return rows


def bench_accuracy(dims, train_steps: int, max_samples) -> list[str]:
    """Relative error of each estimator's λ_max(Ĵ) against eigvalsh of the vmap(jacfwd) Jacobian, on the samples the
    regulariser draws (a net trained ``train_steps`` plain steps on random data)."""
    hinge = [e for e in ESTIMATORS if ESTIMATORS[e].get("loss") == "hinge"]  # (the default = exact here)
    rows = ["| d | " + " | ".join(f"{e} median / max rel. err" for e in hinge)
            + " | gradient: rayleigh vs full, float32 rel. err |", "|---:|" + "---:|" * (len(hinge) + 1)]
    for d in dims:
        p = make_policy(d, contraction_dict("exact", max_samples))
        opt = torch.optim.AdamW(p.net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(3)
        obs = torch.randn(BATCH, OBS_DIM, generator=g)
        act = torch.rand(BATCH, d, generator=g) * 2 - 1
        for _ in range(train_steps):
            opt.zero_grad()
            p.compute_loss(obs, act, generator=g)[0].backward()
            opt.step()
        reg = p.regularizer
        a0 = p.action_normalizer.normalize(act)
        a_t, t, c = reg.sample_points(a0, p.condition(obs), generator=g)
        s, r = sign_and_ratio(reg.schedule, t.double(), reg.config.prediction)
        net64 = p.net.double()
        a_t, t, c, r = a_t.double(), t.double(), c.double(), r.double()
        J = jacobian(net64, a_t, t, c)
        ref = r + torch.linalg.eigvalsh(s * 0.5 * (J + J.transpose(1, 2)))[:, -1]
        cells = []
        for e in hinge:
            cfg = ESTIMATORS[e]
            lam = r + lambda_max(net64, a_t, t, c, sign=s, estimator=cfg["estimator"], iters=cfg.get("iters", 4),
                                 generator=torch.Generator().manual_seed(4)).detach()
            rel = ((lam - ref).abs() / ref.abs().clamp_min(1e-12))
            cells.append(f"{rel.median():.1e} / {rel.max():.1e}")
        p.net.float()
        grads = []  # the default's gradient (Hellmann–Feynman) against differentiating eigvalsh, in training precision
        for mode in ("rayleigh", "full"):
            reg_m = ContractionRegularizer(ContractionConfig(estimator="exact", margin=10.0, exact_grad=mode),
                                           reg.schedule)  # margin 10: every sample's hinge is active
            loss_m, _ = reg_m(p.net, a_t.float(), t.float(), c.float())
            params = list(p.net.parameters())
            gs = torch.autograd.grad(loss_m, params, allow_unused=True)  # unused parameter = zero gradient
            grads.append(torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1) for g, q in zip(gs, params)]))
        cells.append(f"{float((grads[0] - grads[1]).norm() / grads[1].norm()):.1e}")
        rows.append(f"| {d} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def chunk_step_fn(network: str, contraction: dict | None, batch: int = 64):
    """One Diffusion Policy training step at PushT shapes (To = 2 observations of 20, chunk H = 16 × Da = 2, so
    d = 32), UNet down_dims (32, 64, 128) as in configs/experiments/il_pusht_unet_cpu.yaml, DiT at its defaults."""
    torch.manual_seed(0)
    kw = dict(down_dims=(32, 64, 128)) if network == "unet" else {}
    p = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=20, action_dim=2, network=network, horizon=16, n_obs_steps=2,
                                              n_action_steps=8, schedule={"name": "vp", "num_steps": 100},
                                              contraction=contraction, network_kwargs=kw))
    g = torch.Generator().manual_seed(1)
    p.fit_normalizers(torch.randn(256, 20, generator=g), torch.rand(256, 2, generator=g) * 2 - 1)
    obs, act = torch.randn(batch, 2, 20, generator=g), torch.rand(batch, 16, 2, generator=g) * 2 - 1
    return step_closure(p, obs, act, g)


def bench_chunk_nets(repeats: int, max_samples: int = 4) -> list[str]:
    """DP vs CDP training step for the UNet and the DiT (d = 32) per exact-gradient mode and power iteration."""
    variants = {"exact, rayleigh (default)": dict(), "exact, full": dict(exact_grad="full"),
                "power K=4": dict(estimator="power", iters=4)}
    rows = ["| network, batch 64 | DP ms | " + " | ".join(f"CDP {v} ms (ratio)" for v in variants) + " |",
            "|---|---:|" + "---:|" * len(variants)]
    for net in ("unet", "dit"):
        fns = {"base": chunk_step_fn(net, None)}
        for v, kw in variants.items():
            fns[v] = chunk_step_fn(net, dict(max_samples=max_samples, **kw))
        med, times = interleaved(fns, repeats, warmup=1, raw=True)
        b = med["base"]
        rows.append(f"| {net} | {b:.0f} | " + " | ".join(f"{med[v]:.0f} ({paired_ratio(times, v):.2f})"
                                                         for v in variants) + " |")
        print(rows[-1], flush=True)
    return rows


def bench_sampling(repeats: int, d: int = 3) -> list[str]:
    samplers = {
        "ddpm T=5": dict(schedule={"name": "vp", "num_steps": 5}, sampler="ddpm"),
        "ddim T=5": dict(schedule={"name": "vp", "num_steps": 5}, sampler="ddim"),
        "ddim 15/100": dict(schedule={"name": "vp", "num_steps": 100}, sampler="ddim", num_inference_steps=15),
        "dpmsolver++ 15/100": dict(schedule={"name": "vp", "num_steps": 100}, sampler="dpmsolver++", num_inference_steps=15),
    }
    rows = ["| policy | sampler | batch 1 ms | batch 50 ms |", "|---|---|---:|---:|"]
    fns = {}
    g = torch.Generator().manual_seed(5)
    obs1, obs50 = torch.randn(1, OBS_DIM, generator=g), torch.randn(50, OBS_DIM, generator=g)
    for name, kw in samplers.items():
        p = make_policy(d, None, **kw).eval()
        fns[(name, 1)] = (lambda p=p: p.sample(obs1, generator=g))
        fns[(name, 50)] = (lambda p=p: p.sample(obs50, generator=g))
    unet_kw = dict(network="unet", horizon=16, n_obs_steps=2, n_action_steps=8,
                   schedule={"name": "vp", "num_steps": 100}, sampler="dpmsolver++", num_inference_steps=15)
    torch.manual_seed(0)
    up = DiffusionPolicy(DiffusionPolicyConfig(obs_dim=OBS_DIM, action_dim=2, **unet_kw,
                                               network_kwargs=dict(down_dims=(64, 128), time_embed_dim=64))).eval()
    up.fit_normalizers(torch.randn(64, OBS_DIM), torch.rand(64, 2) * 2 - 1)
    o1, o50 = torch.randn(1, 2, OBS_DIM, generator=g), torch.randn(50, 2, OBS_DIM, generator=g)
    unet_name = "dpmsolver++ 15/100"
    fns[("unet", 1)] = lambda: up.sample(o1, generator=g)
    fns[("unet", 50)] = lambda: up.sample(o50, generator=g)
    med = interleaved(fns, repeats, n_inner=3)
    for name in samplers:
        rows.append(f"| MLP 3×256, d={d} | {name} | {med[(name, 1)]:.2f} | {med[(name, 50)]:.2f} |")
    rows.append(f"| UNet down_dims=(64,128), time_embed 64, H=16, Da=2, To=2 (chunk) | {unet_name} | "
                f"{med[('unet', 1)]:.2f} | {med[('unet', 50)]:.2f} |")
    for r in rows[2:]:
        print(r, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer dims and repeats")
    ap.add_argument("--dims", default=None, help="comma-separated action dims (default 2,3,6,7,14,32)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-samples", default="default", help="'default' (config default), 'all', or an integer")
    ap.add_argument("--compare-full", action="store_true", help="also time each estimator on the whole batch")
    ap.add_argument("--train-steps", type=int, default=None, help="plain steps before the accuracy check")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: steps,chunk,compile,accuracy,sampling")
    ap.add_argument("--out", required=True, help="markdown file to write")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dims = [int(x) for x in a.dims.split(",")] if a.dims else ([3, 14] if a.quick else [2, 3, 6, 7, 14, 32])
    repeats = a.repeats or (5 if a.quick else 15)
    ms = a.max_samples if a.max_samples == "default" else (None if a.max_samples == "all" else int(a.max_samples))
    train_steps = a.train_steps if a.train_steps is not None else (20 if a.quick else 200)
    skip = set(filter(None, a.skip.split(",")))
    cfg = ContractionConfig()
    eff_ms = cfg.max_samples if ms == "default" else ms
    out = [f"# bench_speed ({'quick' if a.quick else 'full'}): torch {torch.__version__}, 1 thread, "
           f"MLP 3×256 Mish, batch {BATCH}, obs dim {OBS_DIM}, repeats {repeats} (medians, interleaved)", "",
           f"Regularised samples per batch: {eff_ms if eff_ms is not None else 'all'} (max_samples); "
           f"ContractionConfig defaults: {cfg.to_dict()}", ""]
    if "steps" not in skip:
        out += ["## Training step (forward + backward + AdamW), CDP/base ratio in brackets",
                "",
                "Ratios are medians of per-round ratios (each round times every column back to back), so they "
                "survive slow drifts of a shared machine's load; ms are medians. 'base, unfused' is the base step "
                "through nn.Linear/Mish autograd nodes instead of the MLP's fused trunk.",
                ""]
        out += bench_steps(dims, repeats, ms, a.compare_full) + [""]
    if "chunk" not in skip:
        out += ["## Chunk networks (Diffusion Policy at PushT shapes, d = 32, 4 regularised samples per batch)", ""]
        out += bench_chunk_nets(max(3, repeats // 3)) + [""]
    if "compile" not in skip:
        out += ["## torch.compile of the training pass (`DiffusionPolicyConfig.compile`)", ""]
        out += bench_compile([x for x in dims if x <= 7] or dims, repeats) + [""]
    if "accuracy" not in skip:
        out += [f"## Relative error of λ_max(Ĵ) vs exact eigvalsh (float64, on the regularised samples, "
                f"net after {train_steps} training steps)", ""]
        out += bench_accuracy(dims, train_steps, ms) + [""]
    if "sampling" not in skip:
        out += ["## Action-sampling latency (policy.sample, incl. normalisation)", ""]
        out += bench_sampling(repeats) + [""]
    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
