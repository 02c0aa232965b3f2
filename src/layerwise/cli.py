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
  layerwise report runs/profile/profile.json          # re-render the page from saved results
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerwise", description="Measure how much every layer and sublayer matters.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile", help="measure every block and sublayer", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--model", default="default", help="HF directory, hub id, FILE.gguf or 'default'")
    pr.add_argument("--data", default="builtin:pydoc", help="FILE.txt, DIR, FILE.jsonl or builtin:pydoc")
    pr.add_argument("--seq-len", type=int, default=256)
    pr.add_argument("--samples", type=int, default=16, help="calibration windows")
    pr.add_argument("--ablation", choices=["exact", "taylor", "none"], default="exact")
    pr.add_argument("--no-lens", action="store_true", help="skip the logit lens (one head projection per block)")
    pr.add_argument("--attention", action="store_true",
                    help="per-head attention entropy, query-key distance and sink mass (runs eager attention: slower, more memory)")
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pr.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")
    pr.add_argument("--out", default="runs/profile")
    pr.add_argument("--json", action="store_true", help="print machine-readable results")
    rp = sub.add_parser("report", help="re-render report.html from a saved profile")
    rp.add_argument("profile", help="profile.json or its directory")
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


def _profile(args: argparse.Namespace) -> int:
    from . import load, profile, windows
    from .report import write_report

    lm = load(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
              attn_implementation="eager" if args.attention else None)
    w = windows(args.data, lm.tokenizer, seq_len=args.seq_len, samples=args.samples, max_len=lm.anatomy.context_length)
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


def _report(args: argparse.Namespace) -> int:
    from .profile import Profile
    from .report import write_report

    prof = Profile.load(args.profile)
    src = Path(args.profile)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "report.html"
    print(f"wrote {write_report(prof, out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"profile": _profile, "report": _report}[args.cmd](args)
    except LayerwiseError as exc:
        print(f"layerwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerwise: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
