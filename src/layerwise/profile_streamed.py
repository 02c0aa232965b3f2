"""The profile pass over a model whose weights stay on disk (:mod:`layerwise.engine`).

Block-major where the resident pass is batch-major: every batch passes block ``i`` while its weights are read, then
block ``i + 1`` (:meth:`layerwise.engine.Streamed.blocks`, which reads the next block meanwhile). It feeds the same
reducers as the resident pass (:mod:`layerwise.reducers`), each block's running sums the batches in the same order,
so the numbers are the resident pass's:

- stream statistics and attention patterns from the same taps on the block, zd from its weights while read;
- exact ablation: the three ablated streams of block ``i`` (block skipped, attention skipped, MLP skipped) start
  after block ``i`` as one batch, as in the resident pass, and are carried through each later block as it is read;
- the logit lens and the ablations' readouts once the last block has run, with the head read once, by the same
  function as the resident pass (:func:`layerwise.profile.read`);
- the Taylor estimate by a backward pass block by block in reverse, each block's forward recomputed from its saved
  input: the gradient at a block's input is the gradient at the previous block's output.

Each block's input is kept for the readouts and the backward pass (:class:`layerwise.engine.States`): the hidden
states of the calibration windows once per block, in CPU memory, or in a file in the engine's ``spill`` folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .anatomy import KINDS, Anatomy, unit_name
from .engine import Kept, States
from .experts import chunks, experts_apart
from .loading import LoadedModel
from .metrics import lens as lens_m
from .profile import Positions, read
from .reducers import Reducers, TaylorEstimate
from .trace import BlockTrace, run_blocks, skip, tap, tile_calls


def streamed_pass(
    lm: LoadedModel, batches: list[torch.Tensor], red: Reducers, *, n_ablated: int, sample: Positions, bar: tqdm
) -> None:
    """Feed ``red`` from a block-major pass, with exact ablation on the first ``n_ablated`` batches (``profile``'s
    sampled positions and bar)."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    with s.states() as store:
        inputs, calls, carried = _forward(lm, store, batches, red, n_ablated)
        last = inputs.pop()
        targets = [b[:, 1:].flatten().to(s.device) for b in batches]
        if red.taylor is not None:
            _taylor(lm, store, inputs, last, calls, targets, red.taylor)
        if red.lens is None and red.ablation is None:
            bar.update(len(batches))
            return
        L = an.n_layers
        with s.head(), torch.no_grad():
            for b in range(len(batches)):

                def output(i: int, b: int = b) -> torch.Tensor:
                    return store.load(inputs[i + 1][b] if i + 1 < L else last[b])

                ablate = b < n_ablated
                args = (carried.read(b) if ablate else None, targets[b], sample, bar)
                read(an, red, store.load(last[b]), output, *args, carried.experts(b) if ablate else None)


def _forward(
    lm: LoadedModel, store: States, batches: list[torch.Tensor], red: Reducers, n_ablated: int
) -> tuple[list[list[Kept]], list[list[tuple[tuple, dict]]], _Carried]:
    """Every batch through each block in turn while its weights are read, feeding the reducers that read traces
    and zd: each block's input for every batch and, last, the last block's outputs (in ``store``); what each block
    is called with; and the ablated streams carried to the end."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    starts = [s.calls(b) for b in batches]
    calls = [c for _, c in starts]
    inputs = [[store.keep(h0) for h0, _ in starts]]
    del starts
    carried = _Carried(an, store, calls[:n_ablated], experts=red.ablation is not None and red.ablation.experts)
    with torch.no_grad():
        for i in s.blocks():
            red.zd.add(an, [i])
            outs = []
            for b, kept in enumerate(inputs[i]):
                h = store.load(kept)
                out, mid = _traced(an, i, h, calls[b], red)
                outs.append(store.keep(out))
                carried.step(i, b, h, mid)
            inputs.append(outs)
    return inputs, calls, carried


def _traced(
    an: Anatomy, i: int, h: torch.Tensor, calls: list[tuple[tuple, dict]], red: Reducers
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's input ``h`` through block ``i`` with its trace fed to ``red``: the block's output, and the
    stream between its sublayers."""
    mid: list[torch.Tensor] = []

    def on_block(tr: BlockTrace) -> None:
        mid.append(red.block(tr).view_as(tr.h_in))

    with tap(an, on_block, attn_weights=red.attention is not None):
        out = run_blocks(an, i, h, calls, stop=i + 1)
    return out, mid[0]


class _Carried:
    """Exact ablation from disk: each batch's ablated streams (a unit's, three windows a window: block, attention
    and MLP skipped; with ``experts``, each sparse block's experts out of routing, a group at a time) start after
    their block, as in the resident pass, and are carried together through each later block as it is read, to be
    read out after the last."""

    def __init__(
        self, an: Anatomy, store: States, calls: list[list[tuple[tuple, dict]]], *, experts: bool = False
    ) -> None:
        self.an, self.store, self.calls, self.with_experts = an, store, calls, experts
        self.tiled: list[dict[int, list[tuple[tuple, dict]]]] = [{} for _ in calls]
        self.streams: list[dict[int, Kept]] = [{} for _ in calls]
        self.expert_streams: list[dict[tuple[int, tuple[int, ...]], Kept]] = [{} for _ in calls]

    def _tiled(self, b: int, copies: int, batch: int) -> list[tuple[tuple, dict]]:
        """Batch ``b``'s block arguments for ``copies`` stacked copies, made once."""
        tiles = self.tiled[b]
        tiles[copies] = tiles.get(copies) or tile_calls(self.calls[b], batch, copies)
        return tiles[copies]

    def step(self, i: int, b: int, h: torch.Tensor, mid: torch.Tensor) -> None:
        """Block ``i`` with batch ``b``'s input ``h`` (and stream after attention ``mid``): the earlier units'
        streams carried through it, and its own three started."""
        if b >= len(self.calls):
            return
        an, store, calls, n = self.an, self.store, self.calls[b], int(h.shape[0])
        for j, kept in self.streams[b].items():
            self.streams[b][j] = store.keep(
                run_blocks(an, i, store.load(kept), self._tiled(b, len(KINDS), n), stop=i + 1), over=kept
            )
        for key, kept in self.expert_streams[b].items():
            tiled = self._tiled(b, len(key[1]), n)
            self.expert_streams[b][key] = store.keep(run_blocks(an, i, store.load(kept), tiled, stop=i + 1), over=kept)
        with skip(an, [unit_name(i, "attn")]):
            no_attn = run_blocks(an, i, h, calls, stop=i + 1)
        begin = {"block": h, "attn": no_attn, "mlp": mid}
        self.streams[b][i] = store.keep(torch.cat([begin[k] for k in KINDS]))
        if self.with_experts and i in an.moe_layers:
            for each in chunks(an, i):
                with experts_apart(an, i, each):
                    out = run_blocks(an, i, h.repeat(len(each), 1, 1), self._tiled(b, len(each), n), stop=i + 1)
                self.expert_streams[b][(i, tuple(each))] = store.keep(out)

    def read(self, b: int) -> Callable[[int], torch.Tensor]:
        """Batch ``b``'s streams of block ``i``'s units after the last block, by ``i``."""
        return lambda i: self.store.load(self.streams[b][i])

    def experts(self, b: int) -> Callable[[], Iterator[tuple[int, list[int], torch.Tensor]]]:
        """Batch ``b``'s experts' streams after the last block: (block, experts, their stacked streams)."""
        return lambda: ((i, list(each), self.store.load(kept)) for (i, each), kept in self.expert_streams[b].items())


def _taylor(
    lm: LoadedModel,
    store: States,
    inputs: list[list[Kept]],
    h: list[Kept],
    calls: list[list[tuple[tuple, dict]]],
    targets: list[torch.Tensor],
    taylor: TaylorEstimate,
) -> None:
    """The Taylor estimate of every unit's ablation, from the gradients of a backward pass one block at a time;
    ``inputs`` holds each block's input, ``h`` the last block's outputs (in ``store``)."""
    est: list[list[torch.Tensor]] = [[] for _ in h]
    for _i, grads in backward(lm, store, inputs, h, calls, targets):
        for b, g in enumerate(grads):
            part = [
                -(g.ga * g.a).sum(dim=(1, 2)),
                -(g.gm * g.m).sum(dim=(1, 2)),
                -(g.g_out * (g.a + g.m)).sum(dim=(1, 2)),
            ]
            est[b] = part + est[b]
    for b, parts in enumerate(est):
        taylor.add(torch.stack(parts, dim=-1), targets[b].numel() // parts[0].numel())


def block_inputs(
    lm: LoadedModel, store: States, batches: list[torch.Tensor] | tuple[torch.Tensor, ...], *, start: int = 0
) -> tuple[list[list[Kept]], list[Kept], list[list[tuple[tuple, dict]]]]:
    """A forward pass block by block: every block's input for each batch from block ``start`` on (kept in ``store``;
    empty before ``start``), the last block's outputs, and what each block is called with."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    starts = [s.calls(b) for b in batches]
    h = [store.keep(h0) for h0, _ in starts]
    calls = [c for _, c in starts]
    del starts
    inputs: list[list[Kept]] = []
    with torch.no_grad():
        for i in s.blocks():
            inputs.append(list(h) if i >= start else [])
            # a block's kept input stays: its output takes a slot of its own, else the carried stream's slot
            h = [
                store.keep(run_blocks(an, i, store.load(k), call, stop=i + 1), over=None if i >= start else k)
                for k, call in zip(h, calls)
            ]
    return inputs, h, calls


@dataclass
class BlockGrads:
    """One batch's pass through one block: its sublayers' residual updates (``a``, ``m``) and the gradients of the
    summed next-token NLL at them and at the block's output (``g_out``)."""

    a: torch.Tensor
    m: torch.Tensor
    ga: torch.Tensor
    gm: torch.Tensor
    g_out: torch.Tensor


def backward(
    lm: LoadedModel,
    store: States,
    inputs: list[list[Kept]],
    h: list[Kept],
    calls: list[list[tuple[tuple, dict]]],
    targets: list[torch.Tensor],
    *,
    stop: int = 0,
) -> Iterator[tuple[int, Iterator[BlockGrads]]]:
    """A backward pass one block at a time, from the last down to block ``stop``: yields each block's index and
    its batches' :class:`BlockGrads`, made one batch at a time as they are taken, while that block's weights are
    read.

    Each block's forward is recomputed from its saved input (``inputs[i][b]``; ``h[b]`` is the last block's
    output, both in ``store``): the gradient at a block's input is the gradient at the previous block's output.
    """
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    vocab = an.linear_shape(an.head)[0]
    with s.head():
        g_outs = [store.keep(lens_m.nll_grad(an.logits, vocab, store.load(k), t)) for k, t in zip(h, targets)]
    for i in s.blocks(reversed(range(stop, an.n_layers))):
        per_batch = _through(an, i, store, inputs[i], calls, g_outs)
        yield i, per_batch
        for _ in per_batch:  # the batches the caller left: their gradients carried on all the same
            pass


def _through(
    an: Anatomy, i: int, store: States, inputs: list[Kept], calls: list[list[tuple[tuple, dict]]], g_outs: list[Kept]
) -> Iterator[BlockGrads]:
    """Each batch's gradients through block ``i``, one batch at a time; the gradient at its input replaces the one
    at its output in ``g_outs`` (in ``store``)."""
    for b, kept in enumerate(inputs):
        grads, g_in = _block_grads(an, i, store.load(kept), calls[b], store.load(g_outs[b]))
        g_outs[b] = store.keep(g_in, over=g_outs[b])
        yield grads


def _block_grads(
    an: Anatomy, i: int, h_in: torch.Tensor, calls: list[tuple[tuple, dict]], g_out: torch.Tensor
) -> tuple[BlockGrads, torch.Tensor]:
    """One batch's gradients through block ``i`` given the gradient at its output; and the gradient at its input."""
    hin = h_in.detach().requires_grad_()
    seen: dict[str, torch.Tensor] = {}

    def grab(tr: BlockTrace) -> None:
        seen.update(a=tr.attn, m=tr.mlp)

    with torch.enable_grad(), tap(an, grab):
        out = run_blocks(an, i, hin, calls, stop=i + 1)
    a, m = seen["a"], seen["m"]
    live = [t for t in (a, m, hin) if t.requires_grad]  # a skipped branch's zero update has no gradient
    found = dict(zip(map(id, live), torch.autograd.grad(out, live, grad_outputs=g_out, allow_unused=True)))
    ga, gm, g_in = (found.get(id(t)) for t in (a, m, hin))
    zero = torch.zeros_like
    return (
        BlockGrads(
            a.detach(),
            m.detach(),
            zero(a) if ga is None else ga,
            zero(m) if gm is None else gm,
            g_out,
        ),
        zero(hin) if g_in is None else g_in,
    )
