"""The toy study (the paper's 2-D figure): a standard and contractive diffusion policies side by side.

Data: a 2-D mixture of four isotropic Gaussians (centres (±1, ±1), std ``mode_std``) under a fixed condition.
Each variant is trained from the same seed, on the same batches, with the same network; variants differ only in
the contraction regulariser (none; the paper's hinge at every step; the hinge at the lowest-noise 10% only, as the
public code does). Outputs, in the run folder: ``toy_samples.png`` (rows = variants, columns = training steps,
samples over the ground-truth 3σ circles), ``toy_lambda.png`` (λ_max(Ĵ) per sampling step), ``toy_table.md`` and
``toy_results.json``.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from ..config import TOY_VARIANTS, ExperimentConfig, to_plain
from ..devices import make_generator, resolve_device
from ..diagnostics import action_variance, divergence_ratio, lambda_along_trajectory
from ..policy import DiffusionPolicy, DiffusionPolicyConfig
from ..runs import RunDir
from ..training.agents import DiffusionBC
from ..training.trainer import fit
from .._optional import optional

MODE_CENTRES = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


VARIANTS = TOY_VARIANTS


def validate(cfg: ExperimentConfig) -> None:
    """Raises ValueError naming the key for a toy setting out of range."""
    bad = set(cfg.algo.variants) - set(VARIANTS)
    if bad or not cfg.algo.variants:
        raise ValueError(f"unknown algo.variants {sorted(bad)}; choose from {list(VARIANTS)}")
    if cfg.train.steps < cfg.eval.snapshots or cfg.eval.snapshots < 1:
        raise ValueError("need 1 <= eval.snapshots <= train.steps")
    if cfg.data.mode_std <= 0 or cfg.data.n_data < 4 or cfg.eval.n_samples < 10:
        raise ValueError("data.mode_std > 0, data.n_data >= 4 and eval.n_samples >= 10 are required")


LABELS = {"standard": "standard diffusion", "cdp_all": "CDP (all steps)", "cdp_low10": "CDP (t ≤ 0.1)",
          "cdp_low50": "CDP (t ≤ 0.5)"}


def make_toy_data(n: int, mode_std: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the four-mode mixture: (actions (n, 2), mode labels (n,))."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    x = MODE_CENTRES[labels] + mode_std * torch.randn(n, 2, generator=generator)
    return x, labels


def toy_metrics(samples: torch.Tensor, mode_std: float) -> dict[str, float]:
    """Off-support fraction (farther than 3σ from every centre), mode shares, variances of (N, 2) samples."""
    d = torch.cdist(samples.double(), MODE_CENTRES.double())
    dmin, nearest = d.min(1)
    on = dmin <= 3 * mode_std
    out = {"off_support": float((~on).double().mean())}
    for m in range(4):
        out[f"mode{m}_share"] = float((nearest[on] == m).double().mean()) if on.any() else 0.0
    out["action_var_total"] = float(samples.double().var(0).sum())
    within = [samples[on & (nearest == m)].double().var(0).sum() for m in range(4) if int((on & (nearest == m)).sum()) > 1]
    out["within_mode_var"] = float(torch.stack(within).mean()) if within else float("nan")
    shares = torch.tensor([out[f"mode{m}_share"] for m in range(4)])
    out["mode_share_tv"] = float(0.5 * (shares - 0.25).abs().sum())  # total variation from uniform shares
    return out


def _policy_config(cfg: ExperimentConfig, t_range) -> DiffusionPolicyConfig:
    p = cfg.policy
    contraction = None
    if t_range is not None:
        contraction = {k: v for k, v in to_plain(p.contraction).items() if k != "prediction"}
        contraction["t_range"] = list(t_range)
    return DiffusionPolicyConfig(
        obs_dim=1, action_dim=2, network="mlp",
        network_kwargs={"hidden": p.network.hidden, "n_layers": p.network.layers},
        schedule={"name": p.schedule.name, "num_steps": p.schedule.num_steps}, sampler=p.sampler,
        num_inference_steps=p.num_inference_steps, clip_sample=1.0, obs_normalizer="identity",
        action_normalizer="minmax", ema_decay=p.ema_decay, contraction=contraction, compile=cfg.train.compile)


def run_toy(cfg: ExperimentConfig, log=print) -> dict:
    """Train every variant of ``algo.variants``, evaluate, write the figure and tables into ``cfg.out``.

    Returns the results dict (also ``toy_results.json``). Raises ValueError for settings out of range.
    """
    validate(cfg)
    seed, n_data, mode_std = cfg.train.seed, cfg.data.n_data, cfg.data.mode_std
    device = resolve_device(cfg.train.device)
    torch.manual_seed(seed)
    out_dir = Path(cfg.out if cfg.out is not None else "runs/toy")  # ExperimentConfig.out: None means runs/<job>
    if (out_dir / "toy_results.json").exists():
        raise ValueError(f"{out_dir} holds a finished cdp toy run; choose a new --out")
    for name in cfg.algo.variants:  # an interrupted toy run restarts its variants (minutes of work)
        shutil.rmtree(out_dir / name, ignore_errors=True)
    run = RunDir(out_dir, config=cfg.to_dict(), tensorboard=cfg.log.tensorboard, lock=True,
                 wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project, wandb_mode=cfg.log.wandb_mode)
    gen = torch.Generator().manual_seed(seed)
    data, _ = make_toy_data(n_data, mode_std, gen)
    obs = torch.zeros(n_data, 1)
    fixed_obs = torch.zeros(1, 1, device=device)
    steps, snapshots, n_eval = cfg.train.steps, cfg.eval.snapshots, cfg.eval.n_samples
    snap_steps = sorted({max(1, round(steps * (i + 1) / snapshots)) for i in range(snapshots)})
    log_every = math.gcd(*snap_steps) if len(snap_steps) > 1 else snap_steps[0]

    torch.manual_seed(seed)
    init = DiffusionPolicy(_policy_config(cfg, None)).net.state_dict()  # one shared initialisation
    results: dict = {"config": cfg.to_dict(), "snap_steps": snap_steps, "variants": {}}
    snapshots_: dict[str, dict[int, torch.Tensor]] = {}
    lambdas: dict[str, dict] = {}
    for name in cfg.algo.variants:
        pol = DiffusionPolicy(_policy_config(cfg, VARIANTS[name]))
        pol.net.load_state_dict(init)
        pol.fit_normalizers(obs, data)
        pol.to(device)
        snapshots_[name] = {}

        def cb(step, agent, name=name):
            if step in snap_steps:
                g = make_generator(seed + 1, device)
                snapshots_[name][step] = agent.ema.model.sample(fixed_obs.expand(n_eval, 1), generator=g).cpu()

        sub = RunDir(out_dir / name, config={"variant": name, "policy": pol.config.to_dict()},
                     tensorboard=cfg.log.tensorboard)
        g_train = make_generator(seed, device)
        agent = DiffusionBC(pol, steps=steps, lr=cfg.train.lr, grad_clip=cfg.train.grad_clip, generator=g_train)
        t0 = time.time()
        fit(agent, {"observations": obs, "actions": data}, steps=steps, batch_size=cfg.train.batch_size, seed=seed,
            device=device, precision=cfg.train.precision, log_every=log_every, generator=g_train, callback=cb,
            run=sub, progress=cfg.train.progress, desc=name)
        train_s = time.time() - t0
        sub.close()
        ev = agent.eval_policy
        final = snapshots_[name][snap_steps[-1]]
        m = toy_metrics(final, mode_std)
        div = divergence_ratio(ev, fixed_obs, n_pairs=256, generator=torch.Generator().manual_seed(seed + 2))
        lam = lambda_along_trajectory(ev, fixed_obs, n_samples=256, generator=torch.Generator().manual_seed(seed + 3))
        lam = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in lam.items()}
        div = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in div.items()}
        lambdas[name] = lam
        lh = lam["lambda_hat"]
        high = lam["t"] > 0.5
        m.update({
            "div_ratio_median": float(div["ratio"].median()),
            "div_ratio_mean": float(div["ratio"].mean()),
            "div_ratio_t1_median": float(div["ratio_t1"].median()),
            "div_bound_median": float(div["bound"].median()),
            "bound_holds_frac": float((div["ratio_t1"] <= div["bound"] * 1.05).double().mean()),
            "lambda_hat_mean": float(lh.mean()),
            "lambda_hat_mean_high_noise": float(lh[high].mean()) if high.any() else float("nan"),
            "lambda_hat_mean_low_noise": float(lh[~high].mean()) if (~high).any() else float("nan"),
            "frac_contractive": float((lh < 0).double().mean()),
            "action_var_seeds": action_variance(ev, fixed_obs, n_samples=512,
                                                generator=torch.Generator().manual_seed(seed + 4)),
            "train_seconds": train_s,
        })
        results["variants"][name] = m
        run.log(steps, m, prefix=f"{name}/")
        run.summary(steps, {k: m[k] for k in ("off_support", "mode_share_tv", "div_ratio_median", "lambda_hat_mean",
                                              "frac_contractive")}, prefix=f"{name}/")

    results["lambda_per_step"] = {n: {"t": l["t"].tolist(), "mean": l["lambda_hat"].mean(1).tolist()} for n, l in lambdas.items()}
    run.write_json("toy_results.json", results)
    (out_dir / "toy_table.md").write_text(toy_table_markdown(results))
    plot_toy(snapshots_, data, mode_std, snap_steps, lambdas, out_dir)
    run.close()
    log(toy_table_markdown(results))
    log(f"wrote {out_dir}/toy_samples.png, toy_lambda.png, toy_table.md, toy_results.json")
    return results


def toy_table_markdown(results: dict) -> str:
    cols = [("off_support", "off-support", "{:.3f}"), ("mode_share_tv", "mode-share TV", "{:.3f}"),
            ("within_mode_var", "within-mode var", "{:.4f}"), ("action_var_seeds", "action var (seeds)", "{:.3f}"),
            ("div_ratio_median", "div. ratio (median)", "{:.3f}"), ("div_ratio_t1_median", "div. ratio at t_1", "{:.3f}"),
            ("div_bound_median", "Cor. 3.1.1 bound at t_1 (median)", "{:.3g}"), ("bound_holds_frac", "ratio_t1 ≤ bound", "{:.2f}"),
            ("lambda_hat_mean_high_noise", "λ̂ t>0.5", "{:.3f}"), ("lambda_hat_mean_low_noise", "λ̂ t≤0.5", "{:.3f}"),
            ("frac_contractive", "frac λ̂<0", "{:.2f}"), ("train_seconds", "train s", "{:.0f}")]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in results["variants"].items():
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(fmt.format(m[k]) for k, _, fmt in cols) + " |")
    shares = ["", "Mode shares (ideal 0.25 each):", ""]
    for name, m in results["variants"].items():
        shares.append(f"- {LABELS.get(name, name)}: " + ", ".join(f"{m[f'mode{i}_share']:.3f}" for i in range(4)))
    return "\n".join(lines + shares) + "\n"


def plot_toy(snapshots, data, mode_std: float, snap_steps, lambdas, out_dir: Path) -> None:
    matplotlib = optional("matplotlib", "plots", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(snapshots)
    fig, axes = plt.subplots(len(names), len(snap_steps), figsize=(3 * len(snap_steps), 3 * len(names)), squeeze=False)
    theta = torch.linspace(0, 2 * math.pi, 100)
    for i, name in enumerate(names):
        for j, st in enumerate(snap_steps):
            ax = axes[i][j]
            s = snapshots[name][st]
            ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.4, color="tab:blue" if name == "standard" else "tab:red")
            for c in MODE_CENTRES:
                ax.plot(c[0] + 3 * mode_std * torch.cos(theta), c[1] + 3 * mode_std * torch.sin(theta), "k-", lw=0.8)
            ax.set_xlim(-1.8, 1.8)
            ax.set_ylim(-1.8, 1.8)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            off = toy_metrics(s, mode_std)["off_support"]
            ax.set_title(f"step {st}  off-support {off:.3f}", fontsize=8)
            if j == 0:
                ax.set_ylabel(LABELS.get(name, name))
    fig.suptitle("Samples (dots) over the data's 3σ circles; rows: variants, columns: training steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "toy_samples.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, lam in lambdas.items():
        lh = lam["lambda_hat"]
        ax.plot(lam["t"], lh.mean(1), marker="o", ms=3, label=LABELS.get(name, name))
        ax.fill_between(lam["t"], lh.quantile(0.1, 1), lh.quantile(0.9, 1), alpha=0.15)
    ax.axhline(0, color="k", lw=0.7)
    ax.invert_xaxis()
    ax.set_xlabel("diffusion time t (sampling runs right)")
    ax.set_ylabel("λ_max(Ĵ)  (<0: contracting)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "toy_lambda.png", dpi=110)
    plt.close(fig)
