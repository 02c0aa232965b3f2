"""Fake quantization: put a plan's dequantized weights into the model, to evaluate it exactly as stored."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..loading import LoadedModel
from .allocate import Allocation
from .measure import Measurement, matrix, replaced
from .rtn import QConfig, quantize_rtn


def config_of(name: str) -> QConfig:
    """Parse a config name such as ``a4g64`` (asymmetric, 4 bits, groups of 64) or ``s3g128``."""
    sym, rest = name[0], name[1:]
    bits, group = rest.split("g")
    return QConfig(int(bits), int(group), symmetric=sym == "s")


def rtn_weights(lm: LoadedModel, meas: Measurement, alloc: Allocation) -> dict[nn.Module, torch.Tensor]:
    """Each quantized module's dequantized (out, in) weight under the plan (round to nearest)."""
    an = lm.anatomy
    out = {}
    for g, cfg_name in alloc.configs.items():
        cfg = config_of(cfg_name)
        for path in meas.groups[g]["modules"]:
            m = lm.model.get_submodule(path)
            out[m] = quantize_rtn(matrix(an, m), cfg).dequantize()
    return out


@contextmanager
def quantized(lm: LoadedModel, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """The model with these weights for the duration; the originals come back on exit."""
    with replaced(lm.anatomy, weights):
        yield
