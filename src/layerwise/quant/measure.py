"""EXL2-style measurement: the output error of every quantization group under every candidate config.

A *group* is the set of linear maps that share one config because engines
fuse them (``L3.attn.qkv``, ``L3.attn.o``, ``L3.mlp.gate_up``, ``L3.mlp.down``).
For each group and candidate config, the group's weights are quantized, its
sublayer is run on the sublayer's cached unquantized inputs, and the relative
error ``||y_q - y||^2 / ||y||^2`` of the sublayer's residual update is
recorded with the exact storage cost.

Memory does not grow with the number of calibration windows (the rule the
profile pass keeps). Blocks are measured in runs of consecutive blocks whose
candidate weights fit a fixed budget: a run's candidates are made once
(making them, GPTQ above all, costs more than using them), then the windows
stream through ``batch_size`` at a time, each batch's gradient pass and
block inputs made afresh, and every error is added to running sums. Results
are written after every run, and a rerun measures only the groups missing.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..anatomy import Anatomy, Kind, Weight, first_tensor, parse_unit
from ..data import Windows
from ..errors import LayerwiseError
from ..io import write_json
from ..loading import LoadedModel
from ..metrics.lens import nll_grad
from ..trace import BlockTrace, hooks, tap
from .gptq import ExpertHessians, Hessian, inverse_factor, quantize_gptq, quantize_gptq_many
from .rtn import QConfig, QTensor, quantize_rtn

if TYPE_CHECKING:
    from ..engine import Kept, States
    from ..profile_streamed import BlockGrads

Method = Literal["rtn", "gptq"]
#: Rows one GPTQ sweep stacks on the CPU (measured on 2 cores: 576-row matrices gain from six bit widths at once,
#: 1536-row ones lose).
_CPU_SWEEP_ROWS = 4096
DEFAULT_CANDIDATES: tuple[QConfig, ...] = tuple(QConfig(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))


@dataclass
class Measurement:
    """Per group: its weights' count and, per config name, the measured error and storage bits."""

    meta: dict
    groups: dict[str, dict] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return write_json(path, {"meta": self.meta, "groups": self.groups})

    @classmethod
    def load(cls, path: str | Path, expect: dict) -> Measurement:
        """Read a cached measurement, refusing one made for another model, data, method or candidate set."""
        try:
            d = json.loads(Path(path).read_text())
            meta, groups = d["meta"], d["groups"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LayerwiseError(
                f"{path} is not a readable measurement ({exc.__class__.__name__}); delete it to measure again"
            ) from None
        for key, want in expect.items():
            if meta.get(key) != want:
                raise LayerwiseError(
                    f"{path} is stale: its {key} is {str(meta.get(key))[:40]!r}, not {str(want)[:40]!r}; delete "
                    "it to measure again"
                )
        return cls(meta, groups)


def matrix(weight: Weight) -> torch.Tensor:
    """A quantized weight as a float32 (rows, in) copy (an experts tensor's matrices stacked by rows)."""
    return weight.view().detach().float().reshape(weight.shape).clone()


@contextmanager
def replaced(weights: dict[Weight, torch.Tensor]) -> Iterator[None]:
    """Temporarily give each weight new values, (rows, in) as :func:`matrix` gives them (an embedding's as it is
    stored); the originals come back on exit."""
    saved = []
    try:
        with torch.no_grad():
            for weight, w in weights.items():
                view = weight.view()
                saved.append((view, view.detach().clone()))
                view.copy_(w.reshape(view.shape).to(view.dtype))
        yield
    finally:
        with torch.no_grad():
            for view, w in saved:
                view.copy_(w)


def _sublayer(group: str) -> Kind:
    """The sublayer a quantization group belongs to (``L3.attn.qkv`` -> ``attn``)."""
    return parse_unit(".".join(group.split(".")[:2]))[1]


class Candidates(Protocol):
    """The configs a plan chooses from, and how a weight is stored under each."""

    @property
    def names(self) -> tuple[str, ...]:
        """The configs' names, in the order plans index them."""
        ...

    @property
    def fused(self) -> bool | tuple[str, ...]:
        """Whether engines fuse q/k/v and gate/up (one config per fused group) or type each tensor alone; or the
        groups given one config (:meth:`layerwise.anatomy.Anatomy.quant_groups`)."""
        ...

    @property
    def needs_hessian(self) -> bool:
        """Whether ``stored`` needs the layer's input Hessian (GPTQ)."""
        ...

    @property
    def key(self) -> dict:
        """What identifies this candidate set in a cached measurement."""
        ...

    def bits(self, path: str, shape: tuple[int, int], name: str) -> int:
        """Storage bits of an (out, in) weight under config ``name`` (cheap: no quantization)."""
        ...

    def stored(
        self, path: str, w: torch.Tensor, name: str, hessian: torch.Tensor | None
    ) -> tuple[torch.Tensor, int, str]:
        """The (out, in) weight as it would be stored under config ``name``, its bits, and the stored config."""
        ...

    def twins(self, paths: list[str]) -> dict[str, str]:
        """Configs that store every one of ``paths`` exactly as an earlier config does, each with that config: a
        measurement measures it once and gives both the result."""
        ...

    def outside(self, lm: LoadedModel) -> dict[Weight, torch.Tensor]:
        """Weights outside the plan that its model stores otherwise than the loaded one (a GGUF file's token
        embedding at another type), for the fake-quantized model (:func:`replaced`)."""
        ...

    def stored_all(
        self, path: str, w: torch.Tensor, hessian: torch.Tensor | None
    ) -> dict[str, tuple[torch.Tensor, int, str]]:
        """``stored`` under every config, by name (what a measurement needs; a set may batch the work)."""
        ...


@dataclass(frozen=True)
class GroupCandidates:
    """Integer codes with group scales (RTN or GPTQ), the formats of GPTQ/AWQ checkpoints and compressed-tensors."""

    configs: tuple[QConfig, ...] = DEFAULT_CANDIDATES
    method: Method = "rtn"
    fused: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "gptq"):
            raise LayerwiseError(f"unknown `method` {self.method!r}; use rtn or gptq")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.configs)

    @property
    def needs_hessian(self) -> bool:
        return self.method == "gptq"

    @property
    def key(self) -> dict:
        return {"method": self.method, "candidates": list(self.names)}

    def _config(self, name: str) -> QConfig:
        return next(c for c in self.configs if c.name == name)

    def bits(self, path: str, shape: tuple[int, int], name: str) -> int:
        cfg = self._config(name)
        cfg.check(shape[1])
        return cfg.storage_bits(*shape)

    def codes(self, path: str, w: torch.Tensor, name: str, hessian: torch.Tensor | None) -> QTensor:
        """The integer codes, scales and zero points of ``w`` under config ``name`` (what an export writes)."""
        cfg = self._config(name)
        if self.method == "rtn":
            return quantize_rtn(w, cfg)
        hessian = _need(hessian)
        if hessian.dim() == 3:  # an experts weight: each expert's rows under the Hessian of its own inputs
            return QTensor.cat([quantize_gptq(wj, hj, cfg) for wj, hj in zip(w.chunk(len(hessian)), hessian)])
        return quantize_gptq(w, hessian, cfg)

    def codes_rows(self, ws: list[torch.Tensor], name: str, hessian: torch.Tensor | None) -> list[QTensor]:
        """``codes`` of several (out, in) weights that read the same inputs, quantized as one row-stacked matrix.

        Both methods treat rows independently (GPTQ given the Hessian), so each
        result equals ``codes`` of that weight alone; GPTQ makes one column sweep.
        """
        stacked = self.codes("", torch.cat(ws), name, hessian)
        return stacked.split_rows([w.shape[0] for w in ws])

    def stored(
        self, path: str, w: torch.Tensor, name: str, hessian: torch.Tensor | None
    ) -> tuple[torch.Tensor, int, str]:
        bits = self.bits(path, (w.shape[0], w.shape[1]), name)
        return self.codes(path, w, name, hessian).dequantize(), bits, name

    def twins(self, paths: list[str]) -> dict[str, str]:
        return {}  # each config has its own bits or grid

    def outside(self, lm: LoadedModel) -> dict[Weight, torch.Tensor]:
        return {}  # the checkpoint keeps every other weight as the model has it

    def stored_all(
        self, path: str, w: torch.Tensor, hessian: torch.Tensor | None
    ) -> dict[str, tuple[torch.Tensor, int, str]]:
        """Every config; GPTQ runs one column sweep per group size for all its bit widths (see
        ``quantize_gptq_many``)."""
        if self.method != "gptq":
            return {name: self.stored(path, w, name, hessian) for name in self.names}
        hessian = _need(hessian)
        if hessian.dim() == 3:  # an experts weight: expert by expert, as ``codes``
            parts = [self.stored_all(path, wj, hj) for wj, hj in zip(w.chunk(len(hessian)), hessian)]
            return {
                n: (torch.cat([p[n][0] for p in parts]), sum(p[n][1] for p in parts), parts[0][n][2])
                for n in self.names
            }
        grids: dict[tuple, list[QConfig]] = {}
        for c in self.configs:
            grids.setdefault((c.group_size, c.symmetric, c.scale_bits), []).append(c)
        factor = inverse_factor(hessian)
        # An accelerator is launch-bound: stack every bit width. A CPU is cache-bound: stack while the rows stay few.
        per_sweep = len(self.configs) if w.device.type != "cpu" else max(1, _CPU_SWEEP_ROWS // w.shape[0])
        out = {}
        for cfgs in grids.values():
            for i in range(0, len(cfgs), per_sweep):
                for c, qt in zip(cfgs[i : i + per_sweep], quantize_gptq_many(w, factor, cfgs[i : i + per_sweep])):
                    out[c.name] = (qt.dequantize(), self.bits(path, (w.shape[0], w.shape[1]), c.name), c.name)
        return {name: out[name] for name in self.names}


def _need(hessian: torch.Tensor | None) -> torch.Tensor:
    if hessian is None:
        raise LayerwiseError(
            "GPTQ needs each layer's calibration inputs (its Hessian); apply a GPTQ plan with its calibration "
            "windows (QuantPlan.apply(lm, windows))"
        )
    return hessian


def measure(
    lm: LoadedModel,
    windows: Windows,
    *,
    candidates: Candidates | tuple[QConfig, ...] = DEFAULT_CANDIDATES,
    method: Method = "rtn",
    path: str | Path | None = None,
    progress: bool = True,
    batch_size: int = 4,
    cache_bytes: int = 2**31,
) -> Measurement:
    """Measure every group under every candidate config on the calibration windows (see the module doc).

    A tuple of configs means integer group quantization by ``method``.
    Blocks are measured in runs whose candidate weights fit in
    ``cache_bytes``; each run's candidates are made once and the windows
    stream through it ``batch_size`` at a time.
    """
    if isinstance(candidates, tuple):
        candidates = GroupCandidates(candidates, method)
    if batch_size < 1:
        raise LayerwiseError(f"batch_size must be at least 1, not {batch_size}")
    an = lm.anatomy
    expect = {
        "model_hash": lm.source.get("model_hash"),
        "data_hash": windows.data_hash,
        "n_calib": windows.n_calib,
        "seq_len": windows.seq_len,
        "objective": "fisher",
        "fused": candidates.fused if isinstance(candidates.fused, bool) else list(candidates.fused) or False,
    } | candidates.key
    result = Measurement(expect | {"n_layers": an.n_layers})
    if path is not None and Path(path).exists():
        result = Measurement.load(path, expect)
    every = {layer: an.quant_groups(layer, fused=candidates.fused) for layer in range(an.n_layers)}
    todo = {layer: groups for layer, groups in every.items() if not all(g in result.groups for g, _ in groups)}
    batches = torch.split(windows.calibration, batch_size)
    n_tokens = windows.calibration.shape[0] * (windows.seq_len - 1)
    if lm.streamed is not None and todo:
        with tqdm(total=len(todo), desc="measure", unit="block", disable=not progress) as bar:
            _measure_streamed(lm, batches, todo, candidates, result, n_tokens, path=path, bar=bar)
        return result
    runs = _runs(todo, len(candidates.names), cache_bytes)
    with tqdm(total=len(batches) * len(todo), desc="measure", disable=not progress) as bar:
        for layers in runs:
            start = time.perf_counter()
            hessians = InputHessians(lm, [ms for k in layers for _, ms in todo[k]] if candidates.needs_hessian else [])
            if candidates.needs_hessian:
                hessians.gather(batches, stop_after=an.blocks[layers[-1]])
            made = {
                g: {m: candidates.stored_all(p, matrix(m), hessians.value(m)) for p, m in mods}
                for layer in layers
                for g, mods in todo[layer]
            }
            sums = {
                g: _Sums(g, candidates.names, candidates.twins([p for p, _ in mods]))
                for layer in layers
                for g, mods in todo[layer]
            }
            for batch in batches:
                h, calls, grads = _batch_pass(lm, batch.to(lm.device), layers)
                with torch.no_grad():
                    for layer in range(layers[0], layers[-1] + 1):
                        if layer in todo:
                            h = _measure_layer(
                                an, layer, h, calls[layer], todo[layer], candidates, made, grads.pop(layer), sums
                            )
                            bar.update()
                        else:
                            h = first_tensor(an.blocks[layer](h, *calls[layer][0], **calls[layer][1]))
            for layer in layers:
                for group, mods in todo[layer]:
                    result.groups[group] = sums[group].entry(layer, mods, n_tokens)
            result.meta["seconds"] = round(result.meta.get("seconds", 0.0) + time.perf_counter() - start, 3)
            result.meta["batch_size"] = batch_size
            if path is not None:
                result.save(path)
    return result


def _measure_streamed(
    lm: LoadedModel,
    batches: tuple[torch.Tensor, ...],
    todo: dict,
    candidates: Candidates,
    result: Measurement,
    n_tokens: int,
    *,
    path: str | Path | None,
    bar: tqdm,
) -> None:
    """:func:`measure` of a model whose weights stay on disk: a forward pass block by block keeps each block's input,
    then a backward pass block by block (:func:`layerwise.profile_streamed.backward`) measures each block while its
    weights are read, with the gradients at its sublayers. One config of one group is made at a time, so the weights
    held are one block's and one group's candidate; ``result`` is saved after each block."""
    from ..profile_streamed import backward, block_inputs

    assert lm.streamed is not None
    an, device = lm.anatomy, lm.device
    start = time.perf_counter()
    with lm.streamed.states() as store:
        inputs, h, calls = block_inputs(lm, store, batches, start=min(todo))
        targets = [b[:, 1:].flatten().to(device) for b in batches]
        records: list[Any] = [None] * len(batches)
        for layer, grads in backward(lm, store, inputs, h, calls, targets, stop=min(todo)):
            if layer not in todo:
                continue
            hessians = _keep_records(lm, layer, store, inputs[layer], calls, grads, todo[layer], candidates, records)
            _measure_block(an, layer, store, records, todo[layer], candidates, hessians, result, n_tokens)
            result.meta["seconds"] = round(result.meta.get("seconds", 0.0) + time.perf_counter() - start, 3)
            start = time.perf_counter()
            result.meta["batch_size"] = int(batches[0].shape[0])
            if path is not None:
                result.save(path)
            bar.update()


def _keep_records(
    lm: LoadedModel,
    layer: int,
    store: States,
    inputs: list[Kept],
    calls: list[list[tuple[tuple, dict]]],
    grads: Iterator[BlockGrads],
    groups: list,
    candidates: Candidates,
    records: list[Any],
) -> InputHessians:
    """Each batch's record of block ``layer`` kept in ``store`` (in ``records``, over the previous block's slots):
    each sublayer's branch inputs, its residual update and the loss's gradient there. Batches pass one at a time,
    so what is held does not grow with the number of windows. Returns the weights' input Hessians, gathered in the
    same pass (none gathered when the candidates need none)."""
    hessians = InputHessians(lm, [mods for _, mods in groups] if candidates.needs_hessian else [])
    with torch.no_grad(), hessians.watching():
        for b, (kept, g) in enumerate(zip(inputs, grads, strict=True)):
            _, branch, outputs = sublayer_io(lm.anatomy, layer, store.load(kept), calls[b][layer])
            record = (branch, outputs, {"attn": g.ga, "mlp": g.gm})
            records[b] = store.keep_all(record, over=records[b])
    return hessians


def _measure_block(
    an: Anatomy,
    layer: int,
    store: States,
    records: list[Any],
    groups: list,
    candidates: Candidates,
    hessians: InputHessians,
    result: Measurement,
    n_tokens: int,
) -> None:
    """Block ``layer``'s ``groups`` measured into ``result``, while its weights are read, from each batch's record
    (:func:`_keep_records`), read back one batch and one sublayer at a time."""
    with torch.no_grad():
        for group, mods in groups:
            kind = _sublayer(group)
            acc = _Sums(group, candidates.names, candidates.twins([p for p, _ in mods]))
            for _, outputs, _ in records:
                acc.add_reference(store.load(outputs[kind]))
            hessian = {m: hessians.value(m) for _, m in mods}
            for name in acc.measured:
                stored = [candidates.stored(p, matrix(m), name, hessian[m]) for p, m in mods]
                with replaced({m: w for (_, m), (w, _, _) in zip(mods, stored)}):
                    for branch, outputs, grad in records:
                        y = run_update(an, layer, kind, store.load_all(branch[kind]))
                        acc.add(name, y, store.load(outputs[kind]), store.load(grad[kind]), stored)
            result.groups[group] = acc.entry(layer, mods, n_tokens)


def _runs(todo: dict, n_configs: int, cache_bytes: int) -> list[list[int]]:
    """The layers to measure, in runs of consecutive layers whose candidate weights (float32) fit in ``cache_bytes``.

    Each run costs one gradient pass per batch; one layer is a run even when it alone is larger.
    """
    runs: list[list[int]] = []
    held = cache_bytes + 1
    for layer, groups in todo.items():
        size = 4 * n_configs * sum(math.prod(m.shape) for _, mods in groups for _, m in mods)
        if held + size > cache_bytes:
            runs.append([])
            held = 0
        runs[-1].append(layer)
        held += size
    return runs


@dataclass
class _Sums:
    """One group's running sums over calibration batches: ``sum y^2`` and, per config, ``sum d^2`` and
    ``sum g^2 d^2``; a config that stores the group as another does (``twins``) takes that one's sums."""

    group: str
    names: tuple[str, ...]
    twins: dict[str, str]
    denom: float = 0.0
    configs: dict[str, list[float]] = field(default_factory=dict)  # name -> [d2, g2d2]
    meta: dict[str, tuple[int, list[str]]] = field(default_factory=dict)  # name -> (bits, stored configs)

    @property
    def measured(self) -> list[str]:
        """The configs to run: each but the twins."""
        return [name for name in self.names if name not in self.twins]

    def add_reference(self, ref: torch.Tensor) -> None:
        """One batch's unquantized residual update: the denominator of the relative error."""
        r = ref.double()
        self.denom += float((r * r).sum())

    def add(
        self, name: str, y: torch.Tensor, ref: torch.Tensor, grad: torch.Tensor, stored: list[tuple[Any, int, str]]
    ) -> None:
        """One batch's error under config ``name``: the update ``y`` against ``ref``, weighted by the loss's gradient
        at the update (``grad``); ``stored`` is each weight's (weight, bits, stored config)."""
        d2 = (y.double() - ref.double()) ** 2
        g2 = grad[:, :-1].double() ** 2
        # Second-order loss change (diagonal empirical Fisher): 1/2 sum_d g_d^2 delta_d^2, per token.
        d2_sum, g2d2 = self.configs.setdefault(name, [0.0, 0.0])
        self.configs[name] = [d2_sum + float(d2.sum()), g2d2 + float((g2 * d2[:, :-1]).sum())]
        self.meta[name] = (sum(bits for _, bits, _ in stored), [c for _, _, c in stored])

    def entry(self, layer: int, mods: list, n_tokens: int) -> dict:
        """The measurement's record of this group: relative error and the Fisher-weighted loss change per token."""
        configs = {
            name: {
                "err": 0.5 * g2d2 / n_tokens,
                "rel": d2 / (self.denom or 1e-30),
                "bits": self.meta[name][0],
                "stored": self.meta[name][1],
            }
            for name, (d2, g2d2) in self.configs.items()
        }
        return {
            "layer": layer,
            "sublayer": _sublayer(self.group),
            "modules": [p for p, _ in mods],
            "numel": sum(math.prod(m.shape) for _, m in mods),
            "configs": {name: dict(configs[self.twins.get(name, name)]) for name in self.names},
        }


class InputHessians:
    """The running Hessians of the inputs of quantized weights, gathered while :meth:`watching` (none for weights
    not given: RTN needs none).

    The linear maps of a group read one input, so they share the first one's. An experts weight has one per
    expert, of what that expert's own matrix multiplies (:func:`layerwise.experts.expert_inputs`): the tokens
    routed to it for gate and up, its hidden activation for down; each expert's is in float64, (in, in).
    """

    def __init__(self, lm: LoadedModel, groups: list[list[tuple[str, Weight]]]) -> None:
        an = lm.anatomy
        self.lm = lm
        self.dense: dict[int, Hessian] = {}
        self.first: dict[Weight, nn.Module] = {}
        self.key: dict[Weight, tuple[int, str]] = {}
        self.experts: dict[tuple[int, str], ExpertHessians] = {}
        sparse = an.sparse_layers()
        for group in groups:
            for _, w in group:
                if w.module in sparse:
                    self.key[w] = (sparse[w.module], w.attr)
                    self.experts.setdefault(self.key[w], ExpertHessians(w.view().shape[0]))
                else:
                    self.first[w] = group[0][1].module

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While active, the inputs of every weight given are added to its Hessians."""
        from ..experts import expert_inputs

        def add(layer: int, attr: str, expert: int, x: torch.Tensor) -> None:
            if (layer, attr) in self.experts:
                self.experts[(layer, attr)].add(expert, x)

        watch = expert_inputs(self.lm.model, self.lm.anatomy, add) if self.experts else contextlib.nullcontext()
        with hessian_hooks(list(dict.fromkeys(self.first.values())), self.dense), watch:
            yield

    def gather(self, batches: tuple[torch.Tensor, ...], *, stop_after: nn.Module | None = None) -> InputHessians:
        """Every batch through the model (one in memory at a time) while :meth:`watching`; with ``stop_after``,
        each pass ends when that module has run: the blocks after it would cost time and change nothing."""

        def enough(*_args) -> None:
            raise _Enough

        for batch in batches:
            with torch.no_grad(), self.watching(), _forward_hook(stop_after, enough):
                try:
                    self.lm.model(input_ids=batch.to(self.lm.device), use_cache=False, logits_to_keep=1)
                except _Enough:
                    pass
        return self

    def value(self, w: Weight) -> torch.Tensor | None:
        """``w``'s input Hessian: (in, in), or (experts, in, in) for an experts weight; None when not gathered."""
        if w in self.key:
            return self.experts[self.key[w]].value
        return self.dense[id(self.first[w])].value if w in self.first else None


class _Enough(Exception):
    """Raised by a hook to end a forward pass once the inputs it was run for are seen."""


@contextmanager
def _forward_hook(module: nn.Module | None, fn) -> Iterator[None]:
    """``fn`` as a forward hook of ``module`` (none when it is None) while active."""
    with hooks() as keep:
        if module is not None:
            keep(module.register_forward_hook(fn))
        yield


@contextmanager
def hessian_hooks(modules: list[nn.Module], into: dict[int, Hessian]) -> Iterator[None]:
    """While active, each module's inputs are added to its running Hessian (``into[id(module)]``)."""

    def hook(m: nn.Module, args: tuple) -> None:
        x = args[0]
        into.setdefault(id(m), Hessian(x.shape[-1], device=x.device)).add(x)

    with hooks() as keep:
        for m in modules:
            keep(m.register_forward_pre_hook(hook))
        yield


def sublayer_io(
    an: Anatomy, layer: int, h: torch.Tensor, call: tuple[tuple, dict]
) -> tuple[torch.Tensor, dict[str, tuple[tuple, dict]], dict[str, torch.Tensor]]:
    """Block ``layer`` run on ``h``: its output, each sublayer's branch inputs (what ``run_update`` takes) and each
    sublayer's residual update."""
    inputs: dict[str, tuple[tuple, dict]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def branch_in(kind: str):
        def hook(_m, args, kwargs):
            inputs[kind] = (args, kwargs)

        return hook

    def update_out(kind: str):
        def hook(_m, _args, output):
            outputs[kind] = first_tensor(output).detach()

        return hook

    with hooks() as keep:
        for kind in ("attn", "mlp"):
            keep(an.branch(layer, kind).register_forward_pre_hook(branch_in(kind), with_kwargs=True))
            keep(an.update_module(layer, kind).register_forward_hook(update_out(kind)))
        out = first_tensor(an.blocks[layer](h, *call[0], **call[1]))
    return out, inputs, outputs


def _measure_layer(
    an: Anatomy,
    layer: int,
    h: torch.Tensor,
    call: tuple[tuple, dict],
    groups,
    candidates: Candidates,
    made: dict,
    grads: dict[str, torch.Tensor],
    sums: dict[str, _Sums],
) -> torch.Tensor:
    """Add one batch's errors of one block's groups to ``sums``, from its input ``h``; return the block's (unquantized)
    output."""
    out, inputs, outputs = sublayer_io(an, layer, h, call)
    for group, mods in groups:
        kind = _sublayer(group)
        acc = sums[group]
        acc.add_reference(outputs[kind])
        per = made[group]
        for name in acc.measured:
            with replaced({m: per[m][name][0] for _, m in mods}):
                y = run_update(an, layer, kind, inputs[kind])
            acc.add(name, y, outputs[kind], grads[kind], [per[m][name] for _, m in mods])
    return out


def bit_range(lm: LoadedModel, candidates: Candidates) -> tuple[float, float]:
    """Bits per weight of the cheapest and the dearest plan, known before anything is measured."""
    an = lm.anatomy
    lo = hi = n = 0
    for layer in range(an.n_layers):
        for _, mods in an.quant_groups(layer, fused=candidates.fused):
            shapes = [(p, m.shape) for p, m in mods]
            per = [sum(candidates.bits(p, s, c) for p, s in shapes) for c in candidates.names]
            lo, hi, n = lo + min(per), hi + max(per), n + sum(s[0] * s[1] for _, s in shapes)
    return lo / n, hi / n


def _batch_pass(
    lm: LoadedModel, ids: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, list[tuple[tuple, dict]], dict]:
    """One forward and backward pass over a batch: the input of block ``layers[0]``, every block's other arguments
    (masks, positions), and for each of ``layers`` the gradient of the batch's summed NLL with respect to each
    sublayer's residual update.

    Its square weights a sublayer's output error into a predicted loss change,
    so errors in sublayers the loss is sensitive to count for more. Only the
    gradients of ``layers`` are taken, so the backward pass stops at the first.
    """
    an = lm.anatomy
    wanted = set(layers)
    updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    calls: list[tuple[tuple, dict]] = [((), {})] * an.n_layers
    first: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def on_block(tr: BlockTrace) -> None:
        calls[tr.layer] = (tr.args, tr.kwargs)
        if tr.layer == layers[0]:
            first.append(tr.h_in.detach())
        if tr.layer in wanted:
            updates[tr.layer] = (tr.attn, tr.mlp)
        if tr.layer == an.n_layers - 1:
            last.append(tr.h_out)

    with torch.enable_grad(), tap(an, on_block, mlp_hidden=False):
        embed = lm.model.get_input_embeddings()
        handle = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_())
        try:  # the head is read below, on the last block's output in slices of positions (lens.nll_grad)
            lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        d_out = nll_grad(an.logits, an.head.get_parameter("weight").shape[0], last[0], ids[:, 1:].flatten())
        flat = [u for layer in layers for u in updates[layer]]
        live = [u for u in flat if u.requires_grad]
        found = iter(torch.autograd.grad(last[0], live, grad_outputs=d_out))
    grads = [next(found).detach() if u.requires_grad else torch.zeros_like(u) for u in flat]
    return first[0], calls, {layer: {"attn": grads[2 * i], "mlp": grads[2 * i + 1]} for i, layer in enumerate(layers)}


def run_update(an: Anatomy, layer: int, kind: Kind, call: tuple[tuple, dict]) -> torch.Tensor:
    """A sublayer's residual update for recorded inputs (branch, then Gemma's post-norm where there is one)."""
    y = first_tensor(an.branch(layer, kind)(*call[0], **call[1]))
    update = an.update_module(layer, kind)
    return y if update is an.branch(layer, kind) else first_tensor(update(y))
