"""llama.cpp control vectors: the GGUF file ``--control-vector`` reads, one direction slot per layer (block
k's output is ``direction.k``), written and read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..anatomy import parse_unit
from ..errors import LayerwiseError
from ..loading import LoadedModel
from .vector import SteeringVector


def export_gguf(vec: SteeringVector, lm: LoadedModel, path: str | Path, alpha: float | None = None) -> Path:
    """A llama.cpp control vector: ``direction.k`` = the vector added at block k's output (``alpha`` applied).

    llama.cpp adds ``direction.k`` to the output of its layer k and has no
    slot for layer 0, so a vector at ``L0`` is refused. ``model_hint`` is the
    source GGUF's architecture (llama.cpp's name) when there is one.
    """
    import gguf
    import numpy as np

    from .. import ggufio
    from ..io import write_atomic

    vec.check_model(lm)
    if "L0" in vec.directions:
        raise LayerwiseError(
            "llama.cpp control vectors cannot steer L0 (its first slot, direction.1, is block 1's output); choose "
            "a layer from L1 on"
        )
    hint = ggufio.arch(ggufio.reader(lm.source["gguf_path"])) if lm.source.get("gguf_path") else lm.anatomy.model_type
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", hint)
        w.add_int32("controlvector.layer_count", lm.anatomy.n_layers - 1)
        for u in vec.units:
            w.add_tensor(f"direction.{parse_unit(u)[0]}", vec.delta(u, alpha).numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        write_atomic(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_gguf(path: str | Path, n_layers: int) -> tuple[int, Any]:
    """The file's directions as llama.cpp's loader lays them out: n_embd floats per layer, layer 1 first
    (``llama_set_adapter_cvec``'s data)."""
    import numpy as np

    from .. import ggufio

    r = ggufio.reader(path)
    dirs = {
        int(t.name.split(".")[1]): np.asarray(t.data, dtype=np.float32)
        for t in r.tensors
        if t.name.startswith("direction.")
    }
    n_embd = len(next(iter(dirs.values())))
    data = np.zeros((n_layers - 1) * n_embd, dtype=np.float32)
    for k, d in dirs.items():
        data[(k - 1) * n_embd : k * n_embd] = d
    return n_embd, data
