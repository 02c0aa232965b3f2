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
from typing import Iterator, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..anatomy import Anatomy, first_tensor
from ..data import Windows
from ..errors import LayerwiseError
from ..io import write_json
from ..loading import LoadedModel
from ..trace import BlockTrace, tap
from .gptq import Hessian, quantize_gptq
from .rtn import QConfig, quantize_rtn

Method = Literal["rtn", "gptq"]
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


def measure(
    lm: LoadedModel,
    windows: Windows,
    *,
    candidates: tuple[QConfig, ...] = DEFAULT_CANDIDATES,
    method: Method = "rtn",
    path: str | Path | None = None,
    progress: bool = True,
) -> Measurement:
    """Measure every group under every candidate config on the calibration windows (see the module doc)."""
    if method not in ("rtn", "gptq"):
        raise LayerwiseError(f"unknown --method {method!r}; use rtn or gptq")
    an, model = lm.anatomy, lm.model
    expect = {"model_hash": lm.source.get("model_hash"), "data_hash": windows.data_hash, "n_calib": windows.n_calib,
              "seq_len": windows.seq_len, "method": method, "candidates": [c.name for c in candidates]}
    result = Measurement(expect | {"n_layers": an.n_layers})
    if path is not None and Path(path).exists():
        result = Measurement.load(path, expect)
    ids = windows.calibration.to(lm.device)
    h: torch.Tensor | None = None
    calls: list[tuple[tuple, dict]] = [((), {})] * an.n_layers

    def record(tr: BlockTrace) -> None:
        nonlocal h
        if tr.layer == 0:
            h = tr.h_in.detach()
        calls[tr.layer] = (tr.args, tr.kwargs)

    start = time.perf_counter()
    with torch.no_grad():
        with tap(an, record, mlp_hidden=False):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        assert h is not None
        for layer in tqdm(range(an.n_layers), desc=f"measure ({method})", disable=not progress):
            groups = an.quant_groups(layer)
            if all(g in result.groups for g, _ in groups):
                h = first_tensor(an.blocks[layer](h, *calls[layer][0], **calls[layer][1]))
                continue
            h = _measure_layer(an, layer, h, calls[layer], groups, candidates, method, result)
            result.meta["seconds"] = round(result.meta.get("seconds", 0.0) + time.perf_counter() - start, 3)
            start = time.perf_counter()
            if path is not None:
                result.save(path)
    return result


def _measure_layer(an: Anatomy, layer: int, h: torch.Tensor, call: tuple[tuple, dict], groups, candidates, method, result) -> torch.Tensor:
    """Measure one block's groups from its cached input ``h``; return the block's (unquantized) output."""
    inputs: dict[str, tuple[tuple, dict]] = {}
    outputs: dict[str, torch.Tensor] = {}
    hessians: dict[int, Hessian] = {}
    handles = []

    def branch_in(kind: str):
        def hook(_m, args, kwargs):
            inputs[kind] = (args, kwargs)

        return hook

    def update_out(kind: str):
        def hook(_m, _args, output):
            outputs[kind] = first_tensor(output).detach()

        return hook

    def matrix_in(module: nn.Module):
        def hook(_m, args):
            x = args[0]
            hessians.setdefault(id(module), Hessian(x.shape[-1], device=x.device)).add(x)

        return hook

    for kind in ("attn", "mlp"):
        handles.append(an.branch(layer, kind).register_forward_pre_hook(branch_in(kind), with_kwargs=True))
        handles.append(an.update_module(layer, kind).register_forward_hook(update_out(kind)))
    if method == "gptq":
        for _, mods in groups:
            for _, m in mods:
                handles.append(m.register_forward_pre_hook(matrix_in(m)))
    try:
        out = first_tensor(an.blocks[layer](h, *call[0], **call[1]))
    finally:
        for hd in handles:
            hd.remove()
    for name, mods in groups:
        kind = _sublayer(name)
        ref = outputs[kind].double()
        denom = float((ref * ref).sum()) or 1e-30
        entry = {"layer": layer, "sublayer": kind, "modules": [p for p, _ in mods],
                 "numel": sum(an.linear_weight(m).numel() for _, m in mods), "configs": {}}
        for cfg in candidates:
            deq, bits = {}, 0
            for _, m in mods:
                w = matrix(an, m)
                cfg.check(w.shape[1])
                q = quantize_gptq(w, hessians[id(m)].value, cfg) if method == "gptq" else quantize_rtn(w, cfg)
                deq[m] = q.dequantize()
                bits += cfg.storage_bits(*w.shape)
            with replaced(an, deq):
                y = run_update(an, layer, kind, inputs[kind])
            err = float(((y.double() - ref) ** 2).sum()) / denom
            entry["configs"][cfg.name] = {"err": err, "bits": bits}
        result.groups[name] = entry
    return out


def run_update(an: Anatomy, layer: int, kind: str, call: tuple[tuple, dict]) -> torch.Tensor:
    """A sublayer's residual update for recorded inputs (branch, then Gemma's post-norm where there is one)."""
    y = first_tensor(an.branch(layer, kind)(*call[0], **call[1]))  # type: ignore[arg-type]
    update = an.update_module(layer, kind)  # type: ignore[arg-type]
    return y if update is an.branch(layer, kind) else first_tensor(update(y))  # type: ignore[arg-type]
