"""The profile's metric families, each a reducer: running statistics that a pass over the calibration windows feeds
(:func:`layerwise.profile.profile`, with every weight in memory or block by block from disk), and that give their
metrics per unit once the pass is over.

A reducer never runs the model. The pass hands it what it saw (a block's trace, a readout at a block's output or
of an ablated stream, an estimate from the gradients), so the pass in memory and the pass from disk feed the same
reducers, each block's sums the batches in the same order, and give the same numbers. Each reducer's sums have a
fixed size whatever the number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .anatomy import KINDS, Anatomy, Kind, part_name, unit_name
from .errors import LayerwiseError
from .experts import routed_updates
from .metrics import lens as lens_m
from .metrics import stream as st
from .metrics.routing import expert_updates, layer_summary, routing_columns, update_columns
from .metrics.weights import z_fraction
from .trace import BlockTrace

#: The routing metrics of a sparse MLP: per expert (share, gate), then per layer's router.
ROUTING = ("route_share", "gate_mean", "route_entropy", "load_imbalance", "route_skip")
#: The attention-pattern metrics; each is the mean over heads, per head in ``details``.
ATTENTION = ("attn_entropy", "attn_distance", "attn_sink")
#: One unit's metrics and details, as one reducer measured them.
Row = tuple[dict[str, float | None], dict[str, Any]]
Stat = st.Moments | st.MaxAbs


class Reducer(Protocol):
    def stats(self) -> list[Stat]:
        """The running sums, moved to the host together before :meth:`rows` reads them."""
        ...

    def rows(self) -> dict[str, Row]:
        """Each measured unit's metrics and details, by unit name."""
        ...


def finite(x: float) -> float | None:
    """A value, or None where it is not a number (a metric with no data)."""
    return x if math.isfinite(x) else None


def _se(m: st.Moments) -> float | None:
    se = st.mean_se(m)[1]
    return None if se is None else finite(se)


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

    def hold(self, *tensors: torch.Tensor) -> None:
        """One block's ``h``, ``a``, ``m``, ``h'`` and (when the MLP shows them) hidden activations."""
        self._held.append(tensors)

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

    def stats(self) -> list[Stat]:
        return [self.stream, self.max_in, self.max_mid, self.sparsity]


def _run_elements(device: torch.device) -> int:
    """Activations a run may hold, in elements: 512 MiB of float32 on an accelerator, one block on the CPU."""
    return 0 if device.type == "cpu" else 2**27


class StreamStats:
    """The residual stream around each block and sublayer: its geometry (bi, sub_cos, rel_update, resid_norm), its
    largest activations (max_abs) and their kurtosis, and the MLP's activation sparsity.

    ``runs``: whether consecutive blocks may be reduced together (:class:`_Run`), which needs each batch to pass
    every block in order before the next batch; a pass from disk takes each block through every batch, so its
    runs are single blocks.
    """

    def __init__(self, an: Anatomy, device: torch.device, tokens: int, *, runs: bool) -> None:
        per_block = tokens * (4 * an.embed.weight.shape[1] + an.mlp_width(0))
        runs = runs and not an.moe_layers  # a run stacks its blocks' MLP activations, which a sparse MLP keeps inside
        size = max(1, _run_elements(device) // per_block) if runs else 1
        made = [_Run() for _ in range(0, an.n_layers, size)]
        self._of = [(made[i // size], i % size) for i in range(an.n_layers)]

    def block(self, tr: BlockTrace) -> torch.Tensor:
        """Take one block's trace; return the stream between its sublayers, flattened."""
        i = tr.layer
        hin, a, m = (t.detach().flatten(0, 1) for t in (tr.h_in, tr.attn, tr.mlp))
        hmid = hin + a
        run = self._of[i][0]
        run.hold(hin, a, m, hmid, *([tr.mlp_hidden.detach().flatten(0, 1)] if tr.mlp_hidden is not None else []))
        if i == len(self._of) - 1 or self._of[i + 1][0] is not run:
            run.reduce()
        return hmid

    def stats(self) -> list[Stat]:
        return [s for run in {id(r): r for r, _ in self._of}.values() for s in run.stats()]

    def rows(self) -> dict[str, Row]:
        return {
            unit_name(i, kind): _stream_row(run, row, kind) for i, (run, row) in enumerate(self._of) for kind in KINDS
        }


def _stream_row(run: _Run, row: int, kind: Kind) -> Row:
    """One unit's stream metrics from its block's row of ``run``."""
    stream, sparsity = run.stream.row(row), run.sparsity.row(row)

    def column(name: str) -> tuple[float, float]:
        j = _Run.COLUMNS.index(name)
        return float(stream.mean[j]), float(stream.std[j])

    # A block and its attention read h; the MLP reads h' = h + a.
    at = "in" if kind != "mlp" else "mid"
    norm_mean, norm_std = column(f"norm_{at}")
    peak = (run.max_in if at == "in" else run.max_mid).row(row)
    metrics = {
        "bi" if kind == "block" else "sub_cos": finite(
            column({"block": "bi", "attn": "attn_cos", "mlp": "mlp_cos"}[kind])[0]
        ),
        "rel_update": finite(column(f"{kind}_rel")[0]),
        "resid_norm": finite(norm_mean),
        "max_abs": finite(peak.value),
        "kurtosis": finite(column(f"kurt_{at}")[0]),
    }
    if kind == "mlp" and sparsity.n:
        metrics["mlp_sparsity"] = finite(float(sparsity.mean))
    return metrics, {"resid_norm_std": finite(norm_std), "max_abs_channel": peak.channel}


class AttentionPatterns:
    """Per head, each attention sublayer's entropy, query-key distance and sink mass, from its probabilities."""

    def __init__(self, n_layers: int) -> None:
        self._acc = [st.Moments() for _ in range(n_layers)]  # columns: entropy, distance, sink, each per head

    def block(self, tr: BlockTrace) -> None:
        if tr.attn_weights is None:
            raise LayerwiseError(
                f"{unit_name(tr.layer, 'attn')} returned no attention probabilities; load the model with "
                "attn_implementation='eager'"
            )
        self._acc[tr.layer].add(st.attention_rows(tr.attn_weights))

    def stats(self) -> list[Stat]:
        return list(self._acc)

    def rows(self) -> dict[str, Row]:
        out = {}
        for layer, acc in enumerate(self._acc):
            if not acc.n:
                continue
            metrics: dict[str, float | None] = {}
            details: dict[str, Any] = {}
            for key, heads in zip(ATTENTION, acc.mean.view(len(ATTENTION), -1)):
                metrics[key] = finite(float(heads.mean()))
                details[f"{key}_per_head"] = [finite(v) for v in heads.tolist()]
            out[unit_name(layer, "attn")] = (metrics, details)
        return out


class LogitLens:
    """The head read at each block's output against the model's own output: KL, top-1 agreement and NLL."""

    def __init__(self, n_layers: int) -> None:
        self._acc = [st.Moments() for _ in range(n_layers)]  # columns: kl, top1, nll

    def add(self, layer: int, z: torch.Tensor, ref: lens_m.Reference) -> None:
        """Block ``layer``'s readout ``z`` of one batch, at the reference's positions."""
        kl, nll = lens_m.compare(z, ref)
        self._acc[layer].add(torch.stack((kl, lens_m.top1(z, ref), nll), dim=-1))

    def stats(self) -> list[Stat]:
        return list(self._acc)

    def rows(self) -> dict[str, Row]:
        keys = ("lens_kl", "lens_top1", "lens_nll")
        return {
            unit_name(layer, "block"): ({k: finite(v) for k, v in zip(keys, acc.mean.tolist())}, {})
            for layer, acc in enumerate(self._acc)
            if acc.n
        }


class ExactAblation:
    """Each unit's exact ablation: the change of NLL and the KL of the model's output when the unit is skipped (an
    expert: taken out of routing), per window (for the standard error across windows), from the readouts of the
    ablated streams."""

    def __init__(self, *, experts: bool = False) -> None:
        self.windows = 0  # windows ablated so far
        self.experts = experts  # every expert of every sparse MLP too
        self._nll: dict[str, st.Moments] = {}
        self._kl: dict[str, st.Moments] = {}

    def add(self, unit: str, z: torch.Tensor, ref: lens_m.Reference, sampled: int) -> None:
        """The readout ``z`` of one batch with ``unit`` ablated; ``sampled`` positions a window."""
        kl, nll = lens_m.compare(z, ref)
        self._nll.setdefault(unit, st.Moments()).add(st.window_means(nll - ref.nll, sampled))
        self._kl.setdefault(unit, st.Moments()).add(st.window_means(kl, sampled))

    def stats(self) -> list[Stat]:
        return [*self._nll.values(), *self._kl.values()]

    def rows(self) -> dict[str, Row]:
        return {
            unit: (
                {"ablate_nll": finite(float(nll.mean)), "ablate_kl": finite(float(self._kl[unit].mean))},
                {"ablate_nll_se": _se(nll), "ablate_kl_se": _se(self._kl[unit])},
            )
            for unit, nll in self._nll.items()
        }


class TaylorEstimate:
    """The first-order change of the NLL when each unit's update is removed, per predicted token."""

    #: The order of each block's three columns in :meth:`add`'s estimates.
    ORDER: tuple[Kind, ...] = ("attn", "mlp", "block")

    def __init__(self) -> None:
        self._acc = st.Moments()

    def add(self, est: torch.Tensor, per_window: int) -> None:
        """One batch's estimates of its windows' summed NLL change, (windows, 3 * blocks) in :attr:`ORDER` per
        block; ``per_window`` predicted tokens a window."""
        self._acc.add(est.double() / per_window)

    def stats(self) -> list[Stat]:
        return [self._acc]

    def rows(self) -> dict[str, Row]:
        if not self._acc.n:
            return {}
        means = self._acc.mean.tolist()
        return {unit_name(i // 3, self.ORDER[i % 3]): ({"taylor_nll": finite(v)}, {}) for i, v in enumerate(means)}


def zd_scores(an: Anatomy, layers: Any) -> dict[str, float]:
    """zd of every weight matrix of these blocks, each matrix once (a block shares its sublayers' matrices)."""
    unique = {name: w for layer in layers for name, w in an.weight_matrices(layer, "block")}
    return dict(zip(unique, st.host_floats([z_fraction(w) for w in unique.values()])))


class WeightZD:
    """zd of each unit (and each part of a sparse MLP): the mean over its weight matrices, each read while its
    block's weights are at hand."""

    def __init__(self) -> None:
        self._scores: dict[str, float] = {}
        self._matrices: dict[str, list[str]] = {}

    def add(self, an: Anatomy, layers: Any) -> None:
        """Score these blocks' matrices (their weights must be loaded)."""
        layers = list(layers)
        self._scores |= zd_scores(an, layers)
        for layer in layers:
            for kind in KINDS:
                self._matrices[unit_name(layer, kind)] = [n for n, _ in an.weight_matrices(layer, kind)]
            for name in an.layer_parts(layer):
                self._matrices[name] = [n for n, _ in an.part_matrices(*an.check_part(name))]

    def stats(self) -> list[Stat]:
        return []

    def rows(self) -> dict[str, Row]:
        return {
            unit: ({"zd": finite(sum(self._scores[n] for n in names) / len(names))}, {})
            for unit, names in self._matrices.items()
            if names
        }


class Routing:
    """Each sparse MLP's routing: every expert's share of the tokens and mean gate weight, and the layer's load
    entropy, imbalance and skippable share (:mod:`layerwise.metrics.routing`), from the router's choices in the
    traced pass; and every expert's update (its output times its gate weight) where chosen, against the stream.

    The updates come from the block's own experts module run again on each (token, chosen expert) pair alone,
    inside the traced pass while the block's weights are there: one more pass of the experts' work a block.
    """

    def __init__(self, an: Anatomy) -> None:
        self._an = an
        self._experts = {i: an.n_experts(i) for i in an.moe_layers}
        self._acc = {i: st.Moments() for i in an.moe_layers}

    def block(self, tr: BlockTrace) -> None:
        if tr.routing is None or tr.expert_input is None:
            return
        n, (added, indices) = self._experts[tr.layer], routed_updates(self._an, tr)
        norms = added.float().norm(dim=-1)
        cols = [routing_columns(tr.routing[0], indices, n), update_columns(norms, indices, tr.h_mid.detach(), n)]
        self._acc[tr.layer].add(torch.cat(cols, -1))

    def stats(self) -> list[Stat]:
        return list(self._acc.values())

    def rows(self) -> dict[str, Row]:
        rows: dict[str, Row] = {}
        for i, acc in self._acc.items():
            if not acc.n:
                continue
            n, means = self._experts[i], acc.mean.tolist()
            experts, layer = layer_summary(means[: 2 * n + 1], n)
            updates = expert_updates(means[2 * n + 1 :], [float(e["route_share"] or 0.0) for e in experts])
            rows[part_name(i, "router")] = (dict(layer), {})
            rows |= {
                part_name(i, "expert", j): (m | {"rel_update": u["rel_update"]}, {"update_norm": u["update_norm"]})
                for j, (m, u) in enumerate(zip(experts, updates, strict=True))
            }
        return rows


@dataclass
class Reducers:
    """The reducers of one profile run, those its settings ask for (None: not measured)."""

    stream: StreamStats
    zd: WeightZD
    lens: LogitLens | None
    attention: AttentionPatterns | None
    ablation: ExactAblation | None
    taylor: TaylorEstimate | None
    routing: Routing | None = None

    def block(self, tr: BlockTrace) -> torch.Tensor:
        """Feed one block's trace to the reducers that read traces; return the stream between its sublayers."""
        if self.attention is not None:
            self.attention.block(tr)
        if self.routing is not None:
            self.routing.block(tr)
        return self.stream.block(tr)

    def all(self) -> list[Reducer]:
        """Every reducer of the run, in the order their details are listed."""
        found = (self.stream, self.zd, self.lens, self.attention, self.ablation, self.taylor, self.routing)
        return [r for r in found if r is not None]
