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


CHUNK_ROUTES = {  # label -> contraction config fields (4 regularised samples per batch of 64 unless set)
    "default": dict(),  # exact λ̂, gradient by the central difference in the training pass (fd_step 1e-2)
    "autograd (fd_step=None)": dict(fd_step=None),  # vᵀJv by a double backward on separately drawn points
    "full": dict(fd_step=None, exact_grad="full"),  # differentiate eigvalsh of the full Jacobian
    "power K=4": dict(estimator="power", iters=4),
    "m=2": dict(max_samples=2),
    "m=1": dict(max_samples=1),
    "lazy p=0.25": dict(apply_prob=0.25),  # m = 4 on a random quarter of the steps, ×4
    "lazy p=0.25, m=8": dict(apply_prob=0.25, max_samples=8),
}


def chunk_policy(network: str, contraction: dict | None, seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    kw = dict(down_dims=(32, 64, 128)) if network == "unet" else {}
    return DiffusionPolicy(DiffusionPolicyConfig(obs_dim=20, action_dim=2, network=network, horizon=16, n_obs_steps=2,
                                                 n_action_steps=8, schedule={"name": "vp", "num_steps": 100},
                                                 contraction=contraction, network_kwargs=kw))


def chunk_step_fn(network: str, contraction: dict | None, batch: int = 64):
    """One Diffusion Policy training step at PushT shapes (To = 2 observations of 20, chunk H = 16 × Da = 2, so
    d = 32), UNet down_dims (32, 64, 128) as in configs/experiments/il_pusht_unet_cpu.yaml, DiT at its defaults."""
    p = chunk_policy(network, contraction)
    g = torch.Generator().manual_seed(1)
    p.fit_normalizers(torch.randn(256, 20, generator=g), torch.rand(256, 2, generator=g) * 2 - 1)
    obs, act = torch.randn(batch, 2, 20, generator=g), torch.rand(batch, 16, 2, generator=g) * 2 - 1
    return step_closure(p, obs, act, g)


def bench_chunk_nets(repeats: int, networks=("unet", "dit"), routes=None) -> list[str]:
    """DP vs CDP training step (forward + backward + AdamW) for the UNet and the DiT (d = 32, batch 64) per route;
    10 steps per timing (lazy steps are bimodal), paired ratios."""
    routes = list(routes or CHUNK_ROUTES)
    rows = ["| network, batch 64 | DP ms | " + " | ".join(f"CDP {v} ms (ratio)" for v in routes) + " |",
            "|---|---:|" + "---:|" * len(routes)]
    for net in networks:
        fns = {"base": chunk_step_fn(net, None)}
        for v in routes:
            fns[v] = chunk_step_fn(net, {"max_samples": 4, **CHUNK_ROUTES[v]})
        med, times = interleaved(fns, repeats, warmup=1, n_inner=4 if net == "dit" else 10, raw=True)
        rows.append(f"| {net} | {med['base']:.0f} | " + " | ".join(f"{med[v]:.0f} ({paired_ratio(times, v):.2f})"
                                                                   for v in routes) + " |")
        print(rows[-1], flush=True)
    return rows


def _flat_grad(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1) for g, q in zip(gs, params)])


def bench_chunk_accuracy(networks=("unet", "dit"), train_steps: int = 100, draws: int = 40) -> list[str]:
    """On a network trained ``train_steps`` plain steps at PushT shapes: (1) λ̂ of the default route (float32) against
    eigvalsh of the vmap(jacfwd) Jacobian in float64 at the same points; (2) the contraction term's gradient by the
    central difference against the double backward (float32, same points, every hinge active); (3) the mean and
    variance of the contraction term's gradient over ``draws`` batches for m = 4 every step, m = 1 and lazy
    p = 0.25: the bias check ‖ḡ_a − ḡ_b‖² N / (tr Var_a + tr Var_b) is ≈ 1 when the two routes estimate the same
    mean gradient (unbiased subsampling), ≫ 1 otherwise; variance = E‖g − ḡ‖², relative to m = 4's."""
    from cdp.contraction import jacobian_fast

    rows = ["| network | λ̂ rel. err. median / max | central-difference vs double-backward gradient, rel. err. | "
            "bias check m=1 vs m=4 | bias check lazy vs m=4 | gradient variance m=4 | m=1 (× m=4) | "
            "lazy p=0.25 (× m=4) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for net in networks:
        p = chunk_policy(net, None)
        g = torch.Generator().manual_seed(1)
        obs_all, act_all = torch.randn(512, 2, 20, generator=g), torch.rand(512, 16, 2, generator=g) * 2 - 1
        p.fit_normalizers(obs_all, act_all)
        opt = torch.optim.AdamW(p.net.parameters(), lr=1e-3)
        for _ in range(train_steps):
            idx = torch.randint(0, 512, (64,), generator=g)
            opt.zero_grad()
            p.compute_loss(obs_all[idx], act_all[idx], generator=g)[0].backward()
            opt.step()
        params = list(p.net.parameters())
        obs, act = obs_all[:64], act_all[:64]
        # (1) + (2) at the regulariser's points
        reg = ContractionRegularizer(ContractionConfig(max_samples=16, margin=100.0), p.schedule)
        a_t, t, c = reg.sample_points(p.action_normalizer.normalize(act), p.condition(obs), generator=g)
        with torch.no_grad():
            J32 = jacobian_fast(p.net, a_t, t, c)
            lam32 = torch.linalg.eigvalsh(-0.5 * (J32 + J32.transpose(1, 2)))[:, -1]
        net64 = chunk_policy(net, None).double()
        net64.load_state_dict(p.state_dict())
        J64 = jacobian(net64.net, a_t.double(), t.double(), c.double())
        lam64 = torch.linalg.eigvalsh(-0.5 * (J64 + J64.transpose(1, 2)))[:, -1]
        s, r = sign_and_ratio(p.schedule, t.double(), "epsilon")
        rel = ((r + lam32.double()) - (r + lam64)).abs() / (r + lam64).abs().clamp_min(1e-12)
        gfd, gad = [_flat_grad(ContractionRegularizer(ContractionConfig(margin=100.0, fd_step=fd), p.schedule)(
            p.net, a_t, t, c)[0], params) for fd in (1e-2, None)]
        grad_err = float((gfd - gad).norm() / gad.norm())
        # (3) gradient of γ L_c over draws, per route (the policy's own pass: first m rows of each batch)
        stats = {}
        for seed, (label, kw) in enumerate((("m=4", dict(max_samples=4)), ("m=1", dict(max_samples=1)),
                                            ("lazy", dict(max_samples=4, apply_prob=0.25)))):
            q = chunk_policy(net, kw)
            q.load_state_dict(p.state_dict())
            qp = list(q.net.parameters())
            gen = torch.Generator().manual_seed(7 + seed)  # independent draws per route
            vals = []
            for _ in range(draws):
                idx = torch.randint(0, 512, (64,), generator=gen)
                lc = q.loss_terms(obs_all[idx], act_all[idx], generator=gen)["loss_c"]
                vals.append(torch.zeros(sum(x.numel() for x in qp)) if lc is None else _flat_grad(lc, qp))
            V = torch.stack(vals)
            stats[label] = (V.mean(0), float(((V - V.mean(0)) ** 2).sum(1).mean()))
        m4, v4 = stats["m=4"]

        def bias_check(label):  # ‖ḡ_a − ḡ_b‖² / (tr Var_a + tr Var_b) · N: ≈ 1 when both estimate the same mean
            mu, var = stats[label]
            return float(((mu - m4) ** 2).sum()) * draws / (var + v4)
        rows.append(f"| {net} | {rel.median():.1e} / {rel.max():.1e} | {grad_err:.1e} | "
                    f"{bias_check('m=1'):.2f} | {bias_check('lazy'):.2f} | {v4:.3g} | "
                    f"{stats['m=1'][1] / v4:.2f} | {stats['lazy'][1] / v4:.2f} |")
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
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: steps,chunk,chunk_accuracy,compile,accuracy,sampling")
    ap.add_argument("--routes", default=None, help=f"chunk-network routes to time (default all: {','.join(CHUNK_ROUTES)})")
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
        out += bench_chunk_nets(max(3, repeats // 3), routes=a.routes.split(",") if a.routes else None) + [""]
    if "chunk_accuracy" not in skip:
        out += ["## Chunk networks: λ̂ accuracy, gradient accuracy and gradient variance per route", ""]
        out += bench_chunk_accuracy(train_steps=10 if a.quick else 100, draws=8 if a.quick else 40) + [""]
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
