"""GGUF files through the ``gguf`` package: rewrite one tensor by tensor, with its metadata (tokenizer included) copied.

Dropping blocks and mixed-precision quantization both produce a GGUF file
from a source one: the same metadata, some tensors removed, renamed or given
other bytes and another GGML type. ``rewrite`` does the copying once, writes
to a temporary file and renames it into place, so an interrupted export
leaves nothing behind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: ``blk.12.attn_q.weight`` -> (12, ``attn_q.weight``)
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")

#: A tensor as written: name, raw data (bytes of a quantized type, or plain floats) and GGML type.
Tensor = tuple[str, np.ndarray, Any]


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


def rewrite(source: str | Path, out: str | Path, tensor: Callable[[Any], Tensor | None],
            field: Callable[[str, Any], Any] = lambda _name, value: value) -> Path:
    """Write ``out`` from ``source``: ``tensor`` maps each reader tensor to what to write (None drops it),
    ``field`` maps each metadata value (by key) to the value to write."""
    import gguf

    r = reader(source)
    name = arch(r)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    writer = gguf.GGUFWriter(str(tmp), arch=name, endianess=r.endianess)
    try:
        for f in r.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, field(f.name, f.contents()), vtype, sub_type=sub)
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
