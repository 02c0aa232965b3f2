"""Experts taken out of routing: each token's router chooses among the experts left, weighted by the model's own
rule, as if the removed experts had never been there.

A router's logits for the removed experts become -inf before the rule runs, so a softmax router's weights are a
softmax over the experts left (what deleting the rows would give), a top-k router never picks them, and DeepSeek's
grouped choice leaves them out of their group's score. Nothing else changes: the experts' weights stay in place and
the model is put back on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .anatomy import Anatomy
from .errors import LayerwiseError
from .trace import BlockTrace, hooks, override_forward


def route(router: Any, logits: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate weights and expert indices, each (tokens, k), that ``router`` gives from its ``logits`` under its
    architecture's ``rule`` (:class:`layerwise.anatomy.MoE`), with transformers' dtypes."""
    k = router.top_k
    if rule == "topk_softmax":
        top, idx = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), idx
    if rule == "sigmoid_groups":
        return _grouped(router, logits)
    top, idx = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    if not hasattr(router, "norm_topk_prob"):  # Mixtral: always renormalized, kept in float32
        return top / top.sum(-1, keepdim=True), idx
    if router.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    return top.to(logits.dtype), idx


def _grouped(router: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's choice: sigmoid scores plus a correction bias, the best groups by their two best scores, the
    top k within them; weights are the uncorrected scores, renormalized where the router says so, then scaled."""
    scores = logits.sigmoid()
    choice = (scores + router.e_score_correction_bias).masked_fill(logits == -torch.inf, -torch.inf)
    n, groups = logits.shape[-1], router.num_group
    by_group = choice.view(-1, groups, n // groups).topk(2, dim=-1)[0].sum(-1)
    chosen = torch.topk(by_group, k=router.topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(by_group).scatter_(1, chosen, 1).bool()
    choice = choice.masked_fill(~keep.repeat_interleave(n // groups, dim=-1), -torch.inf)
    idx = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, idx


@contextmanager
def without_experts(an: Anatomy, removed: Mapping[int, list[int]]) -> Iterator[None]:
    """Run the model with these experts (``{layer: [expert, ...]}``) out of routing; one line when an expert does
    not exist or a layer would keep fewer experts than each token is routed to."""
    undo = mask_experts(an, removed)
    try:
        yield
    finally:
        undo()


def mask_experts(an: Anatomy, removed: Mapping[int, list[int]]) -> Callable[[], None]:
    """Take these experts out of routing until the returned function is called (what :func:`without_experts` does
    for a ``with``, and :func:`layerwise.load` for the life of a checkpoint whose drop lists masked experts)."""
    undo: list[Callable[[], None]] = []

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    try:
        for layer, experts in removed.items():
            check_removable(an, layer, experts)
            undo.append(_mask_router(an, layer, [sorted(set(experts))]))
    except BaseException:
        restore()
        raise
    return restore


def check_removable(an: Anatomy, layer: int, experts: list[int]) -> None:
    """One line when an expert does not exist or block ``layer`` would keep fewer experts than each token is routed
    to."""
    for j in experts:
        an.check_part(f"L{layer}.mlp.e{j}")
    left = an.n_experts(layer) - len(set(experts))
    if left < an.top_k:
        raise LayerwiseError(
            f"L{layer} would keep {left} of its {an.n_experts(layer)} experts, fewer than the {an.top_k} each token "
            "is routed to; remove fewer"
        )


@contextmanager
def cut(an: Anatomy, removed: Mapping[int, list[int]]) -> Iterator[None]:
    """Delete these experts for the duration: their slices of every tensor indexed by expert (:meth:`Anatomy.
    by_expert`) cut out, in place so that parameters keep their identity, and each module's expert count lowered;
    the rest renumbered in order. The model computes as with them out of routing (a test checks it on every
    architecture whose routing does not group experts); everything is put back on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    counts: list[tuple[nn.Module, int]] = []
    if any(removed.values()) and an.expert_groups > 1:
        raise LayerwiseError(
            f"this {an.model_type} model routes within {an.expert_groups} equal groups of experts, which "
            "deleting experts would reshape; take them out of routing instead (without_experts)"
        )
    try:
        for layer, experts in removed.items():
            check_removable(an, layer, experts)
            keep = an.kept_experts(layer, experts)
            for m in an.branch(layer, "mlp").modules():
                n = getattr(m, "num_experts", None)
                if isinstance(n, int):
                    counts.append((m, n))
                    setattr(m, "num_experts", len(keep))
            for t in an.by_expert(layer):
                saved.append((t, t.data))
                t.data = t.data[keep]
        yield
    finally:
        for t, data in reversed(saved):
            t.data = data
        for m, n in counts:
            setattr(m, "num_experts", n)


@contextmanager
def experts_apart(an: Anatomy, layer: int, each: list[int]) -> Iterator[None]:
    """Run block ``layer`` on ``len(each)`` copies of a batch stacked along dim 0, copy c with expert ``each[c]``
    out of routing: the ablations of several experts in one pass."""
    undo = _mask_router(an, layer, [[j] for j in each])
    try:
        yield
    finally:
        undo()


def _mask_router(an: Anatomy, layer: int, removed: list[list[int]]) -> Callable[[], None]:
    """Shadow block ``layer``'s router: tokens of the c-th of ``len(removed)`` stacked copies see the experts in
    ``removed[c]`` at -inf logits before the architecture's rule chooses. Returns the undo."""
    router, rule = an.router(layer), an.spec.moe.rule if an.spec.moe is not None else ""
    original = router.forward
    gone = torch.zeros(len(removed), an.n_experts(layer), dtype=torch.bool)
    for c, experts in enumerate(removed):
        gone[c, experts] = True

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = original(hidden_states)[0]
        mask = gone.to(logits.device)[:, None, :]
        logits = logits.view(len(removed), -1, logits.shape[-1]).masked_fill(mask, -torch.inf).view_as(logits)
        return (logits, *route(router, logits, rule))

    return override_forward(router, forward)


@contextmanager
def shut(an: Anatomy, removed: Mapping[int, list[int]]) -> Iterator[dict[int, list[int]]]:
    """Set the router's bias (:meth:`Anatomy.router_bias`) to -inf at these experts for the duration, in place: the
    same routing as :func:`without_experts` in any runtime that reads the weights. Yields the experts of blocks
    whose router has no such bias, which stay routable."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    left = {}
    try:
        for layer, experts in removed.items():
            bias = an.router_bias(layer)
            if bias is None:
                left[layer] = experts
                continue
            saved.append((bias, bias.detach().clone()))
            with torch.no_grad():
                bias[experts] = -torch.inf
        yield left
    finally:
        with torch.no_grad():
            for bias, value in saved:
                bias.copy_(value)


def routed_updates(an: Anatomy, tr: BlockTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """What each token's chosen experts added in a traced sparse block: (tokens, k, hidden), each expert's output
    times its gate weight, with their indices (tokens, k). The block's own experts module runs again on each (token,
    chosen expert) pair alone (one more pass of the experts' work), while the block's weights are there."""
    if tr.routing is None or tr.expert_input is None:
        raise LayerwiseError(f"L{tr.layer}.mlp routes no tokens to experts")
    weights, indices = (t.detach() for t in tr.routing)
    x = tr.expert_input.detach().reshape(-1, tr.expert_input.shape[-1])
    k = indices.shape[1]
    with torch.no_grad():
        out = an.experts(tr.layer)(x.repeat_interleave(k, 0), indices.reshape(-1, 1), weights.reshape(-1, 1))
    return out.view(-1, k, out.shape[-1]), indices


#: Experts ablated in one stacked pass: as many copies of a batch as a block's three unit ablations make, so the
#: profile's peak stays where it was.
COPIES = 3


def chunks(an: Anatomy, layer: int) -> list[list[int]]:
    """Block ``layer``'s experts in the groups :func:`experts_apart` ablates together."""
    n = an.n_experts(layer)
    return [list(range(a, min(a + COPIES, n))) for a in range(0, n, COPIES)]


class _ExpertInputs(TorchFunctionMode):
    """The inputs of each expert's own matrices, caught as the model's experts module computes them: run eagerly
    (transformers' per-expert loop, not a grouped kernel), it takes expert ``j``'s matrix as a slice ``W[j]`` of its
    merged weight and multiplies the rows routed to ``j`` by it (``linear(x, W[j])`` or ``x @ W[j]``). Every slice
    taken of a noted weight is noted, and the left operand of every product with a noted slice is passed on: the
    tokens routed to that expert for gate and up, its hidden activation for down."""

    def __init__(self, add: Callable[[int, str, int, torch.Tensor], None]) -> None:
        super().__init__()
        self.add = add
        self.weights: dict[int, tuple[torch.Tensor, int, str]] = {}  # id -> (weight, layer, attribute)
        self.slices: dict[int, tuple[torch.Tensor, int, str, int]] = {}  # id -> (slice, layer, attribute, expert)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.weights and _is_index(args[1]):
            _, layer, attr = self.weights[id(args[0])]
            self.slices[id(out)] = (out, layer, attr, int(args[1]))  # the slice held, so that its id is not reused
        elif len(args) >= 2 and isinstance(args[1], torch.Tensor) and id(args[1]) in self.slices:
            _, layer, attr, j = self.slices[id(args[1])]
            self.add(layer, attr, j, args[0])
        return out


@contextmanager
def expert_inputs(model: nn.Module, an: Anatomy, add: Callable[[int, str, int, torch.Tensor], None]) -> Iterator[None]:
    """While active, the experts modules run eagerly and ``add(layer, attribute, expert, x)`` gets the inputs ``x``
    of expert ``expert``'s matrix in experts tensor ``attribute`` of block ``layer`` (the weights noted as each
    module starts, for a model read from disk gets them then; nothing of a block held past its forward)."""
    if not an.moe_layers:
        yield
        return
    mode = _ExpertInputs(add)
    attrs = [a for a, _ in an.spec.moe.gguf_experts] if an.spec.moe is not None else []

    def note(layer: int) -> Callable:
        def hook(m: nn.Module, _args: tuple) -> None:
            mode.weights = {id(w): (w, layer, a) for w, a in ((getattr(m, a), a) for a in attrs)}

        return hook

    def done(*_args) -> None:
        mode.weights, mode.slices = {}, {}

    before = getattr(model.config, "_experts_implementation", None)
    model.set_experts_implementation("eager")  # type: ignore[operator]
    try:
        with hooks() as keep, mode:
            for layer in an.moe_layers:
                keep(an.experts(layer).register_forward_pre_hook(note(layer)))
                keep(an.experts(layer).register_forward_hook(done))
            yield
    finally:
        if before is not None:
            model.set_experts_implementation(before)  # type: ignore[operator]


def _is_index(index: object) -> bool:
    """Whether ``index`` picks one expert (an int or a tensor holding one)."""
    return isinstance(index, int) or (
        isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point()
    )
