"""A plan made concrete: every quantized module's stored weight (for fake-quantized evaluation) or its codes (for
export)."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack

import torch

from ..anatomy import Weight
from ..data import Windows
from ..engine import Kept, States
from ..errors import LayerwiseError
from ..loading import LoadedModel
from ..trace import run_blocks
from .allocate import Allocation
from .measure import Candidates, GroupCandidates, InputHessians, Measurement, matrix, replaced
from .rtn import QTensor


def plan_weights(
    lm: LoadedModel,
    meas: Measurement,
    alloc: Allocation,
    candidates: Candidates,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
) -> dict[Weight, torch.Tensor]:
    """Each quantized module's (out, in) weight as the plan stores it (GPTQ: run on ``windows``, ``batch_size`` at a
    time)."""
    return config_weights(lm, weight_config(meas, alloc), candidates, windows, batch_size=batch_size)


def config_weights(
    lm: LoadedModel,
    config: dict[str, str],
    candidates: Candidates,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
) -> dict[Weight, torch.Tensor]:
    """``plan_weights`` from each quantized module's config name, by module path (what a saved plan holds)."""
    if isinstance(candidates, GroupCandidates) and candidates.needs_hessian:
        made = {p: q.dequantize() for p, q in _sequential(lm, config, candidates, windows, batch_size).items()}
    else:
        made = {p: candidates.stored(p, matrix(lm.anatomy.weight(p)), c, None)[0] for p, c in config.items()}
    return {lm.anatomy.weight(p): w for p, w in made.items()} | candidates.outside(lm)


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
    return config_codes(lm, weight_config(meas, alloc), candidates, windows, batch_size=batch_size)


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
    return {p: candidates.codes(p, matrix(lm.anatomy.weight(p)), c, None) for p, c in config.items()}


def weight_config(meas: Measurement, alloc: Allocation) -> dict[str, str]:
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
        with replaced({an.weight(p): q.dequantize() for p, q in out.items()}):
            hess = InputHessians(lm, groups).gather(batches, stop_after=an.blocks[layer])
        for g in groups:
            out |= _group_codes(candidates, g, config, hess)
    return out


def _group_codes(
    candidates: GroupCandidates, group: list[tuple[str, Weight]], config: dict[str, str], hess: InputHessians
) -> dict[str, QTensor]:
    """A group's GPTQ codes: linear maps that read one input as one row-stacked matrix (one column sweep); an
    experts weight on its own, each expert's rows under its own inputs' Hessian."""
    first = hess.value(group[0][1])
    if first is not None and first.dim() == 3:
        return {p: candidates.codes(p, matrix(w), config[p], hess.value(w)) for p, w in group}
    made = candidates.codes_rows([matrix(w) for _, w in group], config[group[0][0]], first)
    return {p: q for (p, _), q in zip(group, made)}


class BlockPlan:
    """A plan applied to a model whose weights stay on disk, one block at a time (an
    :data:`layerwise.evaluate.BlockVariant`): ``plan(i)``, called for every block in order while its weights are
    read, makes that block's quantized weights and puts them in place for the ``with``.

    GPTQ weights are made as :func:`_sequential` makes them: block ``i``'s Hessians come from the calibration
    windows carried through the blocks before it already quantized (one stream of hidden states, kept in the
    engine's store: spilled to its file when it has one), so the weights are those of the model in memory. Use it
    in a ``with``: leaving it (or passing the last block) empties the store, also on error.
    """

    def __init__(
        self,
        lm: LoadedModel,
        config: dict[str, str],
        candidates: Candidates,
        windows: Windows | None = None,
        *,
        batch_size: int = 4,
    ) -> None:
        self.lm, self.config, self.candidates = lm, config, candidates
        self.gptq = isinstance(candidates, GroupCandidates) and candidates.needs_hessian
        if self.gptq and windows is None:
            raise LayerwiseError("GPTQ plans are made on calibration windows; pass the windows")
        self.batches = torch.split(windows.calibration, batch_size) if self.gptq and windows is not None else ()
        self.stream: list[Kept] = []
        self.calls: list[list[tuple[tuple, dict]]] = []
        self.states: States | None = None
        self._store = ExitStack()

    def __enter__(self) -> BlockPlan:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._store.close()

    def __call__(self, layer: int) -> AbstractContextManager[None]:
        an = self.lm.anatomy
        if not self.gptq:
            mods = [(p, m) for g in self._groups(layer) for p, m in g]
            return replaced({m: self.candidates.stored(p, matrix(m), self.config[p], None)[0] for p, m in mods})
        return replaced({an.weight(p): q.dequantize() for p, q in self.codes(layer).items()})

    def codes(self, layer: int) -> dict[str, QTensor]:
        """Block ``layer``'s integer codes by module path, made while its weights are read (GPTQ: the quantized
        stream then goes on through the block)."""
        an, cands = self.lm.anatomy, self.candidates
        if not isinstance(cands, GroupCandidates):
            raise LayerwiseError("a GGUF plan has no integer codes; export it with --export gguf")
        groups = self._groups(layer)
        if not self.gptq:
            return {p: cands.codes(p, matrix(m), self.config[p], None) for g in groups for p, m in g}
        store = self._stream(layer)
        codes = self._gptq(layer, groups, store)
        if layer == an.n_layers - 1:  # nothing reads the stream after the last block
            self._store.close()
            self.stream, self.states = [], None
            return codes
        weights = {an.weight(p): q.dequantize() for p, q in codes.items()}
        with torch.no_grad(), replaced(weights):  # the stream goes on through the quantized block
            self.stream = [
                store.keep(run_blocks(an, layer, store.load(k), c, stop=layer + 1), over=k)
                for k, c in zip(self.stream, self.calls)
            ]
        return codes

    def _stream(self, layer: int) -> States:
        """The store of the quantized stream; at block 0 a fresh one, holding the windows' first block inputs."""
        s = self.lm.streamed
        assert s is not None
        if layer == 0:
            self._store.close()
            store = self._store.enter_context(s.states())
            starts = [s.calls(b) for b in self.batches]
            self.stream, self.calls, self.states = [store.keep(h) for h, _ in starts], [c for _, c in starts], store
        assert self.states is not None
        return self.states

    def _groups(self, layer: int) -> list[list[tuple[str, Weight]]]:
        """Block ``layer``'s quantized modules, in the groups that share an input (fused when the candidates are)."""
        quant_groups = self.lm.anatomy.quant_groups(layer, fused=self.candidates.fused)
        return [g for g in ([(p, m) for p, m in ms if p in self.config] for _, ms in quant_groups) if g]

    def _gptq(self, layer: int, groups: list[list[tuple[str, Weight]]], store: States) -> dict[str, QTensor]:
        """Block ``layer``'s GPTQ codes, from the Hessians of its inputs in the quantized stream."""
        an = self.lm.anatomy
        assert isinstance(self.candidates, GroupCandidates)
        hess = InputHessians(self.lm, groups)
        with torch.no_grad(), hess.watching():
            for k, c in zip(self.stream, self.calls):
                run_blocks(an, layer, store.load(k), c, stop=layer + 1)
        codes: dict[str, QTensor] = {}
        for g in groups:
            codes |= _group_codes(self.candidates, g, self.config, hess)
        return codes
