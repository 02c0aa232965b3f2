"""Fitting a direction per block (difference of means, PCA of the paired differences, or a saved probe's weight),
its held-out separation, and the choice of the best-separating layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import results
from ..errors import LayerwiseError
from ..features import Features, Read, collect, unit_list
from ..loading import LoadedModel
from .pairs import _checked, split
from .vector import DEFAULT_ALPHA, SteeringVector, _hidden, _model_id, check_alpha, parse_layers, run_meta

if TYPE_CHECKING:
    from ..probe import ProbeResult

METHODS: tuple[str, ...] = ("diffmean", "pca", "probe")


def _fit(method: str, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """A unit direction from paired readouts (rows of ``pos`` and ``neg`` are pairs)."""
    diff = (pos - neg).double()
    if method == "diffmean":
        d = diff.mean(0)
    else:  # pca about zero: the top right singular vector of the paired differences
        d = torch.linalg.svd(diff, full_matrices=False).Vh[0]
        d = d if float(diff.mean(0) @ d) >= 0 else -d
    norm = float(d.norm())
    if not math.isfinite(norm) or norm == 0:
        raise LayerwiseError(
            "the positive and negative texts read the same at this layer; give texts that differ in the concept"
        )
    return (d / norm).float()


def _separation(direction: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
    """Cohen's d of the held-out projections, and the share of pairs whose positive projects above its negative."""
    p, q = pos @ direction, neg @ direction
    pooled = math.sqrt((float(p.var(unbiased=False)) + float(q.var(unbiased=False))) / 2 + 1e-12)
    return {"d": float(p.mean() - q.mean()) / pooled, "pair_acc": float((p > q).float().mean())}


@dataclass
class Fit:
    """Per-block directions and the evidence for choosing among them."""

    directions: dict[str, torch.Tensor]  # refit on all pairs
    scales: dict[str, float]  # mean residual norm of the readouts
    gaps: dict[str, float]  # mean projection of pos minus neg, all pairs
    separation: dict[str, dict[str, float]]  # held-out, fit on the calibration half
    calibration: list[int]
    held_out: list[int]
    method: str
    read: str
    seed: int

    def vector(self, units: Sequence[str], lm: LoadedModel, alpha: float, meta: dict) -> SteeringVector:
        return SteeringVector(
            directions={u: self.directions[u] for u in units},
            scales={u: self.scales[u] for u in units},
            alpha=alpha,
            method=self.method,
            read=self.read,
            model=_model_id(lm),
            meta=meta,
        )


def fit(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    *,
    method: str = "diffmean",
    read: Read = "last",
    seed: int = 0,
    probe: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Fit:
    """Read every block output for every pair, fit each block's direction and measure its held-out separation."""
    loaded = (
        _probe_directions(probe, lm, unit_list(lm.anatomy, "blocks")) if method == "probe" else None
    )  # refused before any reading
    pairs = _checked(list(pairs), "the pairs")
    feats = collect(
        lm,
        [p for p, _ in pairs] + [q for _, q in pairs],
        units="blocks",
        read=read,
        batch_size=batch_size,
        progress=progress,
    )
    return fit_features(feats, len(pairs), method=method, seed=seed, given=loaded)


def fit_features(
    feats: Features, n: int, *, method: str = "diffmean", seed: int = 0, given: dict[str, torch.Tensor] | None = None
) -> Fit:
    """:func:`fit` on readouts already taken: rows ``:n`` positive, ``n:`` their paired negatives; ``given`` directions
    skip fitting."""
    if method not in METHODS:
        raise LayerwiseError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
    calib, held = split(n, seed)
    out: dict[str, Any] = {"directions": {}, "scales": {}, "gaps": {}, "separation": {}}
    for u in feats.units:
        x = feats.values[u]
        if not torch.isfinite(x).all():
            raise LayerwiseError(
                f"non-finite activations (NaN/inf) at {u}; load the model with --dtype float32, or check the weights"
            )
        pos, neg = x[:n], x[n:]
        if given:  # a probe's weight, its sign turned toward the positives of the calibration pairs
            d_cal = d = given[u] if float((pos[calib] - neg[calib]).mean(0) @ given[u]) >= 0 else -given[u]
        else:
            d_cal, d = _fit(method, pos[calib], neg[calib]), _fit(method, pos, neg)
        out["separation"][u] = _separation(d_cal, pos[held], neg[held])
        out["directions"][u] = d
        out["scales"][u] = float(x.norm(dim=1).mean())
        out["gaps"][u] = float((pos - neg).mean(0) @ d)
    return Fit(**out, calibration=calib, held_out=held, method=method, read=feats.read, seed=seed)


def probe_result(folder: str | None) -> ProbeResult:
    """A saved ``layerwise probe`` result to steer along (read through the result contract, not the probe action),
    refused when it names no unit that reads the concept."""
    if not folder:
        raise LayerwiseError("method='probe' needs probe=DIR, a folder saved by `layerwise probe`")
    kind = results.kind_of(folder)
    if kind != "probe":
        raise LayerwiseError(f"{folder} holds a {kind} result; give a folder `layerwise probe` saved")
    res = results.load(folder, kind)
    if res.best_unit() is None:
        raise LayerwiseError(
            f"the probe in {folder} shows no unit that reads the concept: {res.best['why']}; "
            "use `method` diffmean, or probe again with more examples"
        )
    return res


def _probe_directions(folder: str | None, lm: LoadedModel, units: list[str]) -> dict[str, torch.Tensor]:
    """Unit directions, each of unit norm, from the saved probe result in ``folder`` (see :func:`probe_result`)."""
    res = probe_result(folder)
    out = {}
    for u in units:
        d = torch.as_tensor(res.direction(u), dtype=torch.float32).flatten().cpu()
        if d.numel() != _hidden(lm) or not torch.isfinite(d).all() or float(d.norm()) == 0:
            raise LayerwiseError(
                f"the probe in {folder} has no usable direction for {u} on this model; probe this model's blocks"
            )
        out[u] = d / d.norm()
    return out


def rank_variants(f: Fit, variants: list[tuple[str, ...]] | None) -> list[dict]:
    """Candidates (every block when ``variants`` is None), best held-out separation first; a range scores its blocks'
    mean d."""
    cands = [(u,) for u in f.directions] if variants is None else variants
    rows = [
        {
            "units": list(v),
            "d": sum(f.separation[u]["d"] for u in v) / len(v),
            "pair_acc": sum(f.separation[u]["pair_acc"] for u in v) / len(v),
        }
        for v in cands
    ]
    return sorted(rows, key=lambda r: -r["d"])


def train(
    lm: LoadedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    method: str = "diffmean",
    layers: str = "auto",
    read: Read = "last",
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    probe: str | None = None,
    batch_size: int = 8,
) -> SteeringVector:
    """Fit a steering vector at the best-separating block (or the first given layer spec) from paired texts."""
    if len(positive) != len(negative):
        raise LayerwiseError(
            f"{len(positive)} positive but {len(negative)} negative texts; give them in pairs (the same count)"
        )
    f = fit(lm, list(zip(positive, negative)), method=method, read=read, seed=seed, probe=probe, batch_size=batch_size)
    ranking = rank_variants(f, parse_layers(layers, lm.anatomy.n_layers))
    return f.vector(
        ranking[0]["units"],
        lm,
        check_alpha(alpha),
        run_meta(lm, seed, batch_size, choice={"layers": layers, "ranking": ranking}),
    )
