"""Activation steering at a measured layer, with its effect and its cost measured, exported to llama.cpp.

Where: a steering vector for unit ``L{k}`` is added to block k's *output* (the
residual stream block k+1 reads), the place llama.cpp adds a control vector's
``direction.k``; :mod:`layerwise.features` reads activations at the same place.

What (``method``): ``diffmean``, the mean positive readout minus the mean
negative one (CAA); ``pca``, the first principal direction of the paired
differences ``pos_i - neg_i`` taken about zero (not centred, so the shared
shift that *is* the concept is kept), its sign turned toward the positives;
``probe``, the weight of a saved ``layerwise probe`` result
(``ProbeResult.load(dir).direction(unit)``), its sign turned toward the
positives of the calibration pairs. Every direction is stored with unit norm.

How strong: ``alpha`` is a multiple of the layer's mean residual norm (the
mean L2 norm of the training readouts there), so ``alpha=0.5`` adds a vector
half as long as the stream it joins, on any model. ``alpha="auto"`` takes the
smallest multiple on :data:`ALPHA_GRID` whose mean change in log-probability
of the positive over the negative continuations reaches ``target`` nats on the
calibration prompts.

Which layer (``layers="auto"``): the positive/negative pairs are split by
:func:`split` into a calibration half, on which each block's direction is fit,
and a held-out half, on which the direction's separation is measured (Cohen's
d of the projections, and the share of pairs whose positive projects above its
negative); the best-separating block is chosen. The saved vector is then refit
on all pairs.

Which prompts do what: ``prompts`` are split by :func:`split` (seed + 1); the
first part is the *calibration* set that chooses ``alpha``. Effects are
reported on ``report_prompts`` when they are given, and the second part of
``prompts`` is then *development* text that this run does not use (the
built-in demo: its 16 ``PROMPTS`` shaped the defaults, so its effects are
reported on fresh prompts, :func:`layerwise.corpora.sentiment.report_prompts`);
without ``report_prompts`` the second part is the report set. ``steer.json``
records every set under ``choice.prompts``. The defaults (``target`` 2 nats,
:data:`ALPHA_GRID`, :data:`DEFAULT_ALPHA`) were fixed before the built-in
report prompts existed and have not been changed after seeing results on them.
Cost is measured on ``builtin:pydoc`` evaluation windows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import results
from .anatomy import first_tensor, parse_unit
from .data import read_jsonl, read_lines
from .errors import LayerwiseError
from .evaluate import next_token_logits, paired_difference, quality
from .features import Features, Read, collect, collect_ids, tokenize, unit_list
from .io import atomic_dir, check_same_model, load_result, write_json
from .loading import LoadedModel
from .memory import peak_memory
from .metrics import stream as st

if TYPE_CHECKING:
    from .probe import ProbeResult

METHODS: tuple[str, ...] = ("diffmean", "pca", "probe")
#: Candidate strengths for ``alpha="auto"``, in multiples of the layer's mean residual norm, tried smallest first.
ALPHA_GRID: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
DEFAULT_ALPHA = 0.25


# ---------------------------------------------------------------- data


def read_pairs(
    *,
    data: str | None = None,
    pos: str | None = None,
    neg: str | None = None,
    n: int = 64,
    seed: int = 0,
    encoding: str | None = None,
) -> list[tuple[str, str]]:
    """Positive/negative pairs from ``builtin:sentiment``, a JSONL of ``{"positive", "negative"}``, or two line-paired
    text files.

    Files are decoded by :func:`layerwise.data.read_file`'s rule; blank lines are skipped, and messages name real line
    numbers.
    """
    if data and (pos or neg):
        raise LayerwiseError("give either data (builtin:sentiment or pairs.jsonl) or pos and neg text files, not both")
    if data == "builtin:sentiment":
        from .corpora import sentiment

        return sentiment.pairs(n, seed)
    if data:
        rows = read_jsonl(data, encoding, fields=("positive", "negative"))
        return _checked([(str(r["positive"]), str(r["negative"])) for _, r in rows], data)
    if not (pos and neg):
        raise LayerwiseError(
            "steering needs contrastive texts: data=builtin:sentiment, data=pairs.jsonl, or both pos and neg files"
        )
    p, q = read_lines(pos, encoding), read_lines(neg, encoding)
    if len(p) != len(q):
        raise LayerwiseError(
            f"{pos} has {len(p)} texts but {neg} has {len(q)}; line i of each must form a pair, so give them the "
            "same count"
        )
    return _checked([(a, b) for (_, a), (_, b) in zip(p, q)], f"{pos} and {neg}")


def read_prompts(path: str, encoding: str | None = None) -> list[str]:
    """Prompts, one per non-blank line."""
    return [line for _, line in read_lines(path, encoding)]


def _checked(pairs: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    if len(pairs) < 2:
        raise LayerwiseError(f"{where} gives {len(pairs)} pairs; steering needs at least 2 (one to fit, one held out)")
    if any(not p.strip() or not q.strip() for p, q in pairs):
        raise LayerwiseError(f"{where} has an empty text in a pair; every pair needs a positive and a negative text")
    return pairs


def split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """The documented split: indices permuted by ``torch.randperm(n)`` under ``manual_seed(seed)``; the first ceil(n/2)
    calibrate, the rest are held out."""
    if n < 2:
        raise LayerwiseError(f"{n} items cannot be split into calibration and held-out parts; give at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = (n + 1) // 2
    return sorted(order[:cut]), sorted(order[cut:])


# ---------------------------------------------------------------- fitting


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
    if results.kind_of(folder) != "probe":
        raise LayerwiseError(
            f"{folder} holds a {results.kind_of(folder)} result; give a folder `layerwise probe` saved"
        )
    res = results.load(folder)
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


# ---------------------------------------------------------------- the vector


def _hidden(lm: LoadedModel) -> int:
    return int(lm.anatomy.embed.weight.shape[1])


def _model_id(lm: LoadedModel) -> dict:
    return {
        "model_hash": lm.source.get("model_hash"),
        "model_id": lm.source.get("model_id"),
        "n_layers": lm.anatomy.n_layers,
        "hidden_size": _hidden(lm),
        "model_type": lm.anatomy.model_type,
    }


def _check_alpha(alpha: float | str) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise LayerwiseError(f"alpha must be a number (got {alpha!r})") from None
    if not math.isfinite(a):
        raise LayerwiseError(
            f"alpha must be finite (got {alpha}); give a multiple of the layer's residual norm such as 0.25"
        )
    return a


def _adder(delta: torch.Tensor, from_token: int) -> Callable:
    """A block forward hook that returns the block's output plus ``delta`` (a new tensor: the model is not touched)."""

    def hook(_m: torch.nn.Module, _args: tuple, kwargs: dict, output: Any) -> Any:
        h = first_tensor(output)
        add = delta.to(device=h.device, dtype=h.dtype)
        if from_token:
            pos = kwargs.get("position_ids")
            if pos is None:
                raise LayerwiseError(
                    "from_token needs the token positions, which this architecture does not pass to its blocks; "
                    "use from_token=0"
                )
            add = add * (pos >= from_token).unsqueeze(-1).to(h.dtype)
        new = h + add
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@dataclass
class SteeringVector:
    """Unit directions per block output, each scaled by its layer's mean residual norm times ``alpha`` when applied."""

    directions: dict[str, torch.Tensor]
    scales: dict[str, float]
    alpha: float = DEFAULT_ALPHA
    method: str = "diffmean"
    read: str = "last"
    model: dict = field(default_factory=dict)  # what it was measured on (hash, n_layers, hidden_size)
    meta: dict = field(default_factory=dict)  # provenance: versions, command line, seed, the choice

    @property
    def units(self) -> list[str]:
        return sorted(self.directions, key=lambda u: parse_unit(u)[0])

    def delta(self, unit: str, alpha: float | None = None) -> torch.Tensor:
        """What is added at ``unit``: ``alpha * scale * direction``."""
        a = _check_alpha(self.alpha if alpha is None else alpha)
        return self.directions[unit] * (a * self.scales[unit])

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse a model other than the one the vector was measured on (its hash, else its shape)."""
        check_same_model(
            self.model.get("model_hash"),
            lm.source.get("model_hash"),
            "this steering vector was measured on",
            "train a vector on this model",
        )
        if (self.model.get("hidden_size"), self.model.get("n_layers")) != (_hidden(lm), lm.anatomy.n_layers):
            raise LayerwiseError(
                f"this steering vector is for a model with {self.model.get('n_layers')} blocks of width "
                f"{self.model.get('hidden_size')}, this one has {lm.anatomy.n_layers} of width {_hidden(lm)}; "
                "train a vector on this model"
            )

    @contextmanager
    def apply(self, lm: LoadedModel, alpha: float | None = None, *, from_token: int = 0) -> Iterator[None]:
        """Steer ``lm`` inside the ``with`` block by forward hooks, removed on exit even on error.

        Every position whose position id is ``from_token`` or more is steered:
        with the default 0, the prompt and every generated token (with a KV
        cache, each decoding step's new position is steered as it is computed,
        and the cached prompt positions were steered when the prompt ran), as
        llama.cpp does. A ``from_token`` above 0 leaves the first tokens of the
        prompt unsteered; it counts position ids, which ``generate`` derives
        from the attention mask, so left padding is not counted.
        """
        self.check_model(lm)
        if not isinstance(from_token, int) or from_token < 0:
            raise LayerwiseError(f"from_token must be a whole number, 0 or more (got {from_token!r})")
        deltas = {u: self.delta(u, alpha) for u in self.units}
        handles = []
        try:
            for u, d in deltas.items():
                layer, _ = lm.anatomy.check_unit(u)
                handles.append(lm.anatomy.blocks[layer].register_forward_hook(_adder(d, from_token), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def to_dict(self) -> dict:
        return {
            "units": self.units,
            "scales": self.scales,
            "alpha": self.alpha,
            "method": self.method,
            "read": self.read,
            "model": self.model,
            "format": "layerwise steering vector: vector.safetensors holds one unit direction per unit name",
        }

    def save(self, out: str | Path, extra: dict | None = None) -> Path:
        """``vector.safetensors`` and ``steer.json`` (this vector, its provenance and ``extra``) into ``out``,
        atomically."""
        with atomic_dir(out, "steer") as tmp:
            self.write(tmp, extra)
        return Path(out)

    def write(self, folder: Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        save_file({u: self.directions[u].contiguous() for u in self.units}, str(folder / "vector.safetensors"))
        write_json(
            folder / "steer.json", {"kind": "steer", "vector": self.to_dict(), "meta": self.meta, **(extra or {})}
        )

    @classmethod
    def load(cls, folder: str | Path, lm: LoadedModel | None = None) -> SteeringVector:
        """The vector saved in ``folder``; with ``lm``, checked to come from that model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        folder = folder.parent if folder.name in ("steer.json", "vector.safetensors") else folder
        try:
            doc = json.loads((folder / "steer.json").read_text())
            v = doc["vector"]
            tensors = load_file(str(folder / "vector.safetensors"))
            vec = cls(
                directions={u: tensors[u].float() for u in v["units"]},
                scales={u: float(v["scales"][u]) for u in v["units"]},
                alpha=float(v["alpha"]),
                method=v["method"],
                read=v["read"],
                model=v["model"],
                meta=doc.get("meta", {}),
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise LayerwiseError(
                f"{folder} is not a layerwise steering vector ({exc.__class__.__name__}); give a folder written "
                "by `layerwise steer`"
            ) from None
        if lm is not None:
            vec.check_model(lm)
        return vec


def run_meta(lm: LoadedModel, seed: int, batch_size: int, **extra: Any) -> dict:
    """Provenance every steering result carries: the model, package versions, the command line, the seed and the batch
    size."""
    from .io import provenance

    return {
        **lm.meta(),
        **provenance(seed=seed, batch_size=batch_size),
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
    }


def parse_layers(spec: str, n_layers: int) -> list[tuple[str, ...]] | None:
    """``auto`` -> None; ``L12`` / ``L6,L12`` -> one single-block variant each; ``L10-L14`` -> one variant steering that
    whole range."""
    if spec == "auto":
        return None
    variants = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        ends = part.split("-")
        try:
            lo, hi = (parse_unit(e.strip()) for e in (ends[0], ends[-1]))
        except (LayerwiseError, ValueError):
            raise LayerwiseError(
                f"layers {part!r} is not a block name; write auto, L12, L10-L14 or L6,L12,L18"
            ) from None
        if len(ends) > 2 or lo[1] != "block" or hi[1] != "block" or hi[0] < lo[0]:
            raise LayerwiseError(
                f"layers {part!r} is not a block or an increasing range of blocks; write auto, L12, L10-L14 or "
                "L6,L12,L18"
            )
        for k in (lo[0], hi[0]):
            if k >= n_layers:
                raise LayerwiseError(f"layer L{k} does not exist; this model has blocks L0 to L{n_layers - 1}")
        variants.append(tuple(f"L{k}" for k in range(lo[0], hi[0] + 1)))
    if not variants:
        raise LayerwiseError("layers names no block; write auto, L12, L10-L14 or L6,L12,L18")
    return list(dict.fromkeys(variants))


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
        _check_alpha(alpha),
        run_meta(lm, seed, batch_size, choice={"layers": layers, "ranking": ranking}),
    )


# ---------------------------------------------------------------- measuring


def _pad(seqs: Sequence[Sequence[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        x[j, sl] = torch.tensor(list(s))
        mask[j, sl] = 1
    return x, mask


@torch.no_grad()
def margins(
    lm: LoadedModel, prompts: list[list[int]], conts: list[tuple[list[int], list[int]]], *, batch_size: int = 32
) -> torch.Tensor:
    """Per prompt, the mean over continuation pairs of log p(positive | prompt) - log p(negative | prompt) (summed over
    tokens).

    The tokens a pair shares before its texts differ have the same log-probability in both and cancel, so the prompt and
    that shared part are run once (their KV cache kept) and only the two differing tails are scored from it.
    """
    heads, tails = [], []
    for p in prompts:
        for pos, neg in conts:
            k = next((i for i, (a, b) in enumerate(zip(pos, neg)) if a != b), min(len(pos), len(neg)))
            heads.append(p + pos[:k])
            tails.append((pos[k:], neg[k:]))
    out = torch.cat(
        [
            _tail_margins(lm, heads[i : i + batch_size], tails[i : i + batch_size])
            for i in range(0, len(heads), batch_size)
        ]
    )
    return out.view(len(prompts), len(conts)).mean(1)


def _tail_margins(lm: LoadedModel, heads: list[list[int]], tails: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """log p(positive tail | head) - log p(negative tail | head) per row: heads left-padded with a cache, tails
    right-padded after it."""
    x, mask = _pad(heads, 0, left=True)
    where = (mask.cumsum(1) - 1).clamp(min=0)
    run = lm.model(
        input_ids=x.to(lm.device),
        attention_mask=mask.to(lm.device),
        position_ids=where.to(lm.device),
        use_cache=True,
        logits_to_keep=1,
    )  # only the head's last position is read: the rest would be (batch, seq, vocab) floats
    first = (
        torch.log_softmax(run.logits[:, -1].float(), -1).cpu().repeat_interleave(2, 0)
    )  # predicts each tail's first token
    seqs = [t for pair in tails for t in pair]  # positive, negative, ... matching the repeated cache rows
    logp = torch.zeros(len(seqs), dtype=torch.float64)
    width = max(len(t) for t in seqs)
    if width > 1:
        cache = run.past_key_values
        cache.batch_repeat_interleave(2)
        y, ymask = _pad([t or [0] for t in seqs], 0, left=False)
        ypos = where[:, -1:].repeat_interleave(2, 0) + 1 + torch.arange(y.shape[1])
        full = torch.cat([mask.repeat_interleave(2, 0), ymask], 1)
        rest = torch.log_softmax(
            lm.model(
                input_ids=y.to(lm.device),
                attention_mask=full.to(lm.device),
                position_ids=ypos.to(lm.device),
                past_key_values=cache,
                use_cache=True,
            ).logits.float(),
            -1,
        ).cpu()
    for j, t in enumerate(seqs):
        if t:
            logp[j] = float(first[j, t[0]]) + (
                float(rest[j, torch.arange(len(t) - 1), torch.tensor(t[1:])].sum()) if len(t) > 1 else 0.0
            )
    return logp[0::2] - logp[1::2]


@torch.no_grad()
def generate(lm: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Greedy continuations of a left-padded batch of prompts (decoded new tokens only)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    x, mask = _pad(prompts, pad, left=True)
    out = lm.model.generate(
        input_ids=x.to(lm.device),
        attention_mask=mask.to(lm.device),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return [t.strip() for t in tok.batch_decode(out[:, x.shape[1] :], skip_special_tokens=True)]


@dataclass
class Prompts:
    """Token ids of the calibration and report prompts, of the continuation pairs scored after them, and every set's
    texts by role."""

    calibration: list[list[int]]
    report: list[list[int]]
    conts: list[tuple[list[int], list[int]]]
    roles: dict[str, list[str]]  # calibration / development / report texts, saved in steer.json


def prompt_sets(
    lm: LoadedModel,
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    held_pairs: list[int],
    *,
    seed: int,
    report: Sequence[str] | None = None,
    max_continuations: int = 4,
) -> Prompts:
    """Split ``prompts`` (:func:`split`, seed + 1) into calibration and development/report parts (module docstring),
    tokenize the report set (``report`` when given) and the held-out pairs as continuations (a leading space, no
    special tokens)."""
    prompts = list(prompts)
    cal, second = split(len(prompts), seed + 1)
    roles = {
        "calibration": [prompts[i] for i in cal],
        "development": [prompts[i] for i in second] if report is not None else [],
        "report": list(report) if report is not None else [prompts[i] for i in second],
    }
    if not roles["report"] or any(not p.strip() for p in roles["report"]):
        raise LayerwiseError(
            "the report prompts are empty or hold an empty line; give at least one prompt, one per line"
        )
    conts = [
        tuple(lm.tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in pairs[i])
        for i in held_pairs[:max_continuations]
    ]
    return Prompts(tokenize(lm, roles["calibration"])[0], tokenize(lm, roles["report"])[0], conts, roles)


def choose_alpha(
    lm: LoadedModel, vec: SteeringVector, ps: Prompts, *, target: float = 2.0, grid: Sequence[float] = ALPHA_GRID
) -> dict:
    """The smallest multiple on ``grid`` whose mean log-prob margin shift on the calibration prompts reaches ``target``
    nats."""
    base = margins(lm, ps.calibration, ps.conts)
    tried = []
    for a in sorted(grid):
        with vec.apply(lm, a):
            shift = float((margins(lm, ps.calibration, ps.conts) - base).mean())
        tried.append({"alpha": a, "margin_shift": shift})
        if shift >= target:
            return {"alpha": a, "reached": True, "target": target, "tried": tried}
    return {"alpha": max(grid), "reached": False, "target": target, "tried": tried}


def measure(
    lm: LoadedModel,
    f: Fit,
    configs: list[tuple[tuple[str, ...], float]],
    ps: Prompts,
    eval_ids: torch.Tensor,
    *,
    new_tokens: int = 24,
    scorer: Callable[[str], float] | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Effect on the report prompts and cost on neutral windows for every (units, alpha), each ± SE.

    Effects, each the paired difference steered minus unsteered across the
    report prompts: the log-prob margin of the positive over the negative
    continuations; the projection of the last block's readout at the
    prompt's last token onto that block's direction, in units of its
    positive-negative gap (1.0 = as far as from a negative text to a
    positive one); and with ``scorer``, the score of greedy continuations.
    Cost: :func:`layerwise.evaluate.quality` (NLL, KL to the unsteered model).
    """
    from tqdm.auto import tqdm

    last = f"L{lm.anatomy.n_layers - 1}"

    def effects() -> dict:
        proj = collect_ids(lm, ps.report, units=[last], read="last").values[last] @ f.directions[last] / f.gaps[last]
        texts = generate(lm, ps.report, new_tokens) if scorer else []
        return {
            "margin": margins(lm, ps.report, ps.conts).tolist(),
            "proj": proj.tolist(),
            "texts": texts,
            "score": [scorer(t) for t in texts] if scorer else [],
        }

    base = effects()
    vecs = {_key(u, a): (f.vector(u, lm, a, {}), a) for u, a in configs}
    rows = []
    for key, (v, a) in tqdm(vecs.items(), desc="steer", disable=not progress):
        with v.apply(lm, a):
            e = effects()
        row = {"key": key, "units": v.units, "alpha": a}
        for name in ("margin", "proj", "score"):
            if e[name]:
                row[f"{name}_shift"], row[f"{name}_shift_se"] = paired_difference(e[name], base[name])
                row[name], row[f"{name}_se"] = st.mean_se(e[name])
        row["samples"] = e["texts"]
        rows.append(row)
    cost = quality(
        next_token_logits(lm.model),
        {k: next_token_logits(lm.model, partial(v.apply, lm, a)) for k, (v, a) in vecs.items()},
        eval_ids,
        batch_size=batch_size,
        device=lm.device,
    )
    for row in rows:
        row.update({k: v for k, v in cost[row["key"]].items() if k != "window_delta_nll"})
    base_row = (
        {k: v for k, v in next(iter(cost.values())).items() if k.startswith("ref_") or k.startswith("n_")}
        if cost
        else {}
    )
    for name in ("margin", "proj", "score"):
        if base[name]:
            base_row[name], base_row[f"{name}_se"] = st.mean_se(base[name])
    base_row["samples"] = base["texts"]
    return {"unsteered": base_row, "rows": rows}


def _key(units: Sequence[str], alpha: float) -> str:
    name = units[0] if len(units) == 1 else f"{units[0]}-{units[-1]}"
    return f"{name}@{alpha:g}"


# ---------------------------------------------------------------- export


def export_gguf(vec: SteeringVector, lm: LoadedModel, path: str | Path, alpha: float | None = None) -> Path:
    """A llama.cpp control vector: ``direction.k`` = the vector added at block k's output (``alpha`` applied).

    llama.cpp adds ``direction.k`` to the output of its layer k and has no
    slot for layer 0, so a vector at ``L0`` is refused. ``model_hint`` is the
    source GGUF's architecture (llama.cpp's name) when there is one.
    """
    import gguf
    import numpy as np

    from . import ggufio
    from .io import write_atomic

    vec.check_model(lm)
    if "L0" in vec.directions:
        raise LayerwiseError(
            "llama.cpp control vectors cannot steer L0 (its first slot, direction.1, is block 1's output); choose "
            "a layer from L1 on"
        )
    hint = ggufio.arch(ggufio.reader(lm.source["gguf_path"])) if lm.source.get("gguf_path") else lm.anatomy.model_type
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", hint)
        w.add_int32("controlvector.layer_count", lm.anatomy.n_layers - 1)
        for u in vec.units:
            w.add_tensor(f"direction.{parse_unit(u)[0]}", vec.delta(u, alpha).numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        write_atomic(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_gguf(path: str | Path, n_layers: int) -> tuple[int, Any]:
    """The file's directions as llama.cpp's loader lays them out: n_embd floats per layer, layer 1 first
    (``llama_set_adapter_cvec``'s data)."""
    import numpy as np

    from . import ggufio

    r = ggufio.reader(path)
    dirs = {
        int(t.name.split(".")[1]): np.asarray(t.data, dtype=np.float32)
        for t in r.tensors
        if t.name.startswith("direction.")
    }
    n_embd = len(next(iter(dirs.values())))
    data = np.zeros((n_layers - 1) * n_embd, dtype=np.float32)
    for k, d in dirs.items():
        data[(k - 1) * n_embd : k * n_embd] = d
    return n_embd, data


# ---------------------------------------------------------------- the action


@dataclass
class SteerReport:
    """What ``layerwise steer`` measured: the choice, every (layer, alpha) evaluated, the unsteered baseline, files
    written."""

    meta: dict
    vector: dict
    choice: dict
    unsteered: dict
    rows: list[dict]
    prompts: list[str]
    exports: dict

    def to_dict(self) -> dict:
        return {
            "kind": "steer",
            "meta": self.meta,
            "vector": self.vector,
            "choice": self.choice,
            "unsteered": self.unsteered,
            "rows": self.rows,
            "prompts": self.prompts,
            "exports": self.exports,
        }

    @classmethod
    def load(cls, path: str | Path) -> SteerReport:
        """A saved result: its folder or its ``steer.json``."""
        return load_result(cls, path, "steer.json", "steer")


def run(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    prompts: Sequence[str],
    eval_ids: torch.Tensor,
    *,
    report_prompts: Sequence[str] | None = None,
    method: str = "diffmean",
    layers: str = "auto",
    alpha: float | str = "auto",
    sweep_alphas: Sequence[float] = (),
    sweep_layers: str | None = None,
    read: Read = "last",
    seed: int = 0,
    target: float = 2.0,
    probe: str | None = None,
    scorer: Callable[[str], float] | None = None,
    new_tokens: int = 24,
    export: Sequence[str] = (),
    out: str | Path | None = None,
    batch_size: int = 4,
    progress: bool = False,
    data: dict | None = None,
) -> SteerReport:
    """Fit, choose the layer and the strength, measure every swept (layer, alpha), write the vector, report and exports.

    ``prompts`` calibrate ``alpha="auto"``; effects are measured on ``report_prompts`` (module docstring: which set is
    which). ``sweep_alphas`` are measured at every variant of ``layers``; with ``sweep_layers`` (a layer spec) they are
    measured at the chosen units and those layers instead, and every variant of ``layers`` once at the chosen alpha.
    """
    start = time.perf_counter()
    unknown = set(export) - {"gguf"}
    if unknown:
        raise LayerwiseError(
            f"unknown export {', '.join(sorted(unknown))}; the vector is always saved, and gguf adds a llama.cpp "
            "control vector"
        )
    sweep = [_check_alpha(a) for a in sweep_alphas]
    fixed = None if alpha == "auto" else _check_alpha(alpha)
    variants = parse_layers(layers, lm.anatomy.n_layers)
    also_swept = None if sweep_layers is None else parse_layers(sweep_layers, lm.anatomy.n_layers) or []
    if "gguf" in export and any("L0" in v for v in variants or []):
        raise LayerwiseError(
            "llama.cpp control vectors cannot steer L0 (its first slot, direction.1, is block 1's output); choose "
            "layers from L1 on"
        )
    f = fit(lm, pairs, method=method, read=read, seed=seed, probe=probe, batch_size=2 * batch_size, progress=progress)
    ranking = rank_variants(f, variants)
    if "gguf" in export and variants is None:
        ranking = [r for r in ranking if r["units"] != ["L0"]]  # llama.cpp cannot take it
    chosen = tuple(ranking[0]["units"])
    ps = prompt_sets(lm, prompts, pairs, f.held_out, seed=seed, report=report_prompts)
    probe_vec = f.vector(chosen, lm, DEFAULT_ALPHA, {})
    alpha_choice = choose_alpha(lm, probe_vec, ps, target=target) if fixed is None else {"alpha": fixed, "given": True}
    a = float(alpha_choice["alpha"])
    listed = variants or [chosen]
    if also_swept is None:
        configs = [(v, s) for v in listed for s in (sweep or [a])]
    else:
        configs = [(v, a) for v in listed] + [(v, s) for v in [chosen, *also_swept] for s in sweep]
    configs = list(dict.fromkeys([*configs, (chosen, a)]))
    m = measure(
        lm, f, configs, ps, eval_ids, new_tokens=new_tokens, scorer=scorer, batch_size=batch_size, progress=progress
    )
    choice = {
        "layers": layers,
        "chosen": list(chosen),
        "chosen_key": _key(chosen, a),
        "alpha": alpha_choice,
        "ranking": ranking,
        "split": {
            "rule": "torch.randperm(n) under manual_seed(seed); first ceil(n/2) calibrate, the rest are held out "
            "(pairs: rank the layers); prompts: seed + 1, the rest are development when report prompts are given, "
            "else the report set",
            "pairs_calibration": f.calibration,
            "pairs_held_out": f.held_out,
            "n_prompts_calibration": len(ps.calibration),
            "n_prompts_development": len(ps.roles["development"]),
            "n_prompts_report": len(ps.report),
            "n_continuation_pairs": len(ps.conts),
        },
        "prompts": {
            "uses": {
                "calibration": "chooses alpha='auto'",
                "development": "not used by this run (the built-in demo's: looked at while the defaults were set)",
                "report": "every reported effect",
            },
            **ps.roles,
        },
        "scales": f.scales,
        "gaps": f.gaps,
    }
    meta = run_meta(
        lm,
        seed,
        batch_size,
        data=data or {},
        method=method,
        read=read,
        target=target,
        new_tokens=new_tokens,
        eval_windows=int(eval_ids.shape[0]),
        eval_seq_len=int(eval_ids.shape[1]),
        wall_time_s=round(time.perf_counter() - start, 3),
    )
    vec = f.vector(chosen, lm, a, meta)
    report = SteerReport(
        meta=meta,
        vector=vec.to_dict(),
        choice=choice,
        unsteered=m["unsteered"],
        rows=m["rows"],
        prompts=ps.roles["report"],
        exports={},
    )
    if out is not None:
        _write(vec, report, lm, Path(out), export)
    return report


def _write(vec: SteeringVector, report: SteerReport, lm: LoadedModel, out: Path, export: Sequence[str]) -> None:
    """Everything into ``out`` at once: a failure leaves no partial folder. The page is the report module's job."""
    with atomic_dir(out, "steer") as tmp:
        if "gguf" in export:
            path = export_gguf(vec, lm, tmp / "control_vector.gguf")
            report.exports["gguf"] = {"path": str(out / path.name), "bytes": path.stat().st_size, "alpha": vec.alpha}
        d = report.to_dict()
        vec.write(tmp, {k: v for k, v in d.items() if k not in ("vector", "meta")})
