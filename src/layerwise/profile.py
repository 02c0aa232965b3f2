"""Profile: one row per unit, one column per metric, plus how it was made.

:func:`profile` makes one streaming pass over the calibration windows that feeds each metric family's reducer
(:mod:`layerwise.reducers`). For each batch it runs the model once with taps on every block (stream metrics,
attention, and the Taylor estimate through one backward pass), reads the logit lens from the cached block outputs,
and then ablates every unit exactly by re-running only the blocks after it from the cached residual stream (the
three units of a block as one batch, since all three rejoin the stream at the next block). The head reads the last
block's output a slice of positions at a time (or at the sampled positions), so a batch's full-vocabulary logits
never exist at once.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import torch
from tqdm.auto import tqdm

from .anatomy import KINDS, Anatomy, Kind, Part, parse_part, part_name, unit_name
from .data import Windows, check_context
from .errors import LayerwiseError
from .experts import COPIES, chunks, experts_apart
from .io import check_same_model, provenance, write_atomic, write_json
from .loading import LoadedModel
from .memory import peak_memory
from .metrics import lens as lens_m
from .metrics import stream as st
from .metrics.agreement import spearman
from .reducers import (
    ATTENTION,
    ROUTING,
    AttentionPatterns,
    ExactAblation,
    LogitLens,
    Reducers,
    Routing,
    StreamStats,
    TaylorEstimate,
    WeightZD,
)
from .trace import BlockTrace, readout, run_blocks, skip, tap, tile_calls

METRICS: tuple[str, ...] = (
    "bi",
    "sub_cos",
    "zd",
    "rel_update",
    "resid_norm",
    "max_abs",
    "kurtosis",
    "mlp_sparsity",
    "lens_kl",
    "lens_top1",
    "lens_nll",
    "ablate_nll",
    "ablate_kl",
    "taylor_nll",
    "attn_entropy",
    "attn_distance",
    "attn_sink",
    *ROUTING,
)
#: Which unit kinds each metric describes (others get null).
APPLIES: dict[str, tuple[str, ...]] = {
    "bi": ("block",),
    "sub_cos": ("attn", "mlp"),
    "mlp_sparsity": ("mlp",),
    "lens_kl": ("block",),
    "lens_top1": ("block",),
    "lens_nll": ("block",),
    **{m: ("attn",) for m in ATTENTION},
    "zd": ("block", "attn", "mlp", "expert", "router", "shared"),
    "rel_update": ("block", "attn", "mlp", "expert"),
    "ablate_nll": ("block", "attn", "mlp", "expert"),
    "ablate_kl": ("block", "attn", "mlp", "expert"),
    "route_share": ("expert",),
    "gate_mean": ("expert",),
    "route_entropy": ("router",),
    "load_imbalance": ("router",),
    "route_skip": ("router",),
}
#: The value a ranking gives a metric an expert that no token was routed to cannot have: no mean gate weight or
#: update over no tokens, so 0 (it added nothing).
UNSEEN: dict[str, float] = {"gate_mean": 0.0, "rel_update": 0.0}
#: +1 if a larger value should mean a more important unit, -1 if smaller does, 0 if undecided.
DIRECTION: dict[str, int] = {
    "bi": 1,
    "sub_cos": -1,
    "zd": 0,
    "rel_update": 1,
    "resid_norm": 0,
    "max_abs": 0,
    "kurtosis": 0,
    "mlp_sparsity": -1,
    "lens_kl": 0,
    "lens_top1": 0,
    "lens_nll": 0,
    "ablate_nll": 1,
    "ablate_kl": 1,
    "taylor_nll": 1,
    "attn_entropy": 0,
    "attn_distance": 0,
    "attn_sink": 0,
    "route_share": 1,
    "gate_mean": 1,
    "route_entropy": 0,
    "load_imbalance": 0,
    "route_skip": 0,
}
Ablation = Literal["exact", "taylor", "none"]


def order_by(order: str) -> tuple[str, int]:
    """The metric an order ranks by, and the sign that sorts units from least to most important.

    ``METRIC:asc`` puts the lowest values first and ``METRIC:desc`` the
    highest; a bare metric takes its :data:`DIRECTION`. A metric with no
    importance direction (``zd``, ``kurtosis``, ``lens_*``, ``attn_*``...) must
    say which end goes first: guessing would quietly rank backwards.
    """
    metric, _, way = order.partition(":")
    if metric not in METRICS:
        raise LayerwiseError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if way:
        if way not in ("asc", "desc"):
            raise LayerwiseError(
                f"unknown direction {way!r} in {order!r}; write {metric}:asc (lowest first) or {metric}:desc "
                "(highest first)"
            )
        return metric, 1 if way == "asc" else -1
    if not DIRECTION.get(metric):
        raise LayerwiseError(
            f"{metric} has no importance direction; write {metric}:asc to take the lowest values as least important, "
            f"or {metric}:desc for the highest"
        )
    return metric, DIRECTION[metric]


#: Unit kinds each unit choice (drop's ``--unit``) draws from; ``any`` ranks attention and MLP sublayers jointly
#: (LLM-Drop); ``expert`` ranks every routed expert of every sparse block jointly.
UNIT_KINDS: dict[str, tuple[Kind | Part, ...]] = {
    "block": ("block",),
    "attn": ("attn",),
    "mlp": ("mlp",),
    "any": ("attn", "mlp"),
    "expert": ("expert",),
}


def check_order(unit: str, order: str) -> tuple[str, int]:
    """The metric of a metric order and its sign (see :func:`order_by`), refused before anything is measured
    when it is unknown, has no direction, or does not describe ``unit``'s kinds."""
    if order.partition(":")[0] not in METRICS:
        raise LayerwiseError(
            f"unknown `order` {order!r}; use a Profile metric ({', '.join(METRICS)}), random or contiguous"
        )
    metric, sign = order_by(order)
    for kind in UNIT_KINDS.get(unit, ()):
        if kind not in APPLIES.get(metric, ("block", "attn", "mlp")):
            fits = [m for m in METRICS if kind in APPLIES.get(m, ("block", "attn", "mlp"))]
            raise LayerwiseError(
                f"{metric} does not describe {kind} units; for `unit` {unit} order by one of {', '.join(fits)}"
            )
    return metric, sign


@dataclass
class Unit:
    name: str
    layer: int
    kind: Kind | Part
    metrics: dict[str, float | None]
    details: dict = field(default_factory=dict)


@dataclass
class Profile:
    """Measurements of every unit of one model on one corpus."""

    meta: dict
    units: list[Unit]
    agreement: dict = field(default_factory=dict)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise LayerwiseError(f"unit {name} is not in this profile")

    def values(self, metric: str, kind: Kind) -> dict[str, float | None]:
        """``{unit name: value}`` for one metric over the units of one kind, in depth order."""
        return {u.name: u.metrics.get(metric) for u in self.units if u.kind == kind}

    def filled(self, metric: str, kinds: Collection[str]) -> dict[str, float | None]:
        """``{unit name: value}`` for one metric over the units of these kinds, in depth order; an expert no token
        chose takes the value it would have over no tokens (``UNSEEN``: a mean gate weight and an update of 0)."""
        unseen = UNSEEN.get(metric)
        return {
            u.name: unseen
            if u.metrics.get(metric) is None and u.metrics.get("route_share") == 0
            else u.metrics.get(metric)
            for u in self.units
            if u.kind in kinds
        }

    def ranked(self, order: str, unit: str = "block", exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Units of a unit choice (``block``, ``attn``, ``mlp``, or ``any`` sublayer) from least to most important by
        ``order`` (a metric, or ``METRIC:asc|desc``, see :func:`order_by`), with their values; ``exclude`` leaves
        some out (an iterative drop's earlier picks)."""
        metric, sign = check_order(unit, order)
        vals = [(name, v) for name, v in self.filled(metric, UNIT_KINDS[unit]).items() if name not in exclude]
        if not vals or any(v is None for _, v in vals):
            raise LayerwiseError(
                f"the profile has no {metric} values; re-profile with {needs_hint(metric, unit == 'expert')}, or leave "
                "out `prof` to measure them"
            )
        return sorted(((name, float(v)) for name, v in vals if v is not None), key=lambda nv: sign * nv[1])

    def rank(self, order: str, unit: str = "block", exclude: Collection[str] = ()) -> list[str]:
        """The unit names of :meth:`ranked`, least important first."""
        return [name for name, _ in self.ranked(order, unit, exclude)]

    def check(self, lm: LoadedModel) -> None:
        """Refuse a model other than the one this profile measured: its ranking means nothing on other weights."""
        check_same_model(
            self.meta.get("model_hash"),
            lm.source.get("model_hash"),
            "the profile was measured on",
            "profile this model, or leave out `prof`",
        )
        if self.meta.get("n_layers") not in (None, lm.anatomy.n_layers):
            raise LayerwiseError(
                f"the profile has {self.meta['n_layers']} blocks but this model has {lm.anatomy.n_layers}; profile "
                "this model"
            )

    def to_dict(self) -> dict:
        return {
            "kind": "profile",
            "meta": self.meta,
            "units": [
                {"name": u.name, "layer": u.layer, "kind": u.kind, "metrics": u.metrics, "details": u.details}
                for u in self.units
            ],
            "agreement": self.agreement,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        units = [Unit(u["name"], u["layer"], u["kind"], u["metrics"], u.get("details", {})) for u in d["units"]]
        return cls(meta=d["meta"], units=units, agreement=d.get("agreement", {}))

    def save(self, out: str | Path) -> Path:
        """Write ``profile.json`` and ``profile.csv`` atomically into ``out``; return the JSON path."""
        out = Path(out)
        path = write_json(out / "profile.json", self.to_dict())
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["name", "layer", "kind", *METRICS])
        for u in self.units:
            w.writerow(
                [u.name, u.layer, u.kind, *("" if u.metrics.get(m) is None else repr(u.metrics[m]) for m in METRICS)]
            )
        write_atomic(out / "profile.csv", buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if path.is_dir():
            path = path / "profile.json"
        if not path.is_file():
            raise LayerwiseError(f"no profile at {path}; run `layerwise profile --out DIR` first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise LayerwiseError(f"{path} is not a layerwise profile ({exc.__class__.__name__})") from None


def needs(metric: str, experts: bool = False) -> dict:
    """The cheapest :func:`profile` options that measure ``metric`` (``METRIC:asc|desc`` allowed), for every expert
    too when ``experts``."""
    metric = metric.partition(":")[0]
    ablation = {"ablate_nll": "exact", "ablate_kl": "exact", "taylor_nll": "taylor"}.get(metric, "none")
    return {"ablation": ablation, "lens": metric.startswith("lens_"), "attention": metric in ATTENTION} | (
        {"expert_ablation": True} if experts and ablation == "exact" else {}
    )


def needs_hint(metric: str, experts: bool = False) -> str:
    """How to ask for ``metric`` (for every expert too when ``experts``), in the API's words and the CLI's."""
    n = needs(metric, experts)
    if n["attention"]:
        return "attention=True (layerwise profile --attention)"
    if n["lens"]:
        return "lens=True (layerwise profile without --no-lens)"
    if n.get("expert_ablation"):
        return "ablation='exact', expert_ablation=True (layerwise profile --ablation exact --expert-ablation)"
    return f"ablation={n['ablation']!r} (layerwise profile --ablation {n['ablation']})"


def _sampled_rows(batch: int, per_window: int, positions: int | None, g: torch.Generator) -> torch.Tensor | None:
    """``positions`` distinct predicted positions drawn uniformly in each window, as rows of the flattened batch (None:
    all)."""
    if positions is None or positions >= per_window:
        return None
    pick = torch.rand(batch, per_window, generator=g).argsort(dim=1)[:, :positions].sort(dim=1).values
    return (pick + per_window * torch.arange(batch)[:, None]).flatten()


def profile(
    lm: LoadedModel,
    windows: Windows,
    *,
    ablation: Ablation = "exact",
    batch_size: int = 4,
    lens: bool = True,
    attention: bool = False,
    positions: int | None = None,
    ablation_samples: int | None = None,
    expert_ablation: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Profile:
    """Measure every block and sublayer on the calibration windows.

    ``ablation="exact"`` computes both the exact ablation and its Taylor
    estimate; ``"taylor"`` only the estimate; ``"none"`` neither. Agreement is
    measured against ``ablate_nll`` (or ``taylor_nll`` when exact is off).
    ``lens=False`` leaves out the logit lens, which costs one head projection
    per block: for a small model with a large vocabulary, several forward passes.
    ``attention=True`` adds per-head attention entropy, query-key distance and
    sink mass; it needs a model loaded with ``attn_implementation="eager"``,
    since fused kernels never materialize the attention probabilities.

    The head-based readouts (logit lens, exact ablation) can be scored on a
    sample: ``positions`` predicted positions per window, drawn uniformly
    with ``seed`` (the ablated model still runs every position: only the
    head and the comparison are skipped elsewhere), and exact ablation on the
    first ``ablation_samples`` calibration windows, rounded up to whole
    batches. Each window's mean is then an unbiased estimate of its mean over
    all positions, and the standard errors across windows
    (``ablate_nll_se``) include the sampling. None means all. ``seed`` also
    seeds torch before the pass, so a model that samples inside its forward
    runs the same way twice.

    ``expert_ablation=True`` (with exact ablation, on a mixture-of-experts model) also ablates every expert exactly:
    taken out of routing (:mod:`layerwise.experts`) in its block, then the later blocks and the head, on the same
    windows and positions; it costs E / 3 passes of the blocks from each sparse block on, per ablated batch.

    Each metric family is a reducer (:mod:`layerwise.reducers`) fed by one pass: batch by batch through the whole
    model here, or, for a model loaded with ``offload="disk"``, block by block with one block's weights read at a
    time (:mod:`layerwise.profile_streamed`), with the same numbers.
    """
    _check(lm, windows, ablation, attention, positions, ablation_samples, expert_ablation)
    torch.manual_seed(seed)
    start = time.perf_counter()
    ids = windows.calibration
    batches = list(torch.split(ids, batch_size))
    red = _reducers(
        lm, int(batches[0].numel()), ablation=ablation, lens=lens, attention=attention, experts=expert_ablation
    )
    n_ablated = 0
    if red.ablation is not None:
        n_ablated = len(batches) if ablation_samples is None else min(len(batches), -(-ablation_samples // batch_size))
    sample = Positions(positions, torch.Generator().manual_seed(seed))
    L = lm.anatomy.n_layers
    units = 3 * L + (sum(map(lm.anatomy.n_experts, lm.anatomy.moe_layers)) if expert_ablation else 0)
    with tqdm(total=len(batches) + units * n_ablated, desc="profile", unit="pass", disable=not progress) as bar:
        if lm.streamed is not None:
            from .profile_streamed import streamed_pass

            streamed_pass(lm, batches, red, n_ablated=n_ablated, sample=sample, bar=bar)
        else:
            for b, batch in enumerate(batches):
                _resident_batch(lm, batch.to(lm.device), red, ablate=b < n_ablated, sample=sample, bar=bar)
            red.zd.add(lm.anatomy, range(L))
    prof = Profile(
        meta={
            **lm.meta(),
            "data": windows.meta(),
            "n_windows_used": int(ids.shape[0]),
            "n_tokens": int(ids.numel()),
            "n_predicted_tokens": sum(int(b[:, 1:].numel()) for b in batches),
            "ablation": ablation,
            "lens": lens,
            "attention": attention,
            "positions": positions,
            "ablation_windows": None if red.ablation is None else red.ablation.windows,
            "expert_ablation": expert_ablation,
            **provenance(seed=seed, batch_size=batch_size),
            "wall_time_s": round(time.perf_counter() - start, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "peak_memory": peak_memory(),
        },
        units=_units(lm.anatomy, red),
    )
    prof.agreement = agreement(prof)
    return prof


def _check(
    lm: LoadedModel,
    windows: Windows,
    ablation: str,
    attention: bool,
    positions: int | None,
    ablation_samples: int | None,
    expert_ablation: bool = False,
) -> None:
    """Refuse settings :func:`profile` cannot measure, before anything runs."""
    if ablation not in ("exact", "taylor", "none"):
        raise LayerwiseError(f"unknown `ablation` {ablation!r}; use exact, taylor or none")
    if expert_ablation and (ablation != "exact" or not lm.anatomy.moe_layers):
        raise LayerwiseError(
            "`expert_ablation` ablates the experts of a mixture-of-experts model with `ablation` exact; "
            + ("this model has no experts" if not lm.anatomy.moe_layers else f"not with `ablation` {ablation}")
        )
    for name, value in (("positions", positions), ("ablation_samples", ablation_samples)):
        if value is not None and value < 1:
            raise LayerwiseError(f"`{name}` must be at least 1 (or None for all), not {value}")
    impl = getattr(lm.model.config, "_attn_implementation", None)
    if attention and impl != "eager":
        raise LayerwiseError(
            f"attention metrics need eager attention, but the model runs {impl!r}; load it with "
            "attn_implementation='eager' (the CLI does for --attention, and for orders by attn_* metrics)"
        )
    check_context(windows.seq_len, lm.anatomy.context_length)


def _reducers(
    lm: LoadedModel, tokens: int, *, ablation: str, lens: bool, attention: bool, experts: bool = False
) -> Reducers:
    """The reducers a run's settings ask for; ``tokens`` a batch; ``experts``: every expert ablated too."""
    L = lm.anatomy.n_layers
    return Reducers(
        stream=StreamStats(lm.anatomy, lm.device, tokens, runs=lm.streamed is None),
        zd=WeightZD(),
        lens=LogitLens(L) if lens else None,
        attention=AttentionPatterns(L) if attention else None,
        ablation=ExactAblation(experts=experts) if ablation == "exact" else None,
        taylor=TaylorEstimate() if ablation in ("exact", "taylor") else None,
        routing=Routing(lm.anatomy) if lm.anatomy.moe_layers else None,
    )


@dataclass
class Positions:
    """The predicted positions the head-based readouts score: ``count`` a window, drawn with ``g`` (None: all)."""

    count: int | None
    g: torch.Generator

    def draw(self, batch: int, per_window: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
        """The rows of a flattened batch to score (None: all), and how many a window."""
        rows = _sampled_rows(batch, per_window, self.count, self.g)
        return (None, per_window) if rows is None else (rows.to(device), rows.numel() // batch)


def _resident_batch(
    lm: LoadedModel, x: torch.Tensor, red: Reducers, *, ablate: bool, sample: Positions, bar: tqdm
) -> None:
    """Feed one batch through the whole model to the reducers: the blocks' traces, the Taylor estimate through one
    backward pass, and the head's readouts of the cached block outputs and (``ablate``) of every unit's ablation."""
    an, L = lm.anatomy, lm.anatomy.n_layers
    h: list[torch.Tensor] = [x] * (L + 1)
    mid: list[torch.Tensor] = [x] * L
    calls: list[tuple[tuple, dict]] = [((), {})] * L
    updates: list[torch.Tensor] = []

    def on_block(tr: BlockTrace) -> None:
        i = tr.layer
        mid[i] = red.block(tr).view_as(tr.h_in)
        h[i], h[i + 1], calls[i] = tr.h_in.detach(), tr.h_out.detach(), (tr.args, tr.kwargs)
        if red.taylor is not None:
            updates.extend((tr.attn, tr.mlp, tr.h_out))

    # The head runs below on the last block's output (in slices, or at sampled positions), never on a whole batch
    # at once: (batch, seq, vocab) logits and their gradient would be gigabytes with a 262k-token vocabulary.
    with torch.set_grad_enabled(red.taylor is not None), tap(an, on_block, attn_weights=red.attention is not None):
        lm.model(input_ids=x, use_cache=False, logits_to_keep=1)
    targets = x[:, 1:].flatten().to(an.head.get_parameter("weight").device)
    if red.taylor is not None:
        red.taylor.add(_taylor(an, updates, targets), x.shape[1] - 1)
    updates.clear()
    stacked = tile_calls(calls, x.shape[0], len(KINDS))

    def ablated(i: int) -> torch.Tensor:
        # All three units of block i rejoin the stream at block i + 1, so their
        # ablated streams run the later blocks as one batch (one pass, not three).
        with skip(an, [unit_name(i, "attn")]):
            no_attn = run_blocks(an, i, h[i], calls, stop=i + 1)
        starts = {"block": h[i], "attn": no_attn, "mlp": mid[i]}
        return run_blocks(an, i + 1, torch.cat([starts[k] for k in KINDS]), stacked)

    def experts_ablated() -> Iterator[tuple[int, list[int], torch.Tensor]]:
        tiled = {n: tile_calls(calls, x.shape[0], n) for n in range(1, COPIES + 1)}
        for i in an.moe_layers:
            for each in chunks(an, i):
                with experts_apart(an, i, each):
                    out = run_blocks(an, i, h[i].repeat(len(each), 1, 1), tiled[len(each)], stop=i + 1)
                yield i, each, run_blocks(an, i + 1, out, tiled[len(each)])

    with torch.no_grad():
        read(
            an,
            red,
            h[L],
            h[1:].__getitem__,
            ablated if ablate else None,
            targets,
            sample,
            bar,
            experts_ablated if ablate else None,
        )


def read(
    an: Anatomy,
    red: Reducers,
    last: torch.Tensor,
    outputs: Callable[[int], torch.Tensor],
    ablated: Callable[[int], torch.Tensor] | None,
    targets: torch.Tensor,
    sample: Positions,
    bar: tqdm,
    experts: Callable[[], Iterable[tuple[int, list[int], torch.Tensor]]] | None = None,
) -> None:
    """One batch's head readouts, each against the model's own (of ``last``, the last block's output) at the same
    sampled positions: the logit lens at each block's output (``outputs(i)``) and, given ``ablated``, the exact
    ablation of every unit (``ablated(i)``: block ``i``'s three ablated streams after the last block, in
    :data:`KINDS` order) and, when the ablation reducer asks, of every expert (``experts()``: each sparse block's
    experts, a group at a time, with their stacked streams after the last block). Nothing is drawn when no reducer
    reads the head. The readouts live only in this call, so the next batch's passes never run beside them."""
    if red.lens is None and red.ablation is None:
        bar.update(1)
        return
    rows, sampled = sample.draw(last.shape[0], last.shape[1] - 1, last.device)
    ref = lens_m.Reference.from_logits(readout(an, last, rows), targets if rows is None else targets[rows])
    if red.lens is not None:
        for i in range(an.n_layers):
            red.lens.add(i, readout(an, outputs(i), rows), ref)
    bar.update(1)
    if ablated is None or red.ablation is None:
        return
    red.ablation.windows += last.shape[0]
    for i in range(an.n_layers):
        for kind, out in zip(KINDS, ablated(i).chunk(len(KINDS))):
            red.ablation.add(unit_name(i, kind), readout(an, out, rows), ref, sampled)
            bar.update(1)
    if experts is not None and red.ablation.experts:
        for i, each, outs in experts():
            for j, out in zip(each, outs.chunk(len(each))):
                red.ablation.add(part_name(i, "expert", j), readout(an, out, rows), ref, sampled)
                bar.update(1)


def _taylor(an: Anatomy, updates: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per window, the first-order change of the summed NLL when each unit's update is removed, as (batch, 3 * layers)
    in (attn, mlp, block) order per layer; ``updates`` holds each block's (attn, mlp, h_out) with their graph."""
    # Units skipped at run time add constant zeros, outside the graph: their estimate is 0.
    live = [u for u in updates if u.requires_grad]
    d_out = lens_m.nll_grad(an.logits, an.head.get_parameter("weight").shape[0], updates[-1], targets)
    found = iter(torch.autograd.grad(updates[-1], live, grad_outputs=d_out))
    grads = [next(found) if u.requires_grad else torch.zeros_like(u) for u in updates]
    est = []
    for i in range(len(updates) // 3):
        a, m = updates[3 * i].detach(), updates[3 * i + 1].detach()
        # The MLP's update and the block's update a+m both move the stream at
        # the block's output: removing them changes the loss by about -g_out.(update).
        ga, g_out = grads[3 * i], grads[3 * i + 2]
        est += [-(ga * a).sum(dim=(1, 2)), -(g_out * m).sum(dim=(1, 2)), -(g_out * (a + m)).sum(dim=(1, 2))]
    return torch.stack(est, dim=-1)


def _units(an: Anatomy, red: Reducers) -> list[Unit]:
    """Every unit's row, each block's then the parts of its sparse MLP, from each reducer's (a metric no reducer
    measured is null)."""
    found = red.all()
    st.to_host([s for r in found for s in r.stats()])  # one copy from the device for every sum
    rows = [r.rows() for r in found]
    units = []
    for layer in range(an.n_layers):
        parts: list[tuple[str, Kind | Part]] = [
            (n, cast(Part, (parse_part(n) or (0, ""))[1])) for n in an.layer_parts(layer)
        ]
        for name, kind in [(unit_name(layer, k), k) for k in KINDS] + parts:
            metrics: dict[str, float | None] = dict.fromkeys(METRICS)
            details: dict[str, Any] = {}
            for got in rows:
                m, d = got.get(name, ({}, {}))
                metrics |= m
                details |= d
            units.append(Unit(name, layer, kind, metrics, details))
    return units


def agreement(prof: Profile) -> dict:
    """Spearman rho of every metric with the causal reference, per unit kind (experts too, when ablated)."""
    ref = "ablate_nll" if any(u.metrics.get("ablate_nll") is not None for u in prof.units) else "taylor_nll"
    by_kind: dict[str, dict] = {}
    ablated = any(u.kind == "expert" and u.metrics.get(ref) is not None for u in prof.units)
    for kind in (*KINDS, "expert") if ablated else KINDS:
        us = [u for u in prof.units if u.kind == kind]
        ys = [u.metrics.get(ref) for u in us]
        row = {}
        for metric in METRICS:
            xs = [u.metrics.get(metric) for u in us]
            # an expert's metrics: those measured on experts (routing, zd, the ablation's KL)
            fits = kind in APPLIES.get(metric, KINDS) if kind in KINDS else any(x is not None for x in xs)
            if metric == ref or not fits:
                continue
            rho, n = spearman(xs, ys)
            row[metric] = {"rho": rho, "n": n}
        by_kind[kind] = row
    return {"reference": ref, "by_kind": by_kind, "direction": DIRECTION}
