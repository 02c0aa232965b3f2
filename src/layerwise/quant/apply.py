"""Fake quantization: put a plan's dequantized weights into the model, to evaluate it exactly as stored."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..anatomy import first_tensor
from ..data import Windows
from ..errors import LayerwiseError
from ..loading import LoadedModel
from .allocate import Allocation
from .gptq import Hessian
from .measure import Candidates, Measurement, block_inputs, hessian_hooks, matrix, replaced


def plan_weights(lm: LoadedModel, meas: Measurement, alloc: Allocation, candidates: Candidates,
                 windows: Windows | None = None) -> dict[nn.Module, torch.Tensor]:
    """Each quantized module's (out, in) weight as the plan stores it (GPTQ: run on ``windows``)."""
    if candidates.needs_hessian:
        if windows is None:
            raise LayerwiseError("GPTQ plans are made on calibration windows; pass the windows")
        return _sequential(lm, meas, alloc, candidates, windows)
    out = {}
    for g, name in alloc.configs.items():
        for path in meas.groups[g]["modules"]:
            m = lm.model.get_submodule(path)
            out[m] = candidates.stored(path, matrix(lm.anatomy, m), name, None)[0]
    return out


def _sequential(lm: LoadedModel, meas: Measurement, alloc: Allocation, candidates: Candidates, windows: Windows) -> dict[nn.Module, torch.Tensor]:
    """GPTQ as it is meant to run: block by block, each block's Hessians from the inputs that the
    already-quantized blocks before it produce."""
    an = lm.anatomy
    config = {p: alloc.configs[g] for g, e in meas.groups.items() for p in e["modules"]}
    h, calls = block_inputs(lm, windows.calibration.to(lm.device))
    out: dict[nn.Module, torch.Tensor] = {}
    with torch.no_grad():
        for layer in range(an.n_layers):
            mods = [(p, m) for _, ms in an.quant_groups(layer, fused=candidates.fused) for p, m in ms]
            hess: dict[int, Hessian] = {}
            handles = hessian_hooks([m for _, m in mods], hess)
            try:
                an.blocks[layer](h, *calls[layer][0], **calls[layer][1])
            finally:
                for hd in handles:
                    hd.remove()
            done = {m: candidates.stored(p, matrix(an, m), config[p], hess[id(m)].value)[0] for p, m in mods}
            out |= done
            with replaced(an, done):
                h = first_tensor(an.blocks[layer](h, *calls[layer][0], **calls[layer][1]))
    return out


@contextmanager
def quantized(lm: LoadedModel, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """The model with these weights for the duration; the originals come back on exit."""
    with replaced(lm.anatomy, weights):
        yield
