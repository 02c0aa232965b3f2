"""layerwise command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

from .errors import LayerwiseError

#: Each subcommand's examples (its --help shows only its own; the top-level help shows them all).
EXAMPLES: dict[str, str] = {
    "profile": """\
  layerwise profile                                   # default model (SmolLM2-135M-Instruct), builtin:pydoc
  layerwise profile --model ./my-llama --data notes.txt --seq-len 512 --samples 32 --out runs/p
  layerwise profile --model model.gguf --ablation taylor --device cuda --dtype bfloat16
  layerwise profile --attention --ablation none        # attention entropy / distance / sink per head
""",
    "drop": """\
  layerwise drop --n 6 --unit block --order bi --out runs/drop6        # ShortGPT
  layerwise drop --n 8 --unit any --order sub_cos --out runs/llmdrop  # LLM-Drop, attn and mlp ranked jointly
  layerwise drop --n 4 --order lens_kl:desc                            # a metric with no importance direction needs one
  layerwise drop --sweep 1,2,4,6,8,12 --unit attn,mlp,block --order sub_cos,ablate_nll,random --out runs/drop-sweep
  layerwise drop --plan runs/drop6/plan.json --export hf,gguf --out runs/drop6-again  # a saved plan, not measured again
""",
    "quantize": """\
  layerwise quantize --bits 5 --strategy measured --out runs/q5        # mixed GGUF types + llama-quantize recipe
  layerwise quantize --sweep 4.6,5,5.5,6 --strategy measured,ranked:bi,uniform,q4km --out runs/q-sweep
  layerwise quantize --format int --group-size 64 --sweep 2.5,3,3.5,4 --strategy measured,uniform --out runs/int
  layerwise quantize --format int --method gptq --bits 4.5 --out runs/q45-ct  # compressed-tensors checkpoint
  layerwise quantize --plan runs/q5/plan.json --export gguf --out runs/q5-again  # a saved plan, not measured again
  layerwise quantize --plan "runs/q-sweep/plan.json#measured@5" --export recipe   # one plan of a sweep
""",
    "report": """\
  layerwise report runs/profile/profile.json          # re-render the page from saved results (profile, drop or quantize)
""",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option (where there is one to show), examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _examples(*cmds: str) -> str:
    return "examples:\n" + "".join(EXAMPLES[c] for c in cmds)


#: The flag that sets each API argument named in a LayerwiseError (see ``errors.py``).
FLAGS = {"n": "--n", "unit": "--unit", "units": "--units", "order": "--order", "iterative": "--iterative", "export": "--export",
         "sweep": "--sweep", "prof": "--profile", "seed": "--seed", "family": "--format", "method": "--method",
         "group_size": "--group-size", "symmetric": "--symmetric", "strategies": "--strategy", "budgets": "--bits or --sweep",
         "ablation": "--ablation", "seq_len": "--seq-len", "samples": "--samples", "batch_size": "--batch-size",
         "eval_samples": "--eval-samples", "key": "--plan FILE#KEY", "windows": "--data, --seq-len and --samples",
         "attention": "--attention", "dtype": "--dtype", "device": "--device", "ref": "--model"}


def _flags(message: str) -> str:
    """An API error message as the CLI's user reads it: each `argument` becomes its flag."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m.group(1), m.group(1)), message)


def _inputs(p: argparse.ArgumentParser, *, samples_help: str, out: str) -> None:
    """Options every model-running subcommand shares: model, data, windows, device, output."""
    p.add_argument("--model", default="default", help="HF directory, hub id, FILE.gguf or 'default'")
    p.add_argument("--data", default="builtin:pydoc", help="FILE.txt, DIR, FILE.jsonl or builtin:pydoc")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--samples", type=int, default=16, help=samples_help)
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the weights' dtype when loaded")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--json", action="store_true", help="print machine-readable results")


def _action(sub, name: str, help: str, samples_help: str) -> argparse.ArgumentParser:
    """A subcommand that changes the model and checks the result on held-out windows."""
    p = sub.add_parser(name, help=help, description=help, epilog=_examples(name), formatter_class=_Help)
    _inputs(p, samples_help=samples_help, out=f"runs/{name}")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out windows for perplexity and KL")
    return p


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="layerwise", description="Measure how much every layer and sublayer matters.",
                                epilog=_examples(*EXAMPLES), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"layerwise {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile", help="measure every block and sublayer", description="Measure every block and sublayer.",
                        epilog=_examples("profile"), formatter_class=_Help)
    _inputs(pr, samples_help="calibration windows", out="runs/profile")
    pr.add_argument("--seed", type=int, default=0, help="seeds torch before the pass (recorded in profile.json)")
    pr.add_argument("--ablation", choices=["exact", "taylor", "none"], default="exact")
    pr.add_argument("--no-lens", action="store_true", help="skip the logit lens (one head projection per block)")
    pr.add_argument("--attention", action="store_true",
                    help="per-head attention entropy, query-key distance and sink mass (runs eager attention: slower, more memory)")
    dr = _action(sub, "drop", "remove blocks or sublayers, save the smaller model, measure cost and speedup",
                 "calibration windows (for measuring the order)")
    what = dr.add_mutually_exclusive_group()
    what.add_argument("--n", type=int, help="how many units to drop (4 when neither --sweep, --units nor --plan is given)")
    what.add_argument("--sweep", help="comma-separated counts, e.g. 1,2,4,8: evaluate each, save no model")
    what.add_argument("--units", help="drop exactly these units, e.g. L3,L7.attn")
    what.add_argument("--plan", help="a saved drop plan (plan.json of an earlier run; FILE#KEY picks one of a sweep): export it, measure nothing")
    dr.add_argument("--unit", default="block", help="block, attn, mlp or any (attn and mlp ranked jointly); comma-separated with --sweep")
    dr.add_argument("--order", default="bi", help="a Profile metric (bi, sub_cos, ablate_nll, taylor_nll...; METRIC:asc drops the lowest "
                    "first, METRIC:desc the highest, required for metrics with no importance direction such as zd or lens_kl), "
                    "random or contiguous; comma-separated with --sweep")
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
    budget.add_argument("--plan", help="a saved quantize plan (plan.json of an earlier run; FILE#KEY picks one of a sweep): "
                        "export it (--export), measure nothing")
    qz.add_argument("--strategy", default="measured", help="measured, ranked:METRIC (e.g. ranked:bi; ranked:zd:asc or :desc for a metric with no importance direction), "
                    "ranked:random, uniform or q4km; comma-separated")
    qz.add_argument("--format", default="gguf", choices=["gguf", "int"], help="llama.cpp's GGUF types, or integer codes with group scales")
    qz.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="--format int: round to nearest or GPTQ")
    qz.add_argument("--group-size", type=int, help="--format int: one group size (default: candidates at 32, 64 and 128)")
    qz.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                    help="--format int: symmetric codes (no zero points); the default with --export hf, which needs them")
    qz.add_argument("--export", help="gguf,recipe (--format gguf) or hf (--format int: compressed-tensors); the format's all for one plan; none")
    qz.add_argument("--profile", help="profile.json for ranked:METRIC (must come from this model); measured if absent")
    qz.add_argument("--seed", type=int, default=0, help="for ranked:random")
    rp = sub.add_parser("report", help="re-render report.html from a saved profile, drop or quantize result",
                        description="Re-render report.html from a saved profile, drop or quantize result.",
                        epilog=_examples("report"), formatter_class=_Help)
    rp.add_argument("profile", metavar="RESULT", help="profile.json, eval.json or the folder holding them")
    rp.add_argument("--out", help="HTML path (default: report.html beside the profile)")
    return p


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
        t.add_row(u.name, _num(u.metrics[ref]), _num(sim), _num(u.metrics.get("rel_update")))
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


def _num(v: float | None) -> str:
    """A metric for a table cell; a value the profile could not measure (stored as null) shows as a dash."""
    return "–" if v is None or not math.isfinite(v) else f"{v:.4g}"


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
                   attention=args.attention, seed=args.seed, progress=not args.json)
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


def _plan_ref(text: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE#KEY`` (one plan of a sweep)."""
    path, _, key = text.partition("#")
    return path, key or None


def _exported(exports: dict, args: argparse.Namespace) -> int:
    """Print what a saved plan's export wrote."""
    if args.json:
        print(json.dumps({"exports": exports}))
    else:
        print("wrote " + ", ".join(v["path"] for v in exports.values()) if exports else "nothing to export; give --export")
    return 0


def _drop(args: argparse.Namespace) -> int:
    from . import drop as dp
    from .profile import Profile, needs
    from .report.drop import write_drop_report

    # attention metrics are read from eager attention's probabilities; the automatic profile measures them then
    eager = not args.profile and any(needs(o)["attention"] for o in _split(args.order))
    lm, w = _load(args, attn_implementation="eager" if eager else None)
    export = () if args.sweep or args.export == "none" else tuple(_split(args.export))
    if args.plan:
        return _exported(dp.export_plan(lm, dp.DropPlan.load(*_plan_ref(args.plan)), args.out, export), args)
    prof = Profile.load(args.profile) if args.profile else None
    if prof is not None:
        dp.check_profile(prof, lm)
    common = dict(prof=prof, iterative=args.iterative, seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    if args.sweep:
        plans = dp.sweep_plans(lm, w, ns=_sweep(args.sweep, int, "whole numbers, e.g. 1,2,4"), units=_split(args.unit), orders=_split(args.order), **common)
    elif args.units:
        plans = [dp.given(lm.anatomy, _split(args.units))]
    else:
        plans = [dp.choose(lm, w, n=4 if args.n is None else args.n, unit=args.unit, order=args.order, **common)]
    report = dp.run(lm, w, plans, out=args.out, export=export, eval_samples=args.eval_samples, batch_size=args.batch_size,
                    with_speed=not args.no_speed, seed=args.seed, progress=not args.json)
    out = Path(args.out)
    html = write_drop_report(report, out / "report.html")
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    _drop_summary(report)
    written = [str(out / "eval.json"), str(out / "plan.json"), str(html)] + [v["path"] for v in report.exports.values()]
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
    from .report.quant import write_quant_report

    lm, w = _load(args)
    export = None if args.export is None else (() if args.export == "none" else tuple(_split(args.export)))
    if args.plan:
        plan = qz.QuantPlan.load(*_plan_ref(args.plan))
        formats = qz.EXPORTS[plan.family] if export is None else export
        return _exported(qz.export_plan(lm, plan, args.out, formats, w.evaluation[:args.eval_samples], w), args)
    prof = Profile.load(args.profile) if args.profile else None
    budgets = _sweep(args.sweep, float, "bits per weight, e.g. 4.6,5,5.5") if args.sweep else ([args.bits] if args.bits is not None else [])
    report = qz.run(lm, w, budgets=budgets, strategies=_split(args.strategy), family=args.format, method=args.method,
                    group_size=args.group_size, symmetric=args.symmetric, export=export, out=args.out, prof=prof, eval_samples=args.eval_samples,
                    seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    out = Path(args.out)
    html = write_quant_report(report, out / "report.html")
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    _quant_summary(report)
    written = [str(out / n) for n in ("plan.json", "eval.json", "measurement.json")] + [str(html)] + [v["path"] for v in report.exports.values()]
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


def _report(args: argparse.Namespace) -> int:
    """Re-render the page of a saved profile, drop or quantize result (its folder or its JSON)."""
    src = Path(args.profile)
    folder = src if src.is_dir() else src.parent
    out = Path(args.out) if args.out else folder / "report.html"
    kind = json.loads((folder / "plan.json").read_text()).get("kind", "quantize") if (folder / "plan.json").exists() else None
    if kind == "quantize":
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
    from .profile import COMMAND

    args = _parser().parse_args(argv)
    token = COMMAND.set(shlex.join(["layerwise", *(sys.argv[1:] if argv is None else argv)]))
    try:
        return {"profile": _profile, "drop": _drop, "quantize": _quantize, "report": _report}[args.cmd](args)
    except LayerwiseError as exc:
        print(f"layerwise: error: {_flags(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerwise: interrupted; every file written is whole (a quantize measurement.json is kept on purpose: "
              "the same command resumes from it)", file=sys.stderr)
        return 130
    finally:
        COMMAND.reset(token)


if __name__ == "__main__":
    sys.exit(main())
