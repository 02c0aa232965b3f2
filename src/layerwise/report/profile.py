"""The profile page: one self-contained HTML page for a Profile, plots inline as PNG, every string escaped."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

import numpy as np

from ..anatomy import KINDS
from ..io import write_atomic
from ..metrics.routing import SKIP_SHARE
from ..profile import ATTENTION, METRICS, Profile
from .page import fmt, layer_ticks, page, png, subplots
from .summary import profile_summary


def _series(prof: Profile, metric: str, kind: str) -> tuple[list[int], list[float]]:
    pts = [(u.layer, y) for u in prof.units if u.kind == kind and (y := u.metrics.get(metric)) is not None]
    return [x for x, _ in pts], [y for _, y in pts]


def _depth_plots(prof: Profile) -> str:
    """Each metric of the blocks, sublayers and routers against depth (the experts' are in the routing section)."""
    metrics = [m for m in METRICS if any(u.metrics.get(m) is not None for u in prof.units if u.kind != "expert")]
    cols = 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for kind, style in zip((*KINDS, "router"), ("-k", "-o", "-s", "-^")):
            xs, ys = _series(prof, metric, kind)
            if xs:
                ax.plot(xs, ys, style, ms=3, lw=1, label=kind)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("layer", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def _heatmap(prof: Profile) -> str:
    units = [u for u in prof.units if u.kind in KINDS]  # a sparse MLP's parts: the routing section
    metrics = [m for m in METRICS if any(u.metrics.get(m) is not None for u in units)]
    mat = np.full((len(metrics), len(units)), np.nan)
    for j, u in enumerate(units):
        for i, m in enumerate(metrics):
            v = u.metrics.get(m)
            if v is not None:
                mat[i, j] = v
    for i in range(len(metrics)):  # rank-normalise each row to [0, 1] so scales compare
        row = mat[i]
        ok = ~np.isnan(row)
        if ok.sum() > 1:
            ranks = row[ok].argsort().argsort()
            row[ok] = ranks / (ok.sum() - 1)
    fig, ax = subplots(figsize=(max(8, len(units) * 0.12), 0.35 * len(metrics) + 1.2))
    ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(metrics)), metrics, fontsize=8)
    layer_ticks(ax, [u.name for u in units])
    ax.set_xlabel("unit (ticks at each layer's first unit: block, attn, mlp)", fontsize=8)
    ax.set_title("metrics across units (rank-normalised per row)", fontsize=10)
    return png(fig)


def _attention_heads(prof: Profile) -> str:
    """Layer-by-head maps of the attention metrics, when the profile has them."""
    attn = [u for u in prof.units if u.kind == "attn" and f"{ATTENTION[0]}_per_head" in u.details]
    if not attn:
        return "<p>Not measured; run <code>layerwise profile --attention</code> (eager attention).</p>"
    fig, axes = subplots(1, len(ATTENTION), figsize=(4.2 * len(ATTENTION), 0.18 * len(attn) + 1.5), squeeze=False)
    for ax, key in zip(axes.flat, ATTENTION):
        mat = np.array([[np.nan if v is None else v for v in u.details[f"{key}_per_head"]] for u in attn], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="magma", interpolation="nearest")
        layer_ticks(ax, [u.name for u in attn], axis="y")
        ax.set_xlabel("head", fontsize=8)
        ax.set_title(
            {
                "attn_entropy": "entropy (nats)",
                "attn_distance": "query-key distance (tokens)",
                "attn_sink": "mass on the first token",
            }[key],
            fontsize=10,
        )
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return (
        "<p>Low entropy and short distance mark local heads; high sink mass marks heads parked on the first token.</p>"
        + png(fig)
    )


def _routing(prof: Profile) -> str:
    """Layer-by-expert maps of each expert's share of the tokens and mean gate weight, when the model routes."""
    experts = [u for u in prof.units if u.kind == "expert"]
    if not experts:
        return ""
    layers = sorted({u.layer for u in experts})
    width = max(int(u.name.rsplit(".e", 1)[1]) for u in experts) + 1
    fig, axes = subplots(1, 2, figsize=(max(8.0, 0.25 * width * 2 + 3), 0.22 * len(layers) + 1.8), squeeze=False)
    for ax, key, title in zip(
        axes.flat, ("route_share", "gate_mean"), ("share of tokens routed to it", "mean gate weight where chosen")
    ):
        mat = np.full((len(layers), width), np.nan)
        for u in experts:
            v = u.metrics.get(key)
            mat[layers.index(u.layer), int(u.name.rsplit(".e", 1)[1])] = np.nan if v is None else v
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="viridis", interpolation="nearest")
        layer_ticks(ax, [f"L{i}" for i in layers], axis="y")
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return (
        "<h2>Routing</h2><p>Each sparse MLP's experts: blank where an expert was never chosen. The routers' load "
        "entropy (1 is even), imbalance (the busiest expert's load over the mean) and skippable share (tokens whose "
        f"last chosen expert carries under {SKIP_SHARE:g} of their chosen weight) are plotted across depth above.</p>"
        + png(fig)
    )


def _agreement_table(prof: Profile) -> str:
    ag = prof.agreement.get("by_kind", {})
    metrics = sorted({m for row in ag.values() for m in row}, key=METRICS.index)
    kinds = [k for k in ag if k in (*KINDS, "expert")]
    head = "".join(f"<th>{escape(k)}</th>" for k in kinds)
    body = "".join(
        f"<tr><td>{escape(m)}</td>"
        + "".join(f"<td>{fmt((ag.get(k, {}).get(m) or {}).get('rho'))}</td>" for k in kinds)
        + "</tr>"
        for m in metrics
    )
    ref = escape(str(prof.agreement.get("reference", "")))
    return (
        f"<p>Spearman rho of each metric with <code>{ref}</code>, per unit kind.</p>"
        f"<table><tr><th>metric</th>{head}</tr>{body}</table>"
    )


def _ablation_note(prof: Profile) -> str:
    """How exact ablation was sampled, and how precise that made it."""
    m = prof.meta
    if m.get("ablation") != "exact":
        return ""
    ses = sorted(se for u in prof.units if (se := u.details.get("ablate_nll_se")) is not None)
    windows, positions = m.get("ablation_windows") or m.get("n_windows_used"), m.get("positions")
    where = f"{fmt(positions)} random positions of each" if positions else "every position of each"
    median = (
        f"; the median standard error of <code>ablate_nll</code> across units is {fmt(ses[len(ses) // 2])} nats"
        if ses
        else ""
    )
    lens = (
        f" The logit lens is scored at the same {fmt(positions)} positions of every window."
        if positions and m.get("lens")
        else ""
    )
    return (
        f"<p>Exact ablation scored at {where} of {fmt(windows)} windows (the ablated model runs every position; only "
        f"the head is read at fewer){median}.{lens} Each unit's standard error is <code>ablate_nll_se</code> in "
        "<code>profile.json</code>; <code>--positions 0 --ablation-samples 0</code> scores every position of "
        "every window.</p>"
    )


def _ranking_table(prof: Profile) -> str:
    ref = prof.agreement.get("reference", "ablate_nll")
    valued = [(v, u) for u in prof.units if (v := u.metrics.get(ref)) is not None]
    rows = [u for _, u in sorted(valued, key=lambda vu: vu[0])]
    cols = [m for m in METRICS if any(u.metrics.get(m) is not None for u in rows)]
    head = "".join(f"<th>{escape(c)}</th>" for c in ["unit", *cols])
    body = "".join(
        "<tr><td>" + escape(u.name) + "</td>" + "".join(f"<td>{fmt(u.metrics.get(c))}</td>" for c in cols) + "</tr>"
        for u in rows
    )
    return (
        f"<p>Units from least to most important by <code>{escape(str(ref))}</code>.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
    )


def render(prof: Profile, path: str = "profile.json") -> str:
    """The whole page as a string; no computation beyond plotting. ``path``: the profile.json the suggested
    commands name."""
    return page(
        "profile",
        prof.meta,
        f"""{profile_summary(prof, path)}
<h2>Metrics across depth</h2>{_depth_plots(prof)}
<h2>All metrics, all units</h2>{_heatmap(prof)}
{_routing(prof)}<h2>Attention heads</h2>{_attention_heads(prof)}
<h2>Which cheap metric tracks ablation?</h2>{_ablation_note(prof)}{_agreement_table(prof)}
<h2>Ranking</h2>{_ranking_table(prof)}""",
    )


def write_report(prof: Profile, path: str | Path, folder: str | Path | None = None) -> Path:
    """Render and write the page atomically; ``folder`` holds the profile.json (default: beside the page)."""
    return write_atomic(path, render(prof, str(Path(folder or Path(path).parent) / "profile.json")))
