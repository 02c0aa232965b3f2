"""A plan made concrete: every quantized module's stored weight (for fake-quantized evaluation) or its codes (for
export)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..data import Windows
from ..errors import LayerwiseError
from ..loading import LoadedModel
from .allocate import Allocation
from .measure import Candidates, GroupCandidates, Measurement, input_hessians, matrix, replaced
from .rtn import QTensor


def plan_weights(
    lm: LoadedModel,
    meas: Measurement,
    alloc: Allocation,
    candidates: Candidates,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
) -> dict[nn.Module, torch.Tensor]:
    """Each quantized module's (out, in) weight as the plan stores it (GPTQ: run on ``windows``, ``batch_size`` at a
    time)."""
    return config_weights(lm, _config(meas, alloc), candidates, windows, batch_size=batch_size)


def config_weights(
    lm: LoadedModel,
    config: dict[str, str],
    candidates: Candidates,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
) -> dict[nn.Module, torch.Tensor]:
    """``plan_weights`` from each quantized module's config name, by module path (what a saved plan holds)."""
    if isinstance(candidates, GroupCandidates) and candidates.needs_hessian:
        made = {p: q.dequantize() for p, q in _sequential(lm, config, candidates, windows, batch_size).items()}
    else:
        made = {
            p: candidates.stored(p, matrix(lm.anatomy, lm.model.get_submodule(p)), c, None)[0]
            for p, c in config.items()
        }
    return {lm.model.get_submodule(p): w for p, w in made.items()}


def plan_codes(
    lm: LoadedModel,
    meas: Measurement,
    alloc: Allocation,
    candidates: GroupCandidates,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
) -> dict[str, QTensor]:
    """Each quantized module's integer codes under the plan, by module path; they dequantize to ``plan_weights``."""
    return config_codes(lm, _config(meas, alloc), candidates, windows, batch_size=batch_size)


def config_codes(
    lm: LoadedModel,
    config: dict[str, str],
    candidates: GroupCandidates,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
) -> dict[str, QTensor]:
    """``plan_codes`` from each quantized module's config name, by module path."""
    if candidates.needs_hessian:
        return _sequential(lm, config, candidates, windows, batch_size)
    return {p: candidates.codes(p, matrix(lm.anatomy, lm.model.get_submodule(p)), c, None) for p, c in config.items()}


def _config(meas: Measurement, alloc: Allocation) -> dict[str, str]:
    """The plan's config of every quantized module, by module path."""
    return {p: alloc.configs[g] for g, e in meas.groups.items() for p in e["modules"]}


def _sequential(
    lm: LoadedModel, config: dict[str, str], candidates: GroupCandidates, windows: Windows | None, batch_size: int
) -> dict[str, QTensor]:
    """GPTQ as it is meant to run: block by block, each block's Hessians from the inputs that the
    already-quantized blocks before it produce.

    The maps of a fused group (q/k/v, gate/up) read one input and share one
    config, so they share one Hessian and are quantized as one row-stacked
    matrix: one column sweep instead of one per map, with the same result.
    Each block's inputs are made again from the token ids, ``batch_size``
    windows at a time, through the blocks already quantized, rather than kept
    for every window: memory stays flat in the number of calibration windows,
    for about ``n_layers / 2`` times the forward passes.
    """
    if windows is None:
        raise LayerwiseError("GPTQ plans are made on calibration windows; pass the windows")
    an = lm.anatomy
    batches = torch.split(windows.calibration, batch_size)
    out: dict[str, QTensor] = {}
    for layer in range(an.n_layers):
        groups = [
            g
            for g in (
                [(p, m) for p, m in ms if p in config] for _, ms in an.quant_groups(layer, fused=candidates.fused)
            )
            if g
        ]
        if not groups:
            continue
        with replaced(an, {lm.model.get_submodule(p): q.dequantize() for p, q in out.items()}):
            hess = input_hessians(lm, [g[0][1] for g in groups], batches, stop_after=an.blocks[layer])
        for g in groups:
            codes = candidates.codes_rows([matrix(an, m) for _, m in g], config[g[0][0]], hess[id(g[0][1])].value)
            out |= {p: q for (p, _), q in zip(g, codes)}
    return out


@contextmanager
def quantized(lm: LoadedModel, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """The model with these weights for the duration; the originals come back on exit."""
    with replaced(lm.anatomy, weights):
        yield
