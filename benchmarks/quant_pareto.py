"""Mixed precision on the default model: held-out perplexity against bits per weight, per strategy.

One process, same calibration and held-out windows for every row; the
original model is the baseline. Three parts:

1. Integer codes with group scales (RTN, then GPTQ): uniform configs, the
   Layer-Wise-Quantization ranking by ``bi``, the same with a random block
   order, and the measured plan, at fractional budgets.
2. Layer-Wise Quantization's ordering curve: the fraction of blocks lowered
   from 4 to 2 bits (group 64) in importance order, in random order and in
   reversed order, against perplexity.
3. GGUF types made by llama.cpp: uniform types, ranked, random and measured
   plans, and llama.cpp's own Q4_K_M rule; the measured plan and the uniform
   type of the same size are exported and run in llama-cpp-python.

Usage: python benchmarks/quant_pareto.py [--samples 8 --eval-samples 8 --device cpu] [--methods rtn,gptq] [--skip-gguf]
       [--name quant_pareto]
Writes benchmarks/results/NAME.md, NAME.png and NAME.json.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import layerwise as lw
from layerwise import quantize as qz
from layerwise.evaluate import paired_difference
from layerwise.io import write_atomic, write_json
from layerwise.quant import gguf as qg
from layerwise.quant import strategies
from layerwise.quant.allocate import fixed
from layerwise.quant.measure import measure
from layerwise.quant.rtn import QConfig

INT_BUDGETS = [2.5, 3.0, 3.25, 3.5, 4.0, 4.5, 5.0]
GGUF_BUDGETS = [4.1, 4.25, 4.5, 4.75]
STRATEGIES = ["measured", "ranked:bi", "ranked:random"]


def family_rows(lm, w, cands, budgets, strategies, eval_ids, prof, extra=()):
    """Measure once, plan every strategy at every budget, evaluate: (rows, original, seconds to measure and plan,
    measurement)."""
    t = time.perf_counter()
    meas = measure(lm, w, candidates=cands)
    allocs = qz.plans(lm, w, meas, cands, budgets, strategies, prof=prof)
    plan_s = time.perf_counter() - t
    allocs += [a(meas) for a in extra]
    original, rows, _ = qz.evaluate(lm, w, meas, cands, allocs, eval_ids)
    return rows, original, plan_s, meas


def int_uniforms(within: float | None = None) -> list:
    """Uniform integer plans as rivals: every bit width and group size, or only those within ``within`` bits per
    weight."""
    configs = [f"a{b}g{g}" for b in (2, 3, 4, 5, 8) for g in (32, 64, 128)]
    if within is not None:  # a uniform plan above every budget is no rival (and a GPTQ one costs a pass)
        configs = [c for c in configs if QConfig(int(c[1]), int(c[3:])).bits_per_weight(576) <= within]
    return [lambda m, c=c: fixed(m, {k: c for k in m.groups}, f"uniform:{c}") for c in configs]


def lwq_curve(lm, w, meas, cands, eval_ids, order: list[int]) -> list[dict]:
    """Blocks lowered from a4g64 to a2g64 in three orders, 0 to all of them."""
    L = lm.anatomy.n_layers
    orders = {"importance (bi)": order, "random": random.Random(0).sample(order, L), "reversed": order[::-1]}
    allocs = []
    for name, o in orders.items():
        for k in sorted({round(f * L) for f in (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)}):
            low = set(o[:k])
            configs = {g: ("a2g64" if e["layer"] in low else "a4g64") for g, e in meas.groups.items()}
            allocs.append(fixed(meas, configs, f"lwq {name} k={k}"))
    _, rows, _ = qz.evaluate(lm, w, meas, cands, allocs, eval_ids)
    for r in rows:
        r["order"], r["k"] = r["plan"].split(" k=")[0][4:], int(r["plan"].split("k=")[1])
    return rows


def table(rows: list[dict], budgets: list[float], families: list[str]) -> list[str]:
    out = ["| strategy | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for fam in families:
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["strategy"] == fam and r["target_bpw"] == b), None)
            cells.append("–" if r is None else f"{r['ppl']:.2f} ({r['bpw']:.2f})")
        out.append(f"| {fam} | " + " | ".join(cells) + " |")
    return out


def uniform_lines(rows: list[dict]) -> list[str]:
    out = ["| uniform config | bits per weight | perplexity | KL |", "|---|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["strategy"].startswith("uniform")), key=lambda r: r["bpw"]):
        out.append(f"| {r['strategy'][8:]} | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['kl']:.4f} |")
    return out


def verdict(rows: list[dict], budgets: list[float], others: list[str], baselines: list[dict]) -> list[str]:
    """For each budget: does the measured plan beat every other plan that fits the same budget?

    Each rival is named with the paired difference in held-out NLL (rival minus
    measured, per window) and its standard error, so a win inside the noise
    reads as one.
    """
    out = []
    for b in budgets:
        m = next((r for r in rows if r["strategy"] == "measured" and r["target_bpw"] == b), None)
        if m is None:
            continue
        rivals = [r for r in rows if r["strategy"] in others and r["target_bpw"] == b] + [
            r for r in baselines if r["bpw"] <= b + 1e-9
        ]
        diffs = {r["plan"]: paired_difference(r["window_delta_nll"], m["window_delta_nll"]) for r in rivals}
        worse = [p for p, (d, _) in diffs.items() if d < 0]
        closest = min(diffs.items(), key=lambda kv: kv[1][0]) if diffs else None
        line = f"- {b:g} bits: measured {m['ppl']:.2f}; " + (
            f"beaten by {', '.join(worse)}" if worse else f"best of {len(rivals) + 1} plans within the budget"
        )
        if closest:
            (p, (d, se)) = closest
            line += f"; closest rival {p}: NLL {d:+.4f} ± {se or 0:.4f} against measured"
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--methods", default="rtn,gptq", help="integer-code methods to run (the ordering curve comes with rtn)"
    )
    ap.add_argument(
        "--gptq-budgets",
        default=",".join(f"{b:g}" for b in INT_BUDGETS),
        help="GPTQ budgets (each GPTQ plan is a full block-by-block GPTQ pass: minutes on a CPU)",
    )
    ap.add_argument(
        "--skip-gguf", action="store_true", help="leave out the llama.cpp part (a machine without llama-cpp-python)"
    )
    ap.add_argument("--name", default="quant_pareto", help="stem of the result files")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    lm = lw.load("default", device=args.device)
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=args.seq_len, samples=args.samples)
    eval_ids = w.evaluation[: args.eval_samples]
    prof = lw.profile(lm, w, ablation="none", lens=False)
    result: dict = {
        "meta": {
            "date": str(date.today()),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "device": str(lm.device),
            "torch": torch.__version__,
            "samples": args.samples,
            "eval_samples": args.eval_samples,
            "seq_len": args.seq_len,
        }
    }
    lines = [
        f"# quant_pareto — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, device "
        f"{lm.device}, torch {torch.__version__}",
        "",
        f"Model SmolLM2-135M-Instruct (30 blocks). Calibration: {args.samples} windows x {args.seq_len} tokens; "
        f"every row evaluated on the same {args.eval_samples} held-out windows. Cells: held-out perplexity "
        "(achieved bits per weight over the quantized tensors, scales and zero points included). The default "
        "model was published as GGUF Q4_1 (4-bit codes on a group-32 grid), "
        "so 4-bit group-32 formats are nearly lossless on it; the integer part therefore also offers group sizes "
        "64 and 128.",
        "",
    ]
    ints = {}
    for method in args.methods.split(",") if args.methods else []:
        cands = qz.candidates_for(lm, "int", method=method)
        budgets = INT_BUDGETS if method == "rtn" else [float(b) for b in args.gptq_budgets.split(",")]
        rows, original, plan_s, meas = family_rows(
            lm, w, cands, budgets, STRATEGIES, eval_ids, prof, int_uniforms(max(budgets) if method == "gptq" else None)
        )
        ints[method] = {"rows": rows, "original": original, "measure_and_plan_s": plan_s}
        lines += [
            f"## Integer codes, {method.upper()} (original perplexity {original['ppl']:.2f})",
            "",
            f"Measurement of 120 fused groups x {len(cands.names)} configs plus all plans: {plan_s:.0f} s.",
            "",
        ]
        lines += table(rows, budgets, STRATEGIES) + [""] + uniform_lines(rows) + [""]
        lines += verdict(
            rows, budgets, ["ranked:bi", "ranked:random"], [r for r in rows if r["strategy"].startswith("uniform")]
        ) + [""]
        if method == "rtn":
            order = strategies.block_order(lm, w, "bi", prof)
            curve = lwq_curve(lm, w, meas, cands, eval_ids, order)
            result["lwq_curve"] = curve
            lines += [
                "## Layer-Wise Quantization ordering curve (RTN, a4g64 -> a2g64)",
                "",
                "| blocks lowered | " + " | ".join(dict.fromkeys(r["order"] for r in curve)) + " |",
                "|---:|---:|---:|---:|",
            ]
            for k in sorted({r["k"] for r in curve}):
                lines.append(f"| {k} | " + " | ".join(f"{r['ppl']:.2f}" for r in curve if r["k"] == k) + " |")
            lines.append("")
    result["int"] = ints
    panels = [(f"integer codes, {m.upper()}", ints[m]["rows"], ints[m]["original"]) for m in ints]
    if not args.skip_gguf:
        panels.append(gguf_part(lm, w, prof, eval_ids, lines, result))
    plot_and_save(panels, Path(args.out), args.name, lines, result)


def gguf_part(lm, w, prof, eval_ids, lines: list[str], result: dict) -> tuple[str, list[dict], dict]:
    """llama.cpp's types: every strategy, Q4_K_M, and the files run in llama-cpp-python; returns the plot panel."""
    cands = qz.candidates_for(lm, "gguf")
    uniforms = [lambda m, c=t: fixed(m, {k: c for k in m.groups}, f"uniform:{c}") for t in qg.TYPES]
    rows, original, plan_s, meas = family_rows(
        lm, w, cands, GGUF_BUDGETS, STRATEGIES + ["q4km"], eval_ids, prof, uniforms
    )
    q4 = next(r for r in rows if r["strategy"] == "q4km")
    same = qz.plans(lm, w, meas, cands, [q4["bpw"]], ["measured"])
    _, extra, _ = qz.evaluate(lm, w, meas, cands, same, eval_ids)
    rows += extra
    lines += [
        f"## GGUF types made by llama.cpp (original perplexity {original['ppl']:.2f})",
        "",
        f"Candidate files and measurement of 210 tensors x {len(cands.names)} types plus all plans: {plan_s:.0f} s. "
        "llama.cpp stores other types where a row of 576 cannot hold 256-blocks (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, "
        "Q5_K -> Q5_1, Q6_K -> Q8_0 for every tensor but ffn_down), so the cheapest plan is about 4.03 bits per "
        "weight.",
        "",
    ]
    lines += table(rows, GGUF_BUDGETS, STRATEGIES) + [""] + uniform_lines(rows) + [""]
    lines += [
        f"q4km (llama.cpp's Q4_K_M rule): {q4['ppl']:.2f} at {q4['bpw']:.3f} bits per weight; measured at the "
        f"same size: {extra[0]['ppl']:.2f} at {extra[0]['bpw']:.3f}.",
        "",
    ]
    lines += verdict(
        rows,
        GGUF_BUDGETS,
        ["ranked:bi", "ranked:random"],
        [r for r in rows if r["strategy"].startswith("uniform") or r["strategy"] == "q4km"],
    ) + [""]
    # Files in llama.cpp: the measured plan against the uniform type of the same budget.
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for a in qz.plans(lm, w, meas, cands, [4.5], ["measured", "uniform"]) + [qg.q4km(meas, lm.anatomy)]:
            path = qg.export(cands, qg.tensor_types(meas, a, lm.anatomy), Path(tmp) / "m.gguf")
            nll = qg.llama_nll(path, eval_ids)
            ours = next(r for r in rows + extra if r["plan"] == qz.label(a))
            files.append(
                {
                    "plan": qz.label(a),
                    "bytes": path.stat().st_size,
                    "llama_cpp_ppl": math.exp(sum(nll) / len(nll)),
                    "layerwise_ppl": ours["ppl"],
                }
            )
    lines += [
        "### The GGUF files in llama-cpp-python",
        "",
        "| plan | file bytes | llama.cpp perplexity | layerwise perplexity (same weights) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {f['plan']} | {f['bytes']} | {f['llama_cpp_ppl']:.2f} | {f['layerwise_ppl']:.2f} |" for f in files
    ] + [""]
    result["gguf"] = {"rows": rows, "original": original, "measure_and_plan_s": plan_s, "files": files}
    return "GGUF types (llama.cpp)", rows, original


def plot_and_save(
    panels: list[tuple[str, list[dict], dict]], out: Path, name: str, lines: list[str], result: dict
) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (title, rr, orig) in zip(axes.flat, panels):
        for fam in dict.fromkeys("uniform" if r["strategy"].startswith("uniform") else r["strategy"] for r in rr):
            pts = sorted(
                (r["bpw"], r["ppl"])
                for r in rr
                if ("uniform" if r["strategy"].startswith("uniform") else r["strategy"]) == fam
            )
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1 if fam != "uniform" else 0, label=fam)
        ax.axhline(orig["ppl"], color="k", lw=0.8, ls="--", label="original")
        ax.set_yscale("log")
        ax.set_ylim(orig["ppl"] * 0.95, orig["ppl"] * 4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("bits per weight", fontsize=8)
        ax.set_ylabel("held-out perplexity", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(out / f"{name}.png", buf.getvalue())
    lines += [f"![perplexity against bits]({name}.png)", ""]
    write_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    write_json(out / f"{name}.json", result)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
