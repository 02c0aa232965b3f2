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

Each block's input is kept for the readouts and the backward pass in CPU memory (off an accelerator): the hidden
states of the calibration windows once per block. Spilling them to a file is still to come.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .anatomy import KINDS, unit_name
from .loading import LoadedModel
from .metrics import lens as lens_m
from .metrics import stream as st
from .profile import _LayerAcc, _observe, _readout, _sampled_rows, zd_scores
from .trace import BlockTrace, run_blocks, skip, tap, tile_calls


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
    assert lm.streamed is not None
    s, an = lm.streamed, lm.anatomy
    L = an.n_layers
    exact = ablation == "exact"
    starts = [s.calls(b) for b in batches]
    h = [h0 for h0, _ in starts]
    calls = [c for _, c in starts]
    stacked = [tile_calls(c, int(b.shape[0]), len(KINDS)) for c, b in zip(calls[:n_ablated], batches)]
    inputs: list[list[torch.Tensor]] = []
    ablated: list[dict[int, torch.Tensor]] = [{} for _ in batches]
    zd: dict[str, float] = {}
    with torch.no_grad():
        for i, block in enumerate(an.blocks):
            with s.onloaded(s.names(block)):
                zd |= zd_scores(an, [i])
                inputs.append([x.to("cpu") for x in h])  # kept off the accelerator: one copy per block
                for b in range(len(batches)):
                    mid: dict[str, torch.Tensor] = {}

                    def on_block(tr: BlockTrace) -> None:
                        _observe(accs, tr, attention)
                        mid["h"] = (tr.h_in + tr.attn).detach()

                    with tap(an, on_block, attn_weights=attention):
                        out = run_blocks(an, i, h[b], calls[b], stop=i + 1)
                    if exact and b < n_ablated:
                        for j, stream in ablated[b].items():
                            ablated[b][j] = run_blocks(an, i, stream, stacked[b], stop=i + 1)
                        with skip(an, [unit_name(i, "attn")]):
                            no_attn = run_blocks(an, i, h[b], calls[b], stop=i + 1)
                        begin = {"block": h[b], "attn": no_attn, "mlp": mid["h"]}
                        ablated[b][i] = torch.cat([begin[k] for k in KINDS])
                    h[b] = out
    targets = [b[:, 1:].flatten().to(s.device) for b in batches]
    if ablation in ("exact", "taylor"):
        _taylor(lm, inputs, h, calls, targets, taylor_acc)
    if not (lens or exact):
        bar.update(len(batches))
        return 0, zd
    done = 0
    with s.onloaded(s.names(an.final_norm, an.head)), torch.no_grad():
        for b, batch in enumerate(batches):
            per_window = batch.shape[1] - 1
            rows = _sampled_rows(batch.shape[0], per_window, positions, g)
            rows = rows.to(s.device) if rows is not None else None
            sampled = per_window if rows is None or positions is None else positions
            tg = targets[b] if rows is None else targets[b][rows]
            ref = lens_m.Reference.from_logits(_readout(an, h[b], rows), tg)
            if lens:
                for i in range(L):
                    z = _readout(an, inputs[i + 1][b].to(s.device) if i + 1 < L else h[b], rows)
                    kl, nll = lens_m.compare(z, ref)
                    accs[i].lens.add(torch.stack((kl, lens_m.top1(z, ref), nll), dim=-1))
            bar.update(1)
            if not (exact and b < n_ablated):
                continue
            done += int(batch.shape[0])
            for i in range(L):
                for kind, out in zip(KINDS, ablated[b][i].chunk(len(KINDS))):
                    kl, nll = lens_m.compare(_readout(an, out, rows), ref)
                    accs[i].abl_nll[kind].add(st.window_means(nll - ref.nll, sampled))
                    accs[i].abl_kl[kind].add(st.window_means(kl, sampled))
                    bar.update(1)
    return done, zd


def _taylor(
    lm: LoadedModel,
    inputs: list[list[torch.Tensor]],
    h: list[torch.Tensor],
    calls: list[list[tuple[tuple, dict]]],
    targets: list[torch.Tensor],
    taylor_acc: st.Moments,
) -> None:
    """The Taylor estimate of every unit's ablation, by a backward pass one block at a time in reverse from each
    block's saved ``inputs``; ``h`` holds the last block's outputs."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    L, vocab = an.n_layers, an.linear_shape(an.head)[0]
    with s.onloaded(s.names(an.final_norm, an.head)):
        grads = [lens_m.nll_grad(an.logits, vocab, hb, t) for hb, t in zip(h, targets)]
    est: list[list[torch.Tensor]] = [[] for _ in h]
    for i in reversed(range(L)):
        block = an.blocks[i]
        with s.onloaded(s.names(block)):
            for b in range(len(h)):
                hin = inputs[i][b].to(s.device).detach().requires_grad_()
                seen: dict[str, torch.Tensor] = {}

                def grab(tr: BlockTrace) -> None:
                    seen.update(a=tr.attn, m=tr.mlp)

                with torch.enable_grad(), tap(an, grab):
                    out = run_blocks(an, i, hin, calls[b], stop=i + 1)
                g_out = grads[b]
                a, m = seen["a"], seen["m"]
                ga, g_in = torch.autograd.grad(out, [a, hin], grad_outputs=g_out, allow_unused=True)
                ga = torch.zeros_like(a) if ga is None else ga
                a, m = a.detach(), m.detach()
                part = [-(ga * a).sum(dim=(1, 2)), -(g_out * m).sum(dim=(1, 2)), -(g_out * (a + m)).sum(dim=(1, 2))]
                est[b] = part + est[b]
                grads[b] = g_in
    for b, parts in enumerate(est):
        per_window = inputs[0][b].shape[1] - 1
        taylor_acc.add(torch.stack(parts, dim=-1).double() / per_window)
