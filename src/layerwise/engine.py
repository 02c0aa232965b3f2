"""Block-sequential running of a model whose weights stay on disk.

The model is built on the meta device (a skeleton: modules and shapes, no weights). Each block's weights are placed
on the device in the compute dtype only while that block runs, and given back afterwards, so the weights in memory
are one block's and the next one's, read from the checkpoint in a background thread meanwhile
(:meth:`Streamed.blocks`; plus the embedding, the final norm and the head while they are used). Every batch of
windows passes a block before the next block is placed: the windows' hidden states are carried from block to block.

The extra inputs each block takes (masks, position embeddings) are the model's own: a dry pass runs the model with
every block skipped (``trace.install_skips``) and records what each block was called with, so no architecture's
signature is known here. The numbers are those of the resident model: the same modules run on the same inputs.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from .anatomy import Anatomy
from .errors import LayerwiseError
from .trace import hooks, install_skips, run_blocks

if TYPE_CHECKING:
    from .loading import CausalLM


@dataclass(frozen=True)
class Checkpoint:
    """Where each tensor of a safetensors checkpoint lives; tensors are read one at a time."""

    files: dict[str, Path]

    @classmethod
    def of(cls, folder: str | Path) -> Checkpoint:
        """The checkpoint in ``folder``: its index (``model.safetensors.index.json``), else its shards. Every shard
        is opened (its header read) first, so a missing, truncated or incomplete one is refused in one line before
        anything runs."""
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            files = {key: shard for shard in sorted(folder.glob("*.safetensors")) for key in _keys(shard)}
            if not files:
                raise LayerwiseError(f"{folder} holds no safetensors weights; give a Hugging Face model directory")
            return cls(files)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {name: folder / file for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise LayerwiseError(f"{index} is not a readable safetensors index; download it again") from None
        held = {shard: _keys(shard) for shard in set(files.values())}
        for name, shard in files.items():
            if name not in held[shard]:
                raise LayerwiseError(f"{shard} lacks {name}, which its index names; download the shard again")
        return cls(files)

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as fh:
            return fh.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a matrix, read alone."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as fh:
            return fh.get_slice(name)[start:stop]


#: In the folder a GGUF file is converted into: which file, and its hash.
SOURCE_FILE = "layerwise-source.json"


@dataclass(frozen=True)
class GGUFCheckpoint:
    """The tensors of a GGUF file under the names transformers gives them, each dequantized to float32 only when
    read, with the fixes transformers' GGUF loader applies (q/k permutation, Gemma's norm offset): what the
    conversion to safetensors writes, without writing it. A model read from disk then needs no float32 copy of a
    quantized file (a 70B Q4 file's would be 280 GB)."""

    path: Path
    #: Every parameter the file holds, by transformers' name (all in ``path``, as :class:`Checkpoint`'s files).
    files: dict[str, Path]
    #: transformers' name -> the GGUF tensors it is made from (a sparse MLP's gate and up experts make one)
    sources: dict[str, list[str]]
    infos: dict[str, Any]  # GGUF name -> ggufio.TensorInfo
    processor: Any
    names: dict[str, str]  # GGUF name -> transformers' name, for the processor

    @classmethod
    def of(cls, gguf: Path, model: CausalLM) -> GGUFCheckpoint:
        """``gguf``'s tensors for ``model`` (a skeleton of the file's config); one line when the file lacks one."""
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        from . import ggufio

        meta, tensors = ggufio.header(gguf)
        arch = meta.get("general.architecture") or ""
        processor = _gguf_processor(arch, model.config)
        # llama.cpp names a Mixtral file's tensors as a llama's, which gguf's name map has no "mixtral" for
        names = get_gguf_hf_weights_map(model, processor, model_type=arch if arch == "llama" else None)
        ckpt = cls(gguf, {}, {}, {t.name: t for t in tensors}, processor, names)
        for t in tensors:
            stem = t.name.removesuffix(".weight")
            if t.name in names:
                made = [names[t.name]]
            elif stem in names:  # a weight mapped without its suffix (Qwen-MoE's, gpt-oss's experts): placed there
                made = [names[stem]]
            else:  # renamed by the processor (GPT-2's output.weight): processed once here to learn its names
                made = list(ckpt._processed(t.name)[1])
            for name in made:
                ckpt.sources.setdefault(name, []).append(t.name)
        missing = [n for n, _ in model.named_parameters() if n not in ckpt.sources]
        if missing:
            raise LayerwiseError(
                f"{gguf.name} holds no tensor for {len(missing)} weights of a {model.config.model_type} model "
                f"({', '.join(missing[:3])}...); re-export it with llama.cpp's convert_hf_to_gguf.py"
            )
        wrong = [n for n, p in model.named_parameters() if ckpt._numel(n) != p.numel()]
        if wrong:
            raise LayerwiseError(
                f"{gguf.name} holds {len(wrong)} weights of another size than its metadata gives a "
                f"{model.config.model_type} model ({', '.join(wrong[:3])}...); re-export it with llama.cpp's "
                "convert_hf_to_gguf.py"
            )
        ckpt.files.update(dict.fromkeys(ckpt.sources, gguf))
        return ckpt

    def _numel(self, name: str) -> int:
        """Elements the file holds for ``name``: its sources' together (gate and up experts make one weight)."""
        return sum(math.prod(self.infos[s].shape) for s in self.sources[name])

    def _processed(self, *gguf_names: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """GGUF tensors dequantized and processed in turn: the last result, and the tensors the processor put by
        name (where several fill one, as gate and up experts do, each its part)."""
        from . import ggufio

        moved: dict[str, dict] = {"tensors": {}}
        for gguf_name in gguf_names:
            weights = ggufio.dequantize(self.path, self.infos[gguf_name])
            result = self.processor.process(
                weights=weights, name=gguf_name, tensor_key_mapping=self.names, parsed_parameters=moved
            )
        return result, moved["tensors"]

    def tensor(self, name: str) -> torch.Tensor:
        import numpy as np

        result, moved = self._processed(*self.sources[name])
        if name in moved:
            return moved[name].float()
        return torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the embedding or the head, dequantized alone: transformers' processors leave these
        two as llama.cpp stores them (a test checks the rows against the whole tensor on each file it reads)."""
        from . import ggufio

        (source,) = self.sources[name]
        return torch.from_numpy(ggufio.dequantize(self.path, self.infos[source], span=(start, stop)))


def _gguf_processor(arch: str, config: Any) -> Any:
    """transformers' tensor processor for a GGUF file of llama.cpp's architecture ``arch`` read as ``config``'s
    model. llama.cpp writes Mixtral as a llama with experts, which transformers has no processor for: its q and k rows
    are a llama's (un-permuted), its experts stored as Qwen-MoE's are (gate and up merged into one weight)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        Qwen2MoeTensorProcessor,
        TensorProcessor,
    )

    if arch == "gpt-oss":
        return _gpt_oss_processor(config)
    if not (arch == "llama" and config.model_type == "mixtral"):
        return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())

    class Mixtral(Qwen2MoeTensorProcessor, LlamaTensorProcessor):
        def process(self, weights: Any, name: str, **kwargs: Any) -> Any:
            if ".attn_q." in name or ".attn_k." in name:
                return LlamaTensorProcessor.process(self, weights, name, **kwargs)
            return super().process(weights, name, **kwargs)

    return Mixtral(config=config.to_dict())


#: The name transformers' GGUF processors give a tensor they have placed in the parsed tensors themselves.
PLACED: Any = None


def _gpt_oss_processor(config: Any) -> Any:
    """A processor for llama.cpp's gpt-oss files (transformers' own expects tensors llama.cpp does not write): its
    converter split each fused gate-and-up tensor (and bias) into ``ffn_gate_exps`` and ``ffn_up_exps`` by
    alternate columns, stored the experts' matrices (out, in) where transformers holds (in, out), and added
    ``.weight`` to the attention sinks' name. Each GGUF tensor is put back in its place, as Qwen-MoE's are."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import GGUFTensor, TensorProcessor

    placed = re.compile(r"(?P<stem>blk\.\d+\.(attn_sinks|ffn_(?P<w>gate|up|down)_exps))\.(?P<kind>weight|bias)$")

    class GptOss(TensorProcessor):
        def perform_fallback_tensor_mapping(self, names: dict, suffix: str, qual_name: str, hf_name: str) -> None:
            if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(_bias)?", hf_name):
                for w in ("gate", "up") if m[2] == "gate_up" else ("down",):  # weights by their stem, as Qwen-MoE's
                    names[f"blk.{m[1]}.ffn_{w}_exps" + (".bias" if m[3] else "")] = qual_name + hf_name

        def process(self, weights: Any, name: str, **kwargs: Any) -> Any:
            names, tensors = kwargs["tensor_key_mapping"], kwargs["parsed_parameters"]["tensors"]
            m = placed.match(name)
            if not m or (m["w"] == "down" and m["kind"] == "bias"):  # as transformers holds it, under its name
                return GGUFTensor(weights, name, {})
            data = torch.from_numpy(np.array(weights))
            if m["w"] and m["kind"] == "weight":
                data = data.transpose(1, 2)
            hf = names[m["stem"] if m["kind"] == "weight" else name]
            if m["w"] in ("gate", "up"):
                if hf not in tensors:
                    tensors[hf] = data.new_zeros(*data.shape[:-1], 2 * data.shape[-1])
                tensors[hf][..., 1 if m["w"] == "up" else 0 :: 2] = data
            else:
                tensors[hf] = data.contiguous()
            return GGUFTensor(weights, PLACED, {})

    return GptOss(config=config.to_dict())


@dataclass(frozen=True)
class HeldCheckpoint:
    """Every tensor of a checkpoint read once into CPU memory in the compute dtype (pinned, for fast copies, when
    the device is a GPU), each block copied onto the device only while it runs: ``offload="cpu"``, for a model that
    fits the machine's memory but not the device's."""

    files: dict[str, Path]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(
        cls, ckpt: Checkpoint | ConvertedCheckpoint | GGUFCheckpoint, dtype: torch.dtype, *, pin: bool
    ) -> HeldCheckpoint:
        tensors = {}
        for key in ckpt.files:
            t = ckpt.tensor(key).to(dtype)
            tensors[key] = t.pin_memory() if pin else t
        return cls(dict(ckpt.files), tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name][start:stop]


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """A checkpoint whose tensors transformers converts as it loads them, seen under the model's names: a
    mixture-of-experts checkpoint stores each expert's matrices apart (Mixtral's under older names too), and the
    model holds one 3-D weight per layer. Each such weight is made when it is read, from its sources in expert order,
    by transformers' own conversion operations, so the streamed engine reads what ``from_pretrained`` would load. A
    pre-quantized checkpoint's weights (gpt-oss's MXFP4 blocks and scales, FP8 with block scales, compressed-tensors)
    are made alike, dequantized by the operations of its quantizer (:func:`dequantizer`)."""

    base: Checkpoint
    #: The skeleton, whose parameters give each made weight its dtype. Where a quantizer dequantizes, a meta copy
    #: in the dtype the checkpoint declares: the dtype ``from_pretrained`` dequantizes into by default, so that a
    #: checkpoint written from the model (a drop's, copied in the stored dtypes) is no wider than the unquantized
    #: model's (gpt-oss-20b: 42 GB in bfloat16, not 84 GB in the float32 a profile computes in), and half the bytes
    #: to make.
    model: nn.Module
    #: Every parameter by the model's name; a made one under its first source's file.
    files: dict[str, Path]
    #: The model's name -> the checkpoint's, for tensors only renamed.
    renamed: dict[str, str]
    #: The model's name -> (the converter, its sources by source pattern in expert order), for tensors made.
    made: dict[str, tuple[Any, dict[str, list[str]]]]

    @classmethod
    def of(
        cls, ckpt: Checkpoint, model: CausalLM, quantizer: Any = None, dtype: torch.dtype | None = None
    ) -> Checkpoint | ConvertedCheckpoint:
        """``ckpt`` seen through ``model``'s conversions (and ``quantizer``'s, which dequantize into ``dtype``);
        ``ckpt`` itself when they change no name."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        own = dict.fromkeys((n for n, _ in model.named_parameters(remove_duplicate=False)), True)
        renamed: dict[str, str] = {}
        sources: dict[str, dict[str, list[str]]] = {}
        for key in sorted(ckpt.files, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
            if pattern is None:
                renamed[name] = key
            else:
                sources.setdefault(name, {}).setdefault(pattern, []).append(key)
        if not sources and all(name == key for name, key in renamed.items()):
            return ckpt
        made = {
            name: (next(c for c in converters if set(by) <= set(c.source_patterns)), by) for name, by in sources.items()
        }
        files = {name: ckpt.files[key] for name, key in renamed.items()}
        files |= {name: ckpt.files[next(iter(by.values()))[0]] for name, by in sources.items()}
        stored: nn.Module = model
        if dtype is not None:
            stored = copy.deepcopy(stored).to(dtype)  # on the meta device: no weights
        return cls(ckpt, stored, files, renamed, made)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.renamed:
            return self.base.tensor(self.renamed[name])
        return self._made(name, self.base.tensor)

    def _made(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """A made weight, from its sources as ``read`` gives them, through its converter's operations."""
        converter, by = self.made[name]
        tensors: dict[str, Any] = {p: [read(k) for k in keys] for p, keys in by.items()}
        for op in converter.operations:
            tensors = op.convert(
                tensors,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                model=self.model,
                full_layer_name=name,
            )
        (made,) = tensors.values()
        return made.data if isinstance(made, nn.Parameter) else made

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of the embedding or the head, read alone: also where a quantizer's converter takes it (FP8's takes
        every weight) but finds it alone, with no scale beside it, and so only casts it, row by row as whole. A
        weight made from several tensors is sliced from the whole."""
        if name in self.renamed:
            return self.base.rows(self.renamed[name], start, stop)
        if sum(map(len, self.made[name][1].values())) == 1:
            return self._made(name, lambda key: self.base.rows(key, start, stop))
        return self.tensor(name)[start:stop]


def dequantizer(model_config: Any) -> Any:
    """For a model config that says its checkpoint is pre-quantized: transformers' quantizer of that format set to
    dequantize as it loads, as ``from_pretrained`` does on a machine without the format's kernels (gpt-oss's MXFP4
    on a CPU); None for plain weights. layerwise measures and changes weights, so it reads every quantized
    checkpoint so, in memory and from disk, also where the format's kernels would run it quantized. One line for a
    format transformers cannot dequantize as it reads."""
    config = getattr(model_config, "quantization_config", None)
    if config is None:
        return None
    from transformers.quantizers import AutoHfQuantizer

    config = config if isinstance(config, dict) else config.to_dict()
    try:
        quantizer = AutoHfQuantizer.from_config(config | {"dequantize": True}, pre_quantized=True)
        quantizer.validate_environment()
    except (ValueError, ImportError, TypeError) as exc:
        raise _undequantizable(config.get("quant_method"), str(exc).splitlines()[0][:120]) from None
    if "dequantize" not in quantizer.get_load_operations():
        raise _undequantizable(config.get("quant_method"))
    return quantizer


def _undequantizable(method: str | None, reason: str | None = None) -> LayerwiseError:
    return LayerwiseError(
        f"layerwise dequantizes a quantized checkpoint as it reads it, which transformers cannot do for this "
        f"{method} checkpoint{f' ({reason})' if reason else ''}; save a dequantized copy first"
    )


def open_checkpoint(folder: str | Path, model: CausalLM) -> Checkpoint | ConvertedCheckpoint | GGUFCheckpoint:
    """The weights of ``folder`` for ``model`` (its skeleton): its safetensors (seen through transformers'
    conversions: a mixture-of-experts checkpoint's experts fused as the model holds them), or, for the folder a GGUF
    file's config and tokenizer were written to without weights, the GGUF file it names."""
    from .io import read_json

    folder = Path(folder)
    source = folder / SOURCE_FILE
    if source.is_file() and not any(folder.glob("*.safetensors")):
        gguf = Path(read_json(source, "the record of a converted GGUF file")["gguf"])
        if not gguf.is_file():
            raise LayerwiseError(f"{gguf}, the GGUF file {folder} was made from, is gone; load the file again")
        return GGUFCheckpoint.of(gguf, model)
    quantizer = dequantizer(model.config)
    if quantizer is None:
        return ConvertedCheckpoint.of(Checkpoint.of(folder), model)
    # as a model transformers dequantizes: it holds, and a checkpoint written from it holds, plain weights
    del model.config.quantization_config
    return ConvertedCheckpoint.of(Checkpoint.of(folder), model, quantizer, _stored_dtype(folder))


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint's config says its weights have (transformers' default, float32, where it says none)."""
    from .io import read_json

    config = read_json(folder / "config.json", "a model config (config.json of a Hugging Face model)")
    named = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def _keys(shard: Path) -> set[str]:
    """The tensor names a shard holds, from its header; one line when it is missing or not whole."""
    from safetensors import SafetensorError, safe_open

    if not shard.is_file():
        raise LayerwiseError(f"{shard} is missing; the checkpoint's index names it: download the complete checkpoint")
    try:
        with safe_open(str(shard), "pt") as fh:
            return set(fh.keys())
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise LayerwiseError(f"{shard} is not a whole safetensors file ({reason}); download it again") from None


def skeleton(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> CausalLM:
    """The model of ``folder``'s config on the meta device (buffers such as rotary tables are real), in eval mode,
    built for ``dtype`` (not the checkpoint's dtype: buffers and casts follow it as in a model loaded in ``dtype``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
    model.tie_weights()  # a tied head is the embedding's parameter, counted once, as in the loaded model
    if (Path(folder) / "generation_config.json").is_file():  # its end-of-text tokens, as from_pretrained reads them
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def return_freed_memory() -> None:
    """Make glibc give every large freed buffer back to the system at once (a fixed mmap threshold of 64 KiB).

    By default glibc raises its threshold to the size of the largest buffer freed, up to 32 MiB, and serves later
    buffers below it from heaps it keeps: a streamed run frees one block's weights and one batch's activations after
    another, and its resident set grew to twice what it holds (1.7B shape from disk: 2.6 GiB against 1.2 GiB with
    the fixed threshold, ``benchmarks/scale.py``). Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_mmap_threshold = -3
    if hasattr(libc, "mallopt"):
        libc.mallopt(m_mmap_threshold, 64 * 1024)


@dataclass(frozen=True)
class Spilled:
    """Where a spilled tensor lies in its :class:`States` file."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


#: A hidden state a pass keeps: in CPU memory, or where it was spilled.
Kept = torch.Tensor | Spilled

#: Errors of a write that found the disk (or the user's quota, or the file size limit) full.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class States:
    """The hidden states a streamed pass carries from block to block: in CPU memory, or spilled to a file.

    ``keep(x)`` gives what ``load`` reads ``x`` back from: ``x`` itself in CPU memory, or the :class:`Spilled` slot
    it was written to in a file of ``folder`` (when given). ``keep(x, over=old)`` writes into ``old``'s slot when it
    is as large, so a stream carried through every block takes one slot. The file is written and read with plain
    ``pwrite``/``pread`` (not a memory map), so a tensor read back is in memory only while the pass holds it, and the
    resident set counts nothing else. :meth:`close` removes the file (the pass calls it also on error or Ctrl-C).
    """

    def __init__(self, device: torch.device, folder: Path | None = None) -> None:
        self.device, self.folder = device, folder
        self.path: Path | None = None
        self._fd, self.end = -1, 0
        if folder is not None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix=".layerwise-states-", suffix=".bin", dir=folder)
            self._fd, self.path = fd, Path(name)

    def keep(self, x: torch.Tensor, *, over: Kept | None = None) -> Kept:
        """``x`` kept (off an accelerator), in ``over``'s slot when it is spilled and as large."""
        if self.path is None:
            return x.detach().to("cpu")
        data = x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = over.offset if isinstance(over, Spilled) and over.nbytes == data.nbytes else self.end
        try:
            done = 0
            while done < data.nbytes:
                done += os.pwrite(self._fd, data.data[done:], offset + done)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            raise LayerwiseError(
                f"the disk under {self.folder} is full: spilling hidden states there stopped after "
                f"{self.end / 2**20:.0f} MiB; free space on it, or run on fewer or shorter windows"
            ) from None
        self.end = max(self.end, offset + data.nbytes)
        return Spilled(offset, tuple(x.shape), x.dtype)

    def load(self, kept: Kept) -> torch.Tensor:
        """A kept tensor on the device."""
        if isinstance(kept, torch.Tensor):
            return kept.to(self.device)
        buf = torch.empty(kept.nbytes, dtype=torch.uint8)
        if os.preadv(self._fd, [buf.numpy().data], kept.offset) != kept.nbytes:
            raise LayerwiseError(f"{self.path} was cut short while the run read it back; run it again")
        return buf.view(kept.dtype).reshape(kept.shape).to(self.device)

    def keep_all(self, tree: Any, *, over: Any = None) -> Any:
        """``tree`` (nested tuples, lists and dicts) with every tensor kept, each in the slot of the same place in
        ``over`` (a tree this kept before, of the same structure) when it fits."""
        leaves, spec = tree_flatten(tree)
        olds = tree_flatten(over)[0] if over is not None else [None] * len(leaves)
        kept = [self.keep(x, over=o) if isinstance(x, torch.Tensor) else x for x, o in zip(leaves, olds, strict=True)]
        return tree_unflatten(kept, spec)

    def load_all(self, tree: Any) -> Any:
        """A tree from :meth:`keep_all` with every kept tensor read back onto the device."""
        return tree_map_only((torch.Tensor, Spilled), self.load, tree)

    def close(self) -> None:
        """Remove the file (if any); the store keeps nothing after."""
        if self.path is not None:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
            self.path = None


#: The least a slice of the embedding or the head holds when they are read in slices (:func:`slice_rows`).
SLICE_BYTES = 256 * 2**20


def slice_rows(model: CausalLM, dtype: torch.dtype) -> int | None:
    """Rows of the embedding and of the head read at a time: None (each read whole) unless the matrix is larger
    than both the largest block and :data:`SLICE_BYTES` (Gemma 3's 262k-row head is six of its 4B model's blocks);
    then slices that size, so neither sets the peak above a block's."""
    an = Anatomy(model)
    vocab, hidden = an.linear_shape(an.head)
    block = max(sum(p.numel() for p in b.parameters()) for b in an.blocks) * dtype.itemsize
    limit = max(block, SLICE_BYTES)
    if vocab * hidden * dtype.itemsize <= limit or getattr(an.head, "bias", None) is not None:
        return None
    return max(1, limit // (hidden * dtype.itemsize))


class _SlicedHead(torch.autograd.Function):
    """The head's logits from its rows read a slice at a time, forward and backward (each reads every slice
    again), so no more than one slice of the matrix is held."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, read: Callable, spans: list[tuple[int, int]]) -> torch.Tensor:
        ctx.read, ctx.spans = read, spans
        return torch.cat([nn.functional.linear(x, read(a, b)) for a, b in spans], -1)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = grads
        total = sum(grad[..., a:b] @ ctx.read(a, b) for a, b in ctx.spans)
        assert isinstance(total, torch.Tensor)
        return total, None, None


class Streamed:
    """A skeleton model whose weights are read from ``checkpoint`` one part at a time onto ``device`` in ``dtype``.

    ``spill``: the folder where each pass keeps the hidden states it carries (:class:`States`); None keeps them in
    CPU memory. ``rows``: how many rows of the embedding and the head are read at a time (None: each whole; see
    :func:`slice_rows`). ``prefetch``: :meth:`blocks` reads the next block in a background thread while the current
    one runs (one more block in host memory), else each block only when it is reached. Making one sets glibc to give
    freed buffers back at once (:func:`return_freed_memory`), for the process."""

    def __init__(
        self,
        model: CausalLM,
        checkpoint: Checkpoint | ConvertedCheckpoint | GGUFCheckpoint | HeldCheckpoint,
        *,
        device: str | torch.device = "cpu",
        dtype=torch.float32,
        spill: str | Path | None = None,
        rows: int | None = None,
        prefetch: bool = True,
    ) -> None:
        return_freed_memory()
        self.model, self.checkpoint, self.rows, self.prefetch = model, checkpoint, rows, prefetch
        self.spill = None if spill is None else Path(spill)
        self.anatomy = Anatomy(model)
        self.device, self.dtype = torch.device(device), dtype
        self.paths = {m: n for n, m in model.named_modules()}
        self.keys = {name: self._key(name) for name, _ in model.named_parameters(remove_duplicate=False)}
        #: Checkpoint keys read from another checkpoint for now (:meth:`reading`).
        self.reads: dict[str, Checkpoint | ConvertedCheckpoint | GGUFCheckpoint | HeldCheckpoint] = {}
        #: Buffers the checkpoint holds (DeepSeek-V3's routing correction bias), read once into the skeleton: they
        #: are state, not weights a block streams, and the skeleton's own are only their initial values.
        self.buffers = {name: key for name, _ in model.named_buffers() if (key := self._find(name)) is not None}
        for name, key in self.buffers.items():  # on the device, where the blocks that read them run
            buf = model.get_buffer(name)
            buf.data = checkpoint.tensor(key).to(self.device, buf.dtype)

    @property
    def offload(self) -> str:
        """Where the weights stay between blocks: ``disk`` (the checkpoint) or ``cpu`` (memory, off the device)."""
        return "cpu" if isinstance(self.checkpoint, HeldCheckpoint) else "disk"

    @property
    def n_params(self) -> int:
        """Parameters in the checkpoint's tensors (a tied head counted once, as the resident model counts it)."""
        shapes = {key: self.model.get_parameter(name).numel() for name, key in self.keys.items()}
        return sum(shapes.values())

    def _find(self, name: str) -> str | None:
        """The checkpoint's name for a tensor of the model: its own, without the base model's prefix, or (a tied
        head) the input embedding's; None when it has none."""
        files = self.checkpoint.files
        prefix = f"{getattr(self.model, 'base_model_prefix', '')}."
        candidates = [name, name.removeprefix(prefix)]
        out = self.model.get_output_embeddings()
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        if out is not None and tied and name.startswith(self.paths[out]):
            candidates.append(f"{self.paths[self.model.get_input_embeddings()]}.weight")
        return next((key for key in candidates if key in files), None)

    def _key(self, name: str) -> str:
        """The checkpoint's name for a parameter, or one line saying why it has none."""
        key = self._find(name)
        if key is not None:
            return key
        raise LayerwiseError(f"the checkpoint holds no tensor for {name}; give the complete checkpoint folder")

    def names(self, *modules: nn.Module) -> list[str]:
        """The parameter names of these modules."""
        return [
            f"{path}.{n}"
            for path in (self.paths[m] for m in modules)
            for n, _ in self.model.get_submodule(path).named_parameters(remove_duplicate=False)
        ]

    @property
    def stem(self) -> list[str]:
        """Parameters outside the blocks and the head: embeddings (token, position) and the final norm."""
        inside = tuple(f"{self.paths[m]}." for m in (*self.anatomy.blocks, self.anatomy.head))
        return [n for n in self.keys if not n.startswith(inside)]

    def _tensor(self, name: str) -> torch.Tensor:
        """A parameter's tensor read from the checkpoint, in the compute dtype, in host memory."""
        key = self.keys[name]
        return self._source(key).tensor(key).to(self.dtype)

    def _source(self, key: str) -> Checkpoint | ConvertedCheckpoint | GGUFCheckpoint | HeldCheckpoint:
        return self.reads.get(key, self.checkpoint)

    @contextmanager
    def reading(
        self, checkpoint: Checkpoint | ConvertedCheckpoint | GGUFCheckpoint | HeldCheckpoint, keys: Iterable[str]
    ) -> Iterator[None]:
        """These checkpoint ``keys`` read from ``checkpoint`` instead in the ``with``, whole or by rows as the
        model's own are: a variant that stores tensors outside the blocks otherwise (a GGUF plan's token embedding,
        and the head tied to it, at another type) is read as lazily as the model."""
        keys = list(keys)
        missing = [k for k in keys if k not in checkpoint.files]
        if missing:
            raise LayerwiseError(f"the checkpoint read in place of the model's holds no tensor {missing[0]}")
        before = self.reads
        self.reads = before | dict.fromkeys(keys, checkpoint)
        try:
            yield
        finally:
            self.reads = before

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """A block's tensors read ahead of its turn, pinned when the device is a GPU so that placing them copies at
        full speed (a :class:`HeldCheckpoint`'s are pinned already: then nothing is copied here)."""
        pin = self.device.type == "cuda"
        values = {}
        for name in names:
            value = self._tensor(name)
            values[name] = value.pin_memory() if pin else value
        return values

    @contextmanager
    def onloaded(self, names: list[str], values: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """These parameters placed on the device for the ``with``: ``values`` when they were read already (taken out
        of the dict as they are placed, so a host copy is freed once on the device), else each read from the
        checkpoint in turn; on exit (also on error) the skeleton's own meta parameters are put back, so ties and
        every parameter's identity outlast the read."""
        from accelerate.utils import set_module_tensor_to_device

        kept = {name: self.model.get_parameter(name) for name in names}
        try:
            for name in names:
                value = values.pop(name) if values is not None else self._tensor(name)
                set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=self.dtype)
            yield
        finally:
            for name, param in kept.items():
                path, _, attr = name.rpartition(".")
                self.model.get_submodule(path).register_parameter(attr, param)

    def blocks(self, order: Iterable[int] | None = None) -> Iterator[int]:
        """Each block of ``order`` (default: first to last; ``reversed(range(a, b))`` for a backward pass) onloaded
        in turn, its index yielded while its weights are placed.

        With :attr:`prefetch` the next block's tensors are read (from disk, dequantized, converted) in a background
        thread while the caller runs the current one, so reading overlaps compute; the thread and any read in flight
        are finished when the loop ends, also when the caller breaks out or raises. Use it directly in a ``for``
        (never kept in a variable), so that leaving the loop closes it at once."""
        order = list(range(self.anatomy.n_layers) if order is None else order)
        if not self.prefetch:
            for i in order:
                with self.onloaded(self.names(self.anatomy.blocks[i])):
                    yield i
            return
        names = [self.names(self.anatomy.blocks[i]) for i in order]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerwise-prefetch")
        try:
            ahead: Future[dict[str, torch.Tensor]] | None = pool.submit(self._read, names[0]) if order else None
            for k, i in enumerate(order):
                assert ahead is not None
                values = ahead.result()
                ahead = pool.submit(self._read, names[k + 1]) if k + 1 < len(order) else None
                with self.onloaded(names[k], values):
                    yield i
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @contextmanager
    def states(self) -> Iterator[States]:
        """A pass's store of hidden states (a file in :attr:`spill`, created if missing, when set), emptied on exit,
        also on error."""
        made = self.spill is not None and not self.spill.exists()
        if self.spill is not None:
            self.spill.mkdir(parents=True, exist_ok=True)
        store = States(self.device, self.spill)
        try:
            yield store
        finally:
            store.close()
            if made and self.spill is not None and not any(self.spill.iterdir()):
                self.spill.rmdir()  # the folder made for the spill only

    def calls(self, input_ids: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """The first block's input for ``input_ids`` and what every block is called with besides it, from a dry pass
        with every block skipped (only the stem's weights are read). ``inputs`` are the model's other keyword
        inputs (``attention_mask``, ``position_ids``, and ``cache`` with ``use_cache=True`` for a step of
        generation: each block updates its layer of that cache as it runs)."""
        an = self.anatomy
        found: list[Any] = [None] * an.n_layers
        first: list[torch.Tensor] = []
        names, embedded = self.stem, cast(contextlib.AbstractContextManager, contextlib.nullcontext())
        if self.rows is not None:  # the embedding's rows these ids use, gathered a slice at a time
            weight = f"{self.paths[an.embed]}.weight"
            names = [n for n in names if n != weight]
            input_ids, embedded = self._gathered(weight, input_ids)

        def record(i: int) -> Callable:
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                if i == 0:
                    first.append(args[0] if args else kwargs["hidden_states"])
                found[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

            return hook

        restore = install_skips(an, [f"L{i}" for i in range(an.n_layers)])
        try:
            with hooks() as keep, self.onloaded(names), embedded, torch.no_grad():
                for i, block in enumerate(an.blocks):
                    keep(block.register_forward_pre_hook(record(i), with_kwargs=True))
                self._dry(input_ids, inputs)
        finally:
            restore()
        return first[0], found

    def _gathered(self, weight: str, ids: torch.Tensor) -> tuple[torch.Tensor, contextlib.AbstractContextManager]:
        """``ids`` renumbered into the rows they use, and the embedding holding those rows only while in the
        ``with``: the module's own forward then gives the same vectors (its scaling too)."""
        used, renumbered = torch.unique(ids, return_inverse=True)
        key, vocab = self.keys[weight], self.anatomy.embed.weight.shape[0]
        assert self.rows is not None
        parts = []
        for start in range(0, vocab, self.rows):
            want = used[(used >= start) & (used < start + self.rows)]
            if len(want):
                parts.append(self._source(key).rows(key, start, min(start + self.rows, vocab))[want - start])
        return renumbered.view(ids.shape), self._embedding(torch.cat(parts).to(self.device, self.dtype))

    @contextmanager
    def _embedding(self, rows: torch.Tensor) -> Iterator[None]:
        """The embedding module holding ``rows`` (and no padding row: it only marks a row gradients skip)."""
        emb = self.anatomy.embed
        kept, pad = emb.get_parameter("weight"), emb.padding_idx
        emb.register_parameter("weight", nn.Parameter(rows, requires_grad=False))
        emb.padding_idx = None
        try:
            yield
        finally:
            emb.register_parameter("weight", kept)
            emb.padding_idx = pad

    @contextmanager
    def head(self) -> Iterator[None]:
        """The final norm and the head ready for ``Anatomy.logits`` in the ``with``: the head read whole, or (with
        :attr:`rows`) a slice at a time at each use."""
        an = self.anatomy
        if self.rows is None:
            with self.onloaded(self.names(an.final_norm, an.head)):
                yield
            return
        key, vocab = self.keys[f"{self.paths[an.head]}.weight"], an.linear_shape(an.head)[0]
        spans = [(a, min(a + self.rows, vocab)) for a in range(0, vocab, self.rows)]

        source = self._source(key)

        def read(start: int, stop: int) -> torch.Tensor:
            return source.rows(key, start, stop).to(self.device, self.dtype)

        head, before = an.head, an.head.__dict__.get("forward")  # an outer ``head`` (another checkpoint's) in force
        with self.onloaded(self.names(an.final_norm)):
            head.forward = lambda x: _SlicedHead.apply(x, read, spans)
            try:
                yield
            finally:
                if before is None:
                    del head.forward
                else:
                    head.forward = before

    def _dry(self, ids: torch.Tensor, inputs: dict[str, Any]) -> None:
        """The model's own forward up to the blocks; the head is never reached (its input is discarded)."""
        base = self.model.get_submodule(self.anatomy.spec.layers.rsplit(".", 1)[0])
        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        base(input_ids=ids.to(self.device), **{"use_cache": False, **moved})

    def last_hidden(self, batches: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each batch (the model's keyword inputs, ``input_ids`` among them) through every block, block-major:
        every batch passes block ``i`` while its weights are placed (:meth:`blocks`). Returns each batch's last
        block output."""
        starts = [self.calls(**inputs) for inputs in batches]
        h = [h0 for h0, _ in starts]
        with torch.no_grad():
            for i in self.blocks():
                h = [run_blocks(self.anatomy, i, hb, c, stop=i + 1) for hb, (_, c) in zip(h, starts)]
        return h

    def greedy(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, *, pad: int) -> torch.Tensor:
        """Greedy continuations of left-padded prompts (``mask`` 0 on the padding), as ``generate`` makes them: up
        to ``new_tokens`` new tokens per row, ``pad`` after a row's end-of-text token, ending when every row has
        ended. All rows take each step together, so a step reads every block and the head once; a KV cache keeps
        what earlier steps computed, each block updating its own layer of it."""
        from transformers import DynamicCache

        an = self.anatomy
        eos = self.model.generation_config.eos_token_id
        ends = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        cache = DynamicCache(config=self.model.config)
        pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        step, out = ids, []
        for _ in range(new_tokens):
            inputs = {"attention_mask": mask, "position_ids": pos, "cache": cache, "use_cache": True}
            (h,) = self.last_hidden([{"input_ids": step, **inputs}])
            with self.head(), torch.no_grad():
                token = an.logits(h[:, -1]).argmax(-1).cpu()
            token = token.masked_fill(done, pad)
            out.append(token)
            done |= torch.isin(token, ends)
            if bool(done.all()):
                break
            step, pos = token[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return torch.stack(out, 1)
