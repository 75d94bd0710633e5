"""Markdown tables of the IL grid from results/il/*.json (docs/results_il.md)."""
import glob
import json
import os
import sys

import numpy as np

here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
rows = []
for f in sorted(glob.glob(os.path.join(here, "*.json"))):
    r = json.load(open(f))
    c, ev, dg, tr = r["config"], r["eval"], r.get("diagnostics", {}), r["train"]
    if "skipped" in ev:
        continue
    cc = (r["policy_config"].get("contraction") or {})
    rows.append(dict(name=os.path.basename(f)[:-5], policy=c["policy"], frac=c["fraction"], seed=c["seed"],
                     steps=c["steps"], batch=c["batch_size"], eps=r["data"]["episodes"], win=r["data"]["windows"],
                     cov=ev["mean_max_coverage"], score=ev["mean_max_reward"], succ=ev["success_rate"],
                     n_eval=len(ev["max_coverage"]), train_s=tr["seconds"], spk=tr["sec_per_1k_steps"],
                     loss=tr["final_loss_d"] if tr.get("final_loss_d") is not None else tr["final_loss"],
                     lam=dg.get("lambda_hat_mean", np.nan), lam_lo=dg.get("lambda_hat_mean_low_noise", np.nan),
                     fracc=dg.get("frac_contractive", np.nan), ratio=dg.get("div_ratio_median", np.nan),
                     bound=dg.get("div_bound_median", np.nan), ms=cc.get("max_samples", "-")))

def ms(v, fmt):
    v = np.asarray(v, float)
    return (fmt % v.mean()) + (" ± " + fmt % v.std(ddof=1) if len(v) > 1 else "")

print("### Mean ± std over seeds (std: sample std, ddof 1)\n")
print("| policy | fraction | demos | steps | seeds | mean max-coverage | DP score | success rate | train s | s/1k steps |"
      " λ̂ mean | λ̂ (t≤0.1) | frac λ̂<0 | div. ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
keys = sorted({(r["policy"], r["frac"], r["steps"]) for r in rows}, key=lambda k: (k[2], -k[1], k[0]))
for k in keys:
    g = [r for r in rows if (r["policy"], r["frac"], r["steps"]) == k]
    eps = sorted({r["eps"] for r in g})
    print(f"| {k[0]} | {k[1]} | {'/'.join(map(str, eps))} | {k[2]} | {','.join(str(r['seed']) for r in g)} | "
          f"{ms([r['cov'] for r in g], '%.3f')} | {ms([r['score'] for r in g], '%.3f')} | "
          f"{ms([r['succ'] for r in g], '%.3f')} | {ms([r['train_s'] for r in g], '%.0f')} | "
          f"{ms([r['spk'] for r in g], '%.1f')} | {ms([r['lam'] for r in g], '%.2f')} | "
          f"{ms([r['lam_lo'] for r in g], '%.2f')} | {ms([r['fracc'] for r in g], '%.2f')} | "
          f"{ms([r['ratio'] for r in g], '%.3f')} |")
print("\n### Per seed\n")
print("| run | demos | windows | steps | eval eps | mean max-cov | DP score | success | final loss_d | train s | "
      "s/1k | reg. samples/batch | λ̂ mean | λ̂ (t≤0.1) | frac λ̂<0 | div. ratio | div. bound |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in sorted(rows, key=lambda r: (r["steps"], -r["frac"], r["policy"], r["seed"])):
    print(f"| {r['name']} | {r['eps']} | {r['win']} | {r['steps']} | {r['n_eval']} | {r['cov']:.3f} | {r['score']:.3f} | "
          f"{r['succ']:.2f} | {r['loss']:.4f} | {r['train_s']:.0f} | {r['spk']:.1f} | {r['ms']} | {r['lam']:.2f} | "
          f"{r['lam_lo']:.2f} | {r['fracc']:.2f} | {r['ratio']:.3f} | {r['bound']:.3f} |")
