"""GGUF files through the ``gguf`` package: rewrite one tensor by tensor, with its metadata (tokenizer included) copied.

Dropping blocks and mixed-precision quantization both produce a GGUF file
from a source one: the same metadata, some tensors removed, renamed or given
other bytes and another GGML type. ``rewrite`` does the copying once, writes
to a temporary file and renames it into place, so an interrupted export
leaves nothing behind.

Loading converts a GGUF file once; ``header`` and ``dequantize`` read what
that needs, a tensor at a time, without parsing the tokenizer's arrays.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

#: ``blk.12.attn_q.weight`` -> (12, ``attn_q.weight``)
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")

#: A tensor as written: name, raw data (bytes of a quantized type, or plain floats) and GGML type.
Tensor = tuple[str, np.ndarray, Any]


#: struct formats of GGUF's fixed-size metadata value types (8 is a string, 9 an array).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class TensorInfo(NamedTuple):
    """Where one tensor's bytes lie in a GGUF file, and their GGML type; ``shape`` in numpy order (rows first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row in the file (a quantization block never spans rows)."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.ggml_type)]
        return self.shape[-1] // block * size


class Stored(NamedTuple):
    """A tensor of a GGUF file as gguf's reader gives one (name, type, raw bytes by row, their count), found from the
    header alone: gguf's reader parses every metadata array first, seconds a file for a large vocabulary."""

    path: Path
    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def tensor_type(self):
        import gguf

        return gguf.GGMLQuantizationType(self.info.ggml_type)

    @property
    def n_bytes(self) -> int:
        return self.info.rows * self.info.row_bytes

    @property
    def n_elements(self) -> int:
        return self.info.rows * self.info.shape[-1]

    @property
    def data(self) -> np.ndarray:
        """The raw bytes, (..., bytes of a row), memory-mapped."""
        shape = (*self.info.shape[:-1], self.info.row_bytes)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.info.offset, shape=shape)


def stored(path: str | Path) -> list[Stored]:
    """Every tensor of a GGUF file (:class:`Stored`), in the file's order."""
    return [Stored(Path(path), t) for t in header(path)[1]]


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, fh.read(size))[0]


def _string(fh: BinaryIO) -> str:
    return fh.read(_read(fh, "<Q")).decode("utf-8", errors="replace")


#: The most elements an array of numbers may have to be read as a list (a value per block, not per token).
SHORT_ARRAY = 4096


def _value(fh: BinaryIO, vtype: int) -> Any:
    """A scalar or string value, or a short array of numbers (:data:`SHORT_ARRAY`) as a list; another array is
    skipped (its element count is returned), never parsed element by element."""
    if vtype == 8:
        return _string(fh)
    if vtype != 9:
        return _read(fh, _SCALAR[vtype])
    itype, n = _read(fh, "<I"), _read(fh, "<Q")
    if itype in _SCALAR and n <= SHORT_ARRAY:
        fmt = _SCALAR[itype]
        return list(struct.unpack(f"{fmt[0]}{n}{fmt[1:]}", fh.read(n * struct.calcsize(fmt))))
    if itype in _SCALAR:
        fh.seek(n * struct.calcsize(_SCALAR[itype]), 1)
    else:
        for _ in range(n):
            _value(fh, itype)
    return n


def header(path: str | Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """A little-endian GGUF file's scalar and string metadata (short arrays of numbers as lists, other arrays as
    their lengths) and its tensors.

    ``gguf.GGUFReader`` parses every element of every array into its own numpy view: for a 262k-token
    vocabulary that is most of a minute and 600 MB. This reads the same header in a second, in constant memory.
    """
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version = _read(fh, "<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (a big-endian file, or an unknown version)")
        n_tensors, n_kv = _read(fh, "<Q"), _read(fh, "<Q")
        meta = {}
        for _ in range(n_kv):
            key = _string(fh)
            meta[key] = _value(fh, _read(fh, "<I"))
        infos = []
        for _ in range(n_tensors):
            name = _string(fh)
            dims = [_read(fh, "<Q") for _ in range(_read(fh, "<I"))]
            infos.append((name, tuple(reversed(dims)), _read(fh, "<I"), _read(fh, "<Q")))
        align = int(meta.get("general.alignment", 32))
        start = -(-fh.tell() // align) * align
        size = fh.seek(0, 2)
    tensors = [TensorInfo(name, shape, ggml_type, start + offset) for name, shape, ggml_type, offset in infos]
    for t in tensors:
        if t.offset + t.rows * t.row_bytes > size:
            raise ValueError(f"tensor {t.name} runs past the end of the file (truncated?)")
    return meta, tensors


#: llama.cpp's sliding-window period for the architectures it gives one where a file names no pattern: every block
#: but the last of each period slides (its ``set_swa_pattern``), by the block's index in the file.
SWA_PERIOD = {"gemma3": 6, "gpt-oss": 2}


def sliding(meta: dict[str, Any], arch: str, blocks: int) -> list[bool] | None:
    """Which blocks llama.cpp runs over a sliding window in a file of ``arch`` with ``meta`` (None for an
    architecture without windows): the file's ``sliding_window_pattern`` block by block, or by its period, or by
    llama.cpp's own period for the architecture."""
    if arch not in SWA_PERIOD:
        return None
    given = meta.get(f"{arch}.attention.sliding_window_pattern", SWA_PERIOD[arch])
    if isinstance(given, list):
        return [bool(b) for b in given]
    return [i % int(given) < int(given) - 1 for i in range(blocks)]


def metadata_copy(path: str | Path, out: str | Path, leave_out: Callable[[str], bool]) -> Path:
    """A GGUF file of ``path``'s metadata, byte for byte, without its tensors or the keys ``leave_out`` names: what
    transformers' tokenizer and config readers need of a file whose other keys they misread (gpt-oss's rope
    scaling), in a second however large the file and its vocabulary."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(8, 1)  # the tensor count: the copy holds none
        kept = []
        for _ in range(_read(fh, "<Q")):
            start = fh.tell()
            key = _string(fh)
            _value(fh, _read(fh, "<I"))
            if not leave_out(key):
                kept.append((start, fh.tell()))
        with open(out, "wb") as dst:
            dst.write(head + struct.pack("<QQ", 0, len(kept)))
            for start, stop in kept:
                fh.seek(start)
                dst.write(fh.read(stop - start))
    return Path(out)


def dequantize(path: str | Path, info: TensorInfo, rows: int = 4096, span: tuple[int, int] | None = None) -> np.ndarray:
    """One tensor as float32 (or its rows ``span``, for a 2-D one), dequantized ``rows`` rows at a time into its
    own array, so the transient copies are a slice's, not the tensor's. The slices are dequantized on as many
    threads as torch computes on: ``gguf``'s numpy code keeps one core busy, and numpy lets go of the interpreter
    lock while it runs (``benchmarks/mxfp4_read.py`` times it on gpt-oss's MXFP4 experts)."""
    import gguf
    import torch

    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    first, stop = span or (0, info.rows)
    out = np.empty((stop - first, info.shape[-1]), dtype=np.float32)
    offset = info.offset + first * info.row_bytes
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(stop - first, info.row_bytes))

    def part(start: int) -> None:
        out[start : start + rows] = gguf.quants.dequantize(raw[start : start + rows], qtype)

    starts = range(0, stop - first, rows)
    with ThreadPoolExecutor(min(len(starts), torch.get_num_threads()) or 1) as pool:
        list(pool.map(part, starts))
    return out if span else out.reshape(info.shape)


def reader(path: str | Path):
    """A memory-mapped reader (tensors are read only when touched)."""
    import gguf

    return gguf.GGUFReader(str(path))


def arch(r) -> str:
    """The file's ``general.architecture`` (llama.cpp's name: ``llama``, ``qwen2``, ``gpt2``, ...)."""
    import gguf

    return bytes(r.get_field(gguf.Keys.General.ARCHITECTURE).parts[-1]).decode()


def tensor_bits(t) -> int:
    """Bits a stored tensor takes in the file (its data, without alignment padding)."""
    return int(t.n_bytes) * 8


def rewrite(
    source: str | Path,
    out: str | Path,
    tensor: Callable[[Any], Tensor | None],
    field: Callable[[str, Any], Any] = lambda _name, value: value,
    added: dict[str, Any] | None = None,
) -> Path:
    """Write ``out`` from ``source``: ``tensor`` maps each reader tensor to what to write (None drops it),
    ``field`` maps each metadata value (by key) to the value to write, and ``added`` gives keys written in place
    of the source's (or beside them, where the source has none)."""
    import gguf

    r = reader(source)
    name = arch(r)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    writer = gguf.GGUFWriter(str(tmp), arch=name, endianess=r.endianess)
    try:
        for f in r.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name in (added or {}):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, field(f.name, f.contents()), vtype, sub_type=sub)
        for key, value in (added or {}).items():
            writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
        tensors = [w for w in map(tensor, r.tensors) if w is not None]
        for tname, data, ttype in tensors:
            writer.add_tensor_info(tname, data.shape, data.dtype, data.nbytes, ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in tensors:
            writer.write_tensor_data(data, tensor_endianess=r.endianess)
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()  # the file handle too, not only the half-written file
        tmp.unlink(missing_ok=True)
        raise
    return out
