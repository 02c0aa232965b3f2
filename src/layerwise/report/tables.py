"""The short tables a command prints when it ends, one spec per result kind: a title, the rows, and the columns
(a header and how a row's cell reads). :func:`tables` builds them for :func:`layerwise.results.print_tables`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

Cell = Callable[[dict], str]


@dataclass(frozen=True)
class Spec:
    """One table: ``title(result)``, ``rows(result)`` (dicts), and ``(header, cell)`` columns; the first column is
    left-aligned and the rest right-aligned."""

    title: Callable[[Any], str]
    rows: Callable[[Any], Iterable[dict]]
    columns: Sequence[tuple[str, Cell]]


def num(v: float | None) -> str:
    """A metric for a table cell; a value that could not be measured (stored as null) shows as a dash."""
    return "–" if v is None or not math.isfinite(v) else f"{v:.4g}"


def fixed(key: str, spec: str) -> Cell:
    """The row's ``key`` formatted by ``spec`` (``"+.4f"``, ``".1%"``), a dash when absent."""
    return lambda r: "–" if r.get(key) is None else format(r[key], spec)


def pm(key: str, digits: int = 4, sign: int = 1) -> Cell:
    """``value ± se`` of the row's ``key`` and ``key_se`` (``sign`` -1 shows a loss as a gain), a dash when absent."""
    return lambda r: (
        "–" if r.get(key) is None else f"{sign * r[key]:+.{digits}f} ± {r.get(key + '_se') or 0:.{digits}f}"
    )


def _perplexity_title(report: Any) -> str:
    o = report.original
    return f"held-out perplexity (original {o['ppl']:.3f} ± {o['ppl_se'] or 0:.3f})"


def _profile_units(prof: Any) -> list[dict]:
    """The five least and five most important units by the reference metric."""
    ref = prof.agreement.get("reference", "ablate_nll")
    ranked = sorted((u for u in prof.units if u.metrics.get(ref) is not None), key=lambda u: u.metrics[ref])
    return [
        {
            "unit": u.name,
            "value": u.metrics[ref],
            "similarity": u.metrics.get("bi") if u.kind == "block" else u.metrics.get("sub_cos"),
            "rel_update": u.metrics.get("rel_update"),
        }
        for u in ranked[:5] + ranked[-5:]
    ]


def _agreement_rows(prof: Any) -> list[dict]:
    by_kind = prof.agreement.get("by_kind", {})
    metrics = sorted({m for row in by_kind.values() for m in row})
    return [{"metric": m, **{k: (by_kind[k].get(m) or {}).get("rho") for k in by_kind}} for m in metrics]


def _agreement(prof: Any) -> Spec:
    """Spearman rho of every metric with the reference, one column per unit kind the profile has."""
    kinds = list(prof.agreement.get("by_kind", {}))
    return Spec(
        lambda p: f"Spearman rho with {p.agreement.get('reference', 'ablate_nll')}",
        _agreement_rows,
        [("metric", lambda r: r["metric"])] + [(k, fixed(k, "+.2f")) for k in kinds],
    )


def _profile(prof: Any) -> list[Spec]:
    ref = prof.agreement.get("reference", "ablate_nll")
    units = Spec(
        lambda p: f"least and most important units by {ref}",
        _profile_units,
        [
            ("unit", lambda r: r["unit"]),
            (ref, lambda r: num(r["value"])),
            ("bi / sub_cos", lambda r: num(r["similarity"])),
            ("rel_update", lambda r: num(r["rel_update"])),
        ],
    )
    return [units, _agreement(prof)]


def _units_cell(r: dict) -> str:
    return ", ".join(r["units"]) if len(r["units"]) <= 6 else f"{len(r['units'])} units"


DROP = Spec(
    _perplexity_title,
    lambda rep: rep.variants,
    [
        ("plan", lambda r: r["key"]),
        ("units", _units_cell),
        ("ppl", fixed("ppl", ".3f")),
        ("Δnll ± se", pm("delta_nll")),
        ("KL", fixed("kl", ".4f")),
        ("params", fixed("params_ratio", ".1%")),
        ("prefill ×", fixed("prefill_speedup", ".2f")),
        ("generate ×", fixed("generate_speedup", ".2f")),
    ],
)

QUANTIZE = Spec(
    _perplexity_title,
    lambda rep: rep.rows,
    [
        ("plan", lambda r: r["plan"]),
        ("bits/weight", fixed("bpw", ".3f")),
        ("model bits/weight", fixed("bpw_model", ".3f")),
        ("ppl", fixed("ppl", ".3f")),
        ("Δnll ± se", pm("delta_nll")),
        ("predicted Δnll", fixed("predicted_delta_nll", ".4f")),
        ("KL", fixed("kl", ".4f")),
    ],
)


def _tune_rows(report: Any) -> list[dict]:
    """One row per strategy, and one more for its restored variant: gain on the tuning data, forgetting on the
    second corpus."""
    rows = []
    for r in report.runs:
        for name in ("tuned", "restored"):
            train, second = r["eval"].get("train", {}).get(name), r["eval"].get("second", {}).get(name)
            if train is not None:
                key = r["key"] + (" restored" if name == "restored" else "")
                rows.append({**r, "key": key, "train": train, "second": second or {}})
    return rows


TUNE = Spec(
    lambda rep: "held-out gain on the tuning data and forgetting on the second corpus (nats per token, ± se)",
    _tune_rows,
    [
        ("strategy", lambda r: r["key"]),
        ("gain", lambda r: pm("delta_nll", sign=-1)(r["train"])),
        ("forgetting", lambda r: pm("delta_nll")(r["second"])),
        ("KL", lambda r: fixed("kl", ".4f")(r["second"])),
        ("trainable", fixed("trainable_params_max", ",")),
        ("optimizer state MB", lambda r: f"{r['optimizer_state_bytes_max'] / 1e6:.1f}"),
        ("s/step", fixed("seconds_per_step", ".2f")),
    ],
)


def _pm3(key: str) -> Cell:
    return lambda r: f"{r[key]:.3f}±{r[key + '_se']:.3f}"


PROBE = Spec(
    lambda res: (
        f"cross-validated probes ({res.meta['folds']} folds, chance {res.meta['chance']:.3f}); best "
        f"{res.best_unit() or 'none'}"
    ),
    lambda res: res.units,
    [("unit", lambda r: r["unit"])]
    + [
        (header, _pm3(key))
        for header, key in (
            ("accuracy", "accuracy"),
            ("AUC", "auc"),
            ("diff-of-means", "diffmean_accuracy"),
            ("control", "control"),
            ("selectivity", "selectivity"),
        )
    ],
)

STEER = Spec(
    lambda rep: (
        f"steering, chosen {rep.choice['chosen_key']} (alpha x mean residual norm); effects on "
        f"{len(rep.prompts)} report prompts"
    ),
    lambda rep: rep.rows,
    [
        ("key", lambda r: r["key"]),
        ("score shift ± se", pm("score_shift", 3)),
        ("margin shift ± se", pm("margin_shift", 3)),
        ("proj shift ± se", pm("proj_shift", 3)),
        ("Δnll ± se", pm("delta_nll", 3)),
        ("KL", fixed("kl", ".4f")),
    ],
)

#: Each kind's tables; the profile's depend on which metrics and unit kinds it holds.
SPECS: dict[str, Callable[[Any], list[Spec]]] = {
    "profile": _profile,
    "drop": lambda _: [DROP],
    "quantize": lambda _: [QUANTIZE],
    "tune": lambda _: [TUNE],
    "probe": lambda _: [PROBE],
    "steer": lambda _: [STEER],
}


def table(spec: Spec, result: Any) -> Table:
    """A rich table of ``result`` by ``spec``."""
    t = Table(title=spec.title(result))
    for i, (header, _) in enumerate(spec.columns):
        t.add_column(header, justify="left" if i == 0 and header == "metric" else "right")
    for row in spec.rows(result):
        t.add_row(*(cell(row) for _, cell in spec.columns))
    return t


def tables(kind: str, result: Any) -> list[Table]:
    """Every table a ``kind`` result ends its command with."""
    return [table(spec, result) for spec in SPECS[kind](result)]
