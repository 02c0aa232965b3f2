"""Streaming capture of unit inputs and outputs, and unit skipping.

Everything here is a context manager: hooks and temporary ``forward``
overrides are removed on exit, even when the body raises, so analysis never
leaves the model changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .anatomy import Anatomy, Kind, first_tensor, unit_name
from .errors import LayerwiseError


@dataclass
class BlockTrace:
    """What one block read and wrote for one batch.

    ``h_in`` is the residual entering the block (h_l), ``attn`` and ``mlp``
    the two branch updates (a_l, m_l), ``h_out`` the block output (h_{l+1});
    ``h_mid = h_in + attn`` is the stream between the two sublayers.
    ``mlp_hidden`` is the input of a dense MLP's output projection (None in a sparse MLP),
    ``attn_weights`` the attention probabilities when eager attention ran and
    ``routing`` a sparse MLP's chosen experts' gate weights and indices, each
    (tokens, k), and ``expert_input`` what its router and experts read, (tokens, hidden) (None in a dense block).
    """

    layer: int
    h_in: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    h_out: torch.Tensor
    mlp_hidden: torch.Tensor | None
    attn_weights: torch.Tensor | None
    args: tuple
    kwargs: dict
    routing: tuple[torch.Tensor, torch.Tensor] | None = None
    expert_input: torch.Tensor | None = None

    @property
    def h_mid(self) -> torch.Tensor:
        return self.h_in + self.attn


def _first_nonfinite(sentinels: list[tuple[int, torch.Tensor]]) -> str | None:
    """Name the first unit, in depth order, whose output held a NaN or inf.

    Each sentinel is the float32 sum of (attn update, mlp update, block
    output): a sum is non-finite exactly when some summed value is, barring
    overflow of values near 1e38, so one host sync checks a whole pass.
    """
    if not sentinels:
        return None
    flags = torch.isfinite(torch.stack([s.to(sentinels[0][1].device) for _, s in sentinels])).cpu()
    for (layer, _), ok in zip(sentinels, flags):
        order: tuple[Kind, ...] = ("attn", "mlp", "block")
        for kind, good in zip(order, ok.tolist()):
            if not good:
                return unit_name(layer, kind)
    return None


@contextmanager
def tap(
    anatomy: Anatomy,
    on_block: Callable[[BlockTrace], None],
    *,
    mlp_hidden: bool = True,
    attn_weights: bool = False,
) -> Iterator[None]:
    """Call ``on_block`` with a :class:`BlockTrace` as each block finishes.

    The trace is handed over while the forward pass is still running and is
    not kept, so memory does not grow with depth or with the number of
    batches. Non-finite activations raise a one-line error naming the first
    unit that produced them when the body of the ``with`` ends; until then
    ``on_block`` may see them.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    state: dict[int, dict[str, Any]] = {}
    sentinels: list[tuple[int, torch.Tensor]] = []

    def pre_block(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict):
            h = args[0] if args else kwargs["hidden_states"]
            state[i] = {
                "h_in": h,
                "args": args[1:],
                "kwargs": {k: v for k, v in kwargs.items() if k != "hidden_states"},
            }

        return hook

    def grab(i: int, key: str, index: int = 0):
        def hook(_m: nn.Module, _args: tuple, output: Any):
            state[i][key] = output[index] if isinstance(output, tuple) else output

        return hook

    def grab_input(i: int):
        def hook(_m: nn.Module, args: tuple):
            state[i]["mlp_hidden"] = args[0]

        return hook

    def routed(i: int):
        def hook(_m: nn.Module, args: tuple, output: tuple) -> None:
            state[i]["routing"] = (output[1], output[2])  # transformers' routers return (logits, weights, indices)
            state[i]["expert_input"] = args[0]

        return hook

    def post_block(i: int):
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any):
            s = state.pop(i)
            h_out = first_tensor(output)
            for key in ("attn", "mlp"):  # a skipped block runs neither branch
                if key not in s:
                    s[key] = torch.zeros_like(s["h_in"])
            sentinels.append(
                (i, torch.stack([t.detach().sum(dtype=torch.float32) for t in (s["attn"], s["mlp"], h_out)]))
            )
            on_block(
                BlockTrace(
                    layer=i,
                    h_in=s["h_in"],
                    attn=s["attn"],
                    mlp=s["mlp"],
                    h_out=h_out,
                    mlp_hidden=s.get("mlp_hidden"),
                    attn_weights=s.get("attn_weights"),
                    args=s["args"],
                    kwargs=s["kwargs"],
                    routing=s.get("routing"),
                    expert_input=s.get("expert_input"),
                )
            )

        return hook

    try:
        for i, block in enumerate(anatomy.blocks):
            handles.append(block.register_forward_pre_hook(pre_block(i), with_kwargs=True))
            handles.append(anatomy.update_module(i, "attn").register_forward_hook(grab(i, "attn")))
            handles.append(anatomy.update_module(i, "mlp").register_forward_hook(grab(i, "mlp")))
            if mlp_hidden and i not in anatomy.moe_layers:  # a sparse MLP's activations stay inside its experts
                handles.append(anatomy.down_proj(i).register_forward_pre_hook(grab_input(i)))
            if attn_weights:
                handles.append(anatomy.branch(i, "attn").register_forward_hook(grab(i, "attn_weights", 1)))
            if i in anatomy.moe_layers:
                handles.append(anatomy.router(i).register_forward_hook(routed(i)))
            handles.append(block.register_forward_hook(post_block(i), with_kwargs=True))
        yield
        bad = _first_nonfinite(sentinels)
        if bad is not None:
            raise LayerwiseError(
                f"non-finite activations (NaN/inf) in the output of {bad}; load the model with `dtype` float32, "
                "or check the weights"
            )
    finally:
        for h in handles:
            h.remove()
        state.clear()
        sentinels.clear()


def override_forward(module: nn.Module, fn: Callable[..., Any]) -> Callable[[], None]:
    """Temporarily shadow ``module.forward``; return the function that undoes it.

    accelerate's device hooks also live in the instance ``forward``; the old
    instance attribute, if any, is restored exactly.
    """
    old = module.__dict__.get("forward")
    module.forward = fn

    def restore() -> None:
        if old is not None:
            module.forward = old
        else:
            del module.forward

    return restore


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _cache_filler(anatomy: Anatomy, layer: int) -> Callable[[dict, torch.Tensor], None]:
    """Keep a KV cache consistent when a layer's attention does not run.

    transformers reads sequence lengths and mask sizes from the cache layers,
    so a skipped attention (or block) still appends zeros of the right shape
    during generation; they are never attended to.
    """
    n_kv, head_dim = anatomy.kv_shape
    cache_idx = getattr(anatomy.branch(layer, "attn"), "layer_idx", layer)

    def fill(kwargs: dict, h: torch.Tensor) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None:
            z = h.new_zeros(h.shape[0], n_kv, h.shape[1], head_dim)
            cache.update(z, z, cache_idx)

    return fill


def _skipped(anatomy: Anatomy, layer: int, kind: Kind) -> Callable[..., Any]:
    """The forward that replaces a skipped unit: identity for a block, a zero update for a branch."""
    fill = _cache_filler(anatomy, layer)
    moe = anatomy.spec.moe
    pair = moe is not None and moe.pair_out and layer in anatomy.moe_layers

    def forward(*args: Any, **kwargs: Any) -> Any:
        h = _hidden_arg(args, kwargs)
        if kind == "mlp":
            return (torch.zeros_like(h), None) if pair else torch.zeros_like(h)
        fill(kwargs, h)
        return h if kind == "block" else (torch.zeros_like(h), None)

    return forward


def install_skips(anatomy: Anatomy, units: Iterable[str]) -> Callable[[], None]:
    """Remove these units from the model's forward until the returned function is called.

    A skipped block passes its input through; a skipped attention or MLP
    branch adds zero to the residual stream (with Gemma's sandwich norms the
    post-norm of zero is zero, so the same holds). Nothing is computed for a
    skipped unit, so the time saved is real.
    """
    undo: list[Callable[[], None]] = []

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        undo.clear()

    try:
        for name in units:
            layer, kind = anatomy.check_unit(name)
            module = anatomy.blocks[layer] if kind == "block" else anatomy.branch(layer, kind)
            undo.append(override_forward(module, _skipped(anatomy, layer, kind)))
    except BaseException:
        restore()
        raise
    return restore


@contextmanager
def hooks() -> Iterator[Callable[[torch.utils.hooks.RemovableHandle], None]]:
    """Yield ``keep``: every hook handle passed to it inside the ``with`` is removed on exit, even when the
    body, or registering a later hook, raises."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        yield handles.append
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skip(anatomy: Anatomy, units: Iterable[str]) -> Iterator[None]:
    """Run the model with these units removed (see :func:`install_skips`), restoring it on exit."""
    restore = install_skips(anatomy, units)
    try:
        yield
    finally:
        restore()


@contextmanager
def scale_update(anatomy: Anatomy, unit: str, factor: float) -> Iterator[None]:
    """Multiply one unit's residual update by ``factor`` (0 = ablation, still computed).

    For a block the update is its output minus its input, so the MLP still
    sees the unscaled attention output: this is the direction the Taylor
    estimate of a block's ablation differentiates along.
    """
    layer, kind = anatomy.check_unit(unit)

    def branch_hook(_m: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * factor, *output[1:])
        return output * factor

    def block_hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        h_in = _hidden_arg(args, kwargs)
        out = first_tensor(output)
        scaled = h_in + factor * (out - h_in)
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    if kind == "block":
        handle = anatomy.blocks[layer].register_forward_hook(block_hook, with_kwargs=True)
    else:
        handle = anatomy.update_module(layer, kind).register_forward_hook(branch_hook)
    try:
        yield
    finally:
        handle.remove()


def run_blocks(
    anatomy: Anatomy, start: int, h: torch.Tensor, calls: list[tuple[tuple, dict]], stop: int | None = None
) -> torch.Tensor:
    """Run blocks ``start..stop-1`` (to the last block by default) from residual ``h`` with each block's recorded extra
    inputs.

    ``calls[i]`` holds the positional and keyword arguments (masks, position
    embeddings) that the model passed to block i in a full forward pass, so
    this works for any architecture without knowing its signature.
    """
    for i in range(start, anatomy.n_layers if stop is None else stop):
        args, kwargs = calls[i]
        h = first_tensor(anatomy.blocks[i](h, *args, **kwargs))
    return h


def readout(an: Anatomy, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits from a residual stream at every position but the last, as (tokens, vocab), or at ``rows`` of
    them.

    The last position has no target; dropping it before the head keeps the
    logits contiguous and saves one head row per window. With ``rows`` the
    head runs only there: on a small model with a large vocabulary the head
    costs as much as 10-18 blocks, and it runs once per readout.
    """
    if rows is None:
        return an.logits(h[:, :-1]).flatten(0, 1)
    return an.logits(h[:, :-1].flatten(0, 1)[rows])


def tile_calls(calls: list[tuple[tuple, dict]], batch: int, times: int) -> list[tuple[tuple, dict]]:
    """Recorded block arguments for ``times`` copies of the batch stacked along dim 0.

    Every tensor whose first dimension is the batch (masks, position ids,
    rotary tables) is repeated; the rest (cache positions, flags) is shared.
    This lets several variants of one batch run through later blocks as one
    larger batch, which is what keeps a GPU busy.
    """

    done: dict[int, torch.Tensor] = {}  # blocks share one rotary table: tile it once

    def tile(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.dim() < 2 or x.shape[0] != batch:
                return x
            if id(x) not in done:
                done[id(x)] = x.repeat(times, *([1] * (x.dim() - 1)))
            return done[id(x)]
        if isinstance(x, tuple):
            return tuple(tile(v) for v in x)
        if isinstance(x, list):
            return [tile(v) for v in x]
        return x

    return [(tile(args), {k: tile(v) for k, v in kwargs.items()}) for args, kwargs in calls]
