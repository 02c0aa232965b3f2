"""Each routed expert as parameters of its own while it trains, so that ``unit="expert"`` switches experts on and off
with their optimizer state really freed.

transformers keeps a sparse block's experts in one tensor per weight (experts along the first axis; biases too), and
AdamW keeps state per tensor: training one expert of 64 in place would hold moments for all 64, and the 63 frozen ones
would move under any weight decay. :func:`expert_tensors` gives each expert's slice of each such tensor a parameter of
its own through ``torch.nn.utils.parametrize``:

- the slices are views into the original tensor, so nothing is copied and training writes the original;
- the forward reads the original tensor itself (no stacked copy held for the backward);
- the backward hands each slice that trains a copy of its own gradient and the others none, so a frozen expert has
  no ``.grad`` and no optimizer state, exactly like a frozen block.

On exit each experts module holds its original parameter object again, now trained, so state dicts, checkpoints and
the :class:`~layerwise.tune.snapshot.Snapshot` of the weights before training see what they saw before. While the
split is active, :func:`plain_state_dict` is the model's state dict as it will be after it (what checkpoints save).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..anatomy import Anatomy, part_name
from ..errors import LayerwiseError


class _Slices(torch.autograd.Function):
    """The whole tensor forward (an alias, no copy); its gradient split by expert backward, copied for each slice
    that trains (a view would keep the whole gradient alive as long as one slice's ``.grad``)."""

    @staticmethod
    def forward(ctx, whole: torch.Tensor, *slices: torch.Tensor) -> torch.Tensor:
        return whole.view_as(whole)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *(grad[j].clone() if need else None for j, need in enumerate(ctx.needs_input_grad[1:])))


class ByExpert(nn.Module):
    """The parametrization of a tensor indexed by expert: one parameter per expert, each a view into it."""

    def __init__(self, whole: torch.Tensor):
        super().__init__()
        self.whole = whole.detach()  # a plain tensor attribute, not a parameter: the slices are the parameters

    def forward(self, *slices: torch.Tensor) -> torch.Tensor:
        return _Slices.apply(self.whole, *slices)

    def right_inverse(self, whole: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return whole.detach().unbind(0)


def _by_expert(an: Anatomy, layer: int) -> list[tuple[str, nn.Parameter]]:
    """The experts module's own tensors indexed by expert (weights and biases), by attribute name."""
    n = an.n_experts(layer)
    return [(name, p) for name, p in an.experts(layer).named_parameters(recurse=False) if p.shape[0] == n]


@contextmanager
def expert_tensors(model: nn.Module) -> Iterator[None]:
    """While active, every routed expert's weights are parameters of their own (:func:`part_params`); build the
    optimizer inside, after entering. A model without experts is left as it is.

    With a ``transformers.Trainer``::

        with expert_tensors(model):
            Trainer(model=model, ..., callbacks=[LayerSelector("lisa", "expert")]).train()
    """
    an = Anatomy(model)
    done: dict[nn.Module, dict[str, nn.Parameter]] = {}  # each module's own parameters, in their order
    try:
        for layer in an.moe_layers:
            experts = an.experts(layer)
            done[experts] = dict(experts.named_parameters(recurse=False))
            for name, whole in _by_expert(an, layer):
                parametrize.register_parametrization(experts, name, ByExpert(whole))
        yield
    finally:
        for module, own in done.items():
            for name in own:
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                delattr(module, name)
            for name, p in own.items():  # the very objects the slices wrote into, in their order
                module.register_parameter(name, p)


def _slices(module: nn.Module, name: str) -> list[nn.Parameter] | None:
    """The per-expert parameters of a split tensor, or None where it is not split."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])
    if not any(isinstance(p, ByExpert) for p in plist):
        return None
    return [getattr(plist, f"original{j}") for j in range(plist.ntensors)]


def check_sparse(an: Anatomy, unit: str) -> None:
    """One line when ``unit`` names parts of sparse blocks (``expert``, ``router``) and the model has none."""
    if unit in ("expert", "router") and not an.moe_layers:
        raise LayerwiseError(
            f"unit {unit} needs a mixture-of-experts model; this {an.model_type} has no experts (use block, attn or "
            "mlp)"
        )


def part_params(model: nn.Module, unit: str) -> dict[str, list[nn.Parameter]]:
    """Each sparse block's routed experts' parameters (``unit="expert"``, by part name ``L3.mlp.e5``; the experts must
    be split, :func:`expert_tensors`) or router's (``"router"``, ``L3.router``), in depth order. Experts a drop kept in
    the file but out of routing (``config.layerwise["masked_experts"]``) compute nothing and are left out."""
    an = Anatomy(model)
    check_sparse(an, unit)
    if unit == "router":
        return {part_name(i, "router"): list(an.router(i).parameters()) for i in an.moe_layers}
    masked = (getattr(model.config, "layerwise", None) or {}).get("masked_experts") or {}
    out: dict[str, list[nn.Parameter]] = {}
    for layer in an.moe_layers:
        experts = an.experts(layer)
        split = [s for n in getattr(experts, "parametrizations", {}) if (s := _slices(experts, n))]
        if not split:
            raise LayerwiseError(
                "unit expert trains each expert as parameters of its own: build the optimizer inside `with "
                "layerwise.tune.expert_tensors(model):` (tune.train does this)"
            )
        for slices in split:
            for j, p in enumerate(slices):
                if j not in masked.get(str(layer), []):
                    out.setdefault(part_name(layer, "expert", j), []).append(p)
    return out


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every split expert tensor whole again under its own name (what a checkpoint
    written during training saves); None when nothing is split."""
    split = [
        (prefix, module, name)
        for prefix, module in model.named_modules()
        for name in getattr(module, "parametrizations", {})
        if _slices(module, name) is not None
    ]
    if not split:
        return None
    state = model.state_dict()
    for prefix, module, name in split:
        at = f"{prefix}.parametrizations.{name}."
        for key in [k for k in state if k.startswith(at)]:
            del state[key]
        state[f"{prefix}.{name}"] = getattr(module, name).detach()
    return state
