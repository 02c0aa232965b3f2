"""The table of llama.cpp-style KL statistics that the drop and quantize pages share."""

from __future__ import annotations

from html import escape

from .page import fmt

#: Columns shown, with their headings as ``llama-perplexity --kl-divergence`` names them.
_SHOWN = (
    ("kl_median", "median KL"),
    ("kl_p90", "KL 90%"),
    ("kl_p95", "KL 95%"),
    ("kl_p99", "KL 99%"),
    ("kl_p99_9", "KL 99.9%"),
    ("kl_max", "max KL"),
    ("same_top_p", "same top p"),
    ("same_top_p_se", "± SE"),
    ("dp_mean", "mean Δp"),
    ("dp_mean_se", "± SE"),
    ("dp_rms", "RMS Δp"),
    ("dp_rms_se", "± SE"),
    ("dp_p1", "Δp 1%"),
    ("dp_p5", "Δp 5%"),
    ("dp_median", "median Δp"),
    ("dp_p95", "Δp 95%"),
    ("dp_p99", "Δp 99%"),
)


def kl_table(rows: list[dict], name_key: str) -> str:
    """One row per variant (``rows[i][name_key]`` names it); the text says how each figure was measured."""
    if not rows or "same_top_p" not in rows[0]:
        return "<p>This result predates the KL statistics; evaluate again to see them.</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in ("plan", *(h for _, h in _SHOWN)))
    body = "".join(
        "<tr><td>"
        + escape(str(r[name_key]))
        + "</td>"
        + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in _SHOWN)
        + "</tr>"
        for r in rows
    )
    return f"""<p>What <code>llama-perplexity --kl-divergence</code> reports, on the same held-out windows: the
distribution of the per-token KL from the original (nats), how often the top token is the original's, and the change
Δp in the probability of the true next token (as a fraction, not %). Percentiles are streamed through fixed bins:
KL within 1.2 % of the exact value, Δp within 0.00005. Standard errors are across windows. All columns are in
<code>eval.json</code>, with more Δp percentiles.</p>
<table><tr>{head}</tr>{body}</table>"""
