"""The page for a probe result: accuracy and selectivity across depth beside the model's importance profile."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from ..io import write_atomic
from .page import fmt, page, png, subplots
from .summary import probe_summary

if TYPE_CHECKING:
    from ..probe import ProbeResult

_COLUMNS = ("accuracy", "auc", "diffmean_accuracy", "control", "selectivity")
_STYLE = {"block": "o", "attn": "^", "mlp": "s", "expert": "."}


def curve_figure(result: ProbeResult):
    """Probe accuracy, control and selectivity (± SE) against layer; importance on a second axis of the same layers."""
    fig, ax = subplots(figsize=(9.5, 4.2))
    kinds = list(dict.fromkeys(r["kind"] for r in result.units))
    for kind in kinds:
        rows = sorted((r for r in result.units if r["kind"] == kind), key=lambda r: r["layer"])
        xs = [r["layer"] for r in rows]
        tag = "" if kinds == ["block"] else f" ({kind})"
        for key, color in (("accuracy", "C0"), ("diffmean_accuracy", "C2"), ("control", "grey"), ("selectivity", "C3")):
            ax.errorbar(
                xs,
                [r[key] for r in rows],
                yerr=[r[f"{key}_se"] for r in rows],
                color=color,
                marker=_STYLE[kind],
                ms=3,
                lw=0 if kind == "expert" else 1,  # a block's experts share its x
                capsize=2,
                label=key.replace("_", " ") + tag,
            )
    ax.axhline(result.meta.get("chance", 0.5), color="grey", lw=0.8, ls=":", label="chance")
    best_name = result.best_unit()
    if best_name is not None:
        best = result.unit(best_name)
        ax.axvline(best["layer"], color="C3", lw=0.8, ls="--", label=f"best: {best_name}")
    ax.set_xlabel("layer (L{k}: output of block k)", fontsize=8)
    ax.set_ylabel("cross-validated accuracy", fontsize=8)
    ax.set_ylim(min(0.0, min(r["selectivity"] for r in result.units) - 0.05), 1.02)
    if result.importance:
        imp = result.importance
        pts = sorted((int(u[1:]), v) for u, v in imp["values"].items() if v is not None)
        twin = ax.twinx()
        twin.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color="k",
            lw=1,
            ls="-.",
            marker=".",
            label=f"importance: {imp['metric']}",
        )
        twin.set_ylabel(f"block importance ({imp['metric']})", fontsize=8)
        twin.legend(fontsize=7, loc="upper right")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig


def render(result: ProbeResult) -> str:
    m = result.meta
    head = "".join(f"<th>{escape(c)}</th>" for c in ("unit", *_COLUMNS))
    body = "".join(
        "<tr><td>"
        + escape(r["unit"])
        + "</td>"
        + "".join(f"<td>{fmt(r[c])} ± {fmt(r[c + '_se'])}</td>" for c in _COLUMNS)
        + "</tr>"
        for r in result.units
    )
    imp = result.importance
    imp_note = (
        f"Importance: <code>{escape(imp['metric'])}</code> per block, from {escape(str(imp['source']))}."
        if imp
        else "No importance profile was given or measured."
    )
    classes = ", ".join(escape(str(c)) for c in result.classes)
    return page(
        "probe",
        m,
        f"""{probe_summary(result)}
<p>{fmt(m.get("n_examples"))} examples from <code>{escape(str(m["data"]["source"]))}</code>, classes {classes};
read at the <code>{escape(str(m.get("read")))}</code> token(s) of each example; {fmt(m.get("folds"))}-fold \
cross-validation by example.
Control: the same probe on shuffled labels; selectivity = accuracy − control. ± is the standard error across \
folds. {imp_note}</p>
<h2>Where the concept becomes readable</h2>{png(curve_figure(result))}
<h2>Every unit</h2><table><tr>{head}</tr>{body}</table>""",
    )


def write_probe_report(result: ProbeResult, path: str | Path) -> Path:
    return write_atomic(path, render(result))
