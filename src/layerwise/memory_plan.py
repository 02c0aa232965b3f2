"""A command's memory (profile, drop, quantize), planned from the model's config and the run's settings before any
weight is read.

The plan adds up what the run holds at its peak, two ways: with every weight in memory, and with the weights read
one block at a time (:mod:`layerwise.engine`). The run takes the first way when its peak fits the budget
(``--max-memory``; by default what the device has free), the second otherwise, and refuses in one line when even
that does not fit. Each figure is an estimate; ``benchmarks/offload_profile.py`` sets it beside the measured peak.

- ``runtime``: the interpreter, torch, transformers and a tokenizer, measured once (:data:`RUNTIME`), and
  :data:`SLACK` on the whole sum;
- ``weights``: every weight in the compute dtype, and ``files``, the checkpoint's pages, which loading maps and the
  resident set counts while they are read;
- ``block`` and ``stem``: the largest block's weights, and the embedding or the head (read alone), each with its
  pages, when reading from disk; the block counted twice, the one running and the next one read ahead in host
  memory meanwhile (:meth:`layerwise.engine.Streamed.blocks`);
- ``states``: what the block-by-block pass keeps: each block's input for every calibration window and, for exact
  ablation, the ablated streams it carries (profile, quantize's measurement); the original's and each variant's
  stream for every held-out window (drop's and quantize's evaluation);
- ``work``: one batch's working memory, the forward's saved activations (the whole model's for a backward pass
  when resident, one block's from disk) and the head's distributions;
- ``extra``: what only the in-memory run holds besides (quantize: its candidates and each plan's weights; from
  disk it makes one group's candidate, or one block's plan weights, at a time: counted with the block's work);
- ``kept``: what both runs hold besides (probe: every example's readout at every unit);
- ``live``: the hidden states still in memory when the carried ones are spilled to a file
  (:class:`layerwise.engine.States`): one batch's streams at a time (the quantization measurement's sublayer
  inputs, updates and gradients, and GPTQ's calibration stream, are spilled with the rest); 0 for a command that
  does not spill.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LayerwiseError

#: The interpreter, torch, transformers, layerwise and SmolLM2's tokenizer, before any weight, with what the
#: components below leave out (the dry pass's copies): about 1000 MiB in benchmarks/results/offload_profile.md.
RUNTIME = 1000 * 2**20
#: Headroom on the sum, for the allocator's slack. The resident set of identical runs from disk once varied by
#: 800 MiB (1.7B shape: 1817 to 2632 MiB), glibc keeping freed buffers; the engine now has it give them back
#: (:func:`layerwise.engine.return_freed_memory`), and the same run peaks at 1.2 GiB.
SLACK = 1.1
#: Hidden-state streams of one batch a spilling pass holds at once: the block's input and output, its ablated
#: streams (three windows each) carried and started, and its gradients.
_LIVE = 16
#: Floats one token keeps per block for a backward pass: about eight hidden-sized and four MLP-sized vectors.
_SAVED = (8, 4)
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6, "MIB": 2**20}
_UNITS |= {"G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12, "TIB": 2**40}


def parse_bytes(text: str, what: str = "max_memory") -> int:
    """``4GiB``, ``512MiB``, ``3.5GB`` or a number of bytes (``what``: the option, for the error)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise LayerwiseError(f"`{what}` takes a size such as 4GiB, 512MiB or 3.5GB (got {text!r})")
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
    """What a command holds at its peak (bytes), in memory and from disk; see the module docstring."""

    runtime: int
    weights: int
    files: int
    block: int
    stem: int
    states: int
    work: int
    block_work: int
    extra: int = 0
    kept: int = 0
    live: int = 0
    what: str = "the profile"
    fix: str = "`batch_size`, `samples` or `seq_len` (or `ablation_samples` for exact ablation)"

    @property
    def resident(self) -> int:
        return int(SLACK * (self.runtime + self.weights + self.files + self.work + self.extra + self.kept))

    @property
    def blocks(self) -> int:
        """The block weights a run from disk holds: the block running and the next one, read ahead meanwhile."""
        return 2 * self.block

    @property
    def streamed(self) -> int:
        """The peak from disk, the carried hidden states in memory."""
        return int(SLACK * (self.runtime + self.blocks + self.stem + self.states + self.block_work + self.kept))

    @property
    def spilled(self) -> int:
        """The peak from disk with the carried hidden states in a file (only ``live`` of them in memory)."""
        return int(SLACK * (self.runtime + self.blocks + self.stem + self.live + self.block_work + self.kept))

    @property
    def held(self) -> int:
        """The machine's memory ``offload`` cpu holds: every weight, read once, and the hidden states kept (a block
        read ahead is one of those weights, not a copy: nothing more)."""
        return int(SLACK * (self.runtime + self.weights + self.files + self.states + self.kept))

    def choose(self, offload: str, budget: int, host: int | None = None) -> str:
        """``none`` (weights in memory), ``cpu`` (weights in the machine's memory, one block at a time on the
        device), ``disk`` or ``spill`` (from disk, the hidden states in a file): ``offload`` when forced (``disk``
        spills when its states do not fit), else the first whose peak fits ``budget`` (``cpu`` only for an
        accelerator, ``host`` being what the machine has free); one line naming the fix when the run cannot fit
        it."""
        if offload == "auto":
            fits_host = host is not None and self.held <= host
            offload = "none" if self.resident <= budget else "cpu" if fits_host else "disk"
        if offload not in ("disk", "cpu") or self.streamed <= budget:
            return offload
        if offload == "cpu":
            raise LayerwiseError(
                f"{self.what} needs about {_size(self.streamed)} on the device even one block at a time, over the "
                f"{_size(budget)} budget; lower {self.fix}, or raise `max_memory`"
            )
        if self.live and self.spilled <= budget:
            return "spill"
        raise LayerwiseError(
            f"{self.what} needs about {_size(self.spilled if self.live else self.streamed)} even reading one block "
            f"at a time{', its hidden states in a file' if self.live else ''}, over the {_size(budget)} budget; "
            f"lower {self.fix}, or raise `max_memory`"
        )

    def check_spill(self, out: Path) -> None:
        """Refuse in one line, before the run, to spill more hidden states than the disk under ``out`` has room
        for."""
        import shutil

        there = next(p for p in (out, *out.parents) if p.exists())
        free = shutil.disk_usage(there).free
        if free < self.states:
            raise LayerwiseError(
                f"{self.what} spills about {_size(self.states)} of hidden states into `out`, and the disk under "
                f"{there} has {_size(free)} free; free space there, give `out` on a larger disk, or lower {self.fix}"
            )

    def line(self, mode: str, budget: int) -> str:
        """The plan in one line, as the CLI prints it before the run."""
        where = {
            "none": "in memory",
            "cpu": "its weights in the machine's memory, one block at a time on the device",
            "disk": "reading one block at a time from disk",
            "spill": "reading one block at a time from disk, its hidden states spilled to a file in the output folder",
        }[mode]
        if mode == "none" and self.resident > budget:  # only when asked: the system may kill the run
            where += ", as `offload` none asks, over the budget (`offload` auto would read from disk)"
        spilled = f", {_size(self.spilled)} spilling its hidden states" if self.live else ""
        return (
            f"memory: weights {_size(self.weights)}, largest block {_size(self.block)} (two held from disk, the "
            f"next read ahead), hidden states kept from disk {_size(self.states)}, one batch's work "
            f"{_size(self.work)}; peak about {_size(self.resident)} in "
            f"memory, {_size(self.streamed)} from disk{spilled}; budget {_size(budget)}: runs {where}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "resident": self.resident, "streamed": self.streamed, "spilled": self.spilled}


@dataclass(frozen=True)
class Shape:
    """The sizes of a checkpoint that a plan adds up (bytes, weights in the compute dtype), from its config and its
    shards' headers: no weight is read."""

    layers: int
    hidden: int
    mlp: int
    vocab: int
    size: int  # bytes per value in the compute dtype
    weights: int
    files: int
    block: int  # the largest block's weights, with their pages as stored
    stem: int  # the embedding or the head, read alone, with its pages
    experts: int = 0  # routed experts over all sparse blocks (a mixture-of-experts model)
    block_numel: int = 0  # the largest block's weights, counted

    @classmethod
    def of(cls, folder: str | Path, *, dtype: torch.dtype, seq_len: int, trust_remote_code: bool = False) -> Shape:
        from .anatomy import Anatomy
        from .data import check_context
        from .engine import ConvertedCheckpoint, GGUFCheckpoint, Streamed, open_checkpoint, skeleton, slice_rows

        model = skeleton(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        an = Anatomy(model)
        check_context(seq_len, an.context_length)
        ckpt = open_checkpoint(folder, model)
        s = Streamed(model, ckpt)
        size = torch.finfo(dtype).bits // 8
        shards = ckpt.base.files if isinstance(ckpt, ConvertedCheckpoint) else ckpt.files  # every shard, once
        files = sum(f.stat().st_size for f in set(shards.values()))
        stored = files / max(1, s.n_params)  # bytes per weight as stored
        if isinstance(ckpt, GGUFCheckpoint):  # loaded in memory from the float32 safetensors it is converted to
            files = 4 * s.n_params

        def count(names: list[str]) -> int:
            return sum(model.get_parameter(name).numel() for name in names)

        def held(names: list[str]) -> int:
            return int(count(names) * (size + stored))

        return cls(
            layers=an.n_layers,
            hidden=an.embed.weight.shape[1],
            mlp=max(an.mlp_width(i) for i in range(an.n_layers)),
            vocab=an.linear_shape(an.head)[0],
            size=size,
            weights=s.n_params * size,
            files=files,
            block=max(held(s.names(b)) for b in an.blocks),
            stem=max(held(s.names(an.embed)), held(s.names(an.head)))
            if (rows := slice_rows(model, dtype)) is None
            else int(rows * an.embed.weight.shape[1] * (size + stored)),  # one slice of either
            experts=sum(map(an.n_experts, an.moe_layers)),
            block_numel=max(count(s.names(b)) for b in an.blocks),
        )

    def states(self, streams: int, windows: int, seq_len: int) -> int:
        """``streams`` hidden states of ``windows`` windows: a block's input each, or each variant's stream."""
        return streams * windows * seq_len * self.hidden * self.size

    def work(self, tokens: int, blocks: int = 1) -> int:
        """The activations that ``blocks`` blocks keep for a backward pass over ``tokens`` tokens."""
        return tokens * (_SAVED[0] * self.hidden + _SAVED[1] * self.mlp) * self.size * blocks

    def logits(self, tokens: int) -> int:
        """One float32 distribution over the vocabulary per token (a reference, or a candidate's logits)."""
        return tokens * self.vocab * 4

    def plan(self, **parts: Any) -> MemoryPlan:
        """A plan of this checkpoint's weights with ``parts`` (states, work, block_work, extra, kept, what, fix)."""
        return MemoryPlan(
            runtime=RUNTIME, weights=self.weights, files=self.files, block=self.block, stem=self.stem, **parts
        )


def profile_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    windows: int,
    seq_len: int,
    batch_size: int,
    ablation: str,
    ablation_windows: int,
    expert_ablation: bool = False,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of profiling the checkpoint in ``folder`` on ``windows`` calibration windows (every expert
    ablated too: one more carried stream an expert)."""
    shape = Shape.of(folder, dtype=dtype, seq_len=seq_len, trust_remote_code=trust_remote_code)
    parts = _profile_parts(shape, windows, seq_len, batch_size, ablation, ablation_windows, experts=expert_ablation)
    return shape.plan(**parts)


def _profile_parts(
    shape: Shape, windows: int, seq_len: int, batch_size: int, ablation: str, ablated: int, *, experts: bool = False
) -> dict:
    tokens, L = batch_size * seq_len, shape.layers
    carried = 3 * L + (shape.experts if experts else 0)  # the ablated streams, carried to the last block
    states = shape.states(L, windows, seq_len) + (shape.states(carried, ablated, seq_len) if ablation == "exact" else 0)
    taylor = ablation in ("exact", "taylor")
    return {
        "states": states,
        "live": shape.states(_LIVE, batch_size, seq_len),
        "work": shape.work(tokens, L if taylor else 1) + shape.logits(tokens),
        "block_work": shape.work(tokens) + shape.logits(tokens),
    }


def drop_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    seq_len: int,
    batch_size: int,
    calibration: int,
    evaluation: int,
    plans: int,
    ablation: str | None,
    expert_ablation: bool = False,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of ``drop``: the profile it measures to rank units (``ablation`` its kind, with every expert
    ablated when ``expert_ablation``; None when it measures none) on ``calibration`` windows, then ``plans``
    evaluated block by block beside the original on ``evaluation`` held-out windows (every stream kept), two
    distributions a batch."""
    shape = Shape.of(folder, dtype=dtype, seq_len=seq_len, trust_remote_code=trust_remote_code)
    tokens = batch_size * seq_len
    evaluate = {
        "states": shape.states(1 + plans, evaluation, seq_len),
        "live": shape.states(2, batch_size, seq_len),
        "work": shape.work(tokens) + 2 * shape.logits(tokens),
        "block_work": shape.work(tokens) + 2 * shape.logits(tokens),
    }
    if ablation is not None:
        measure = _profile_parts(
            shape, calibration, seq_len, batch_size, ablation, calibration, experts=expert_ablation
        )
        evaluate = {k: max(v, measure[k]) for k, v in evaluate.items()}
    return shape.plan(**evaluate, what="drop", fix="`batch_size`, `eval_samples`, `samples` or `seq_len`")


def quantize_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    seq_len: int,
    batch_size: int,
    calibration: int,
    evaluation: int,
    configs: int,
    gptq: bool,
    chunk: int = 4,
    cache_bytes: int = 2**31,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of ``quantize``: the measurement (from disk: every block's input and one block's sublayer
    inputs, updates and gradients; in memory: up to ``cache_bytes`` of ``configs`` candidates), then ``chunk``
    plans at a time evaluated beside the original on ``evaluation`` windows (from disk: every stream kept, and for
    GPTQ each plan's calibration stream; in memory: each plan's weights)."""
    shape = Shape.of(folder, dtype=dtype, seq_len=seq_len, trust_remote_code=trust_remote_code)
    tokens, L = batch_size * seq_len, shape.layers
    streams = shape.states(L + 6, calibration, seq_len)
    plans = shape.states(1 + chunk, evaluation, seq_len) + (shape.states(chunk, calibration, seq_len) if gptq else 0)
    f32 = shape.weights * 4 // shape.size  # the weights in float32, as candidates and plans' weights are made
    candidates = max(configs * f32 // L, min(cache_bytes, configs * f32))  # a run of blocks, at least one
    # from disk, one group's candidate and its rounding's temporaries (a sparse block's experts are nearly all of
    # it), or a block's plan weights beside the original's: twice the largest block in float32
    made = 2 * 4 * shape.block_numel
    return shape.plan(
        states=max(streams, plans),
        # spilled: one batch's streams (a block's input and output, its sublayers' inputs, updates and gradients)
        live=shape.states(_LIVE, batch_size, seq_len),
        work=shape.work(tokens, L) + 2 * shape.logits(tokens),
        block_work=shape.work(tokens) + 2 * shape.logits(tokens) + made,
        extra=max(candidates, chunk * f32),
        what="quantize",
        fix="`batch_size`, `samples`, `eval_samples` or `seq_len`",
    )


def imatrix_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    windows: int,
    seq_len: int,
    batch_size: int,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of ``imatrix``: one forward pass, ``batch_size`` windows at a time (from disk: every window's
    hidden state carried from block to block), each quantized matrix's running sums (a few floats per column)."""
    shape = Shape.of(folder, dtype=dtype, seq_len=seq_len, trust_remote_code=trust_remote_code)
    tokens = batch_size * seq_len
    return shape.plan(
        states=shape.states(1, windows, seq_len),
        live=shape.states(2, batch_size, seq_len),
        work=shape.work(tokens) + shape.logits(batch_size),
        block_work=shape.work(tokens),
        kept=shape.layers * 7 * 2 * max(shape.hidden, shape.mlp) * 8,
        what="imatrix",
        fix="`batch_size`, `samples` or `seq_len`",
    )


def probe_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    lengths: list[int],
    batch_size: int,
    units: str | list[str],
    profile_windows: int,
    profile_seq_len: int,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of ``probe``: the cheap profile it measures for its importance curve (``profile_windows``
    windows, Taylor; 0 when it measures none), then the readouts of examples of these token ``lengths`` (from disk:
    every batch's hidden states, right-padded as :func:`layerwise.features.collect_ids` batches them), and the
    readouts themselves (``units``: blocks, all, or names), which both ways keep."""
    seq_len = profile_seq_len if profile_windows else 1
    shape = Shape.of(folder, dtype=dtype, seq_len=seq_len, trust_remote_code=trust_remote_code)
    parts = _feature_parts(shape, lengths, batch_size)
    if profile_windows:
        profile = _profile_parts(shape, profile_windows, profile_seq_len, batch_size, "taylor", 0)
        parts = {k: max(v, profile[k]) for k, v in parts.items()}
    n_units = len(units) if not isinstance(units, str) else shape.layers * (3 if units == "all" else 1)
    return shape.plan(
        **parts,
        kept=len(lengths) * n_units * shape.hidden * 4,
        what="probe",
        fix="`batch_size`, `examples`, `units` or `profile_samples`",
    )


def _feature_parts(shape: Shape, lengths: list[int], batch_size: int) -> dict:
    """Reading examples of these token ``lengths``: from disk, every batch's hidden states, right-padded as
    :func:`layerwise.features.collect_ids` batches them; one batch's work."""
    from .features import by_length

    widths = [len(rows) * max(lengths[i] for i in rows) for rows in by_length(lengths, batch_size)]
    return {
        "states": sum(widths) * shape.hidden * shape.size,
        "live": 2 * max(widths) * shape.hidden * shape.size,  # spilled: a batch's input and output
        "work": shape.work(max(widths)),
        "block_work": shape.work(max(widths)),
    }


def steer_plan(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    lengths: list[int],
    batch_size: int,
    eval_windows: int,
    seq_len: int,
    layers: str,
    sweep_layers: str | None,
    sweep: int,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """The memory plan of ``steer``: every pair's texts (of these token ``lengths``) read at every block, in
    batches of ``2 * batch_size``, their readouts kept; then the cost, each measured (layers, alpha) steered beside
    the original on ``eval_windows`` windows (from disk every stream kept), two distributions a batch. The margins
    and the continuations, on a few short prompts, hold less."""
    from .steer.vector import parse_layers

    shape = Shape.of(folder, dtype=dtype, seq_len=seq_len, trust_remote_code=trust_remote_code)
    listed = len(parse_layers(layers, shape.layers) or [()])
    also = None if sweep_layers is None else len(parse_layers(sweep_layers, shape.layers) or [])
    steered = 1 + (listed * max(1, sweep) if also is None else listed + (1 + also) * sweep)
    tokens = batch_size * seq_len
    cost = {
        "states": shape.states(1 + steered, eval_windows, seq_len),
        "live": shape.states(2, batch_size, seq_len),
        "work": shape.work(tokens) + 2 * shape.logits(tokens),
        "block_work": shape.work(tokens) + 2 * shape.logits(tokens),
    }
    features = _feature_parts(shape, lengths, 2 * batch_size)
    return shape.plan(
        **{k: max(v, features[k]) for k, v in cost.items()},
        kept=len(lengths) * shape.layers * shape.hidden * 4,
        what="steer",
        fix="`batch_size`, `eval_samples`, `n_pairs` or `seq_len`",
    )
