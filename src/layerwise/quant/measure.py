"""EXL2-style measurement: the output error of every quantization group under every candidate config.

A *group* is the set of linear maps that share one config because engines
fuse them (``L3.attn.qkv``, ``L3.attn.o``, ``L3.mlp.gate_up``, ``L3.mlp.down``).
For each group and candidate config, the group's weights are quantized, its
sublayer is run on the sublayer's cached unquantized inputs, and the relative
error ``||y_q - y||^2 / ||y||^2`` of the sublayer's residual update is
recorded with the exact storage cost. Layers are measured one at a time from
the cached residual stream, so memory holds one layer's inputs; results are
written after every layer and a rerun resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..anatomy import Anatomy, first_tensor
from ..data import Windows
from ..errors import LayerwiseError
from ..io import write_json
from ..loading import LoadedModel
from ..trace import BlockTrace, hooks, tap
from .gptq import Hessian, inverse_factor, quantize_gptq, quantize_gptq_many
from .rtn import QConfig, QTensor, quantize_rtn

Method = Literal["rtn", "gptq"]
#: Rows one GPTQ sweep stacks on the CPU (measured on 2 cores: 576-row matrices gain from six bit widths at once, 1536-row ones lose).
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
    def load(cls, path: str | Path, expect: dict) -> "Measurement":
        """Read a cached measurement, refusing one made for another model, data, method or candidate set."""
        try:
            d = json.loads(Path(path).read_text())
            meta, groups = d["meta"], d["groups"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LayerwiseError(f"{path} is not a readable measurement ({exc.__class__.__name__}); delete it to measure again") from None
        for key, want in expect.items():
            if meta.get(key) != want:
                raise LayerwiseError(f"{path} is stale: its {key} is {str(meta.get(key))[:40]!r}, not {str(want)[:40]!r}; delete it to measure again")
        return cls(meta, groups)


def matrix(an: Anatomy, module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear map, as a float32 copy."""
    return an.linear_weight(module).detach().float().clone()


@contextmanager
def replaced(an: Anatomy, weights: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Temporarily give each module a new (out, in) weight; the originals come back on exit."""
    saved = []
    try:
        with torch.no_grad():
            for m, w in weights.items():
                saved.append((m, m.weight.detach().clone()))
                m.weight.copy_((w.T if an.spec.transposed else w).to(m.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for m, w in saved:
                m.weight.copy_(w)


def _sublayer(group: str) -> str:
    return group.split(".")[1]


class Candidates(Protocol):
    """The configs a plan chooses from, and how a weight is stored under each."""

    names: tuple[str, ...]
    #: Whether engines fuse q/k/v and gate/up (one config per fused group) or type each tensor alone.
    fused: bool
    #: Whether ``stored`` needs the layer's input Hessian (GPTQ).
    needs_hessian: bool
    #: What identifies this candidate set in a cached measurement.
    key: dict

    def bits(self, path: str, shape: tuple[int, int], name: str) -> int:
        """Storage bits of an (out, in) weight under config ``name`` (cheap: no quantization)."""
        ...

    def stored(self, path: str, w: torch.Tensor, name: str, hessian: torch.Tensor | None) -> tuple[torch.Tensor, int, str]:
        """The (out, in) weight as it would be stored under config ``name``, its bits, and the stored config."""
        ...

    def stored_all(self, path: str, w: torch.Tensor, hessian: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, int, str]]:
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
        if self.method == "gptq" and hessian is None:
            raise LayerwiseError("GPTQ needs each layer's calibration inputs (its Hessian); apply a GPTQ plan with its calibration windows (QuantPlan.apply(lm, windows))")
        return quantize_gptq(w, hessian, cfg) if self.method == "gptq" else quantize_rtn(w, cfg)  # type: ignore[arg-type]

    def codes_rows(self, ws: list[torch.Tensor], name: str, hessian: torch.Tensor | None) -> list[QTensor]:
        """``codes`` of several (out, in) weights that read the same inputs, quantized as one row-stacked matrix.

        Both methods treat rows independently (GPTQ given the Hessian), so each
        result equals ``codes`` of that weight alone; GPTQ makes one column sweep.
        """
        stacked = self.codes("", torch.cat(ws), name, hessian)
        return stacked.split_rows([w.shape[0] for w in ws])

    def stored(self, path: str, w: torch.Tensor, name: str, hessian: torch.Tensor | None) -> tuple[torch.Tensor, int, str]:
        bits = self.bits(path, tuple(w.shape), name)  # type: ignore[arg-type]
        return self.codes(path, w, name, hessian).dequantize(), bits, name

    def stored_all(self, path: str, w: torch.Tensor, hessian: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, int, str]]:
        """Every config; GPTQ runs one column sweep per group size for all its bit widths (see ``quantize_gptq_many``)."""
        if self.method != "gptq":
            return {name: self.stored(path, w, name, hessian) for name in self.names}
        if hessian is None:
            raise LayerwiseError("GPTQ needs each layer's calibration inputs (its Hessian); apply a GPTQ plan with its calibration windows (QuantPlan.apply(lm, windows))")
        grids: dict[tuple, list[QConfig]] = {}
        for c in self.configs:
            grids.setdefault((c.group_size, c.symmetric, c.scale_bits), []).append(c)
        factor = inverse_factor(hessian)
        # An accelerator is launch-bound: stack every bit width. A CPU is cache-bound: stack while the rows stay few.
        per_sweep = len(self.configs) if w.device.type != "cpu" else max(1, _CPU_SWEEP_ROWS // w.shape[0])
        out = {}
        for cfgs in grids.values():
            for i in range(0, len(cfgs), per_sweep):
                for c, qt in zip(cfgs[i:i + per_sweep], quantize_gptq_many(w, factor, cfgs[i:i + per_sweep])):
                    out[c.name] = (qt.dequantize(), self.bits(path, tuple(w.shape), c.name), c.name)  # type: ignore[arg-type]
        return {name: out[name] for name in self.names}


def measure(
    lm: LoadedModel,
    windows: Windows,
    *,
    candidates: Candidates | tuple[QConfig, ...] = DEFAULT_CANDIDATES,
    method: Method = "rtn",
    path: str | Path | None = None,
    progress: bool = True,
) -> Measurement:
    """Measure every group under every candidate config on the calibration windows (see the module doc).

    A tuple of configs means integer group quantization by ``method``.
    """
    if isinstance(candidates, tuple):
        candidates = GroupCandidates(candidates, method)
    an = lm.anatomy
    expect = {"model_hash": lm.source.get("model_hash"), "data_hash": windows.data_hash, "n_calib": windows.n_calib,
              "seq_len": windows.seq_len, "objective": "fisher", "fused": candidates.fused} | candidates.key
    result = Measurement(expect | {"n_layers": an.n_layers})
    if path is not None and Path(path).exists():
        result = Measurement.load(path, expect)
    ids = windows.calibration.to(lm.device)
    start = time.perf_counter()
    grads = output_grads(lm, ids)
    h, calls = block_inputs(lm, ids)
    with torch.no_grad():
        for layer in tqdm(range(an.n_layers), desc="measure", disable=not progress):
            groups = an.quant_groups(layer, fused=candidates.fused)
            if all(g in result.groups for g, _ in groups):
                h = first_tensor(an.blocks[layer](h, *calls[layer][0], **calls[layer][1]))
                continue
            h = _measure_layer(an, layer, h, calls[layer], groups, candidates, result, grads[layer])
            result.meta["seconds"] = round(result.meta.get("seconds", 0.0) + time.perf_counter() - start, 3)
            start = time.perf_counter()
            if path is not None:
                result.save(path)
    return result


def block_inputs(lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """The first block's input and every block's other arguments (masks, positions), from one forward pass."""
    an = lm.anatomy
    first: list[torch.Tensor] = []
    calls: list[tuple[tuple, dict]] = [((), {})] * an.n_layers

    def record(tr: BlockTrace) -> None:
        if tr.layer == 0:
            first.append(tr.h_in.detach())
        calls[tr.layer] = (tr.args, tr.kwargs)

    with torch.no_grad(), tap(an, record, mlp_hidden=False):
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return first[0], calls


@contextmanager
def hessian_hooks(modules: list[nn.Module], into: dict[int, Hessian]) -> Iterator[None]:
    """For the duration, add each module's inputs to its running Hessian (``into[id(module)]``)."""

    def hook(m: nn.Module, args: tuple) -> None:
        x = args[0]
        into.setdefault(id(m), Hessian(x.shape[-1], device=x.device)).add(x)

    with hooks() as keep:
        for m in modules:
            keep(m.register_forward_pre_hook(hook))
        yield


def _measure_layer(an: Anatomy, layer: int, h: torch.Tensor, call: tuple[tuple, dict], groups, candidates: Candidates, result,
                   grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Measure one block's groups from its cached input ``h``; return the block's (unquantized) output."""
    inputs: dict[str, tuple[tuple, dict]] = {}
    outputs: dict[str, torch.Tensor] = {}
    hessians: dict[int, Hessian] = {}

    def branch_in(kind: str):
        def hook(_m, args, kwargs):
            inputs[kind] = (args, kwargs)

        return hook

    def update_out(kind: str):
        def hook(_m, _args, output):
            outputs[kind] = first_tensor(output).detach()

        return hook

    quantized = [m for _, mods in groups for _, m in mods] if candidates.needs_hessian else []
    with hooks() as keep, hessian_hooks(quantized, hessians):
        for kind in ("attn", "mlp"):
            keep(an.branch(layer, kind).register_forward_pre_hook(branch_in(kind), with_kwargs=True))
            keep(an.update_module(layer, kind).register_forward_hook(update_out(kind)))
        out = first_tensor(an.blocks[layer](h, *call[0], **call[1]))
    for group, mods in groups:
        kind = _sublayer(group)
        ref = outputs[kind].double()
        denom = float((ref * ref).sum()) or 1e-30
        entry = {"layer": layer, "sublayer": kind, "modules": [p for p, _ in mods],
                 "numel": sum(an.linear_weight(m).numel() for _, m in mods), "configs": {}}
        made = {m: candidates.stored_all(path, matrix(an, m), hessians[id(m)].value if candidates.needs_hessian else None)
                for path, m in mods}
        for name in candidates.names:
            deq = {m: made[m][name][0] for _, m in mods}
            bits = sum(made[m][name][1] for _, m in mods)
            kept = [made[m][name][2] for _, m in mods]
            with replaced(an, deq):
                y = run_update(an, layer, kind, inputs[kind])
            d2 = (y.double() - ref) ** 2
            rel = float(d2.sum()) / denom
            # Second-order loss change (diagonal empirical Fisher): 1/2 sum_d g_d^2 delta_d^2, per token.
            err = 0.5 * float((grads[kind][:, :-1].double() ** 2 * d2[:, :-1]).sum()) / (d2.shape[0] * (d2.shape[1] - 1))
            entry["configs"][name] = {"err": err, "rel": rel, "bits": bits, "stored": kept}
        result.groups[group] = entry
    return out


def bit_range(lm: LoadedModel, candidates: Candidates) -> tuple[float, float]:
    """Bits per weight of the cheapest and the dearest plan, known before anything is measured."""
    an = lm.anatomy
    lo = hi = n = 0
    for layer in range(an.n_layers):
        for _, mods in an.quant_groups(layer, fused=candidates.fused):
            shapes = [(p, tuple(an.linear_weight(m).shape)) for p, m in mods]
            per = [sum(candidates.bits(p, s, c) for p, s in shapes) for c in candidates.names]  # type: ignore[arg-type]
            lo, hi, n = lo + min(per), hi + max(per), n + sum(s[0] * s[1] for _, s in shapes)
    return lo / n, hi / n


def output_grads(lm: LoadedModel, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per block, the gradient of the calibration NLL with respect to each sublayer's residual update.

    Its square weights a sublayer's output error into a predicted loss change,
    so errors in sublayers the loss is sensitive to count for more.
    """
    an = lm.anatomy
    updates: list[torch.Tensor] = []

    def on_block(tr: BlockTrace) -> None:
        updates.extend((tr.attn, tr.mlp))

    with torch.enable_grad(), tap(an, on_block, mlp_hidden=False):
        embed = lm.model.get_input_embeddings()
        handle = embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_())
        try:
            logits = lm.model(input_ids=ids, use_cache=False, logits_to_keep=torch.arange(ids.shape[1] - 1)).logits
        finally:
            handle.remove()
        logp = torch.log_softmax(logits.float(), dim=-1)
        loss = -logp.gather(-1, ids[:, 1:, None].to(logp.device)).mean()
        live = [u for u in updates if u.requires_grad]
        found = iter(torch.autograd.grad(loss * (ids.shape[1] - 1) * ids.shape[0], live))
    grads = [next(found).detach() if u.requires_grad else torch.zeros_like(u) for u in updates]
    return [{"attn": grads[2 * i], "mlp": grads[2 * i + 1]} for i in range(an.n_layers)]


def run_update(an: Anatomy, layer: int, kind: str, call: tuple[tuple, dict]) -> torch.Tensor:
    """A sublayer's residual update for recorded inputs (branch, then Gemma's post-norm where there is one)."""
    y = first_tensor(an.branch(layer, kind)(*call[0], **call[1]))  # type: ignore[arg-type]
    update = an.update_module(layer, kind)  # type: ignore[arg-type]
    return y if update is an.branch(layer, kind) else first_tensor(update(y))  # type: ignore[arg-type]
