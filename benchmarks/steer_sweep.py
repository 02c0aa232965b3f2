"""Steering on the default model, built-in sentiment demo: effect against cost at every block, and dose-response curves.

One process, one set of report prompts and pydoc windows: the unsteered
model is the baseline of every row (VADER score of greedy continuations, the
log-prob margin of positive over negative continuations, NLL and KL on
pydoc). Two sweeps, measured together:

- every block steered alone at the alpha ``layerwise steer`` chose
  automatically (best held-out separation, then the smallest alpha on the grid
  reaching the target margin on the calibration prompts), the auto choice
  marked, and how close it comes to the best block;
- dose-response: ``--alphas`` (multiples of the layer's mean residual norm) at
  the auto block and at ``--dose-layers``, blocks fixed before any run.
  Alpha 0 is the unsteered model itself (every shift and KL 0), so it is the
  origin of every curve rather than a measured row.

Which prompts are which: the 16 ``sentiment.PROMPTS`` are calibration (8,
they choose alpha) and development (8, looked at while the defaults were set;
unused here); every effect is measured on the fresh report prompts,
``sentiment.report_prompts``, built after the defaults were fixed. The pairs'
calibration half fits the directions that are ranked on their held-out half.

How close auto comes to the sweep's best: the best block at auto's own alpha
(largest VADER shift), and the best row of the whole run whose KL is no more
than auto's (the most effect for at most the same cost).

Usage: python benchmarks/steer_sweep.py [--alphas 0.0625,0.125,0.25,0.5 --dose-layers L6,L12,L18,L24 --device cpu]
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
    ap.add_argument(
        "--alphas", default="0.0625,0.125,0.25,0.5", help="dose-response multiples at the auto block and --dose-layers"
    )
    ap.add_argument(
        "--dose-layers",
        default="L6,L12,L18,L24",
        help="blocks swept over --alphas besides the auto block (fixed a priori)",
    )
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--report-prompts", type=int, default=40, help="fresh report prompts (sentiment.report_prompts)")
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
    report_prompts = sentiment.report_prompts(args.report_prompts, 0)
    t = time.perf_counter()
    report = sv.run(
        lm,
        sentiment.pairs(args.pairs, 0),
        sentiment.PROMPTS,
        w.evaluation,
        report_prompts=report_prompts,
        eval_samples=args.eval_samples,
        layers=layers,
        alpha="auto",
        sweep_alpha=alphas,
        sweep_layers=args.dose_layers,
        scorer=sentiment.vader_scorer(),
        new_tokens=args.new_tokens,
        progress=True,
        data={
            "pairs": "builtin:sentiment",
            "n_pairs": args.pairs,
            "prompts": "builtin:sentiment PROMPTS (calibration + development)",
            "report_prompts": f"builtin:sentiment report_prompts({args.report_prompts}, seed=0)",
            "eval": w.meta(),
        },
    )
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    out = Path(args.out)
    write_json(out / "steer_sweep.json", report.to_dict())
    fig = dose_figure(report)
    fig.savefig(out / "steer_sweep.png.part", format="png", dpi=90, bbox_inches="tight")
    (out / "steer_sweep.png.part").replace(out / "steer_sweep.png")
    write_atomic(out / "steer_sweep.md", _markdown(report, args, wall, peak, lm))
    print((out / "steer_sweep.md").read_text())


def _cell(r: dict, k: str) -> str:
    return f"{r[k]:+.3f} ± {r[k + '_se']:.3f}"


def _table(rows: list[dict], auto: dict, sep: dict[str, float]) -> list[str]:
    lines = [
        "| key | held-out d | VADER shift ± se | margin shift ± se | proj shift ± se | Δnll ± se | KL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " (auto)" if r is auto else ""
        lines.append(
            f"| {r['key']}{mark} | {sep[r['units'][0]]:.2f} | {_cell(r, 'score_shift')} | {_cell(r, 'margin_shift')} | "
            f"{_cell(r, 'proj_shift')} | {_cell(r, 'delta_nll')} | {r['kl']:.4f} |"
        )
    return lines


def _markdown(report: sv.SteerReport, args: argparse.Namespace, wall: float, peak: float, lm) -> str:
    rows = {r["key"]: r for r in report.rows}
    auto = rows[report.choice["chosen_key"]]
    same_alpha = [r for r in report.rows if r["alpha"] == auto["alpha"]]
    best_at_alpha = max(same_alpha, key=lambda r: r["score_shift"])
    best_cheaper = max((r for r in report.rows if r["kl"] <= auto["kl"]), key=lambda r: r["score_shift"])
    rank = sorted(same_alpha, key=lambda r: -r["score_shift"]).index(auto) + 1
    dose_units = [report.choice["chosen"][0], *[u.strip() for u in args.dose_layers.split(",") if u.strip()]]
    dose = sorted(
        (r for r in report.rows if r["units"][0] in dose_units), key=lambda r: (int(r["units"][0][1:]), r["alpha"])
    )
    sep = {r["units"][0]: r["d"] for r in report.choice["ranking"]}
    u, a, split = report.unsteered, report.choice["alpha"], report.choice["split"]
    lines = [
        f"# steer_sweep — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, device "
        f"{lm.device}, torch {torch.__version__}",
        "",
        f"Model SmolLM2-135M-Instruct ({lm.anatomy.n_layers} blocks). builtin:sentiment: {args.pairs} AFINN pairs "
        f"({len(split['pairs_calibration'])} calibrate the directions, {len(split['pairs_held_out'])} rank them).",
        f"Prompts: calibration = {split['n_prompts_calibration']} of sentiment.PROMPTS (choose alpha); "
        f"development = the other {split['n_prompts_development']} (looked at while the defaults were set, unused "
        f"here); report = {split['n_prompts_report']} fresh sentiment.report_prompts (seed 0), built after the "
        f"defaults were fixed: every effect below is on them ({args.new_tokens} greedy tokens scored by VADER). "
        f"Cost on {u['n_windows']} pydoc windows x {args.seq_len} tokens. "
        f"{len(report.rows)} (layer, alpha) rows in {wall:.0f} s, peak RSS {peak:.2f} GiB.",
        f"Unsteered: VADER {_cell(u, 'score')}, pydoc NLL {u['ref_nll']:.4f} ± {u['ref_nll_se']:.4f}.",
        "",
        f"Auto choice: {report.choice['chosen_key']} (held-out Cohen's d {report.choice['ranking'][0]['d']:.2f}; alpha "
        f"{a['alpha']:g} = smallest on the grid with margin shift >= {a['target']:g} nats on calibration prompts, "
        f"reached: {a['reached']}).",
        f"- auto: VADER shift {_cell(auto, 'score_shift')}, margin shift {_cell(auto, 'margin_shift')}, KL "
        f"{auto['kl']:.4f}, Δnll {_cell(auto, 'delta_nll')}",
        f"- best block at the same alpha: {best_at_alpha['key']}, VADER shift "
        f"{_cell(best_at_alpha, 'score_shift')}, KL {best_at_alpha['kl']:.4f}; "
        f"auto ranks {rank} of {len(same_alpha)}, ratio auto/best "
        f"{auto['score_shift'] / best_at_alpha['score_shift']:.2f}",
        f"- best row with KL <= auto's: {best_cheaper['key']}, VADER shift {_cell(best_cheaper, 'score_shift')}, "
        f"KL {best_cheaper['kl']:.4f}; ratio auto/best {auto['score_shift'] / best_cheaper['score_shift']:.2f}",
        "",
        f"## Dose-response (alphas {args.alphas} at the auto block and {args.dose_layers}; steer_sweep.png)",
        "",
        *_table(dose, auto, sep),
        "",
        f"## Every block at auto's alpha {a['alpha']:g}",
        "",
        *_table(same_alpha, auto, sep),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
