"""The page for a quantization result: each plan as a layer-by-bits chart, perplexity against bits, the table."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io import write_atomic
from .divergence import kl_table
from .page import fmt, layer_ticks, page, plain_log_axis, png, subplots
from .summary import quant_summary

if TYPE_CHECKING:
    from ..quantize import QuantReport

_COLUMNS = (
    "target_bpw",
    "bpw",
    "bpw_model",
    "bytes",
    "ppl",
    "ppl_se",
    "delta_nll",
    "delta_nll_se",
    "predicted_delta_nll",
    "kl",
    "kl_se",
)
_MAX_PLAN_CHARTS = 8


def plan_figure(key: str, plan: dict):
    """Bits per weight of every quantized tensor (or fused group), by block and tensor."""
    groups = plan["groups"]
    rows = list(dict.fromkeys(g.split(".", 1)[1] for g in groups))
    layers = 1 + max(e["layer"] for e in groups.values())
    grid = np.full((len(rows), layers), np.nan)
    for g, e in groups.items():
        grid[rows.index(g.split(".", 1)[1]), e["layer"]] = e["bits"] / e["numel"]
    fig, ax = subplots(figsize=(min(16, 2 + 0.35 * layers), 0.9 + 0.3 * len(rows)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    layer_ticks(ax, [str(i) for i in range(layers)])
    ax.set_xlabel("block", fontsize=8)
    ax.set_title(f"{key}: {plan['bpw']:.3f} bits per weight", fontsize=9)
    fig.colorbar(im, ax=ax, label="bits per weight", fraction=0.03)
    fig.tight_layout()
    return fig


def curve_figure(report: QuantReport):
    """Held-out perplexity against achieved bits per weight, one line per strategy family."""
    fig, ax = subplots(figsize=(7, 4))
    families = dict.fromkeys(
        r["strategy"].split(":")[0] if r["strategy"].startswith("uniform") else r["strategy"] for r in report.rows
    )
    for fam in families:
        pts = sorted(
            (r["bpw"], r["ppl"], r["ppl_se"] or 0.0)
            for r in report.rows
            if (r["strategy"].split(":")[0] if r["strategy"].startswith("uniform") else r["strategy"]) == fam
        )
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            ms=3,
            lw=1,
            capsize=2,
            label=fam,
        )
    ax.axhline(report.original["ppl"], color="k", lw=0.8, ls="--", label="original")
    plain_log_axis(ax)
    ax.set_xlabel("bits per weight (quantized tensors, scales included)", fontsize=8)
    ax.set_ylabel("held-out perplexity", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


#: Where each export's perplexity was measured: the program that loads the file.
_CONSUMERS = {"llama_cpp_ppl": "llama.cpp", "transformers_ppl": "transformers"}


def render(report: QuantReport, plan_path: str = "plan.json") -> str:
    """The whole page; ``plan_path``: the plan.json the summary's export commands name."""
    o = report.original
    head = "".join(f"<th>{escape(c)}</th>" for c in ("plan", *_COLUMNS))
    body = "".join(
        "<tr><td>" + escape(r["plan"]) + "</td>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in _COLUMNS) + "</tr>"
        for r in report.rows
    )
    charts = "".join(png(plan_figure(k, p)) for k, p in list(report.plans.items())[:_MAX_PLAN_CHARTS])
    orig = "".join(f"<tr><td>{escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in o.items())
    exports = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v.get('path')))}</td><td>{fmt(v.get('bytes'))}</td>"
        + "".join(f"<td>{fmt(v[key])} ({who})</td>" for key, who in _CONSUMERS.items() if key in v)
        + "</tr>"
        for k, v in report.exports.items()
    )
    return page(
        "quantize",
        report.meta,
        f"""{quant_summary(report, plan_path)}
<p>Held-out windows: {fmt(o.get("n_windows"))} ({fmt(o.get("n_tokens"))} predicted tokens). Standard errors are \
across windows;
<code>delta_nll</code> is the paired difference from the original and <code>predicted_delta_nll</code> what the \
measurement
predicted for it. <code>bpw</code> counts codes, scales and zero points over the quantized tensors; \
<code>bpw_model</code>
adds every other tensor as stored.</p>
<h2>Perplexity against bits per weight</h2>{png(curve_figure(report))}
<h2>Every plan</h2><table><tr>{head}</tr>{body}</table>
<h2>KL statistics, as llama.cpp reports them</h2>{kl_table(report.rows, "plan")}
<h2>Bits by block</h2>{charts}
<h2>Original model</h2><table>{orig}</table>
<h2>Files written</h2><table><tr><th>export</th><th>path</th><th>bytes</th><th>perplexity where it is loaded</th></tr>\
{exports or "<tr><td>none</td></tr>"}</table>""",
    )


def write_quant_report(report: QuantReport, path: str | Path, folder: str | Path | None = None) -> Path:
    """Render and write the page atomically; ``folder`` holds the result's plan.json (default: beside the page)."""
    return write_atomic(path, render(report, str(Path(folder or Path(path).parent) / "plan.json")))
