"""The profile pass over a model whose weights stay on disk (:mod:`layerwise.engine`).

Block-major where the resident pass is batch-major: every batch passes block ``i`` while its weights are read, then
block ``i + 1``. The same statistics are fed in the same order (each block's running sums see the batches in order),
so the numbers are the resident pass's:

- stream statistics and attention patterns from the same taps on the block;
- exact ablation: the three ablated streams of block ``i`` (block skipped, attention skipped, MLP skipped) start
  after block ``i`` as one batch, as in the resident pass, and are carried through each later block as it is read;
- the logit lens and the ablations' readouts once the last block has run, with the head read once;
- the Taylor estimate by a backward pass block by block in reverse, each block's forward recomputed from its saved
  input: the gradient at a block's input is the gradient at the previous block's output.

Each block's input is kept for the readouts and the backward pass (:class:`layerwise.engine.States`): the hidden
states of the calibration windows once per block, in CPU memory, or in a file in the engine's ``spill`` folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .anatomy import KINDS, Anatomy, unit_name
from .engine import Kept, States
from .loading import LoadedModel
from .metrics import lens as lens_m
from .metrics import stream as st
from .profile import _LayerAcc, _observe, _sampled_rows, zd_scores
from .trace import BlockTrace, readout, run_blocks, skip, tap, tile_calls


def streamed_pass(
    lm: LoadedModel,
    batches: list[torch.Tensor],
    accs: list[_LayerAcc],
    taylor_acc: st.Moments,
    *,
    ablation: str,
    lens: bool,
    attention: bool,
    positions: int | None,
    n_ablated: int,
    g: torch.Generator,
    bar: tqdm,
) -> tuple[int, dict[str, float]]:
    """Feed ``accs`` and ``taylor_acc`` from a block-major pass (``profile``'s settings, its generator of sampled
    positions and its bar); return the number of windows ablated and every weight matrix's zd (read while its block
    is)."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    with s.states() as store:
        L = an.n_layers
        exact = ablation == "exact"
        starts = [s.calls(b) for b in batches]
        calls = [c for _, c in starts]
        inputs = [[store.keep(h0) for h0, _ in starts]]  # block i's input for each batch; then the last block's output
        del starts
        stacked = [tile_calls(c, int(b.shape[0]), len(KINDS)) for c, b in zip(calls[:n_ablated], batches)]
        ablated: list[dict[int, Kept]] = [{} for _ in batches]
        zd: dict[str, float] = {}
        with torch.no_grad():
            for i, block in enumerate(an.blocks):
                with s.onloaded(s.names(block)):
                    zd |= zd_scores(an, [i])
                    outs = []
                    for b in range(len(batches)):
                        h = store.load(inputs[i][b])
                        mid: dict[str, torch.Tensor] = {}

                        def on_block(tr: BlockTrace) -> None:
                            _observe(accs, tr, attention)
                            mid["h"] = (tr.h_in + tr.attn).detach()

                        with tap(an, on_block, attn_weights=attention):
                            out = run_blocks(an, i, h, calls[b], stop=i + 1)
                        if exact and b < n_ablated:
                            for j, kept in ablated[b].items():
                                carried = run_blocks(an, i, store.load(kept), stacked[b], stop=i + 1)
                                ablated[b][j] = store.keep(carried, over=kept)
                            with skip(an, [unit_name(i, "attn")]):
                                no_attn = run_blocks(an, i, h, calls[b], stop=i + 1)
                            begin = {"block": h, "attn": no_attn, "mlp": mid["h"]}
                            ablated[b][i] = store.keep(torch.cat([begin[k] for k in KINDS]))
                        outs.append(store.keep(out))
                    inputs.append(outs)
        last = inputs.pop()
        targets = [b[:, 1:].flatten().to(s.device) for b in batches]
        if ablation in ("exact", "taylor"):
            _taylor(lm, store, inputs, last, calls, targets, taylor_acc)
        if not (lens or exact):
            bar.update(len(batches))
            return 0, zd
        done = 0
        with s.head(), torch.no_grad():
            for b, batch in enumerate(batches):
                per_window = batch.shape[1] - 1
                rows = _sampled_rows(batch.shape[0], per_window, positions, g)
                rows = rows.to(s.device) if rows is not None else None
                sampled = per_window if rows is None or positions is None else positions
                tg = targets[b] if rows is None else targets[b][rows]
                ref = lens_m.Reference.from_logits(readout(an, store.load(last[b]), rows), tg)
                if lens:
                    for i in range(L):
                        z = readout(an, store.load(inputs[i + 1][b] if i + 1 < L else last[b]), rows)
                        kl, nll = lens_m.compare(z, ref)
                        accs[i].lens.add(torch.stack((kl, lens_m.top1(z, ref), nll), dim=-1))
                bar.update(1)
                if not (exact and b < n_ablated):
                    continue
                done += int(batch.shape[0])
                for i in range(L):
                    for kind, out in zip(KINDS, store.load(ablated[b][i]).chunk(len(KINDS))):
                        kl, nll = lens_m.compare(readout(an, out, rows), ref)
                        accs[i].abl_nll[kind].add(st.window_means(nll - ref.nll, sampled))
                        accs[i].abl_kl[kind].add(st.window_means(kl, sampled))
                        bar.update(1)
        return done, zd


def _taylor(
    lm: LoadedModel,
    store: States,
    inputs: list[list[Kept]],
    h: list[Kept],
    calls: list[list[tuple[tuple, dict]]],
    targets: list[torch.Tensor],
    taylor_acc: st.Moments,
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
        per_window = targets[b].numel() // parts[0].numel()
        taylor_acc.add(torch.stack(parts, dim=-1).double() / per_window)


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
        for i, block in enumerate(an.blocks):
            inputs.append(list(h) if i >= start else [])
            with s.onloaded(s.names(block)):
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
    for i in reversed(range(stop, an.n_layers)):
        with s.onloaded(s.names(an.blocks[i])):
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
