"""llama.cpp's importance matrix: for every quantized matrix, the sum of each input column's squared activations over
the calibration tokens, and the number of tokens.

llama.cpp's quantizer weighs each column's rounding error by that column's mean squared input, so that the columns
the data drives hardest are rounded best; its low-bit IQ types refuse to quantize without it, and the K-quant files
people download are made with it. The statistic is a streamed one: each matrix's running sums grow with its input
width, never with the number of windows, and the pass runs block by block from disk like every other.

Written in the GGUF format current llama.cpp reads (``llama-quantize --imatrix``; ``general.type`` ``imatrix``,
``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``, and per matrix ``NAME.in_sum2`` and
``NAME.counts``); read in that format or llama.cpp's legacy ``.dat`` one. Entries are named as llama.cpp names the
matrices (``blk.3.attn_q.weight``), and what the quantizer is given is each column's mean square
(:meth:`Imatrix.importance`), as ``llama-quantize`` computes it from the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Windows
from ..errors import LayerwiseError
from ..experts import expert_inputs
from ..io import provenance
from ..loading import LoadedModel
from ..trace import hooks, run_blocks

#: The metadata key that carries layerwise's record of how the matrix was made (llama.cpp ignores it).
META_KEY = "layerwise.meta"


@dataclass
class Imatrix:
    """Per llama.cpp tensor name: the running sum of squared inputs per column, shaped (matrices, columns) (one
    matrix for a dense tensor, one per expert for a merged expert tensor), and the tokens each matrix saw."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    legacy: bool = False  # read from a .dat file: ``sums`` hold mean squares times ``counts`` (its call count)

    def importance(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer is given per tensor: each column's mean square, matrices one after the other
        (a matrix that saw no token gets 1 everywhere, as ``llama-quantize`` does)."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float64).reshape(-1, 1)
            if self.legacy:  # one call count for the whole entry
                mean = sums / counts[0, 0] if counts[0, 0] > 0 else sums
            else:
                mean = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
            out[name] = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        return out

    @property
    def digest(self) -> str:
        """A hash of what the quantizer is given: files made from equal importances share candidates."""
        h = hashlib.sha256()
        for name, v in sorted(self.importance().items()):
            h.update(name.encode())
            h.update(v.tobytes())
        return h.hexdigest()

    def check(self, columns: dict[str, int], source: str) -> None:
        """Refuse, in one line, a matrix made for another model: every tensor of ``columns`` (name to input width)
        must have an entry of that width, and no entry may name a tensor the model lacks."""
        missing = [n for n in columns if n not in self.sums]
        foreign = [n for n in self.sums if n not in columns]
        wrong = [n for n in columns if n in self.sums and self.sums[n].shape[-1] != columns[n]]
        if missing or foreign or wrong:
            what = (
                f"has no entry for {missing[0]}"
                if missing
                else f"has an entry for {foreign[0]}, which the model lacks"
                if foreign
                else f"gives {wrong[0]} {self.sums[wrong[0]].shape[-1]} columns, not {columns[wrong[0]]}"
            )
            raise LayerwiseError(
                f"the importance matrix {source} {what}: it was made for another model; make one for this model "
                "with `layerwise imatrix`, or use `imatrix` auto"
            )

    def save(self, path: str | Path) -> Path:
        """Write the matrix in llama.cpp's GGUF format, atomically (one read from a legacy file keeps its importance:
        its values over its call count, at least one)."""
        import gguf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        writer = gguf.GGUFWriter(str(tmp), arch="")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        try:
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_array(gguf.Keys.IMatrix.DATASETS, self.datasets)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, self.chunk_count)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.chunk_size)
            writer.add_string(META_KEY, json.dumps(self.meta, sort_keys=True))
            for name in sorted(self.sums):
                writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32))
                counts = np.maximum(self.counts[name], 1) if self.legacy else self.counts[name]
                writer.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            tmp.replace(path)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        """A matrix from a file in llama.cpp's GGUF format or its legacy ``.dat`` one; one line naming the fix when
        the file is missing, cut short or not an importance matrix."""
        path = Path(path)
        fix = "make it again with `layerwise imatrix` (or llama-imatrix)"
        try:
            with path.open("rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise LayerwiseError(f"cannot read the importance matrix {path} ({exc.strerror}); check the path") from None
        try:
            return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
        except LayerwiseError as exc:
            raise LayerwiseError(f"{path} {exc}; {fix}") from None
        except (ValueError, KeyError, IndexError, struct.error, OSError) as exc:
            raise LayerwiseError(
                f"{path} is not a readable importance matrix ({exc.__class__.__name__}: cut short?); {fix}"
            ) from None


def _read_gguf(path: Path) -> Imatrix:
    """An importance matrix in llama.cpp's GGUF format."""
    import gguf

    r = gguf.GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}
    if fields.get(gguf.Keys.General.TYPE) is None or fields[gguf.Keys.General.TYPE].contents() != "imatrix":
        raise LayerwiseError("is a GGUF file but not an importance matrix (its general.type is not imatrix)")
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}
    names = sorted(n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2"))
    if not names or any(f"{n}.counts" not in tensors for n in names):
        raise LayerwiseError("has no pairs of .in_sum2 and .counts tensors")
    meta = fields.get(META_KEY)

    def number(key: str) -> int:
        f = fields.get(key)
        return int(f.contents()) if f is not None else 0

    datasets = fields.get(gguf.Keys.IMatrix.DATASETS)
    return Imatrix(
        sums={n: tensors[f"{n}.in_sum2"].reshape(tensors[f"{n}.counts"].size, -1) for n in names},
        counts={n: tensors[f"{n}.counts"].reshape(-1) for n in names},
        chunk_count=number(gguf.Keys.IMatrix.CHUNK_COUNT),
        chunk_size=number(gguf.Keys.IMatrix.CHUNK_SIZE),
        datasets=list(datasets.contents()) if datasets is not None else [],
        meta=json.loads(meta.contents()) if meta is not None else {},
    )


def _read_legacy(path: Path) -> Imatrix:
    """An importance matrix in llama.cpp's legacy binary format: the entry count, then per entry its name, call
    count and values (mean squares times the call count); then the last chunk and the dataset's name."""
    data = path.read_bytes()
    at = 0

    def take(fmt: str) -> tuple:
        nonlocal at
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise struct.error("the file ends early")
        at += size
        return struct.unpack_from(fmt, data, at - size)

    (n,) = take("<i")
    if n < 1:
        raise LayerwiseError("holds no entries")
    sums, counts = {}, {}
    for _ in range(n):
        (length,) = take("<i")
        name = take(f"<{length}s")[0].decode()
        ncall, nval = take("<ii")
        sums[name] = np.array(take(f"<{nval}f"), dtype=np.float64).reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.float64)
    chunks, dataset = 0, []
    if at + 8 <= len(data):
        (chunks,) = take("<i")
        (length,) = take("<i")
        dataset = [take(f"<{length}s")[0].decode()]
    return Imatrix(sums, counts, chunk_count=chunks, datasets=dataset, legacy=True)


def tensor_columns(lm: LoadedModel) -> dict[str, int]:
    """Every matrix llama.cpp runs as a product, by its tensor name, with its input width (a merged expert tensor's
    per-expert matrices' width)."""
    an = lm.anatomy
    merged = {name: columns for name, (_, columns) in _merged(lm).items()}
    return {name: an.linear_shape(m)[1] for name, m in _matrices(lm).items()} | merged


def _merged(lm: LoadedModel) -> dict[str, tuple[int, int]]:
    """Every merged expert tensor's (experts, columns of each expert's matrix), by llama.cpp's tensor name."""
    an = lm.anatomy
    return {
        an.gguf_name(path): (an.n_experts(layer), w.shape[1])
        for layer in an.moe_layers
        for _, ws in an.quant_groups(layer, fused=False)
        for path, w in ws
        if w.module is an.experts(layer)
    }


def _matrices(lm: LoadedModel) -> dict[str, nn.Module]:
    """Every matrix's module (not the merged expert tensors'), by llama.cpp's tensor name."""
    an = lm.anatomy
    return {name: m for layer in range(an.n_layers) for name, m in an.gguf_matrices(layer).items()}


def compute(
    lm: LoadedModel, windows: Windows, *, batch_size: int = 4, dataset: str = "", progress: bool = True
) -> Imatrix:
    """The importance matrix of every quantized matrix over every token of the calibration windows, ``batch_size``
    windows a pass (block by block, the weights read from disk, for a model run so); ``dataset`` names the data in
    the file, as llama-imatrix names its text file. A merged expert tensor has one matrix per expert, each summed
    over the tokens routed to that expert (see :func:`layerwise.experts.expert_inputs`)."""
    modules = _matrices(lm)
    batches = torch.split(windows.calibration, batch_size)
    acc = _Squares()
    names = {(k, a): n for k in lm.anatomy.moe_layers for a, n in lm.anatomy.gguf_experts(k).items()}

    def add(layer: int, attr: str, expert: int, x: torch.Tensor) -> None:
        for name in names[(layer, attr)]:
            acc.add((name, expert), x)

    with acc.hooked(modules), expert_inputs(lm.model, lm.anatomy, add), torch.no_grad():
        _run(lm, batches, progress)
    merged = {name: n for name, (n, _) in _merged(lm).items()}
    rows = {name: [name] for name in modules} | {name: [(name, j) for j in range(n)] for name, n in merged.items()}
    columns = tensor_columns(lm)
    return Imatrix(
        sums={n: acc.stacked(keys, columns[n]) for n, keys in sorted(rows.items())},
        counts={
            n: np.array([acc.counts.get(k, 0) for k in keys], dtype=np.float64) for n, keys in sorted(rows.items())
        },
        chunk_count=int(windows.calibration.shape[0]),
        chunk_size=int(windows.seq_len),
        datasets=[dataset] if dataset else [],
        meta={**lm.meta(), "data": windows.meta(), **provenance(seed=None, batch_size=batch_size)},
    )


class _Squares:
    """Running sums of squared inputs per column (float64, on the CPU) and token counts, by tensor name (a merged
    expert tensor's by (name, expert))."""

    def __init__(self) -> None:
        self.sums: dict[Hashable, torch.Tensor] = {}
        self.counts: dict[Hashable, int] = {}

    def add(self, key: Hashable, x: torch.Tensor) -> None:
        """The rows of ``x`` (every leading axis flattened) added to ``key``'s sums and count."""
        x = x.detach().reshape(-1, x.shape[-1])
        part = x.float().square().sum(0).to("cpu", torch.float64)
        self.sums[key] = self.sums[key] + part if key in self.sums else part
        self.counts[key] = self.counts.get(key, 0) + int(x.shape[0])

    def stacked(self, keys: list, columns: int) -> np.ndarray:
        """The sums of ``keys`` as the rows of one (matrices, columns) array (as the file holds them, in float32);
        zeros for a matrix that saw no token."""
        zero = torch.zeros(columns, dtype=torch.float64)
        return torch.stack([self.sums.get(k, zero) for k in keys]).float().double().numpy()

    @contextmanager
    def hooked(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """While active, every input to each module is added to its sums."""
        with hooks() as keep:
            for name, m in modules.items():
                keep(m.register_forward_pre_hook(lambda _m, args, name=name: self.add(name, args[0])))
            yield


def _run(lm: LoadedModel, batches: tuple[torch.Tensor, ...], progress: bool) -> None:
    """Every batch through every block: the whole model a batch at a time, or block by block from disk (the
    batches' hidden states carried in the engine's store)."""
    an, s = lm.anatomy, lm.streamed
    if s is None:
        for b in tqdm(batches, desc="imatrix", unit="batch", disable=not progress):
            lm.model(input_ids=b.to(lm.device), use_cache=False, logits_to_keep=1)
        return
    with s.states() as store:
        starts = [s.calls(b) for b in batches]
        h, calls = [store.keep(h0) for h0, _ in starts], [c for _, c in starts]
        del starts
        with tqdm(total=an.n_layers, desc="imatrix", unit="block", disable=not progress) as bar:
            for i in s.blocks():
                h = [store.keep(run_blocks(an, i, store.load(k), c, stop=i + 1), over=k) for k, c in zip(h, calls)]
                bar.update()
