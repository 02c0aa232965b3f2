"""Fake quantization: put a plan's dequantized weights into the model, to evaluate it exactly as stored."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..loading import LoadedModel
from .allocate import Allocation
from .measure import Candidates, Measurement, matrix, replaced


def plan_weights(lm: LoadedModel, meas: Measurement, alloc: Allocation, candidates: Candidates) -> dict[nn.Module, torch.Tensor]:
    """Each quantized module's (out, in) weight as the plan stores it."""
    out = {}
    for g, name in alloc.configs.items():
        for path in meas.groups[g]["modules"]:
            m = lm.model.get_submodule(path)
            out[m] = candidates.stored(path, matrix(lm.anatomy, m), name, None)[0]
    return out


@contextmanager
def quantized(lm: LoadedModel, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """The model with these weights for the duration; the originals come back on exit."""
    with replaced(lm.anatomy, weights):
        yield
