"""A profile's memory, planned from the model's config and the run's settings before any weight is read.

The plan adds up what the run holds at its peak, two ways: with every weight in memory, and with the weights read
one block at a time (:mod:`layerwise.engine`). The run takes the first way when its peak fits the budget
(``--max-memory``; by default what the device has free), the second otherwise, and refuses in one line when even
that does not fit. Each figure is an estimate; ``benchmarks/offload_profile.py`` sets it beside the measured peak.

- ``runtime``: the interpreter, torch, transformers and a tokenizer, measured once (:data:`RUNTIME`), and
  :data:`SLACK` on the whole sum;
- ``weights``: every weight in the compute dtype, and ``files``, the checkpoint's pages, which loading maps and the
  resident set counts while they are read;
- ``block`` and ``stem``: the largest block's weights, and the embedding or the head (read alone), each with its
  pages, when reading from disk;
- ``states``: what the block-by-block pass keeps, each block's input for every calibration window and, for exact
  ablation, the ablated streams it carries;
- ``work``: one batch's working memory, the forward's saved activations (the whole model's for the Taylor estimate
  when resident, one block's from disk) and the head's reference distribution.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import LayerwiseError

#: The interpreter, torch, transformers, layerwise and SmolLM2's tokenizer, before any weight, with what the
#: components below leave out (the dry pass's copies): about 1000 MiB in benchmarks/results/offload_profile.md.
RUNTIME = 1000 * 2**20
#: Headroom on the sum, for the allocator's slack. The resident set of identical runs from disk once varied by
#: 800 MiB (1.7B shape: 1817 to 2632 MiB), glibc keeping freed buffers; the engine now has it give them back
#: (:func:`layerwise.engine.return_freed_memory`), and the same run peaks at 1.2 GiB.
SLACK = 1.1
#: Floats one token keeps per block for a backward pass: about eight hidden-sized and four MLP-sized vectors.
_SAVED = (8, 4)
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20}
_UNITS |= {"G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """``4GiB``, ``512MiB``, ``3.5GB`` or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise LayerwiseError(f"`max_memory` takes a size such as 4GiB, 512MiB or 3.5GB (got {text!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def available(device: str) -> int:
    """What the device has free: CUDA's free memory, or the machine's available memory (``MemAvailable``)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What a profile holds at its peak (bytes), in memory and from disk; see the module docstring."""

    runtime: int
    weights: int
    files: int
    block: int
    stem: int
    states: int
    work: int
    block_work: int

    @property
    def resident(self) -> int:
        return int(SLACK * (self.runtime + self.weights + self.files + self.work))

    @property
    def streamed(self) -> int:
        return int(SLACK * (self.runtime + self.block + self.stem + self.states + self.block_work))

    def choose(self, offload: str, budget: int) -> str:
        """``none`` (weights in memory) or ``disk``: ``offload`` when forced, else the first whose peak fits
        ``budget``; one line naming the fix when the run cannot fit it."""
        mode = offload if offload != "auto" else ("none" if self.resident <= budget else "disk")
        if mode == "disk" and self.streamed > budget:
            raise LayerwiseError(
                f"the profile needs about {_size(self.streamed)} even reading one block at a time, over the "
                f"{_size(budget)} budget; lower `batch_size`, `samples` or `seq_len` (or `ablation_samples` for "
                "exact ablation), or raise `max_memory`"
            )
        return mode

    def line(self, mode: str, budget: int) -> str:
        """The plan in one line, as the CLI prints it before the run."""
        where = "in memory" if mode == "none" else "reading one block at a time from disk"
        return (
            f"memory: weights {_size(self.weights)}, largest block {_size(self.block)}, hidden states kept from "
            f"disk {_size(self.states)}, one batch's work {_size(self.work)}; peak about {_size(self.resident)} in "
            f"memory, {_size(self.streamed)} from disk; budget {_size(budget)}: runs {where}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "resident": self.resident, "streamed": self.streamed}


def profile_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    windows: int,
    seq_len: int,
    batch_size: int,
    ablation: str,
    ablation_windows: int,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of profiling the checkpoint in ``folder`` on ``windows`` calibration windows."""
    from .anatomy import Anatomy
    from .data import check_context
    from .engine import Checkpoint, Streamed, skeleton

    model = skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    an = Anatomy(model)
    check_context(seq_len, an.context_length)
    ckpt = Checkpoint.of(folder)
    s = Streamed(model, ckpt)
    size = torch.finfo(dtype).bits // 8
    files = {f: f.stat().st_size for f in set(ckpt.files.values())}
    stored = sum(files.values()) / max(1, s.n_params)  # bytes per weight as stored

    def held(names: list[str]) -> int:
        n = sum(model.get_parameter(name).numel() for name in names)
        return int(n * (size + stored))

    hidden = an.embed.weight.shape[1]
    mlp = an.linear_shape(an.down_proj(0))[1]
    vocab = an.linear_shape(an.head)[0]
    token_block = (_SAVED[0] * hidden + _SAVED[1] * mlp) * size
    tokens = batch_size * seq_len
    reference = tokens * vocab * 4
    taylor = ablation in ("exact", "taylor")
    L = an.n_layers
    states = L * windows * seq_len * hidden * size
    if ablation == "exact":
        states += 3 * L * ablation_windows * seq_len * hidden * size
    return MemoryPlan(
        runtime=RUNTIME,
        weights=s.n_params * size,
        files=sum(files.values()),
        block=max(held(s.names(b)) for b in an.blocks),
        stem=max(held(s.names(an.embed)), held(s.names(an.head))),
        states=states,
        work=tokens * token_block * (L if taylor else 1) + reference,
        block_work=tokens * token_block + reference,
    )
