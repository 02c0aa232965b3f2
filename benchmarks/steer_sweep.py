"""Steering on the default model, built-in sentiment demo: effect against cost at every block, the auto choice marked.

One process, one set of held-out prompts and pydoc windows: the unsteered
model is the baseline of every row (VADER score of greedy continuations, the
log-prob margin of positive over negative continuations, NLL and KL on
pydoc). Every block is steered alone at each swept alpha (multiples of its
own mean residual norm); ``layerwise steer``'s automatic choice (best held-out
separation, then the smallest alpha on the grid reaching the target margin on
the calibration prompts) is measured the same way. Which is which: the pairs'
calibration half fits the directions that are ranked on their held-out half;
calibration prompts choose alpha; held-out prompts give every effect below.

How close auto comes to the sweep's best: the best block at auto's own alpha
(largest VADER shift), and the best row of the whole sweep whose KL is no
more than auto's (the most effect for at most the same cost).

Usage: python benchmarks/steer_sweep.py [--alphas 0.0625,0.125,0.25 --pairs 24 --eval-samples 4 --device cpu]
Without --alphas every block is steered at the alpha auto chose (one point per block).
Writes benchmarks/results/steer_sweep.md, steer_sweep.png and steer_sweep.json.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from datetime import date
from pathlib import Path

import torch

import layerwise as lw
from layerwise import steer as sv
from layerwise.corpora import sentiment
from layerwise.io import write_atomic, write_json
from layerwise.report.steer import dose_figure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="", help="multiples to sweep at every block (default: auto's own alpha only)")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    lm = lw.load("default", device=args.device)
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=args.seq_len, samples=4)
    layers = ",".join(f"L{k}" for k in range(lm.anatomy.n_layers))
    t = time.perf_counter()
    report = sv.run(lm, sentiment.pairs(args.pairs, 0), sentiment.PROMPTS, w.evaluation[:args.eval_samples], layers=layers,
                    alpha="auto", sweep_alphas=alphas, scorer=sentiment.vader_scorer(), new_tokens=args.new_tokens, progress=True,
                    data={"pairs": "builtin:sentiment", "n_pairs": args.pairs, "eval": w.meta()})
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    out = Path(args.out)
    write_json(out / "steer_sweep.json", report.to_dict())
    fig = dose_figure(report)
    fig.savefig(out / "steer_sweep.png.part", format="png", dpi=90, bbox_inches="tight")
    (out / "steer_sweep.png.part").replace(out / "steer_sweep.png")

    rows = {r["key"]: r for r in report.rows}
    auto = rows[report.choice["chosen_key"]]
    same_alpha = [r for r in report.rows if r["alpha"] == auto["alpha"]]
    best_at_alpha = max(same_alpha, key=lambda r: r["score_shift"])
    cheaper = [r for r in report.rows if r["kl"] <= auto["kl"]]
    best_cheaper = max(cheaper, key=lambda r: r["score_shift"])
    rank = sorted(same_alpha, key=lambda r: -r["score_shift"]).index(auto) + 1
    u = report.unsteered
    a = report.choice["alpha"]

    def cell(r: dict, k: str) -> str:
        return f"{r[k]:+.3f} ± {r[k + '_se']:.3f}"

    lines = [
        f"# steer_sweep — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, device {lm.device}, torch {torch.__version__}",
        "",
        f"Model SmolLM2-135M-Instruct ({lm.anatomy.n_layers} blocks). builtin:sentiment: {args.pairs} AFINN pairs "
        f"({len(report.choice['split']['pairs_calibration'])} calibrate the directions, {len(report.choice['split']['pairs_held_out'])} rank them); "
        f"{report.choice['split']['n_prompts_calibration']} calibration prompts choose alpha, {len(report.prompts)} held-out prompts "
        f"give every effect ({args.new_tokens} greedy tokens scored by VADER); cost on {u['n_windows']} pydoc windows x {args.seq_len} tokens. "
        f"{len(report.rows)} (layer, alpha) rows in {wall:.0f} s, peak RSS {peak:.2f} GiB.",
        f"Unsteered: VADER {u['score']:+.3f} ± {u['score_se']:.3f}, pydoc NLL {u['ref_nll']:.4f} ± {u['ref_nll_se']:.4f}.",
        "",
        f"Auto choice: {report.choice['chosen_key']} (held-out Cohen's d {report.choice['ranking'][0]['d']:.2f}; alpha "
        f"{a['alpha']:g} = smallest on the grid with margin shift >= {a['target']:g} nats on calibration prompts, reached: {a['reached']}).",
        f"- auto: VADER shift {cell(auto, 'score_shift')}, margin shift {cell(auto, 'margin_shift')}, KL {auto['kl']:.4f}, Δnll {cell(auto, 'delta_nll')}",
        f"- best block at the same alpha: {best_at_alpha['key']}, VADER shift {cell(best_at_alpha, 'score_shift')}, KL {best_at_alpha['kl']:.4f}; "
        f"auto ranks {rank} of {len(same_alpha)}, ratio auto/best {auto['score_shift'] / best_at_alpha['score_shift']:.2f}",
        f"- best row with KL <= auto's: {best_cheaper['key']}, VADER shift {cell(best_cheaper, 'score_shift')}, KL {best_cheaper['kl']:.4f}; "
        f"ratio auto/best {auto['score_shift'] / best_cheaper['score_shift']:.2f}",
        "",
        "## Every block",
        "",
        "| key | held-out d | VADER shift ± se | margin shift ± se | proj shift ± se | Δnll ± se | KL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    sep = {r["units"][0]: r["d"] for r in report.choice["ranking"]}
    for r in report.rows:
        mark = " (auto)" if r is auto else ""
        lines.append(f"| {r['key']}{mark} | {sep[r['units'][0]]:.2f} | {cell(r, 'score_shift')} | {cell(r, 'margin_shift')} | "
                     f"{cell(r, 'proj_shift')} | {cell(r, 'delta_nll')} | {r['kl']:.4f} |")
    text = "\n".join(lines) + "\n"
    write_atomic(out / "steer_sweep.md", text)
    print(text)


if __name__ == "__main__":
    main()
