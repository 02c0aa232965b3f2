"""Fresh evidence for quant_pareto's verdicts: the same strategies judged on text nobody looked at during development.

The measured strategy was revised while its results were read on the first
evaluation windows of ``builtin:pydoc`` (256 tokens: the 8 after the 8
calibration windows, and once 16 more), so those windows are no longer held
out. This benchmark keeps the method's own input (the same 8 calibration
windows) and judges every plan on two report sets that played no part in
any choice:

1. ``builtin:pydoc`` evaluation windows from ``--skip`` on (default 64: the
   32 that were read during development, and as many again as a margin);
2. a second corpus never used in development (default ``builtin:fortunes``,
   quotations and verse, far from Python's documentation).

Each budget gets a verdict line per report set, naming the closest rival
with the paired NLL difference (rival minus measured, per window) and its
standard error.

Usage: python benchmarks/quant_fresh.py [--methods rtn,gptq] [--skip-gguf] [--device cuda] [--name quant_fresh]
Writes benchmarks/results/NAME.md, NAME.png and NAME.json.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import layerwise as lw
from layerwise import quantize as qz
from layerwise.evaluate import next_token_logits, paired_difference
from layerwise.quant import gguf as qg
from layerwise.quant.allocate import fixed
from layerwise.quant.measure import measure
from quant_pareto import GGUF_BUDGETS, STRATEGIES, int_uniforms, plot_and_save, table, uniform_lines, verdict

SETS = ("pydoc (fresh windows)", "second corpus")


def window_nll(lm, ids: torch.Tensor, batch_size: int) -> list[float]:
    """The original model's mean NLL of each window."""
    fn, out = next_token_logits(lm.model), []
    for b in torch.split(ids, batch_size):
        x = b.to(lm.device)
        nll = F.cross_entropy(fn(x).float(), x[:, 1:].flatten(), reduction="none")
        out += nll.view(len(b), -1).double().mean(1).tolist()
    return out


def per_set(rows: list[dict], sizes: list[int], ref: list[list[float]]) -> list[list[dict]]:
    """Split every row's per-window NLL differences into one row per report set, with that set's perplexity."""
    out = []
    start = 0
    for n, ref_w in zip(sizes, ref):
        part = []
        for r in rows:
            d = r["window_delta_nll"][start : start + n]
            mean, se = paired_difference(d, [0.0] * n)
            part.append(
                {
                    **r,
                    "window_delta_nll": d,
                    "delta_nll": mean,
                    "delta_nll_se": se,
                    "ppl": math.exp(sum(ref_w) / n + mean),
                }
            )
        out.append(part)
        start += n
    return out


def family(
    lm, w, cands, budgets, strategies, uniforms, report_ids, sizes, ref, prof, batch_size
) -> tuple[list[list[dict]], float]:
    """Measure on the calibration windows, plan every strategy, evaluate on both report sets at once
    (eight plans per pass over the windows, sharing the original's forward)."""
    t = time.perf_counter()
    meas = measure(lm, w, candidates=cands)
    rivals = [
        a for a in (u(meas) for u in uniforms) if a.bpw <= max(budgets) + 1e-9
    ]  # a uniform plan above every budget is no rival
    allocs = qz.plans(lm, w, meas, cands, budgets, strategies, prof=prof) + rivals
    _, rows, _ = qz.evaluate(lm, w, meas, cands, allocs, report_ids, batch_size=batch_size, chunk=8)
    return per_set(rows, sizes, ref), time.perf_counter() - t


def section(
    title: str, sets: list[list[dict]], budgets: list[float], refs: list[list[float]], rivals_extra=()
) -> list[str]:
    lines = []
    for name, rows, ref in zip(SETS, sets, refs):
        lines += [
            f"### {title}: {name} (original perplexity {math.exp(sum(ref) / len(ref)):.2f}, {len(ref)} windows)",
            "",
        ]
        lines += table(rows, budgets, STRATEGIES) + [""] + uniform_lines(rows)
        lines += [
            "",
            "(KL is the mean over both report sets' tokens together; perplexity and verdicts are this set's.)",
            "",
        ]
        base = [r for r in rows if r["strategy"].startswith("uniform") or r["strategy"] in rivals_extra]
        lines += verdict(rows, budgets, ["ranked:bi", "ranked:random"], base) + [""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (as in quant_pareto)")
    ap.add_argument("--skip", type=int, default=64, help="pydoc evaluation windows left out (read during development)")
    ap.add_argument("--eval-samples", type=int, default=48, help="fresh pydoc windows")
    ap.add_argument("--second", default="builtin:fortunes", help="second report corpus")
    ap.add_argument("--second-samples", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default="rtn", help="integer-code methods (comma-separated; empty for none)")
    ap.add_argument("--rtn-budgets", default="3,3.5,4,4.5")
    ap.add_argument("--gptq-budgets", default="3,3.5,4")
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--name", default="quant_fresh")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    lm = lw.load(args.model, device=args.device)
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=args.seq_len, samples=args.samples)
    fresh = w.evaluation[args.skip : args.skip + args.eval_samples]
    second_w = lw.windows(args.second, lm.tokenizer, seq_len=args.seq_len, samples=1)
    second = second_w.ids[: args.second_samples]
    report_ids, sizes = torch.cat([fresh, second]), [len(fresh), len(second)]
    refs = [window_nll(lm, x, args.batch_size) for x in (fresh, second)]
    prof = lw.profile(lm, w, ablation="none", lens=False)
    dev = (
        torch.cuda.get_device_name() if str(lm.device).startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    lines = [
        f"# quant_fresh — {date.today()} — {platform.machine()}, {dev}, torch {torch.__version__}",
        "",
        "Model SmolLM2-135M-Instruct. Calibration (the method's input, as in quant_pareto): the first "
        f"{args.samples} windows of builtin:pydoc x {args.seq_len} tokens. Development windows, never reported "
        f"here: pydoc evaluation windows 0-{args.skip - 1}. Report sets, used for nothing but this table: pydoc "
        f"evaluation windows {args.skip}-{args.skip + len(fresh) - 1} "
        f"({len(fresh)} windows) and the first {len(second)} windows of {args.second} (text sha256 "
        f"{second_w.data_hash[:16]}). Cells: perplexity (bits per weight); uniform plans are listed where they "
        "fit the largest budget, as rivals."
        + (
            ""
            if "gptq" in args.methods
            else " GPTQ is left out of this run (on a 2-core CPU it takes over an hour); "
            "`--methods gptq --skip-gguf --name quant_fresh_gptq` runs it apart, into quant_fresh_gptq.md."
        ),
        "",
    ]
    result: dict = {
        "meta": {
            "date": str(date.today()),
            "machine": platform.machine(),
            "device": dev,
            "torch": torch.__version__,
            **{
                k: getattr(args, k)
                for k in ("samples", "skip", "second", "seq_len", "methods", "rtn_budgets", "gptq_budgets")
            },
            "report_windows": sizes,
            "second_data_hash": second_w.data_hash,
            "command": sys.argv,
        },
        "families": {},
    }
    panels = []
    for method in [m for m in args.methods.split(",") if m]:
        budgets = [float(b) for b in (args.rtn_budgets if method == "rtn" else args.gptq_budgets).split(",")]
        cands = qz.candidates_for(lm, "int", method=method)
        sets, secs = family(
            lm, w, cands, budgets, STRATEGIES, int_uniforms(), report_ids, sizes, refs, prof, args.batch_size
        )
        lines += [f"## Integer codes, {method.upper()} (measurement, plans and evaluation: {secs:.0f} s)", ""]
        lines += section(method.upper(), sets, budgets, refs)
        result["families"][method] = sets
        panels += [
            (f"{method.upper()}, {name}", rows, {"ppl": math.exp(sum(ref) / len(ref))})
            for name, rows, ref in zip(SETS, sets, refs)
        ]
    if not args.skip_gguf:
        cands = qz.candidates_for(lm, "gguf")
        uniforms = [lambda m, c=t: fixed(m, {k: c for k in m.groups}, f"uniform:{c}") for t in qg.TYPES]
        sets, secs = family(
            lm, w, cands, GGUF_BUDGETS, STRATEGIES + ["q4km"], uniforms, report_ids, sizes, refs, prof, args.batch_size
        )
        lines += [
            f"## GGUF types made by llama.cpp (candidate files, measurement, plans and evaluation: {secs:.0f} s)",
            "",
        ]
        lines += section("GGUF", sets, GGUF_BUDGETS, refs, rivals_extra=("q4km",))
        result["families"]["gguf"] = sets
        panels += [
            (f"GGUF, {name}", rows, {"ppl": math.exp(sum(ref) / len(ref))}) for name, rows, ref in zip(SETS, sets, refs)
        ]
    plot_and_save(panels, Path(args.out), args.name, lines, result)


if __name__ == "__main__":
    main()
