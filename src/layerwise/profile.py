"""Profile: one row per unit, one column per metric, plus how it was made.

:func:`profile` makes one streaming pass over the calibration windows. For
each batch it runs the model once with taps on every block (stream metrics,
and the Taylor estimate through one backward pass), reads the logit lens from
the cached block outputs, and then ablates every unit exactly by re-running
only the blocks after it from the cached residual stream (the three units of
a block as one batch, since all three rejoin the stream at the next block).
The head reads the last block's output a slice of positions at a time (or at
the sampled positions), so a batch's full-vocabulary logits never exist at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .anatomy import KINDS, Kind, unit_name
from .data import Windows, check_context
from .errors import LayerwiseError
from .io import check_same_model, provenance, write_atomic, write_json
from .loading import LoadedModel
from .memory import peak_memory
from .metrics import lens as lens_m
from .metrics import stream as st
from .metrics.agreement import spearman
from .metrics.weights import z_fraction
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
)
#: The attention-pattern metrics (``attention=True``); each is the mean over heads, per head in ``details``.
ATTENTION = ("attn_entropy", "attn_distance", "attn_sink")
#: Which unit kinds each metric describes (others get null).
APPLIES: dict[str, tuple[Kind, ...]] = {
    "bi": ("block",),
    "sub_cos": ("attn", "mlp"),
    "mlp_sparsity": ("mlp",),
    "lens_kl": ("block",),
    "lens_top1": ("block",),
    "lens_nll": ("block",),
    **{m: ("attn",) for m in ATTENTION},
}
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
#: (LLM-Drop).
UNIT_KINDS: dict[str, tuple[Kind, ...]] = {
    "block": ("block",),
    "attn": ("attn",),
    "mlp": ("mlp",),
    "any": ("attn", "mlp"),
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
    kind: Kind
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

    def ranked(self, order: str, unit: str = "block", exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Units of a unit choice (``block``, ``attn``, ``mlp``, or ``any`` sublayer) from least to most important by
        ``order`` (a metric, or ``METRIC:asc|desc``, see :func:`order_by`), with their values; ``exclude`` leaves
        some out (an iterative drop's earlier picks)."""
        metric, sign = check_order(unit, order)
        kinds = UNIT_KINDS[unit]
        vals = [(u.name, u.metrics.get(metric)) for u in self.units if u.kind in kinds and u.name not in exclude]
        if not vals or any(v is None for _, v in vals):
            raise LayerwiseError(
                f"the profile has no {metric} values; re-profile with {needs_hint(metric)}, or leave out `prof` to "
                "measure them"
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


def needs(metric: str) -> dict:
    """The cheapest :func:`profile` options that measure ``metric`` (``METRIC:asc|desc`` allowed)."""
    metric = metric.partition(":")[0]
    ablation = {"ablate_nll": "exact", "ablate_kl": "exact", "taylor_nll": "taylor"}.get(metric, "none")
    return {"ablation": ablation, "lens": metric.startswith("lens_"), "attention": metric in ATTENTION}


def needs_hint(metric: str) -> str:
    """How to ask for ``metric``, in the API's words and the CLI's."""
    n = needs(metric)
    if n["attention"]:
        return "attention=True (layerwise profile --attention)"
    if n["lens"]:
        return "lens=True (layerwise profile without --no-lens)"
    return f"ablation={n['ablation']!r} (layerwise profile --ablation {n['ablation']})"


class _Run:
    """Stream statistics of a run of consecutive blocks, reduced together.

    During a pass each block's ``h``, ``a``, ``m``, ``h'`` and MLP hidden
    activations are held until the run's last block has run; then one set of
    kernels reduces the whole run, stacked along a block axis. On a GPU a
    small block's time goes to launching kernels, so statistics taken block
    by block would cost more than the blocks themselves; a run needs one set
    of launches for all its blocks. On the CPU a run is one block, which
    keeps the tensors in cache.
    """

    #: Per-token columns streamed into ``stream``: the block geometry, then the kurtosis of h and h'.
    COLUMNS = (*st.GEOMETRY, "kurt_in", "kurt_mid")

    def __init__(self) -> None:
        self.stream = st.Moments()
        self.max_in, self.max_mid = st.MaxAbs(), st.MaxAbs()
        self.sparsity = st.Moments()
        self._held: list[tuple[torch.Tensor, ...]] = []

    def hold(
        self, h: torch.Tensor, a: torch.Tensor, m: torch.Tensor, h_mid: torch.Tensor, mlp_hidden: torch.Tensor | None
    ) -> None:
        self._held.append((h, a, m, h_mid) + ((mlp_hidden,) if mlp_hidden is not None else ()))

    def reduce(self) -> None:
        """Add every held block to the running sums, as (tokens, blocks, ...) tensors, and let them go."""
        h, a, m, h_mid, *hidden = (torch.stack(ts, dim=1) if len(ts) > 1 else ts[0][:, None] for ts in zip(*self._held))
        self._held.clear()
        cols = (st.geometry(h, a, m), st.excess_kurtosis(h)[..., None], st.excess_kurtosis(h_mid)[..., None])
        self.stream.add(torch.cat(cols, dim=-1))
        self.max_in.add(h)
        self.max_mid.add(h_mid)
        if hidden:
            self.sparsity.add(st.lazy_fraction(hidden[0]))

    def stats(self) -> list[st.Moments | st.MaxAbs]:
        return [self.stream, self.max_in, self.max_mid, self.sparsity]


def _run_elements(device: torch.device) -> int:
    """Activations a run may hold, in elements: 512 MiB of float32 on an accelerator, one block on the CPU."""
    return 0 if device.type == "cpu" else 2**27


def _runs(lm: LoadedModel, tokens: int) -> list[tuple[_Run, int]]:
    """Each block's run and its row in it, for batches of ``tokens`` tokens."""
    an = lm.anatomy
    per_block = tokens * (4 * an.embed.weight.shape[1] + an.linear_weight(an.down_proj(0)).shape[1])
    size = max(1, _run_elements(lm.device) // per_block)
    runs = [_Run() for _ in range(0, an.n_layers, size)]
    return [(runs[i // size], i % size) for i in range(an.n_layers)]


class _LayerAcc:
    """Everything measured of one block and its two sublayers; fixed size whatever the number of tokens."""

    def __init__(self, run: _Run, row: int) -> None:
        self.run, self.row = run, row
        self.lens = st.Moments()  # columns: kl, top1, nll
        self.attention = st.Moments()  # columns: entropy, distance, sink, each per head
        self.abl_nll = {k: st.Moments() for k in KINDS}  # per-window means, for the standard error
        self.abl_kl = {k: st.Moments() for k in KINDS}

    def stats(self) -> list[st.Moments | st.MaxAbs]:
        return [self.lens, self.attention, *self.abl_nll.values(), *self.abl_kl.values()]

    def peak(self, stream: str) -> st.MaxAbs:
        """This block's row of its run's largest activations at its input (``in``) or after attention (``mid``)."""
        return (self.run.max_in if stream == "in" else self.run.max_mid).row(self.row)

    def sparsity(self) -> st.Moments:
        """This block's row of its run's MLP activation sparsity."""
        return self.run.sparsity.row(self.row)

    def column(self, name: str) -> tuple[float, float]:
        """Mean and standard deviation over tokens of one streamed column."""
        j = _Run.COLUMNS.index(name)
        stream = self.run.stream.row(self.row)
        return float(stream.mean[j]), float(stream.std[j])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _se(m: st.Moments) -> float | None:
    se = st.mean_se(m)[1]
    return None if se is None else _finite(se)


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

    A model loaded with ``offload="disk"`` is profiled block by block, one block's weights read at a time
    (:mod:`layerwise.profile_streamed`), with the same numbers.
    """
    if ablation not in ("exact", "taylor", "none"):
        raise LayerwiseError(f"unknown `ablation` {ablation!r}; use exact, taylor or none")
    for name, value in (("positions", positions), ("ablation_samples", ablation_samples)):
        if value is not None and value < 1:
            raise LayerwiseError(f"`{name}` must be at least 1 (or None for all), not {value}")
    an, model = lm.anatomy, lm.model
    impl = getattr(model.config, "_attn_implementation", None)
    if attention and impl != "eager":
        raise LayerwiseError(
            f"attention metrics need eager attention, but the model runs {impl!r}; load it with "
            "attn_implementation='eager' (the CLI does for --attention, and for orders by attn_* metrics)"
        )
    check_context(windows.seq_len, an.context_length)
    torch.manual_seed(seed)
    L = an.n_layers
    taylor_acc = st.Moments()  # columns: (attn, mlp, block) of each layer in turn
    taylor = ablation in ("exact", "taylor")
    need_ref = lens or ablation == "exact"
    start = time.perf_counter()
    ids = windows.calibration
    n_tokens = 0
    batches = list(torch.split(ids, batch_size))
    accs = [_LayerAcc(run, row) for run, row in _runs(lm, batches[0].numel())]
    n_ablated = (
        len(batches) if ablation_samples is None else min(len(batches), math.ceil(ablation_samples / batch_size))
    )
    bar = tqdm(
        total=len(batches) + (3 * L * n_ablated if ablation == "exact" else 0),
        desc="profile",
        unit="pass",
        disable=not progress,
    )
    g = torch.Generator().manual_seed(seed)
    ablated_windows, zd_of = 0, None
    if lm.streamed is not None:
        from .profile_streamed import streamed_pass

        ablated_windows, zd_of = streamed_pass(
            lm,
            batches,
            accs,
            taylor_acc,
            ablation=ablation,
            lens=lens,
            attention=attention,
            positions=positions,
            n_ablated=n_ablated if ablation == "exact" else 0,
            g=g,
            bar=bar,
        )
        n_tokens = sum(int(b[:, 1:].numel()) for b in batches)
        batches = []
    for batch_no, batch in enumerate(batches):
        x = batch.to(lm.device)
        h: list[torch.Tensor | None] = [None] * (L + 1)
        mid: list[torch.Tensor | None] = [None] * L
        calls: list[tuple[tuple, dict]] = [((), {})] * L
        updates: list[torch.Tensor] = []

        def on_block(tr: BlockTrace) -> None:
            i = tr.layer
            hmid = _observe(accs, tr, attention)
            h[i], mid[i], h[i + 1] = tr.h_in.detach(), hmid.view_as(tr.h_in), tr.h_out.detach()
            calls[i] = (tr.args, tr.kwargs)
            if taylor:
                updates.extend((tr.attn, tr.mlp, tr.h_out))

        # The head runs below on the last block's output (in slices, or at sampled positions), never on a whole batch
        # at once: (batch, seq, vocab) logits and their gradient would be gigabytes with a 262k-token vocabulary.
        with torch.set_grad_enabled(taylor), tap(an, on_block, attn_weights=attention):
            model(input_ids=x, use_cache=False, logits_to_keep=1)
        targets = x[:, 1:].flatten().to(an.head.get_parameter("weight").device)
        per_window = x.shape[1] - 1
        n_tokens += targets.numel()
        if taylor:
            taylor_acc.add(_taylor(an, updates, targets).double() / per_window)
        updates.clear()
        with torch.no_grad():
            if not need_ref:
                bar.update(1)
                continue
            rows = _sampled_rows(x.shape[0], per_window, positions, g)
            rows = rows.to(x.device) if rows is not None else None
            ablate = ablation == "exact" and batch_no < n_ablated
            ablated_windows += x.shape[0] if ablate else 0
            _readouts(
                an,
                accs,
                h,
                mid,
                calls,
                targets,
                rows,
                per_window if rows is None or positions is None else positions,
                lens=lens,
                ablate=ablate,
                bar=bar,
            )
    bar.close()
    units = _finalize(lm, accs, taylor_acc, ablation, zd_of)
    prof = Profile(
        meta={
            **lm.meta(),
            "data": windows.meta(),
            "n_windows_used": int(ids.shape[0]),
            "n_tokens": int(ids.numel()),
            "n_predicted_tokens": n_tokens,
            "ablation": ablation,
            "lens": lens,
            "attention": attention,
            "positions": positions,
            "ablation_windows": ablated_windows if ablation == "exact" else None,
            **provenance(seed=seed, batch_size=batch_size),
            "wall_time_s": round(time.perf_counter() - start, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "peak_memory": peak_memory(),
        },
        units=units,
    )
    prof.agreement = agreement(prof)
    return prof


def _observe(accs: list[_LayerAcc], tr: BlockTrace, attention: bool) -> torch.Tensor:
    """Feed one block's trace to its statistics; return the stream between its sublayers, flattened."""
    i, L = tr.layer, len(accs)
    hin, a, m = (t.detach().flatten(0, 1) for t in (tr.h_in, tr.attn, tr.mlp))
    hmid = hin + a
    hidden = tr.mlp_hidden.detach().flatten(0, 1) if tr.mlp_hidden is not None else None
    accs[i].run.hold(hin, a, m, hmid, hidden)
    if i == L - 1 or accs[i + 1].run is not accs[i].run:
        accs[i].run.reduce()
    if attention:
        if tr.attn_weights is None:
            raise LayerwiseError(
                f"{unit_name(i, 'attn')} returned no attention probabilities; load the model with "
                "attn_implementation='eager'"
            )
        accs[i].attention.add(st.attention_rows(tr.attn_weights))
    return hmid


def _taylor(an, updates: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
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


def _readouts(
    an,
    accs: list[_LayerAcc],
    h: list,
    mid: list,
    calls: list,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    sampled: int,
    *,
    lens: bool,
    ablate: bool,
    bar,
) -> None:
    """One batch's logit lens at every block output and, with ``ablate``, every unit's exact ablation, each against the
    model's own readout at the same positions. The batch's reference distribution and readouts live only in this call,
    so the next batch's passes never run beside them."""
    L = an.n_layers
    ref = lens_m.Reference.from_logits(readout(an, h[L], rows), targets if rows is None else targets[rows])
    if lens:
        for i in range(L):
            z = readout(an, h[i + 1], rows)
            kl, nll = lens_m.compare(z, ref)
            accs[i].lens.add(torch.stack((kl, lens_m.top1(z, ref), nll), dim=-1))
    bar.update(1)
    if not ablate:
        return
    stacked = tile_calls(calls, h[0].shape[0], len(KINDS))
    for i in range(L):
        # All three units of block i rejoin the stream at block i + 1, so their
        # ablated streams run the later blocks as one batch (one pass, not three).
        with skip(an, [unit_name(i, "attn")]):
            no_attn = run_blocks(an, i, h[i], calls, stop=i + 1)
        starts = {"block": h[i], "attn": no_attn, "mlp": mid[i]}
        outs = run_blocks(an, i + 1, torch.cat([starts[k] for k in KINDS]), stacked).chunk(len(KINDS))
        for kind, out in zip(KINDS, outs):
            kl, nll = lens_m.compare(readout(an, out, rows), ref)
            accs[i].abl_nll[kind].add(st.window_means(nll - ref.nll, sampled))
            accs[i].abl_kl[kind].add(st.window_means(kl, sampled))
            bar.update(1)


def zd_scores(an, layers) -> dict[str, float]:
    """zd of every weight matrix of these blocks, each matrix once (a block shares its sublayers' matrices)."""
    unique = {name: w for layer in layers for name, w in an.weight_matrices(layer, "block")}
    return dict(zip(unique, st.host_floats([z_fraction(w) for w in unique.values()])))


def _finalize(
    lm: LoadedModel, accs: list[_LayerAcc], taylor_acc: st.Moments, ablation: Ablation, zd_of: dict | None = None
) -> list[Unit]:
    an = lm.anatomy
    runs = list({id(acc.run): acc.run for acc in accs}.values())
    st.to_host([s for acc in accs for s in acc.stats()] + [s for run in runs for s in run.stats()] + [taylor_acc])
    # zd: each matrix once (a block shares its sublayers' matrices), all scores in one copy.
    mats = {(layer, kind): an.weight_matrices(layer, kind) for layer in range(len(accs)) for kind in KINDS}
    if zd_of is None:
        zd_of = zd_scores(an, range(len(accs)))
    taylor_means = taylor_acc.mean.tolist() if taylor_acc.n else None
    taylor_order = ("attn", "mlp", "block")
    units = []
    for layer, acc in enumerate(accs):
        lens = acc.lens.mean.tolist() if acc.lens.n else None
        sparsity = acc.sparsity()
        for kind in KINDS:
            # A block and its attention read h; the MLP reads h' = h + a.
            stream = "in" if kind != "mlp" else "mid"
            norm_mean, norm_std = acc.column(f"norm_{stream}")
            peak = acc.peak(stream)
            similarity = acc.column({"block": "bi", "attn": "attn_cos", "mlp": "mlp_cos"}[kind])[0]
            names = [n for n, _ in mats[(layer, kind)]]
            metrics: dict[str, float | None] = {
                "bi": _finite(similarity) if kind == "block" else None,
                "sub_cos": _finite(similarity) if kind != "block" else None,
                "zd": _finite(sum(zd_of[n] for n in names) / len(names)) if names else None,
                "rel_update": _finite(acc.column(f"{kind}_rel")[0]),
                "resid_norm": _finite(norm_mean),
                "max_abs": _finite(peak.value),
                "kurtosis": _finite(acc.column(f"kurt_{stream}")[0]),
                "mlp_sparsity": _finite(float(sparsity.mean)) if kind == "mlp" and sparsity.n else None,
                "lens_kl": None,
                "lens_top1": None,
                "lens_nll": None,
                "ablate_nll": _finite(float(acc.abl_nll[kind].mean)) if ablation == "exact" else None,
                "ablate_kl": _finite(float(acc.abl_kl[kind].mean)) if ablation == "exact" else None,
                "taylor_nll": _finite(taylor_means[3 * layer + taylor_order.index(kind)]) if taylor_means else None,
            }
            if kind == "block" and lens:
                metrics |= {key: _finite(v) for key, v in zip(("lens_kl", "lens_top1", "lens_nll"), lens)}
            details: dict[str, Any] = {"resid_norm_std": _finite(norm_std), "max_abs_channel": peak.channel}
            metrics |= {key: None for key in ATTENTION}
            if kind == "attn" and acc.attention.n:
                per_head = acc.attention.mean.view(len(ATTENTION), -1)
                for key, heads in zip(ATTENTION, per_head):
                    metrics[key] = _finite(float(heads.mean()))
                    details[f"{key}_per_head"] = [_finite(v) for v in heads.tolist()]
            if ablation == "exact":
                details |= {"ablate_nll_se": _se(acc.abl_nll[kind]), "ablate_kl_se": _se(acc.abl_kl[kind])}
            units.append(Unit(unit_name(layer, kind), layer, kind, metrics, details))
    return units


def agreement(prof: Profile) -> dict:
    """Spearman rho of every metric with the causal reference, per unit kind."""
    ref = "ablate_nll" if any(u.metrics.get("ablate_nll") is not None for u in prof.units) else "taylor_nll"
    by_kind: dict[str, dict] = {}
    for kind in KINDS:
        us = [u for u in prof.units if u.kind == kind]
        ys = [u.metrics.get(ref) for u in us]
        row = {}
        for metric in METRICS:
            if metric == ref or kind not in APPLIES.get(metric, KINDS):
                continue
            rho, n = spearman([u.metrics.get(metric) for u in us], ys)
            row[metric] = {"rho": rho, "n": n}
        by_kind[kind] = row
    return {"reference": ref, "by_kind": by_kind, "direction": DIRECTION}
