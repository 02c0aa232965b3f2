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
``L{k}.attn`` and ``L{k}.mlp`` are the two branch updates (``a_k``, ``m_k``); in a mixture-of-experts model
``L{k}.mlp.e{j}`` is expert j's share of ``m_k``: its output times its gate weight where the token chose it, zero
where it did not.
``read="last"`` takes the last real token of each example; ``read="mean"``
averages its real tokens, leaving out a BOS token the tokenizer prepended
(its huge, text-independent activations would swamp the mean).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .anatomy import Anatomy, Kind, parse_part, unit_name
from .errors import LayerwiseError
from .experts import routed_updates
from .loading import LoadedModel
from .trace import BlockTrace, run_blocks, tap

Read = Literal["last", "mean"]
READS: tuple[str, ...] = ("last", "mean")
UNIT_SETS: tuple[str, ...] = ("blocks", "all", "experts")


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
    """``"blocks"`` (every block output), ``"all"`` (blocks and both sublayers of each), ``"experts"`` (every routed
    expert of a mixture-of-experts model) or explicit unit names."""
    if isinstance(units, str):
        if units not in UNIT_SETS:
            raise LayerwiseError(
                f"units={units!r} is not known; use 'blocks', 'all', 'experts' or a list of unit names such as "
                "['L3', 'L7.attn', 'L7.mlp.e2']"
            )
        if units == "experts":
            names = [u for u in anatomy.parts() if (parse_part(u) or (0, ""))[1] == "expert"]
            if not names:
                raise LayerwiseError(f"units='experts' needs a model with experts; this {anatomy.model_type} has none")
            return names
        kinds: tuple[Kind, ...] = ("block",) if units == "blocks" else ("block", "attn", "mlp")
        return [unit_name(i, k) for i in range(anatomy.n_layers) for k in kinds]
    names = list(units)
    if not names:
        raise LayerwiseError("units is empty; name at least one unit such as 'L3'")
    for name in names:
        where(anatomy, name)
    return names


def where(anatomy: Anatomy, name: str) -> tuple[int, str, int | None]:
    """A readable unit's block, kind and expert: a block or sublayer, or a routed expert (one line for another
    part of a sparse MLP)."""
    if parse_part(name) is None:
        return (*anatomy.check_unit(name), None)
    layer, part, expert = anatomy.check_part(name)
    if part != "expert":
        raise LayerwiseError(f"{name} is not read; read L{layer}.mlp (the whole sparse MLP) or its experts")
    return layer, part, expert


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


def by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
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
    """Read every unit for every example (token id lists), right-padded in batches, in one forward per batch (or,
    from a model on disk, block by block with every batch).

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
    reads = _Readouts(lm.anatomy, {u: torch.empty(len(ids), hidden, dtype=torch.float32) for u in names}, {})
    for u in names:
        layer, kind, expert = where(lm.anatomy, u)
        reads.wanted.setdefault(layer, []).append((u, kind, expert))
    batches = [_Batch.of([ids[i] for i in rows], rows, read, skip_first) for rows in by_length(lengths, batch_size)]
    run = _collect_streamed if lm.streamed is not None else _collect_resident
    run(lm, batches, reads, progress)
    return Features(units=names, values=reads.out, read=read, n_tokens=torch.tensor(lengths))


@dataclass
class _Readouts:
    """Every unit's readouts (``out[unit]``: one row per example), and the units read at each block (name, kind,
    expert)."""

    anatomy: Anatomy
    out: dict[str, torch.Tensor]
    wanted: dict[int, list[tuple[str, str, int | None]]]

    def tap(self, batch: _Batch) -> Callable[[BlockTrace], None]:
        """A tap that writes each wanted unit's readout of ``batch`` into its rows."""

        def hook(tr: BlockTrace) -> None:
            wanted = self.wanted.get(tr.layer, [])
            routed = routed_updates(self.anatomy, tr) if any(e is not None for _, _, e in wanted) else None
            for u, kind, expert in wanted:
                if routed is not None and expert is not None:
                    added, indices = routed
                    src = (added * (indices == expert)[..., None]).sum(1).view_as(tr.mlp)
                else:
                    src = {"block": tr.h_out, "attn": tr.attn, "mlp": tr.mlp}[kind]
                self.out[u][batch.rows] = batch.readout(src.detach()).cpu()

        return hook


def _collect_resident(lm: LoadedModel, batches: list[_Batch], reads: _Readouts, progress: bool) -> None:
    """One forward per batch."""
    todo: Sequence[_Batch] = batches
    if progress:
        from tqdm import tqdm

        todo = tqdm(batches, desc="features", unit="batch")
    for batch in todo:
        with torch.no_grad(), tap(lm.anatomy, reads.tap(batch), mlp_hidden=False):
            lm.model(
                input_ids=batch.ids.to(lm.device),
                attention_mask=batch.mask.to(lm.device),
                use_cache=False,
                logits_to_keep=1,
            )


@dataclass
class _Batch:
    """Examples right-padded to one width, and how one vector is read from each (``read``)."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # where the examples' readouts go in the features
    read: str
    weights: torch.Tensor  # each real token's share of the mean (the first left out when it is a BOS)

    @classmethod
    def of(cls, seqs: list[Sequence[int]], rows: list[int], read: str, skip_first: bool) -> _Batch:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(list(s))
            mask[j, : len(s)] = 1
        weights = mask.clone().float()
        if skip_first:
            weights[:, 0] = 0
        return cls(ids, mask, torch.tensor(rows), read, weights / weights.sum(1, keepdim=True))

    def readout(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if self.read == "last":
            last = (self.mask.sum(1) - 1).to(t.device)
            return t[torch.arange(t.shape[0], device=t.device), last]
        return torch.einsum("bt,btd->bd", self.weights.to(t.device), t)


def _collect_streamed(lm: LoadedModel, batches: list[_Batch], reads: _Readouts, progress: bool) -> None:
    """The same readouts from a model on disk: every batch passes block ``i`` while its weights are read, up to the
    last block a unit is read at; every batch's hidden states are carried from block to block (in the engine's
    store: in memory, or spilled)."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    from tqdm import tqdm

    stop = max(reads.wanted) + 1
    bar = tqdm(total=stop, desc="features, block by block", unit="block", disable=not progress)
    with s.states() as store, torch.no_grad(), bar:
        starts = [s.calls(b.ids, attention_mask=b.mask) for b in batches]
        h = [store.keep(h0) for h0, _ in starts]
        calls = [c for _, c in starts]
        del starts
        for i in s.blocks(range(stop)):
            for k, batch in enumerate(batches):
                with tap(an, reads.tap(batch), mlp_hidden=False):
                    h[k] = store.keep(run_blocks(an, i, store.load(h[k]), calls[k], stop=i + 1), over=h[k])
            bar.update()


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
