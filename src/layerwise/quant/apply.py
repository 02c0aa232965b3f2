"""A plan made concrete: every quantized module's stored weight (for fake-quantized evaluation) or its codes (for export)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from ..anatomy import first_tensor
from ..data import Windows
from ..errors import LayerwiseError
from ..loading import LoadedModel
from .allocate import Allocation
from .gptq import Hessian
from .measure import Candidates, GroupCandidates, Measurement, block_inputs, hessian_hooks, matrix, replaced
from .rtn import QTensor

T = TypeVar("T")
#: Quantize one module: (module path, (out, in) float weight, config name, input Hessian or None) -> result.
Make = Callable[[str, torch.Tensor, str, "torch.Tensor | None"], T]


def plan_weights(lm: LoadedModel, meas: Measurement, alloc: Allocation, candidates: Candidates,
                 windows: Windows | None = None) -> dict[nn.Module, torch.Tensor]:
    """Each quantized module's (out, in) weight as the plan stores it (GPTQ: run on ``windows``)."""
    made = _made(lm, meas, alloc, candidates, windows, lambda p, w, c, h: candidates.stored(p, w, c, h)[0], lambda w: w)
    return {lm.model.get_submodule(p): w for p, w in made.items()}


def plan_codes(lm: LoadedModel, meas: Measurement, alloc: Allocation, candidates: GroupCandidates,
               windows: Windows | None = None) -> dict[str, QTensor]:
    """Each quantized module's integer codes under the plan, by module path; they dequantize to ``plan_weights``."""
    return _made(lm, meas, alloc, candidates, windows, candidates.codes, QTensor.dequantize)


def _made(lm: LoadedModel, meas: Measurement, alloc: Allocation, candidates: Candidates, windows: Windows | None,
          make: Make[T], weight: Callable[[T], torch.Tensor]) -> dict[str, T]:
    """``make`` applied to every module of the plan; ``weight`` turns a result into the weight later blocks see."""
    config = {p: alloc.configs[g] for g, e in meas.groups.items() for p in e["modules"]}
    if not candidates.needs_hessian:
        return {p: make(p, matrix(lm.anatomy, lm.model.get_submodule(p)), c, None) for p, c in config.items()}
    if windows is None:
        raise LayerwiseError("GPTQ plans are made on calibration windows; pass the windows")
    return _sequential(lm, config, candidates.fused, windows, make, weight)


def _sequential(lm: LoadedModel, config: dict[str, str], fused: bool, windows: Windows, make: Make[T],
                weight: Callable[[T], torch.Tensor]) -> dict[str, T]:
    """GPTQ as it is meant to run: block by block, each block's Hessians from the inputs that the
    already-quantized blocks before it produce."""
    an = lm.anatomy
    h, calls = block_inputs(lm, windows.calibration.to(lm.device))
    out: dict[str, T] = {}
    with torch.no_grad():
        for layer in range(an.n_layers):
            mods = [(p, m) for _, ms in an.quant_groups(layer, fused=fused) for p, m in ms if p in config]
            hess: dict[int, Hessian] = {}
            handles = hessian_hooks([m for _, m in mods], hess)
            try:
                an.blocks[layer](h, *calls[layer][0], **calls[layer][1])
            finally:
                for hd in handles:
                    hd.remove()
            done = {p: make(p, matrix(an, m), config[p], hess[id(m)].value) for p, m in mods}
            out |= done
            with replaced(an, {m: weight(done[p]) for p, m in mods}):
                h = first_tensor(an.blocks[layer](h, *calls[layer][0], **calls[layer][1]))
    return out


@contextmanager
def quantized(lm: LoadedModel, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """The model with these weights for the duration; the originals come back on exit."""
    with replaced(lm.anatomy, weights):
        yield
