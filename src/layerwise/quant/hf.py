"""compressed-tensors export: a plan's integer codes as a ``pack-quantized`` checkpoint.

transformers loads it with plain ``from_pretrained`` (the ``compressed-tensors``
package installed) and vLLM serves it. Every (bits, group size) pair of the
plan becomes one config group that targets its modules by exact name, so q/k/v
and gate/up (and DeepSeek's q_a/kv_a down-projections), which the plan keeps
together, share a scheme as vLLM's fused layers require. The codes are the
plan's own: nothing is requantized, and the loaded weights equal layerwise's
fake-quantized weights bit for bit when the model is float32 or float16
(scales are stored as float16).

Conventions: layerwise's symmetric codes are unsigned with an offset of
``2**(bits-1)``, compressed-tensors' are signed; ``pack_to_int32`` adds the
offset back, so the bits on disk are layerwise's codes.

Only symmetric groups that tile every row exactly are written: with
compressed-tensors 0.20 and transformers 5, checkpoints with zero points or a
short last group are written but do not load.

Mixture-of-experts models: transformers holds a layer's experts as 3-D tensors,
but checkpoints (and vLLM, and transformers' own loader) keep each expert's
gate, up and down maps as modules of their own (``mlp.experts.3.gate_proj``,
Mixtral's ``block_sparse_moe.experts.3.w1``). The export writes each expert's
codes under those names, found by reversing transformers' own load-time
conversion, and targets a layer's experts with one pattern per map that also
matches the ``experts.N.gate_proj|up_proj|down_proj`` names vLLM's fused MoE
looks a layer's scheme up by; a plan gives a layer's experts one config, as
vLLM requires. transformers (5.25) decompresses every layer's experts with one
scheme, so it reads such a checkpoint right only when all layers share it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Generator, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LayerwiseError
from ..io import atomic_dir
from ..loading import LoadedModel
from .apply import BlockPlan
from .rtn import QConfig, QTensor

FORMAT = "pack-quantized"


def row_widths(lm: LoadedModel) -> set[int]:
    """The input widths of every quantized linear map (a group size must divide each for compressed-tensors)."""
    an = lm.anatomy
    return {m.shape[1] for layer in range(an.n_layers) for _, ms in an.quant_groups(layer) for _, m in ms}


def _check_dtype(lm: LoadedModel) -> None:
    if lm.model.dtype == torch.bfloat16:
        raise LayerwiseError(
            "a bfloat16 model cannot hold the float16 scales exactly; load it with `dtype` float16 or float32 to "
            "export hf"
        )


def check(lm: LoadedModel, configs: tuple[QConfig, ...]) -> None:
    """Refuse, before anything is measured, a model or candidate set that cannot become a loadable checkpoint."""
    an = lm.anatomy
    _check_dtype(lm)
    for layer in an.moe_layers[:1]:
        _expert_modules(lm, layer)
    if an.spec.transposed:
        raise LayerwiseError(
            f"compressed-tensors quantizes torch.nn.Linear layers; {an.model_type}'s Conv1D layers cannot be "
            "exported as hf (leave hf out of `export`)"
        )
    asym = sorted({c.name for c in configs if not c.symmetric})
    if asym:
        raise LayerwiseError(
            "`export` hf writes symmetric codes only (transformers cannot load compressed-tensors zero points); "
            f"set `symmetric` (got {', '.join(asym)})"
        )
    widths = row_widths(lm)
    for c in configs:
        for w in widths:
            c.check(w)
        bad = sorted(w for w in widths if w % c.group_size)
        if bad:
            fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
            raise LayerwiseError(
                f"group size {c.group_size} does not divide rows of {bad[0]} weights, and compressed-tensors "
                "needs whole groups; use `group_size` "
                f"{' or '.join(map(str, fits)) or 'that divides ' + str(bad[0])}"
            )


def quantization_config(configs: dict[str, QConfig], linear: list[str]):
    """One config group per (bits, group size) of the ``configs`` of each target (a module's name, or a ``re:``
    pattern for a layer's experts); other Linear layers ignored."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    by_scheme: dict[tuple[int, int], list[str]] = defaultdict(list)
    for path, c in configs.items():
        by_scheme[(c.bits, c.group_size)].append(path)
    groups = {
        f"group_{i}": QuantizationScheme(
            targets=sorted(paths),
            format=FORMAT,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=g),
        )
        for i, ((bits, g), paths) in enumerate(sorted(by_scheme.items()))
    }
    return QuantizationConfig(
        config_groups=groups,
        format=FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(n for n in linear if n not in configs),
    )


def packed(q: QTensor) -> dict[str, torch.Tensor]:
    """The ``weight_packed``/``weight_scale``/``weight_shape`` tensors of one module."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    cfg = q.config
    if q.zeros is not None:
        raise LayerwiseError("compressed-tensors export takes symmetric codes only")
    out_f, in_f = q.codes.shape
    signed = (q.codes.to(torch.int16) - 2 ** (cfg.bits - 1)).to(torch.int8)
    return {
        "weight_packed": pack_to_int32(signed.cpu(), cfg.bits).contiguous(),
        "weight_scale": q.scales.detach().cpu().half().contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }


@contextmanager
def _published_names(model: torch.nn.Module) -> Iterator[None]:
    """Within the ``with``, transformers names the model's tensors as it saves a model of this architecture made
    anew: each expert a module of its own, as published checkpoints (and vLLM) hold them. Loaded with
    ``from_pretrained``, a model otherwise goes back to the layout its checkpoint stored, fused experts included.
    Only transformers' record of the load's conversions is set aside, and it is put back after."""
    held = model.__dict__.pop("_weight_conversions", None)
    try:
        yield
    finally:
        if held is not None:
            model.__dict__["_weight_conversions"] = held


def _expert_modules(lm: LoadedModel, layer: int) -> dict[str, list[str]]:
    """The checkpoint's module for each expert's matrix of block ``layer``'s experts weights, by weight path
    (``model.layers.3.mlp.experts.gate`` -> ``[model.layers.3.mlp.experts.0.gate_proj, ...]``).

    The names are transformers' own: its load-time conversion for the architecture is reversed on tensors that
    number every row of the experts tensors, so each name comes back holding the rows (and the expert) it stands
    for. One line where transformers writes the experts fused (gpt-oss), which compressed-tensors cannot quantize.
    """
    from transformers.core_model_loading import revert_weight_conversion

    an, moe = lm.anatomy, lm.anatomy.spec.moe
    assert moe is not None
    experts, n = an.experts(layer), an.n_experts(layer)
    handles = {p: w for _, ws in an.quant_groups(layer) for p, w in ws if w.module is experts}
    marks, spans, start = {}, {}, 0
    for attr in dict.fromkeys(w.attr for w in handles.values()):
        rows = experts.get_parameter(attr).shape[-1 if moe.transposed else -2]
        mark = torch.arange(start, start + n * rows).view(n, rows, 1)
        marks[f"{an.spec.layers}.{layer}.{moe.experts}.{attr}"] = mark.transpose(-1, -2) if moe.transposed else mark
        spans[attr], start = (start, rows), start + n * rows
    found: dict[str, dict[int, str]] = {p: {} for p in handles}
    with _published_names(lm.model):
        reverted = revert_weight_conversion(lm.model, marks)
    for key, t in reverted.items():
        for p, w in handles.items():
            base, rows = spans[w.attr]
            got = (t.flatten() - base).tolist()
            j = got[0] // rows
            if 0 <= j < n and [r - j * rows for r in got] == list(range(rows))[w.rows]:
                found[p][j] = key.removesuffix(".weight")
    if not all(len(names) == n for names in found.values()):
        raise LayerwiseError(
            f"transformers writes {an.model_type}'s experts fused, not a module per expert, and compressed-tensors "
            "quantizes modules; give `export` none to plan and evaluate, or quantize a GGUF file of it (llama.cpp's "
            "convert_hf_to_gguf.py writes one) with `format` gguf"
        )
    return {p: [names[j] for j in range(n)] for p, names in found.items()}


def _experts_target(names: list[str], path: str) -> str:
    """One pattern for a layer's experts' gate, up or down maps (``path``'s last part): the checkpoint's modules
    and the ``experts.N.gate_proj`` names vLLM's fused MoE looks their scheme up by."""
    prefix, leaf = names[0].rsplit(".", 2)[0], names[0].rsplit(".", 1)[1]
    leaves = "|".join(sorted({leaf, f"{path.rsplit('.', 1)[1]}_proj"}))
    return f"re:^{re.escape(prefix)}\\.\\d+\\.({leaves})$"


def _packed(lm: LoadedModel, codes: dict[str, QTensor]) -> tuple[set[str], dict[str, torch.Tensor], dict[str, QConfig]]:
    """What ``codes`` (by weight path) write: the model's parameters they replace, the packed tensors that replace
    them (by the checkpoint's names), and each target's config. A linear map is its own module; a sparse block's
    experts weight is split into each expert's matrix, under the module the checkpoint keeps it in."""
    an = lm.anatomy
    sparse = an.sparse_layers()
    names: dict[int, dict[str, list[str]]] = {}
    gone: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, QConfig] = {}
    for path, q in codes.items():
        w = an.weight(path)
        if w.module not in sparse:
            gone.add(f"{path}.weight")
            tensors |= {f"{path}.{k}": v for k, v in packed(q).items()}
            targets[path] = q.config
            continue
        layer = sparse[w.module]
        if layer not in names:
            names[layer] = _expert_modules(lm, layer)
        modules = names[layer][path]
        gone.add(f"{path.rsplit('.', 1)[0]}.{w.attr}")
        for module, part in zip(modules, q.split_rows([q.codes.shape[0] // len(modules)] * len(modules))):
            tensors |= {f"{module}.{k}": v for k, v in packed(part).items()}
        targets[_experts_target(modules, path)] = q.config
    return gone, tensors, targets


def one_experts_scheme(lm: LoadedModel, configs: Mapping[str, object]) -> bool:
    """Whether every sparse block's experts have the same config (by weight path): only then does transformers read
    the checkpoint's experts right (it decompresses all of them with the first config group that names experts;
    vLLM reads each layer's own)."""
    an = lm.anatomy
    sparse = an.sparse_layers()
    return len({c for p, c in configs.items() if an.weight(p).module in sparse}) <= 1


def export(lm: LoadedModel, codes: dict[str, QTensor], out: str | Path) -> Path:
    """Write the model with ``codes`` in place of those weights, as a compressed-tensors checkpoint, atomically."""
    _check_dtype(lm)
    gone, tensors, targets = _packed(lm, codes)
    state = {name: t for name, t in lm.model.state_dict().items() if name not in gone} | tensors
    with atomic_dir(out, "checkpoint") as tmp:
        with _published_names(lm.model):
            lm.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        _finish(lm, targets, tmp)
    return Path(out)


def export_streamed(lm: LoadedModel, plan: BlockPlan, out: str | Path, *, shard_bytes: int = 2**30) -> Path:
    """:func:`export` for a model whose weights stay on disk: block by block, each block's codes made by ``plan``
    while its weights are read (GPTQ from the quantized stream, as in memory), and every tensor written as it comes,
    in shards of about ``shard_bytes``: the in-memory export's tensors and config."""
    from ..io import save_model_config, save_shards

    _check_dtype(lm)
    configs: dict[str, QConfig] = {}
    # closed at once on an error (a full disk): the block read ahead dropped, the skeleton's parameters put back
    with atomic_dir(out, "checkpoint") as tmp, closing(_block_tensors(lm, plan, configs)) as tensors:
        save_shards(tensors, tmp, shard_bytes=shard_bytes)
        save_model_config(lm.model, tmp)
        _finish(lm, configs, tmp)
    return Path(out)


def _block_tensors(
    lm: LoadedModel, plan: BlockPlan, configs: dict[str, QConfig]
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Every tensor of the checkpoint in the compute dtype under the checkpoint's names (as ``save_pretrained``
    renames them), a quantized weight as its packed codes (its target's config added to ``configs``): the embeddings
    and final norm, each block, then an untied head, each with the buffers the checkpoint holds there."""
    from transformers.core_model_loading import revert_weight_conversion

    s, an = lm.streamed, lm.anatomy
    assert s is not None
    written: set[str] = set()

    def own(names: list[str]) -> list[str]:  # a tied head is the embedding's tensor: written once
        fresh = [n for n in names if s.keys[n] not in written]
        written.update(s.keys[n] for n in fresh)
        return fresh

    def held(inside: tuple[str, ...], within: bool = True) -> dict[str, torch.Tensor]:
        """The checkpoint's buffers (DeepSeek's routing correction bias) under (or outside) these modules' paths."""
        return {n: lm.model.get_buffer(n).detach().cpu() for n in s.buffers if n.startswith(inside) == within}

    def read(names: list[str], extra: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        state = {n: lm.model.get_parameter(n).detach().cpu() for n in names} | extra
        return iter(revert_weight_conversion(lm.model, state).items())

    with s.onloaded(s.stem):
        yield from read(own(s.stem), held(tuple(f"{s.paths[m]}." for m in (*an.blocks, an.head)), within=False))
    for i in s.blocks():
        gone, tensors, targets = _packed(lm, plan.codes(i))
        configs |= targets
        kept = [n for n in own(s.names(an.blocks[i])) if n not in gone]
        yield from read(kept, tensors | held((f"{s.paths[an.blocks[i]]}.",)))
    head = own(s.names(an.head))
    with s.onloaded(head):
        yield from read(head, held((f"{s.paths[an.head]}.",)))


def _finish(lm: LoadedModel, configs: dict[str, QConfig], folder: Path) -> None:
    """The quantization config in the checkpoint's config, and the tokenizer beside it."""
    from compressed_tensors.compressors import ModelCompressor

    linear = [n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)]
    ModelCompressor(quantization_config=quantization_config(configs, linear)).update_config(str(folder))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(folder)


def transformers_nll(
    path: str | Path, ids: torch.Tensor, *, device: str | torch.device = "cpu", progress: bool = False
) -> list[float]:
    """Mean next-token NLL of each window when plain transformers loads the checkpoint (compressed-tensors decompresses
    it); ``progress`` shows a bar over the windows."""
    from transformers import AutoModelForCausalLM

    from ..evaluate import next_token_logits

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    model.to(device).eval()
    logits = next_token_logits(model)
    out = [
        float(torch.nn.functional.cross_entropy(logits(row[None].to(device)).float(), row[1:].to(device)))
        for row in tqdm(ids, desc="transformers perplexity", unit="window", disable=not progress)
    ]
    del model
    return out
