"""Dropping on the default model: held-out perplexity against units dropped, per unit kind and order, and speed.

One process, same windows: the original model is the baseline for every row
(perplexity, KL, prefill and generation tokens per second). Orders come from
one Profile measured on the calibration windows (exact ablation included),
plus random (seeded) and, for blocks, ShortGPT's best contiguous run.
LLM-Drop's claim checked here: attention sublayers are far more droppable
than MLP sublayers.

Usage: python benchmarks/drop_sweep.py [--ns 1,2,4,6,8,12 --samples 8 --eval-samples 16 --device cpu]
Writes benchmarks/results/drop_sweep.md, drop_sweep.png and drop_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import layerwise as lw
from layerwise import drop as dp
from layerwise.io import write_atomic, write_json
from layerwise.report.drop import curves_figure

ORDERS = {
    "block": ["bi", "ablate_nll", "taylor_nll", "random", "contiguous"],
    "attn": ["sub_cos", "ablate_nll", "taylor_nll", "random"],
    "mlp": ["sub_cos", "ablate_nll", "taylor_nll", "random"],
    "any": ["sub_cos", "ablate_nll", "random"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1,2,4,6,8,12")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    lm = lw.load("default", device=args.device)
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=args.seq_len, samples=args.samples)
    t = time.perf_counter()
    prof = lw.profile(lm, w, ablation="exact", lens=False)
    t_prof = time.perf_counter() - t
    plans = []
    for unit, orders in ORDERS.items():
        plans += dp.sweep_plans(lm, w, sweep=ns, unit=[unit], order=orders, prof=prof, seed=0)
    plans += dp.sweep_plans(lm, w, sweep=ns, unit=["any"], order=["sub_cos"], iterative=True)
    t = time.perf_counter()
    report = dp.run(lm, w, plans=plans, eval_samples=args.eval_samples, with_speed=False)
    t_eval = time.perf_counter() - t
    # Speed depends on how many units of each kind go, not on which: time the first order's plans.
    firsts = [p for p in plans if p.order == ORDERS[p.unit][0] and not p.iterative]
    timed = dp.run(lm, w, plans=firsts, eval_samples=1, with_speed=True)
    report.original |= {
        k: v for k, v in timed.original.items() if k.endswith("tok_s") or k in ("prompt_len", "new_tokens")
    }
    speeds = {v["key"]: v for v in timed.variants}
    for v in report.variants:
        if v["key"] in speeds:
            v |= {k: x for k, x in speeds[v["key"]].items() if k.endswith(("tok_s", "speedup"))}

    out = Path(args.out)
    write_json(out / "drop_sweep.json", report.to_dict())
    fig = curves_figure(report)
    fig.savefig(out / "drop_sweep.png.part", format="png", dpi=90, bbox_inches="tight")
    (out / "drop_sweep.png.part").replace(out / "drop_sweep.png")

    o = report.original
    lines = [
        f"# drop_sweep — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, device "
        f"{lm.device}, torch {torch.__version__}",
        "",
        f"Model SmolLM2-135M-Instruct (30 blocks). Orders from one profile of {args.samples} calibration windows "
        f"x {args.seq_len} tokens ({t_prof:.0f} s with exact ablation); every row evaluated on the same "
        f"{o['n_windows']} held-out windows ({o['n_tokens']} predicted tokens); {t_eval:.0f} s for the quality of "
        f"all {len(plans)} plans.",
        f"Original: perplexity {o['ppl']:.3f} ± {o['ppl_se'] or 0:.3f}, prefill {o['prefill_tok_s']:.0f} tok/s "
        f"({o['prompt_len']}-token prompt), generation {o['generate_tok_s']:.1f} tok/s (greedy, KV cache, "
        f"{o['new_tokens']} tokens).",
        "",
        "## Held-out perplexity by units dropped",
        "",
        "| unit | order | " + " | ".join(f"n={n}" for n in ns) + " |",
        "|---|---|" + "---:|" * len(ns),
    ]
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    for v in report.variants:
        rows.setdefault((v["unit"], v["order"] + (" (iterative)" if v["iterative"] else "")), {})[v["n"]] = v
    for (unit, order), by_n in rows.items():
        lines.append(
            f"| {unit} | {order} | " + " | ".join(f"{by_n[n]['ppl']:.2f}" if n in by_n else "–" for n in ns) + " |"
        )
    lines += [
        "",
        "## Speed against the original (real smaller model; first order of each unit kind)",
        "",
        "| unit | " + " | ".join(f"n={n} prefill / generate" for n in ns) + " |",
        "|---|" + "---:|" * len(ns),
    ]
    for unit, orders in ORDERS.items():
        by_n = rows[(unit, orders[0])]
        lines.append(
            f"| {unit} | "
            + " | ".join(
                f"{by_n[n]['prefill_speedup']:.2f}x / {by_n[n]['generate_speedup']:.2f}x" for n in ns if n in by_n
            )
            + " |"
        )
    best = {
        unit: {n: min(rows[(unit, o)][n]["ppl"] for o in ORDERS[unit] if n in rows[(unit, o)]) for n in ns}
        for unit in ("attn", "mlp")
    }
    lines += ["", "## LLM-Drop's finding (attention is more droppable than MLP), best order per n", ""]
    for n in ns:
        a, m = best["attn"][n], best["mlp"][n]
        lines.append(f"- n={n}: attention {a:.2f}, MLP {m:.2f} -> {'attention' if a < m else 'MLP'} is cheaper to drop")
    holds = all(best["attn"][n] < best["mlp"][n] for n in ns)
    lines += ["", f"Finding {'holds' if holds else 'does not hold at every n'} on this model.", ""]
    text = "\n".join(lines)
    write_atomic(out / "drop_sweep.md", text)
    print(text)
    print(json.dumps({"wall_profile_s": t_prof, "wall_eval_s": t_eval}))


if __name__ == "__main__":
    main()
