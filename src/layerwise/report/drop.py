"""The page for a drop result: perplexity against units dropped per order, speed, and the table."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.ticker import MaxNLocator

from ..io import write_atomic
from .divergence import kl_table
from .page import fmt, page, plain_log_axis, png, subplots
from .summary import drop_summary

if TYPE_CHECKING:
    from ..drop import DropReport

_COLUMNS = (
    "ppl",
    "ppl_se",
    "delta_nll",
    "delta_nll_se",
    "kl",
    "kl_se",
    "params_ratio",
    "prefill_speedup",
    "generate_speedup",
)


def curves_figure(report: DropReport):
    """Held-out perplexity against units dropped, one panel per unit kind, one line per order."""
    kinds = list(dict.fromkeys(v["unit"] for v in report.variants))
    fig, axes = subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.4), squeeze=False)
    base = report.original["ppl"]
    for ax, kind in zip(axes.flat, kinds):
        rows = [v for v in report.variants if v["unit"] == kind]
        for label in dict.fromkeys(v["order"] + (" (iterative)" if v["iterative"] else "") for v in rows):
            pts = sorted(
                (v["n"], v["ppl"], v["ppl_se"] or 0.0)
                for v in rows
                if v["order"] + (" (iterative)" if v["iterative"] else "") == label
            )
            ax.errorbar(
                [0] + [p[0] for p in pts],
                [base] + [p[1] for p in pts],
                yerr=[0] + [p[2] for p in pts],
                marker="o",
                ms=3,
                lw=1,
                capsize=2,
                label=label,
            )
        ax.axhline(base, color="grey", lw=0.8, ls=":")
        plain_log_axis(ax)
        ax.set_title(f"--unit {kind}", fontsize=10)
        ax.set_xlabel("units dropped", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("held-out perplexity", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _speed(report: DropReport) -> str:
    rows = [v for v in report.variants if v.get("prefill_speedup") is not None]
    if not rows:
        return "<p>Speed was not measured.</p>"
    kinds = list(dict.fromkeys(v["unit"] for v in rows))
    fig, axes = subplots(1, 2, figsize=(9.5, 3.2))
    for ax, key in zip(axes, ("prefill_speedup", "generate_speedup")):
        for kind in kinds:
            pts = sorted({v["n"]: v[key] for v in rows if v["unit"] == kind}.items())
            ax.plot([0] + [n for n, _ in pts], [1.0] + [s for _, s in pts], marker="o", ms=3, lw=1, label=kind)
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.set_xlabel("units dropped", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def render(report: DropReport, plan_path: str = "plan.json") -> str:
    """The whole page; ``plan_path``: the plan.json the summary's export commands name."""
    o = report.original
    head = "".join(f"<th>{escape(c)}</th>" for c in ("plan", "units", *_COLUMNS))
    body = "".join(
        "<tr><td>"
        + escape(v["key"])
        + "</td><td>"
        + escape(", ".join(v["units"]))
        + "</td>"
        + "".join(f"<td>{fmt(v.get(c))}</td>" for c in _COLUMNS)
        + "</tr>"
        for v in report.variants
    )
    orig = "".join(f"<tr><td>{escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in o.items())
    exports = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v.get('path')))}</td><td>{fmt(v.get('bytes'))}</td>"
        f"<td>{escape(v.get('note', ''))}</td></tr>"
        for k, v in report.exports.items()
    )
    return page(
        "drop",
        report.meta,
        f"""{drop_summary(report, plan_path)}
<p>Held-out windows: {fmt(o.get("n_windows"))} ({fmt(o.get("n_tokens"))} predicted tokens). Standard errors are \
across windows;
<code>delta_nll</code> is the paired difference from the original.</p>
<h2>Perplexity against units dropped</h2>{png(curves_figure(report))}
<h2>Speed against the original</h2>{_speed(report)}
<h2>Every plan</h2><table><tr>{head}</tr>{body}</table>
<h2>KL statistics, as llama.cpp reports them</h2>{kl_table(report.variants, "key")}
<h2>Original model</h2><table>{orig}</table>
<h2>Files written</h2><table>{exports or "<tr><td>none</td></tr>"}</table>""",
        left_columns=2,
    )


def write_drop_report(report: DropReport, path: str | Path, folder: str | Path | None = None) -> Path:
    """Render and write the page atomically; ``folder`` holds the result's plan.json (default: beside the page)."""
    return write_atomic(path, render(report, str(Path(folder or Path(path).parent) / "plan.json")))
