"""The page for a tune result: loss curves per strategy, what trained at every step, and both domains."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..anatomy import depth_key, parse_unit
from ..io import write_atomic
from .page import fmt, page, png, subplots
from .summary import tune_summary

if TYPE_CHECKING:
    from ..tune import TuneReport

_MEMORY = (
    "trainable_params_max",
    "optimizer_state_bytes_max",
    "memory_added_bytes",
    "memory_bytes_max",
    "seconds_per_step",
)


def loss_figure(report: TuneReport):
    """Training loss against step, one line per strategy."""
    fig, ax = subplots(figsize=(7, 3.4))
    for r in report.runs:
        ax.plot(range(1, len(r["loss"]) + 1), r["loss"], lw=1, label=r["key"])
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("training loss", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def unit_map_figure(report: TuneReport):
    """One panel per strategy: units (rows) × steps (columns), dark where the unit trained."""
    runs = report.runs
    fig, axes = subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), squeeze=False)
    for ax, r in zip(axes.flat, runs):
        rows = _rows(report, r)
        mat = np.zeros((len(rows), max(len(r["records"]), 1)))
        for j, rec in enumerate(r["records"]):
            for u in rec["active"]:
                if u in rows:
                    mat[rows.index(u), j] = 1
        ax.imshow(mat, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1, origin="lower")
        ax.set_title(r["key"], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{r.get('unit', 'block')} (in depth order)", fontsize=8)
    fig.tight_layout()
    return fig


def _rows(report: TuneReport, r: dict) -> list[str]:
    """A run's units in depth order: those it could train (recorded since experts became units), else every unit of
    its kind up to the model's depth."""
    if r.get("units"):
        return list(r["units"])
    units = sorted({u for rec in r["records"] for u in rec["active"]}, key=depth_key)
    n_layers = report.meta.get("n_layers") or (max((depth_key(u)[0] for u in units), default=0) + 1)
    kind = parse_unit(units[0])[1] if units else "block"
    return [f"L{i}" if kind == "block" else f"L{i}.{kind}" for i in range(n_layers)]


def _pm(v, se) -> str:
    return f"{fmt(v)} ± {fmt(se)}"


def _domain_rows(report: TuneReport) -> str:
    out = []
    for r in report.runs:
        ev = r["eval"]
        for name in ("tuned", "restored"):
            t, s = ev.get("train", {}).get(name), ev.get("second", {}).get(name)
            if t is None and s is None:
                continue
            label = r["key"] + (f" + restore {ev['restored_blocks']}" if name == "restored" else "")
            cells = [escape(label)]
            cells += (
                [f"{fmt(t['ref_ppl'])} → {fmt(t['ppl'])}", _pm(-t["delta_nll"], t["delta_nll_se"])] if t else ["–", "–"]
            )
            cells += (
                [
                    f"{fmt(s['ref_ppl'])} → {fmt(s['ppl'])}",
                    _pm(s["delta_nll"], s["delta_nll_se"]),
                    _pm(s["kl"], s["kl_se"]),
                ]
                if s
                else ["–"] * 3
            )
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(out)


def _diversity(report: TuneReport) -> str:
    rows = [(r["key"], who, d) for r in report.runs for who, d in (r["eval"].get("diversity") or {}).items()]
    if not rows:
        return "<p>Not chat data: no sampled responses.</p>"
    body = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(w)}</td><td>{fmt(d['distinct_1'])}</td><td>{fmt(d['distinct_2'])}</td>"
        f"<td>{escape(' ‖ '.join(d['samples'][:2]))}</td></tr>"
        for k, w, d in rows
    )
    return (
        "<table><tr><th>strategy</th><th>model</th><th>distinct-1</th><th>distinct-2</th><th>samples</th></tr>"
        f"{body}</table>"
    )


def _rates(report: TuneReport) -> str:
    """Per-unit learning rates (``layer_lr``), one row per strategy that used them."""
    rows = [(r["key"], r["unit_lr"]) for r in report.runs if r.get("unit_lr")]
    if not rows:
        return ""

    def in_unit_order(lrs: dict) -> str:
        return ", ".join(f"{u} {fmt(v)}" for u, v in sorted(lrs.items(), key=lambda x: depth_key(x[0])))

    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(in_unit_order(lrs))}</td></tr>" for k, lrs in rows)
    return (
        "<h2>Per-unit learning rates</h2><p>lr × w, w ∝ importance^τ with mean 1 over units; embeddings, norms "
        "and head at the base lr.</p>"
        f"<table><tr><th>strategy</th><th>learning rate per unit</th></tr>{body}</table>"
    )


def render(report: TuneReport) -> str:
    mem_head = "".join(f"<th>{escape(c)}</th>" for c in ("strategy", *_MEMORY))
    mem = "".join(
        "<tr><td>" + escape(r["key"]) + "</td>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in _MEMORY) + "</tr>"
        for r in report.runs
    )
    exports = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v.get('path')))}</td><td>{escape(str(v.get('kind')))}</td></tr>"
        for k, v in report.exports.items()
    )
    return page(
        "tune",
        report.meta,
        f"""{tune_summary(report)}
<p>Gain: the drop in held-out NLL on the tuning data (windows never trained on);
forgetting: the rise in NLL on the second corpus; KL(base ‖ tuned) on the second corpus. Every figure ± its standard \
error across windows.</p>
<h2>Training loss</h2>{png(loss_figure(report))}
<h2>What trained at every step</h2>{png(unit_map_figure(report))}
<h2>Both domains</h2><table><tr><th>strategy</th><th>tuning data ppl (base → tuned)</th><th>gain (nats)</th>
<th>second corpus ppl</th><th>forgetting (nats)</th><th>KL</th></tr>{_domain_rows(report)}</table>
{_rates(report)}
<h2>Memory and time</h2><p>{escape(str(report.meta.get("memory_note", "")))}</p><table><tr>{mem_head}</tr>{mem}</table>
<h2>Diversity of sampled responses</h2>{_diversity(report)}
<h2>Files written</h2><table>{exports or "<tr><td>none</td></tr>"}</table>""",
    )


def write_tune_report(report: TuneReport, path: str | Path) -> Path:
    return write_atomic(path, render(report))
