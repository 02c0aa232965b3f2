"""GGUF types as quantization candidates, produced by llama.cpp itself, and mixed-type GGUF exports.

For each candidate type, llama.cpp (through ``llama-cpp-python``) quantizes
the source GGUF file once with every tensor at that type; the files are
cached. A candidate's error and bits are measured from the tensors those
files actually hold, read back with the ``gguf`` package: llama.cpp silently
stores another type where a row length is not a multiple of a K-type's 256
(SmolLM2's 576), and the measurement sees the type that was really written.

A plan is exported by copying, for every quantized tensor, the bytes of its
chosen type from that type's file into a copy of the source (metadata and
tokenizer included), so the export holds exactly the weights that were
measured and evaluated. The same plan is also written as a
``llama-quantize`` command line (``recipe``) for people who run llama.cpp's
quantizer themselves; a test checks the two give the same file contents.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import ggufio
from ..anatomy import Anatomy, Weight
from ..errors import LayerwiseError
from ..loading import LoadedModel, cache_root
from .allocate import Allocation, fixed
from .imatrix import Imatrix, tensor_columns
from .measure import Measurement

if TYPE_CHECKING:
    from ..engine import GGUFCheckpoint

#: Candidate types made without an importance matrix, cheapest first (bits per weight with scales: 2.625 ... 8.5).
TYPES: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")
#: llama.cpp's IQ types, cheapest first (1.5625 ... 4.5 bits per weight): candidates too when there is an
#: importance matrix. Their 256-wide blocks fall back to IQ4_NL in rows of another width (SmolLM2's 576).
IQ_TYPES: tuple[str, ...] = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL")
#: The token embedding's name in GGUF files (it serves as the output head too where the model ties the two).
EMBEDDING = "token_embd.weight"
#: The output head's name, in files of models that do not tie it to the embedding.
OUTPUT = "output.weight"
#: The types llama.cpp refuses to make without an importance matrix (its ``tensor_requires_imatrix``; not for the
#: token embedding, which has no entry in one).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
#: llama.cpp file types (``LLAMA_FTYPE_MOSTLY_*``) whose base type is the tensor type named, where the names differ.
_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "IQ2_S": "IQ2_M"}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LayerwiseError("GGUF quantization needs llama-cpp-python: pip install 'layerwise[llama]'") from None
    return llama_cpp


def _ggml_type(name: str) -> int:
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise LayerwiseError(f"unknown GGUF type {name!r}; use one of {', '.join(TYPES + IQ_TYPES)}") from None


def _nominal_bits(name: str) -> float:
    """Bits per weight of a type's blocks, scales included (``Q4_K``: 4.5)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    return 8 * size / block


def candidate_types(asked: tuple[str, ...] | None, imatrix: Imatrix | None) -> tuple[str, ...]:
    """The types to measure, cheapest first: those ``asked`` (checked), else every K- and legacy type and, with an
    importance matrix, every IQ type."""
    if asked is None:
        asked = TYPES + IQ_TYPES if imatrix is not None else TYPES
    names = tuple(dict.fromkeys(_known(t, "types") for t in asked))
    check_imatrix(names, imatrix)
    return tuple(sorted(names, key=_nominal_bits))


def _known(name: str, option: str) -> str:
    """A quantized type's name (upper case), or one line naming the types there are."""
    if name.upper() not in TYPES + IQ_TYPES:
        raise LayerwiseError(f"unknown GGUF type {name!r} in `{option}`; use any of {', '.join(TYPES + IQ_TYPES)}")
    return name.upper()


def check_imatrix(types: Iterable[str], imatrix: Imatrix | None, option: str = "types") -> None:
    """Refuse, before anything is made, a type llama.cpp only makes with an importance matrix when there is none
    (``option``: where the type was asked for)."""
    needs = sorted(NEEDS_IMATRIX.intersection(types))
    if needs and imatrix is None:
        raise LayerwiseError(
            f"llama.cpp makes {', '.join(needs)} only with an importance matrix: give `imatrix` auto or a file, or "
            f"leave {', '.join(needs)} out of `{option}`"
        )


def llama_quantize(
    source: str | Path,
    out: str | Path,
    base: str,
    overrides: list[tuple[str, str]] | None = None,
    *,
    token_embedding_type: str | None = None,
    output_tensor_type: str | None = None,
    pure: bool = True,
    threads: int | None = None,
    imatrix: Imatrix | None = None,
) -> Path:
    """Quantize ``source`` with llama.cpp: every tensor at type ``base`` (``--pure``; with ``pure=False``,
    llama.cpp's own mix for that type's file type, e.g. Q4_K_M, or for the file type ``base`` names, e.g. IQ3_M)
    except the (regex, type) ``overrides`` (first match wins); the token embedding and the output head at their own
    types when given; each tensor's rounding weighted by ``imatrix`` when given (``llama-quantize --imatrix``)."""
    import ctypes

    lc = _llama_cpp()
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{_FTYPE.get(base, base)}", None)
    if base not in TYPES + IQ_TYPES and (pure or ftype is None):
        raise LayerwiseError(
            f"unknown GGUF type {base!r}; use one of {', '.join(TYPES + IQ_TYPES)}"
            + ("" if pure else " or a llama.cpp file type (Q4_K_M, IQ3_M, ...)")
        )
    check_imatrix([base, *(t for _, t in overrides or ())], imatrix)
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.pure = pure
    params.nthread = threads or os.cpu_count() or 1
    if token_embedding_type is not None:
        params.token_embedding_type = _ggml_type(token_embedding_type)
    if output_tensor_type is not None:
        params.output_tensor_type = _ggml_type(output_tensor_type)
    keep = []  # the override array and its strings must outlive the call
    if overrides:
        arr = (lc.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides):
            keep.append(pattern.encode())
            arr[i].pattern = keep[-1]
            arr[i].type = _ggml_type(t)
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, type(params.tt_overrides))
        keep.append(arr)
    if imatrix is not None:
        params.imatrix = _imatrix_array(lc, imatrix, keep)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        with _log_kept(lc) as log:
            rc = lc.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            arch = ggufio.arch(ggufio.reader(source))
            said = next((ln.strip() for ln in reversed(log) if "error" in ln.lower() or "failed" in ln.lower()), "")
            raise LayerwiseError(
                f"llama.cpp could not quantize {Path(source).name} (architecture {arch!r}) to {base}"
                f"{f' ({said})' if said else f' (error {rc})'}; if this llama.cpp build does not support that "
                "architecture, use `family` int"
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _log_kept(lc) -> Iterator[list[str]]:
    """llama.cpp's log into a list while the block runs, the callback before it put back after: the quantizer logs
    a few lines per tensor (every fallback type too, which the plan records) through the process-wide callback, which
    llama-cpp-python points at Python's standard error, and its reason for failing comes the same way."""
    import ctypes

    before, data = lc.llama_log_callback(), ctypes.c_void_p()
    lc.llama_log_get(ctypes.byref(before), ctypes.byref(data))
    parts: list[str] = []
    lines: list[str] = []

    @lc.llama_log_callback
    def keep(level: int, text: bytes, user_data: object) -> None:
        parts.append(text.decode(errors="replace"))

    lc.llama_log_set(keep, None)
    try:
        yield lines
    finally:
        lc.llama_log_set(before, data)
        lines += "".join(parts).splitlines()


def _imatrix_array(lc, imatrix: Imatrix, keep: list):
    """llama.cpp's importance data (name, values, size per tensor, then an empty entry), its buffers added to
    ``keep`` so that they outlive the call."""
    import ctypes

    entries = imatrix.importance()
    arr = (lc.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, values) in enumerate(sorted(entries.items())):
        keep += [name.encode(), values]
        arr[i].name = keep[-2]
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(entries)].name = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(lc.llama_model_imatrix_data))


def source_gguf(lm: LoadedModel) -> Path:
    """The GGUF file the model was loaded from; GGUF plans are built from it."""
    path = lm.source.get("gguf_path")
    if not path:
        raise LayerwiseError(
            "GGUF plans need a model loaded from a GGUF file (`ref` default or FILE.gguf); "
            "convert a Hugging Face directory with llama.cpp's convert_hf_to_gguf.py first"
        )
    return Path(path)


def candidate_files(lm: LoadedModel, types: tuple[str, ...] = TYPES, imatrix: Imatrix | None = None) -> dict[str, Path]:
    """One llama.cpp-quantized copy of the source per type (with ``imatrix`` when given), made once and cached by
    the source's hash and the importance matrix's."""
    src = source_gguf(lm)
    folder = cache_root() / "gguf" / str(lm.source["model_hash"])[:16]
    if imatrix is not None:
        folder = folder / f"imatrix-{imatrix.digest[:16]}"
    files = {t: folder / f"{t}.gguf" for t in types}
    todo = [t for t in types if not files[t].exists()]
    for t in tqdm(todo, desc="GGUF candidates", unit="type", disable=not todo):
        llama_quantize(src, files[t], t, imatrix=imatrix)  # the token embedding too: `embedding` may take it
    return files


def embedding_type(source: str | Path, name: str = EMBEDDING) -> str | None:
    """The type a GGUF file stores its token embedding (or tensor ``name``) in; None where it has none."""
    return next((t.tensor_type.name for t in ggufio.stored(source) if t.name == name), None)


def _row_order(w: torch.Tensor, src: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Indices ``p`` with ``src[p] == w``: llama.cpp's converter permutes the rows of some
    tensors (Llama's q and k), and quantization acts on rows, so the permutation found on the
    source weights maps every quantized copy back to the model's layout. The source is
    rounded to the model's dtype first, so a bf16 or fp16 model matches exactly too."""
    w = w.detach().float().cpu()
    if w.shape != src.shape:
        raise LayerwiseError(
            f"{name} in the GGUF file is {tuple(src.shape)}, the loaded model's is {tuple(w.shape)}; load the "
            "model from that GGUF file"
        )
    src = src.to(dtype).float()
    probe = torch.randn(w.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = torch.empty(w.shape[0], dtype=torch.long)
    p[torch.argsort(w.double() @ probe)] = torch.argsort(src.double() @ probe)
    if not torch.allclose(src[p], w, atol=1e-6 * float(w.abs().max()), rtol=0):
        raise LayerwiseError(
            f"the weights of {name} in the GGUF file do not match the loaded model; load the model from that GGUF file"
        )
    return p


@dataclass
class GGUFCandidates:
    """GGUF types as candidates, each read back from the file llama.cpp wrote for it."""

    anatomy: Anatomy
    source: Path
    files: dict[str, Path]
    imatrix: Imatrix | None = None  # what llama.cpp weighed each tensor's rounding by
    # llama.cpp types each tensor on its own; these groups (``mlp.gate_up``) get one type, as they run together
    fused: tuple[str, ...] = ()
    # the file whose token embedding the plan's file takes (``embedding``: a type's file); None: the source's
    embedding: Path | None = None
    needs_hessian: bool = False
    _readers: dict = field(default_factory=dict, repr=False)
    _rows: dict = field(default_factory=dict, repr=False)
    _sizes: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(
        cls,
        lm: LoadedModel,
        types: tuple[str, ...] | None = None,
        imatrix: Imatrix | None = None,
        tie: tuple[str, ...] = (),
        embedding: str | None = None,
    ) -> GGUFCandidates:
        """Each of ``types`` (by default :func:`candidate_types`'s) in a file quantized from the model's source
        (with ``imatrix``, checked against the model); the groups ``tie`` names (``("mlp.gate_up",)``) typed as
        one; the token embedding of the plan's file at type ``embedding`` (None: as the source stores it)."""
        types = candidate_types(types, imatrix)
        if imatrix is not None:
            imatrix.check(tensor_columns(lm), "given")
        emb = None
        if embedding is not None:
            check_imatrix([_known(embedding, "embedding")], imatrix, "embedding")  # its whole file is made at it
            emb = candidate_files(lm, (embedding.upper(),), imatrix)[embedding.upper()]
        return cls(lm.anatomy, source_gguf(lm), candidate_files(lm, types, imatrix), imatrix, tie, emb)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.files)

    @property
    def key(self) -> dict:
        im = self.imatrix.digest if self.imatrix is not None else None
        return {"method": "llama.cpp", "candidates": list(self.names), "imatrix": im}

    def tensor(self, file: str, name: str):
        """A tensor of one candidate file (or of the source, ``file="source"``, or of the embedding's,
        ``"embedding"``)."""
        if file not in self._readers:
            path = {"source": self.source, "embedding": self.embedding}.get(file) or self.files[file]
            self._readers[file] = {t.name: t for t in ggufio.stored(path)}
        try:
            return self._readers[file][name]
        except KeyError:
            raise LayerwiseError(
                f"{name} is not in the GGUF file; llama.cpp names this architecture's tensors differently"
            ) from None

    def bits(self, path: str, shape: tuple[int, int], name: str) -> int:
        """From the file's header alone: a plan's range and a size's budget are known, and bad ones refused, without
        parsing every file's metadata (gguf's reader takes seconds a file)."""
        if name not in self._sizes:
            self._sizes[name] = {t.name: t.rows * t.row_bytes for t in ggufio.header(self.files[name])[1]}
        return 8 * self._sizes[name][self.anatomy.gguf_name(path)]

    def kept(self, planned: set[str]) -> list:
        """The tensors the plan's file holds besides the ``planned`` ones, as it stores them: the source's, the token
        embedding from ``embedding``'s file when there is one."""
        own = "embedding" if self.embedding is not None else "source"
        tensors = ggufio.stored(self.source)
        return [self.tensor(own, t.name) if t.name == EMBEDDING else t for t in tensors if t.name not in planned]

    def outside(self, lm: LoadedModel) -> dict[Weight, torch.Tensor]:
        """The token embedding as the plan's file stores it, when that is not as the source does (``embedding``)."""
        if self.embedding is None:
            return {}
        weight = Weight(lm.model.get_input_embeddings())
        w = weight.view()
        return {weight: _dequantize(self.tensor("embedding", EMBEDDING))[self._order(EMBEDDING, w, w.dtype)]}

    def outside_reads(self, lm: LoadedModel) -> tuple[GGUFCheckpoint, list[str]] | None:
        """:meth:`outside` for a model read from disk: the file whose token embedding (and the head tied to it) the
        plan's file takes, and the checkpoint keys to read from it (``Streamed.reading``); None when the plan keeps
        the source's."""
        from ..engine import GGUFCheckpoint

        s = lm.streamed
        if self.embedding is None or s is None:
            return None
        return GGUFCheckpoint.of(self.embedding, lm.model), [s.keys[f"{s.paths[self.anatomy.embed]}.weight"]]

    def _order(self, tname: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows of the file's ``tname`` in the order of the model's weight ``w`` (q and k permuted back), worked
        out once from the source."""
        if tname not in self._rows:
            src = _dequantize(self.tensor("source", tname))
            self._rows[tname] = _row_order(w, src.reshape(-1, src.shape[-1]), tname, dtype)
        return self._rows[tname]

    def twins(self, paths: list[str]) -> dict[str, str]:
        """Types whose files hold the same bytes as an earlier type's for every one of ``paths`` (llama.cpp's
        fallback in rows its blocks do not tile: Q4_K stored as Q5_0, IQ2_XXS as IQ4_NL), each with the first such
        type."""
        out: dict[str, str] = {}
        for i, name in enumerate(self.names):
            mine = [self.tensor(name, self.anatomy.gguf_name(p)) for p in paths]
            same = (o for o in self.names[:i] if o not in out and all(_same(t, self.tensor(o, t.name)) for t in mine))
            if (first := next(same, None)) is not None:
                out[name] = first
        return out

    def stored(
        self, path: str, w: torch.Tensor, name: str, hessian: torch.Tensor | None
    ) -> tuple[torch.Tensor, int, str]:
        tname = self.anatomy.gguf_name(path)
        rows = self._order(tname, w, self.anatomy.weight(path).view().dtype)
        t = self.tensor(name, tname)
        return _dequantize(t).reshape(w.shape)[rows], ggufio.tensor_bits(t), t.tensor_type.name

    def stored_all(
        self, path: str, w: torch.Tensor, hessian: torch.Tensor | None
    ) -> dict[str, tuple[torch.Tensor, int, str]]:
        return {name: self.stored(path, w, name, hessian) for name in self.names}


def _same(a, b) -> bool:
    """Whether two stored tensors hold the same type and bytes."""
    return a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data)


def _dequantize(t) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(np.require(dequantize(t.data, t.tensor_type), np.float32, ["C", "W"]))  # F32: a copy


def tensor_types(meas: Measurement, alloc: Allocation, anatomy: Anatomy) -> dict[str, tuple[str, str]]:
    """Per GGUF tensor name: (the plan's type, the type llama.cpp stored for it)."""
    out = {}
    for g, t in alloc.configs.items():
        entry = meas.groups[g]
        for path, stored in zip(entry["modules"], entry["configs"][t]["stored"]):
            out[anatomy.gguf_name(path)] = (t, stored)
    return out


def export(cands: GGUFCandidates, types: dict[str, tuple[str, str]], out: str | Path) -> Path:
    """Write the plan as one GGUF file: each planned tensor's bytes from its type's file, the rest as
    :meth:`GGUFCandidates.kept` gives them."""
    kept = {t.name: t for t in cands.kept(set(types))}

    def tensor(t) -> ggufio.Tensor:
        c = cands.tensor(types[t.name][0], t.name) if t.name in types else kept[t.name]
        return c.name, c.data, c.tensor_type

    return ggufio.rewrite(cands.source, out, tensor)


def recipe(
    types: dict[str, tuple[str, str]],
    source: str | Path,
    out: str = "model-mixed.gguf",
    imatrix: str | None = None,
    embedding: str | Path | None = None,
) -> str:
    """``llama-quantize`` arguments that make the same file from the source (stored types, so no fallback is needed),
    with the importance matrix file ``imatrix`` (a path from the folder the recipe runs in) when given, the token
    embedding as the file ``embedding`` (else the source) stores it, and an output head of its own (a model that
    does not tie it to the embedding) as the source stores it: llama.cpp copies a tensor asked at its own type."""
    embd = embedding_type(embedding or source) or "Q8_0"
    lines = ["llama-quantize --allow-requantize --pure", f"  --token-embedding-type {embd.lower()}"]
    head = embedding_type(source, OUTPUT)
    lines += [f"  --output-tensor-type {head.lower()}"] if head is not None else []
    lines += [f"  --imatrix {shlex.quote(imatrix)}"] if imatrix is not None else []
    lines += [f"  --tensor-type {shlex.quote(pattern)}={t.lower()}" for pattern, t in recipe_overrides(types)]
    lines.append(f"  {shlex.quote(str(source))} {shlex.quote(out)} Q8_0")
    return " \\\n".join(lines) + "\n"


def fixed_bytes(source: str | Path, planned: set[str], embedding: str | Path | None = None) -> int:
    """The bytes a plan's GGUF file holds besides its planned tensors' data, at most: the header and metadata (the
    export copies the source's), every other tensor as the source stores it (the token embedding as the file
    ``embedding`` does, when given), and each tensor's alignment padding (the planned ones' at its largest)."""
    meta, infos = ggufio.header(source)
    start = min(t.offset for t in infos)
    if embedding is not None:
        emb = next(t for t in ggufio.header(embedding)[1] if t.name == EMBEDDING)
        infos = [emb if t.name == EMBEDDING else t for t in infos]
    align = int(meta.get("general.alignment", 32))
    others = sum(-(-t.rows * t.row_bytes // align) * align for t in infos if t.name not in planned)
    return start + others + (align - 1) * len(planned)


def tensor_type_file(types: dict[str, tuple[str, str]]) -> str:
    """The recipe's tensor types as ``llama-quantize --tensor-type-file`` reads them: one ``pattern=type`` a line."""
    return "".join(f"{pattern}={t.lower()}\n" for pattern, t in recipe_overrides(types))


def recipe_overrides(types: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """The recipe's ``--tensor-type`` pairs, for :func:`llama_quantize`."""
    return [("^" + re.escape(name) + "$", stored) for name, (_, stored) in sorted(types.items(), key=_natural)]


def _natural(item) -> tuple:
    m = ggufio.BLOCK_TENSOR.match(item[0])
    return (int(m.group(1)), m.group(2)) if m else (-1, item[0])


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4km(meas: Measurement, anatomy: Anatomy) -> Allocation:
    """llama.cpp's Q4_K_M rule as a plan (the hand-written baseline, as its ``llama_tensor_get_type`` has it): Q6_K
    for ``attn_v`` and every ``ffn_down`` (a sparse block's ``ffn_down_exps`` and ``ffn_down_shexp`` too) where
    :func:`_more_bits` says so, Q4_K for every other tensor; in a model of 8 experts, Q8_0 for ``attn_k`` and
    ``attn_v`` and Q5_K for ``attn_output``."""
    n = anatomy.n_layers
    eight = any(anatomy.n_experts(i) == 8 for i in anatomy.moe_layers)
    configs = {}
    if any(len(e["modules"]) > 1 for e in meas.groups.values()):
        raise LayerwiseError("the q4km baseline types each tensor on its own; leave out `tie` to compare with it")
    for g, entry in meas.groups.items():
        (path,) = entry["modules"]
        kind = anatomy.gguf_name(path).split(".")[2]
        if eight and kind in ("attn_k", "attn_v", "attn_output"):
            configs[g] = "Q5_K" if kind == "attn_output" else "Q8_0"
        elif (kind == "attn_v" or kind.startswith("ffn_down")) and _more_bits(entry["layer"], n):
            configs[g] = "Q6_K"
        else:
            configs[g] = "Q4_K"
    return fixed(meas, configs, "q4km")


def llama_nll(
    path: str | Path, ids: torch.Tensor, *, threads: int | None = None, progress: bool = False
) -> list[float]:
    """Mean next-token NLL of each window when llama.cpp runs the GGUF file (its own kernels and types); ``progress``
    shows a bar over the windows."""
    lc = _llama_cpp()
    llm = lc.Llama(
        model_path=str(path),
        n_ctx=int(ids.shape[1]),
        logits_all=True,
        verbose=False,
        n_threads=threads or os.cpu_count() or 1,
        n_batch=int(ids.shape[1]),
    )
    with contextlib.closing(llm):  # the model and its context are freed on error too
        out = []
        for row in tqdm(ids.tolist(), desc="llama.cpp perplexity", unit="window", disable=not progress):
            llm.reset()
            llm.eval(row)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(row) - 1], dtype=np.float32))
            out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]))))
    return out
