"""What every layerwise page is made of: figures rendered without pyplot, axes of layers, numbers as text, and
the page itself (one style, the run's metadata at the end). The page modules, one per result kind, build on these."""

from __future__ import annotations

import base64
import io
import math
from html import escape

from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """``pyplot.subplots`` without pyplot: a bare Figure renders to PNG through Agg by itself, so the
    report never touches the user's matplotlib backend or pyplot's figure list."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


#: At most this many tick labels on an axis of layers or units, so 30+ layers stay readable.
MAX_TICKS = 32


def layer_ticks(ax, labels: list[str], *, axis: str = "x", fontsize: float = 7) -> None:
    """Label an axis of layers (or units) without crowding: every ``k``-th label so at most :data:`MAX_TICKS`
    show, and, when units of several kinds share a layer, only each layer's first unit (``L7``, not
    ``L7.attn``), rotated on the x axis."""
    firsts = [i for i, name in enumerate(labels) if i == 0 or name.split(".")[0] != labels[i - 1].split(".")[0]]
    if len(firsts) < len(labels):  # several units per layer: one tick per layer, named by the layer
        names = [labels[i].split(".")[0] for i in firsts]
    else:
        names = labels
    k = max(1, math.ceil(len(firsts) / MAX_TICKS))
    pos, text = firsts[::k], names[::k]
    if axis == "x":
        ax.set_xticks(pos, text, rotation=90 if max(map(len, text), default=0) > 3 else 0, fontsize=fontsize)
    else:
        ax.set_yticks(pos, text, fontsize=fontsize)


def plain_log_axis(ax) -> None:
    """A log y axis labelled with plain numbers (``40``, not ``4×10^1``), major and minor ticks alike."""
    from matplotlib.ticker import FormatStrFormatter

    ax.set_yscale("log")
    for set_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_fmt(FormatStrFormatter("%.4g"))


def png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def page(command: str, meta: dict, body: str, *, left_columns: int = 1) -> str:
    """The page every layerwise command writes: title from the model id, one style, ``body``, then the run's
    metadata."""
    title = escape(str(meta.get("model_id", "model")))
    left = ",".join(f"td:nth-child({i + 1})" for i in range(left_columns))
    rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in meta.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>layerwise {command}: {title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}{left}{{text-align:left}}img{{max-width:100%}}
.summary{{background:#f3f6fa;border:1px solid #c8d3e0;padding:0.2em 1.2em 0.6em;margin-bottom:1.5em}}
.summary li{{margin:0.3em 0}}.summary code{{overflow-wrap:anywhere}}</style>
</head><body>
<h1>layerwise {command}: {title}</h1>
{body}
<h2>Run</h2><table>{rows}</table>
</body></html>
"""
