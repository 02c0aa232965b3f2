"""The page for a steer result: effect against cost per layer (dose-response), the layer choice, samples, the table."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

from ..io import write_atomic
from .page import fmt, page, png, subplots
from .summary import steer_summary

if TYPE_CHECKING:
    from ..steer import SteerReport

_COLUMNS = (
    "alpha",
    "score_shift",
    "score_shift_se",
    "margin_shift",
    "margin_shift_se",
    "proj_shift",
    "proj_shift_se",
    "delta_nll",
    "delta_nll_se",
    "kl",
    "kl_se",
    "ppl",
)


def effect_name(report: SteerReport) -> str:
    """The effect the plots use: the independent score when there is one, else the log-prob margin."""
    return "score_shift" if any("score_shift" in r for r in report.rows) else "margin_shift"


def dose_figure(report: SteerReport):
    """Effect against KL and against delta NLL, one line per layer through its alphas; the chosen (layer, alpha)
    starred.

    Layers measured at a single alpha (a per-block sweep) are grey points, so the swept layers' lines stay readable.
    """
    eff = effect_name(report)
    fig, axes = subplots(1, 2, figsize=(11, 4))
    layers = list(dict.fromkeys(tuple(r["units"]) for r in report.rows))
    alphas = {u: {r["alpha"] for r in report.rows if tuple(r["units"]) == u} for u in layers}
    swept = [u for u in layers if len(alphas[u]) > 1] or layers
    cmap = matplotlib.colormaps["viridis"].resampled(max(2, len(swept)))
    for ax, cost in zip(axes, ("kl", "delta_nll")):
        single = [r for r in report.rows if tuple(r["units"]) not in swept]
        if single:
            ax.errorbar(
                [r[cost] for r in single],
                [r[eff] for r in single],
                yerr=[r.get(f"{eff}_se") or 0.0 for r in single],
                fmt="o",
                ms=3,
                color="0.6",
                ecolor="0.8",
                capsize=1,
                label="other layers, one alpha",
            )
        for i, units in enumerate(swept):
            pts = sorted(
                (r["alpha"], r[cost], r[eff], r.get(f"{eff}_se") or 0.0)
                for r in report.rows
                if tuple(r["units"]) == units
            )
            label = units[0] if len(units) == 1 else f"{units[0]}-{units[-1]}"
            ax.errorbar(
                [p[1] for p in pts],
                [p[2] for p in pts],
                yerr=[p[3] for p in pts],
                marker="o",
                ms=3,
                lw=1,
                capsize=2,
                color=cmap(i),
                label=label if len(swept) <= 12 else None,
            )
        chosen = [r for r in report.rows if r["key"] == report.choice["chosen_key"]]
        for r in chosen:
            ax.plot([r[cost]], [r[eff]], "r*", ms=14, label="chosen")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(
            {"kl": "KL to the unsteered model (nats/token, pydoc)", "delta_nll": "delta NLL (nats/token, pydoc)"}[cost],
            fontsize=8,
        )
        ax.set_ylabel(f"{eff} (report prompts)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def separation_figure(report: SteerReport):
    """Held-out separation (Cohen's d) of every candidate, by depth."""
    rows = sorted(report.choice["ranking"], key=lambda r: int(r["units"][0][1:]))
    fig, ax = subplots(figsize=(7, 2.8))
    ax.plot([int(r["units"][0][1:]) for r in rows], [r["d"] for r in rows], "-o", ms=3, lw=1)
    ax.set_xlabel("block (first of the range)", fontsize=8)
    ax.set_ylabel("held-out Cohen's d", fontsize=8)
    fig.tight_layout()
    return fig


def _samples(report: SteerReport) -> str:
    base = report.unsteered.get("samples") or []
    chosen = next((r for r in report.rows if r["key"] == report.choice["chosen_key"]), None)
    if not base or chosen is None:
        return "<p>No generations (no scorer was used).</p>"
    body = "".join(
        f"<tr><td>{escape(p)}</td><td>{escape(b)}</td><td>{escape(s)}</td></tr>"
        for p, b, s in zip(report.prompts, base, chosen["samples"])
    )
    return f"<table><tr><th>prompt</th><th>unsteered</th><th>steered ({escape(chosen['key'])})</th></tr>{body}</table>"


def _roles(report: SteerReport) -> str:
    """How many prompts each set held, from ``choice.prompts`` (absent in results saved before the sets were
    recorded)."""
    roles = report.choice.get("prompts")
    if not roles:
        return ""
    n = {k: len(roles.get(k, [])) for k in ("calibration", "development", "report")}
    return (
        f" ({n['calibration']} other prompts calibrated alpha"
        + (f", {n['development']} development prompts were not used" if n["development"] else "")
        + "; the texts of every set are in steer.json)"
    )


def render(report: SteerReport) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in ("key", *_COLUMNS))
    body = "".join(
        "<tr><td>" + escape(r["key"]) + "</td>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in _COLUMNS) + "</tr>"
        for r in report.rows
    )
    rank = "".join(
        f"<tr><td>{escape(', '.join(r['units']))}</td><td>{fmt(r['d'])}</td><td>{fmt(r['pair_acc'])}</td></tr>"
        for r in report.choice["ranking"]
    )
    a = report.choice["alpha"]
    tried = "".join(f"<tr><td>{fmt(t['alpha'])}</td><td>{fmt(t['margin_shift'])}</td></tr>" for t in a.get("tried", []))
    base = "".join(
        f"<tr><td>{escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in report.unsteered.items() if k != "samples"
    )
    exports = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v.get('path')))}</td><td>{fmt(v.get('bytes'))}</td></tr>"
        for k, v in report.exports.items()
    )
    strength = (
        "Given."
        if a.get("given")
        else f"Smallest multiple reaching {fmt(a.get('target'))} nats of margin on the calibration prompts "
        f"(reached: {escape(str(a.get('reached')))})."
    )
    return page(
        "steer",
        report.meta,
        f"""{steer_summary(report)}
<p>Chosen: <code>{escape(report.choice["chosen_key"])}</code> (alpha in multiples of the layer's mean residual norm).
Effects are paired differences steered minus unsteered over {len(report.prompts)} report prompts (± SE across \
prompts){_roles(report)};
<code>score</code> is the independent scorer on greedy continuations, <code>margin</code> the log-prob of positive \
over negative continuations,
<code>proj</code> the last block's projection on its direction in units of the positive-negative gap. Cost is NLL \
and KL to the unsteered model on held-out neutral windows (± SE across windows).</p>
<h2>Effect against cost (dose-response per layer)</h2>{png(dose_figure(report))}
<h2>Which layer separates the concept (held-out pairs)</h2>{png(separation_figure(report))}
<table><tr><th>units</th><th>Cohen's d</th><th>pair accuracy</th></tr>{rank}</table>
<h2>Strength</h2><p>{strength}</p>
<table><tr><th>alpha</th><th>margin shift</th></tr>{tried}</table>
<h2>Generations</h2>{_samples(report)}
<h2>Every (layer, alpha)</h2><table><tr>{head}</tr>{body}</table>
<h2>Unsteered model</h2><table>{base}</table>
<h2>Files written</h2><table>{exports or "<tr><td>vector.safetensors, steer.json</td></tr>"}</table>""",
    )


def write_steer_report(report: SteerReport, path: str | Path) -> Path:
    return write_atomic(path, render(report))
