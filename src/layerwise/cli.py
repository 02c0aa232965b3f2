"""layerwise command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LayerwiseError

EXAMPLES = """examples:
  layerwise profile                                   # default model (SmolLM2-135M-Instruct), builtin:pydoc
  layerwise profile --model ./my-llama --data notes.txt --seq-len 512 --samples 32 --out runs/p
  layerwise profile --model model.gguf --ablation taylor --device cuda --dtype bfloat16
  layerwise profile --attention --ablation none        # attention entropy / distance / sink per head
  layerwise report runs/profile/profile.json          # re-render the page from saved results (profile, drop or quantize)
  layerwise drop --n 6 --unit block --order bi --out runs/drop6        # ShortGPT
  layerwise drop --n 8 --unit any --order sub_cos --out runs/llmdrop  # LLM-Drop, attn and mlp ranked jointly
  layerwise drop --sweep 1,2,4,6,8,12 --unit attn,mlp,block --order sub_cos,ablate_nll,random --out runs/drop-sweep
  layerwise quantize --bits 5 --strategy measured --out runs/q5        # mixed GGUF types + llama-quantize recipe
  layerwise quantize --sweep 4.6,5,5.5,6 --strategy measured,ranked:bi,uniform,q4km --out runs/q-sweep
  layerwise quantize --format int --group-size 64 --sweep 2.5,3,3.5,4 --strategy measured,uniform --out runs/int
  layerwise quantize --format int --method gptq --bits 4.5 --out runs/q45-ct  # compressed-tensors checkpoint
  layerwise steer --data builtin:sentiment --export gguf --out runs/steer     # layer and strength chosen, llama.cpp control vector
  layerwise steer --pos pos.txt --neg neg.txt --layers L6,L12,L18 --sweep-alpha 0.125,0.25,0.5 --out runs/steer-sweep
"""


def _inputs(p: argparse.ArgumentParser, *, samples_help: str, out: str) -> None:
    """Options every model-running subcommand shares: model, data, windows, device, output."""
    p.add_argument("--model", default="default", help="HF directory, hub id, FILE.gguf or 'default'")
    p.add_argument("--data", default="builtin:pydoc", help="FILE.txt, DIR, FILE.jsonl or builtin:pydoc")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16, help=samples_help)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    p.add_argument("--out", default=out)
    p.add_argument("--json", action="store_true", help="print machine-readable results")


def _action(sub, name: str, help: str, samples_help: str) -> argparse.ArgumentParser:
    """A subcommand that changes the model and checks the result on held-out windows."""
    p = sub.add_parser(name, help=help, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _inputs(p, samples_help=samples_help, out=f"runs/{name}")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out windows for perplexity and KL")
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerwise", description="Measure how much every layer and sublayer matters.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile", help="measure every block and sublayer", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _inputs(pr, samples_help="calibration windows", out="runs/profile")
    pr.add_argument("--ablation", choices=["exact", "taylor", "none"], default="exact")
    pr.add_argument("--no-lens", action="store_true", help="skip the logit lens (one head projection per block)")
    pr.add_argument("--attention", action="store_true",
                    help="per-head attention entropy, query-key distance and sink mass (runs eager attention: slower, more memory)")
    dr = _action(sub, "drop", "remove blocks or sublayers, save the smaller model, measure cost and speedup",
                 "calibration windows (for measuring the order)")
    what = dr.add_mutually_exclusive_group()
    what.add_argument("--n", type=int, help="how many units to drop (default 4)")
    what.add_argument("--sweep", help="comma-separated counts, e.g. 1,2,4,8: evaluate each, save no model")
    what.add_argument("--units", help="drop exactly these units, e.g. L3,L7.attn")
    dr.add_argument("--unit", default="block", help="block, attn, mlp or any (attn and mlp ranked jointly); comma-separated with --sweep")
    dr.add_argument("--order", default="bi", help="a Profile metric (bi, sub_cos, ablate_nll, taylor_nll...), random or contiguous; comma-separated with --sweep")
    dr.add_argument("--iterative", action="store_true", help="re-measure the order's metric after each drop")
    dr.add_argument("--profile", help="profile.json to rank by (must come from this model); measured if absent")
    dr.add_argument("--seed", type=int, default=0, help="for --order random")
    dr.add_argument("--export", default="hf", help="hf, gguf (GGUF source models only), both as hf,gguf, or none")
    dr.add_argument("--no-speed", action="store_true", help="skip the tokens-per-second measurement")
    qz = _action(sub, "quantize", "mixed precision at any fractional bit budget, evaluated and exported",
                 "calibration windows (for the measurement)")
    budget = qz.add_mutually_exclusive_group()
    budget.add_argument("--bits", type=float, help="target bits per weight over the quantized tensors, scales included (e.g. 4.6)")
    budget.add_argument("--sweep", help="comma-separated budgets, e.g. 4.6,5,5.5: evaluate each, export nothing")
    qz.add_argument("--strategy", default="measured", help="measured, ranked:METRIC (e.g. ranked:bi), ranked:random, uniform or q4km; comma-separated")
    qz.add_argument("--format", default="gguf", choices=["gguf", "int"], help="llama.cpp's GGUF types, or integer codes with group scales")
    qz.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="--format int: round to nearest or GPTQ")
    qz.add_argument("--group-size", type=int, help="--format int: one group size (default: candidates at 32, 64 and 128)")
    qz.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                    help="--format int: symmetric codes (no zero points); the default with --export hf, which needs them")
    qz.add_argument("--export", help="gguf,recipe (--format gguf) or hf (--format int: compressed-tensors); the format's all for one plan; none")
    qz.add_argument("--profile", help="profile.json for ranked:METRIC (must come from this model); measured if absent")
    qz.add_argument("--seed", type=int, default=0, help="for ranked:random")
    _steer_parser(sub)
    rp = sub.add_parser("report", help="re-render report.html from a saved profile, drop, quantize or steer result")
    rp.add_argument("profile", metavar="RESULT", help="profile.json, eval.json or the folder holding them")
    rp.add_argument("--out", help="HTML path (default: report.html beside the profile)")
    return p


def _steer_parser(sub) -> None:
    """``layerwise steer``: --data names the contrastive pairs here; --eval-data the neutral text that measures the cost."""
    st = _action(sub, "steer", "activation steering at a measured layer and strength, its effect and cost, llama.cpp export",
                 "pydoc windows set aside before the evaluation windows (not used)")
    st.set_defaults(data=None, seq_len=128)
    for a in st._actions:
        if a.dest == "data":
            a.help = "contrastive pairs: builtin:sentiment or pairs.jsonl ({\"positive\": ..., \"negative\": ...} per line)"
    st.add_argument("--pos", help="positive texts, one per line (paired line by line with --neg)")
    st.add_argument("--neg", help="negative texts, one per line")
    st.add_argument("--n-pairs", type=int, default=64, help="pairs drawn from builtin:sentiment")
    st.add_argument("--prompts", help="held-out prompts, one per line (default: builtin:sentiment's neutral prompts); half calibrate --alpha auto")
    st.add_argument("--eval-data", default="builtin:pydoc", help="neutral text for the cost (NLL, KL): FILE.txt, DIR, FILE.jsonl or builtin:pydoc")
    st.add_argument("--method", default="diffmean", choices=["diffmean", "pca", "probe"])
    st.add_argument("--probe", help="--method probe: a folder saved by `layerwise probe`")
    st.add_argument("--read", default="last", choices=["last", "mean"], help="read the last token or the mean over tokens")
    st.add_argument("--layers", default="auto", help="auto (best held-out separation), L12, L10-L14 (one vector over the range) or L6,L12,L18 (each)")
    st.add_argument("--alpha", default="auto", help="auto or a multiple of the layer's mean residual norm, e.g. 0.25")
    st.add_argument("--target", type=float, default=2.0, help="--alpha auto: log-prob margin (nats) to reach on the calibration prompts")
    st.add_argument("--sweep-alpha", help="comma-separated multiples to evaluate at every layer, e.g. 0,0.125,0.25,0.5")
    st.add_argument("--new-tokens", type=int, default=24, help="tokens generated per prompt for the independent scorer")
    st.add_argument("--seed", type=int, default=0, help="pair and prompt splits, and builtin:sentiment's draw")
    st.add_argument("--export", default="none", help="gguf (a llama.cpp control vector) or none; vector.safetensors is always saved")


def _summary(prof) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = prof.agreement.get("reference", "ablate_nll")
    console = Console(stderr=False)
    ranked = sorted((u for u in prof.units if u.metrics.get(ref) is not None), key=lambda u: u.metrics[ref])
    t = Table(title=f"least and most important units by {ref}")
    for c in ("unit", ref, "bi / sub_cos", "rel_update"):
        t.add_column(c, justify="right")
    for u in ranked[:5] + ranked[-5:]:
        sim = u.metrics.get("bi") if u.kind == "block" else u.metrics.get("sub_cos")
        t.add_row(u.name, f"{u.metrics[ref]:.4g}", "–" if sim is None else f"{sim:.4g}", f"{u.metrics['rel_update']:.4g}")
    console.print(t)
    a = Table(title=f"Spearman rho with {ref}")
    a.add_column("metric")
    kinds = list(prof.agreement.get("by_kind", {}))
    for k in kinds:
        a.add_column(k, justify="right")
    metrics = sorted({m for row in prof.agreement.get("by_kind", {}).values() for m in row})
    for m in metrics:
        cells = []
        for k in kinds:
            rho = (prof.agreement["by_kind"][k].get(m) or {}).get("rho")
            cells.append("–" if rho is None else f"{rho:+.2f}")
        a.add_row(m, *cells)
    console.print(a)


def _load(args: argparse.Namespace, attn_implementation: str | None = None):
    """The model and the windows the shared options name."""
    from . import load, windows

    lm = load(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
              attn_implementation=attn_implementation)
    return lm, windows(args.data, lm.tokenizer, seq_len=args.seq_len, samples=args.samples, max_len=lm.anatomy.context_length)


def _profile(args: argparse.Namespace) -> int:
    from . import profile
    from .report import write_report

    lm, w = _load(args, attn_implementation="eager" if args.attention else None)
    prof = profile(lm, w, ablation=args.ablation, batch_size=args.batch_size, lens=not args.no_lens,
                   attention=args.attention, progress=not args.json)
    out = Path(args.out)
    path = prof.save(out)
    html = write_report(prof, out / "report.html")
    if args.json:
        print(json.dumps({"profile": str(path), "report": str(html), **prof.to_dict()}))
    else:
        _summary(prof)
        print(f"wrote {path}, {out / 'profile.csv'} and {html}")
    return 0


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sweep(text: str, cast: type, what: str) -> list:
    """The values of a --sweep list, sorted and without repeats."""
    try:
        return sorted({cast(t) for t in _split(text)})
    except ValueError:
        raise LayerwiseError(f"--sweep takes comma-separated {what} (got {text!r})") from None


def _drop(args: argparse.Namespace) -> int:
    from . import drop as dp
    from .profile import Profile

    lm, w = _load(args)
    prof = Profile.load(args.profile) if args.profile else None
    if prof is not None:
        dp.check_profile(prof, lm)
    common = dict(prof=prof, iterative=args.iterative, seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    if args.sweep:
        plans = dp.sweep_plans(lm, w, ns=_sweep(args.sweep, int, "whole numbers, e.g. 1,2,4"), units=_split(args.unit), orders=_split(args.order), **common)
    elif args.units:
        plans = [dp.given(lm.anatomy, _split(args.units))]
    else:
        plans = [dp.choose(lm, w, n=args.n or 4, unit=args.unit, order=args.order, **common)]
    export = () if args.sweep or args.export == "none" else tuple(_split(args.export))
    report = dp.run(lm, w, plans, out=args.out, export=export, eval_samples=args.eval_samples, batch_size=args.batch_size,
                    with_speed=not args.no_speed, progress=not args.json)
    out = Path(args.out)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    _drop_summary(report)
    written = [str(out / "eval.json"), str(out / "report.html")] + [v["path"] for v in report.exports.values()]
    print("wrote " + ", ".join(written))
    return 0


def _drop_summary(report) -> None:
    from rich.console import Console
    from rich.table import Table

    o = report.original
    t = Table(title=f"held-out perplexity (original {o['ppl']:.3f} ± {o['ppl_se'] or 0:.3f})")
    for c in ("plan", "units", "ppl", "Δnll ± se", "KL", "params", "prefill ×", "generate ×"):
        t.add_column(c, justify="right")
    for v in report.variants:
        speed = [f"{v[k]:.2f}" if v.get(k) is not None else "–" for k in ("prefill_speedup", "generate_speedup")]
        units = ", ".join(v["units"]) if len(v["units"]) <= 6 else f"{len(v['units'])} units"
        t.add_row(v["key"], units, f"{v['ppl']:.3f}", f"{v['delta_nll']:+.4f} ± {v['delta_nll_se'] or 0:.4f}",
                  f"{v['kl']:.4f}", f"{v['params_ratio']:.1%}", *speed)
    Console().print(t)


def _quantize(args: argparse.Namespace) -> int:
    from . import quantize as qz
    from .profile import Profile

    lm, w = _load(args)
    prof = Profile.load(args.profile) if args.profile else None
    budgets = _sweep(args.sweep, float, "bits per weight, e.g. 4.6,5,5.5") if args.sweep else ([args.bits] if args.bits is not None else [])
    export = None if args.export is None else (() if args.export == "none" else tuple(_split(args.export)))
    report = qz.run(lm, w, budgets=budgets, strategies=_split(args.strategy), family=args.format, method=args.method,
                    group_size=args.group_size, symmetric=args.symmetric, export=export, out=args.out, prof=prof, eval_samples=args.eval_samples,
                    seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    out = Path(args.out)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    _quant_summary(report)
    written = [str(out / n) for n in ("plan.json", "eval.json", "measurement.json", "report.html")] + [v["path"] for v in report.exports.values()]
    print("wrote " + ", ".join(written))
    return 0


def _quant_summary(report) -> None:
    from rich.console import Console
    from rich.table import Table

    o = report.original
    t = Table(title=f"held-out perplexity (original {o['ppl']:.3f} ± {o['ppl_se'] or 0:.3f})")
    for c in ("plan", "bits/weight", "model bits/weight", "ppl", "Δnll ± se", "predicted Δnll", "KL"):
        t.add_column(c, justify="right")
    for r in report.rows:
        t.add_row(r["plan"], f"{r['bpw']:.3f}", f"{r['bpw_model']:.3f}", f"{r['ppl']:.3f}",
                  f"{r['delta_nll']:+.4f} ± {r['delta_nll_se'] or 0:.4f}", f"{r['predicted_delta_nll']:.4f}", f"{r['kl']:.4f}")
    Console().print(t)
    for name, e in report.exports.items():
        ppl = [f"{who} perplexity {e[k]:.3f}" for k, who in (("llama_cpp_ppl", "llama.cpp"), ("transformers_ppl", "transformers")) if k in e]
        extra = ", " + ", ".join(ppl) if ppl else ""
        print(f"{name}: {e['path']}{extra}")


def _steer(args: argparse.Namespace) -> int:
    from . import load, windows
    from . import steer as sv

    alpha = args.alpha if args.alpha == "auto" else _number(args.alpha, "--alpha", "auto or a multiple such as 0.25")
    sweep = [_number(t, "--sweep-alpha", "comma-separated multiples such as 0,0.25,0.5") for t in _split(args.sweep_alpha or "")]
    for a in [alpha, *sweep]:
        if a != "auto":
            sv._check_alpha(a)
    if args.new_tokens < 1:
        raise LayerwiseError(f"--new-tokens must be at least 1 (got {args.new_tokens})")
    pairs = sv.read_pairs(data=args.data, pos=args.pos, neg=args.neg, n=args.n_pairs, seed=args.seed)
    prompts = sv._lines(Path(args.prompts)) if args.prompts else None
    if prompts is None:
        from .corpora.sentiment import PROMPTS

        prompts = list(PROMPTS)
    scorer = None
    if args.data == "builtin:sentiment":
        from .corpora.sentiment import vader_scorer

        scorer = vader_scorer()
    lm = load(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    w = windows(args.eval_data, lm.tokenizer, seq_len=args.seq_len, samples=args.samples, max_len=lm.anatomy.context_length)
    data = {"pairs": args.data or f"{args.pos} / {args.neg}", "n_pairs": len(pairs), "prompts": args.prompts or "builtin:sentiment prompts",
            "scorer": "vaderSentiment compound" if scorer else None, "eval": w.meta()}
    report = sv.run(lm, pairs, prompts, w.evaluation[:args.eval_samples], method=args.method, layers=args.layers, alpha=alpha,
                    sweep_alphas=sweep, read=args.read, seed=args.seed, target=args.target, probe=args.probe, scorer=scorer,
                    new_tokens=args.new_tokens, export=() if args.export == "none" else tuple(_split(args.export)), out=args.out,
                    batch_size=args.batch_size, progress=not args.json, data=data)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    _steer_summary(report)
    print("wrote " + ", ".join([str(Path(args.out) / n) for n in ("vector.safetensors", "steer.json", "report.html")] + [e["path"] for e in report.exports.values()]))
    return 0


def _number(text: str, option: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LayerwiseError(f"{option} takes {what} (got {text!r})") from None


def _steer_summary(report) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"steering, chosen {report.choice['chosen_key']} (alpha x mean residual norm); effects on {len(report.prompts)} held-out prompts")
    for c in ("key", "score shift ± se", "margin shift ± se", "proj shift ± se", "Δnll ± se", "KL"):
        t.add_column(c, justify="right")

    def pm(r: dict, k: str) -> str:
        return "–" if k not in r else f"{r[k]:+.3f} ± {r.get(k + '_se') or 0:.3f}"

    for r in report.rows:
        t.add_row(r["key"], pm(r, "score_shift"), pm(r, "margin_shift"), pm(r, "proj_shift"), pm(r, "delta_nll"), f"{r['kl']:.4f}")
    Console().print(t)


def _report(args: argparse.Namespace) -> int:
    """Re-render the page of a saved profile, drop or quantize result (its folder or its JSON)."""
    src = Path(args.profile)
    folder = src if src.is_dir() else src.parent
    out = Path(args.out) if args.out else folder / "report.html"
    if (folder / "steer.json").exists():
        from .report.steer import write_steer_report
        from .steer import SteerReport

        path = write_steer_report(SteerReport.load(folder), out)
    elif (folder / "plan.json").exists():
        from .quantize import QuantReport
        from .report.quant import write_quant_report

        path = write_quant_report(QuantReport.load(folder), out)
    elif (folder / "eval.json").exists() and not (folder / "profile.json").exists():
        from .drop import DropReport
        from .report.drop import write_drop_report

        path = write_drop_report(DropReport.load(folder), out)
    else:
        from .profile import Profile
        from .report import write_report

        path = write_report(Profile.load(args.profile), out)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"profile": _profile, "drop": _drop, "quantize": _quantize, "steer": _steer, "report": _report}[args.cmd](args)
    except LayerwiseError as exc:
        print(f"layerwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerwise: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
