"""The weights from before training, kept on the CPU, and putting blocks back: Selective Layer Restoration
restores the blocks that moved most (or matter least) to trade some gain for less forgetting."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from ..anatomy import Anatomy
from ..errors import LayerwiseError
from .selection import _unique, _unwrap


class Snapshot:
    """The tunable parameters' values before training: the reference model, restoration, and resets between runs."""

    def __init__(self, params: list[nn.Parameter]):
        self.values = {id(p): (p, p.detach().clone()) for p in _unique(params)}

    @contextlib.contextmanager
    def swapped(self, params: list[nn.Parameter] | None = None) -> Iterator[None]:
        """Put the saved values in for the duration (all of them by default); the trained ones come back after."""
        chosen = (
            [self.values[id(p)] for p in _unique(params) if id(p) in self.values]
            if params is not None
            else list(self.values.values())
        )
        kept = [(p, p.detach().clone()) for p, _ in chosen]
        try:
            with torch.no_grad():
                for p, v in chosen:
                    p.copy_(v)
            yield
        finally:
            with torch.no_grad():
                for p, v in kept:
                    p.copy_(v)

    def reset(self) -> None:
        with torch.no_grad():
            for p, v in self.values.values():
                p.copy_(v)


def block_params(model: nn.Module, layer: int) -> list[nn.Parameter]:
    return list(Anatomy(_unwrap(model)).blocks[layer].parameters())


def restore_order(model: nn.Module, snap: Snapshot, order: str, weights: dict[str, float] | None = None) -> list[int]:
    """Blocks in the order restoration takes them.

    ``change``: largest relative weight change first, ``||θ - θ0|| / ||θ0||``
    over the block's tunable tensors (the blocks that moved furthest from the
    base model are where forgetting is likeliest). ``importance``: least
    important first by the Profile (their tuning should matter least to the gain).
    """
    n = Anatomy(_unwrap(model)).n_layers
    if order == "importance":
        if not weights:
            raise LayerwiseError(
                "restore order 'importance' needs a Profile (--profile, or an importance:/top: select that "
                "measured one)"
            )
        return sorted(range(n), key=lambda i: weights.get(f"L{i}", 0.0))
    if order != "change":
        raise LayerwiseError(f"unknown restore order {order!r}; use change or importance")

    def rel(i: int) -> float:
        pairs = [snap.values[id(p)] for p in block_params(model, i) if id(p) in snap.values]
        num = sum(float((p.detach() - v).double().norm() ** 2) for p, v in pairs)
        den = sum(float(v.double().norm() ** 2) for _, v in pairs)
        return math.sqrt(num / den) if den else 0.0

    return sorted(range(n), key=lambda i: -rel(i))
