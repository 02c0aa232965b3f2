"""Per-example readouts of the residual stream, one row per example and unit.

Probing and steering both ask the same question of many short texts: what
does the residual stream hold at each unit for this example? This module
answers it in one streamed pass per batch, keeping only one vector per
example and unit (never every token's hidden state).

Where it reads (the convention every probe and steering vector shares):
``L{k}`` is block k's *output*, the residual stream that block k+1 reads
(``h_{k+1}`` in METHODS.md), which is the place llama.cpp adds a control
vector's ``direction.k``; it equals ``output_hidden_states[k + 1]`` for every
block but the last, whose tuple entry is taken after the final norm.
``L{k}.attn`` and ``L{k}.mlp`` are the two branch updates (``a_k``, ``m_k``).
``read="last"`` takes the last real token of each example; ``read="mean"``
averages its real tokens, leaving out a BOS token the tokenizer prepended
(its huge, text-independent activations would swamp the mean).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .anatomy import Anatomy, Kind, unit_name
from .errors import LayerwiseError
from .loading import LoadedModel
from .trace import BlockTrace, tap

Read = Literal["last", "mean"]
READS: tuple[str, ...] = ("last", "mean")
UNIT_SETS: tuple[str, ...] = ("blocks", "all")


@dataclass
class Features:
    """``values[unit]`` is a float32 ``(n_examples, hidden)`` tensor on the CPU."""

    units: list[str]
    values: dict[str, torch.Tensor]
    read: str
    n_tokens: torch.Tensor  # real tokens per example (BOS included)

    @property
    def n_examples(self) -> int:
        return int(self.n_tokens.shape[0])


def unit_list(anatomy: Anatomy, units: str | Sequence[str]) -> list[str]:
    """``"blocks"`` (every block output), ``"all"`` (blocks and both sublayers of each) or explicit unit names."""
    if isinstance(units, str):
        if units not in UNIT_SETS:
            raise LayerwiseError(
                f"units={units!r} is not known; use 'blocks', 'all' or a list of unit names such as ['L3', 'L7.attn']"
            )
        kinds: tuple[Kind, ...] = ("block",) if units == "blocks" else ("block", "attn", "mlp")
        return [unit_name(i, k) for i in range(anatomy.n_layers) for k in kinds]
    names = list(units)
    if not names:
        raise LayerwiseError("units is empty; name at least one unit such as 'L3'")
    for name in names:
        anatomy.check_unit(name)
    return names


def tokenize(lm: LoadedModel, texts: Sequence[str]) -> tuple[list[list[int]], bool]:
    """Token ids of each text as the model reads a prompt (special tokens added), and whether a BOS leads them."""
    from .data import _default_bos

    if lm.tokenizer is None:
        raise LayerwiseError(
            "this model was loaded without a tokenizer (its folder has none); copy the tokenizer files beside its "
            "config.json"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise LayerwiseError(f"example {i} has an empty text; every example needs some text")
    ids = [list(x) for x in lm.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    return ids, _default_bos(lm.tokenizer) is not None


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def check_fits(n_examples: int, n_units: int, hidden: int, max_bytes: int | None = None) -> int:
    """Bytes the features will take (float32), or a one-line error with a way out when they would not fit."""
    need = n_examples * n_units * hidden * 4
    limit = max_bytes if max_bytes is not None else _available_bytes() // 2
    if need > limit:
        raise LayerwiseError(
            f"features need {need / 2**30:.2f} GiB ({n_examples} examples x {n_units} units x {hidden} floats), "
            f"more than the {limit / 2**30:.2f} GiB allowed; use units='blocks' or fewer units, or fewer examples"
        )
    return need


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Example indices grouped by similar length, so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collect_ids(
    lm: LoadedModel,
    ids: Sequence[Sequence[int]],
    *,
    units: str | Sequence[str] = "blocks",
    read: Read = "last",
    skip_first: bool = False,
    batch_size: int = 8,
    max_bytes: int | None = None,
    progress: bool = False,
) -> Features:
    """Read every unit for every example (token id lists), right-padded in batches, in one forward per batch.

    ``skip_first`` leaves the first token out of ``read="mean"`` (a BOS).
    """
    if read not in READS:
        raise LayerwiseError(f"read={read!r} is not known; use 'last' or 'mean'")
    if batch_size < 1:
        raise LayerwiseError(f"batch_size must be at least 1 (got {batch_size})")
    names = unit_list(lm.anatomy, units)
    lengths = [len(x) for x in ids]
    if not ids or min(lengths) == 0 or (skip_first and read == "mean" and min(lengths) < 2):
        raise LayerwiseError("every example needs at least one text token; remove empty examples")
    limit = lm.anatomy.context_length
    if limit is not None and max(lengths) > limit:
        raise LayerwiseError(
            f"an example has {max(lengths)} tokens, more than the model's context of {limit}; shorten it"
        )
    hidden = lm.anatomy.embed.weight.shape[1]
    check_fits(len(ids), len(names), hidden, max_bytes)
    out = {u: torch.empty(len(ids), hidden, dtype=torch.float32) for u in names}
    wanted: dict[int, list[tuple[str, Kind]]] = {}
    for u in names:
        layer, kind = lm.anatomy.check_unit(u)
        wanted.setdefault(layer, []).append((u, kind))
    batches = _batches(lengths, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="features", unit="batch")
    for rows in batches:
        _collect_batch(lm, [ids[i] for i in rows], rows, wanted, read, skip_first, out)
    return Features(units=names, values=out, read=read, n_tokens=torch.tensor(lengths))


def _collect_batch(
    lm: LoadedModel,
    seqs: list[Sequence[int]],
    rows: list[int],
    wanted: dict[int, list[tuple[str, Kind]]],
    read: str,
    skip_first: bool,
    out: dict[str, torch.Tensor],
) -> None:
    """One forward over a right-padded batch; each wanted unit's readout lands in its rows of ``out``."""
    width = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        x[j, : len(s)] = torch.tensor(list(s))
        mask[j, : len(s)] = 1
    dev = lm.device
    last = mask.sum(1) - 1
    weights = mask.clone().float()
    if skip_first:
        weights[:, 0] = 0
    weights = (weights / weights.sum(1, keepdim=True)).to(dev)
    index = torch.tensor(rows)

    def readout(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if read == "last":
            return t[torch.arange(t.shape[0], device=t.device), last.to(t.device)]
        return torch.einsum("bt,btd->bd", weights.to(t.device), t)

    def on_block(tr: BlockTrace) -> None:
        for u, kind in wanted.get(tr.layer, ()):
            src = {"block": tr.h_out, "attn": tr.attn, "mlp": tr.mlp}[kind]
            out[u][index] = readout(src.detach()).cpu()

    with torch.no_grad(), tap(lm.anatomy, on_block, mlp_hidden=False):
        lm.model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)


def collect(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    units: str | Sequence[str] = "blocks",
    read: Read = "last",
    batch_size: int = 8,
    max_bytes: int | None = None,
    progress: bool = False,
) -> Features:
    """Tokenize ``texts`` as prompts and read every unit for each (see the module docstring for where)."""
    ids, bos = tokenize(lm, texts)
    return collect_ids(
        lm, ids, units=units, read=read, skip_first=bos, batch_size=batch_size, max_bytes=max_bytes, progress=progress
    )
