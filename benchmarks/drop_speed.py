"""Speed of dropped models against the original, alone on the machine (the speed part of drop_sweep.py).

drop_sweep.py times speed after a long quality sweep, where other work on a
small machine can disturb it; this script measures only the speed of the
first order's plans of each unit kind, in one process, original timed before
and after.

Usage: python benchmarks/drop_speed.py [--ns 4,8,12 --device cpu]
Appends a table to benchmarks/results/drop_sweep.md.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path

import torch

import layerwise as lw
from layerwise import drop as dp
from layerwise.io import write_atomic

FIRST_ORDER = {"block": "bi", "attn": "sub_cos", "mlp": "sub_cos"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="4,8,12")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" / "drop_sweep.md"))
    args = ap.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    lm = lw.load("default", device=args.device)
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=256, samples=8)
    prof = lw.profile(lm, w, ablation="none", lens=False)
    plans = []
    for unit, order in FIRST_ORDER.items():
        plans += dp.sweep_plans(lm, w, sweep=ns, unit=[unit], order=[order], prof=prof)
    keys = {f"{p.unit}/{p.order}/{len(p.units)}": p for p in plans}
    original, results = dp.measure(lm, keys, w.evaluation[:1], with_speed=True)
    lines = [
        "",
        f"## Speed alone on the machine — {date.today()} — {platform.machine()}, {torch.get_num_threads()} "
        f"threads, device {lm.device}",
        "",
        f"Original: prefill {original['prefill_tok_s']:.0f} tok/s, generation {original['generate_tok_s']:.1f} tok/s "
        "(best of 5, timed before and after the variants).",
        "",
        "| plan | prefill speedup | generation speedup | parameters that compute |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {r['prefill_speedup']:.2f}x | {r['generate_speedup']:.2f}x | {r['params_ratio']:.1%} |"
        for k, r in results.items()
    ]
    path = Path(args.results)
    write_atomic(path, path.read_text() + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
