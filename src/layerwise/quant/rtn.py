"""Group-wise round-to-nearest quantization of a weight matrix, and its exact storage cost.

Groups run along the input dimension (each row is cut into groups of
``group_size`` columns). The group size need not divide the row length
(SmolLM2's hidden size is 576): the last group of each row is then shorter
and gets its own scale, which the storage cost counts exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import cast

import torch

from ..errors import LayerwiseError


@dataclass(frozen=True)
class QConfig:
    """How one tensor is quantized: ``bits`` per code, one scale (and zero point) per ``group_size`` inputs."""

    bits: int
    group_size: int
    symmetric: bool = False
    scale_bits: int = 16  # fp16 scales, as GPTQ, AWQ and compressed-tensors store them

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LayerwiseError(f"{self.bits}-bit codes are not supported; use 2 to 8 bits")
        if self.group_size < 1:
            raise LayerwiseError(f"group size must be at least 1 (got {self.group_size})")

    @property
    def zero_bits(self) -> int:
        """A zero point is stored as one more code, so it costs ``bits``; symmetric groups have none."""
        return 0 if self.symmetric else self.bits

    def check(self, in_features: int) -> None:
        if self.group_size > in_features:
            raise LayerwiseError(
                f"group size {self.group_size} is larger than a row of {in_features} weights; use `group_size` "
                f"{in_features} or less"
            )

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store a quantized (out, in) matrix: each row's codes packed into whole 32-bit words (as the
        compressed-tensors export writes them), plus one scale and zero per group."""
        groups = math.ceil(in_features / self.group_size)
        codes = 32 * math.ceil(in_features * self.bits / 32)
        return out_features * (codes + groups * (self.scale_bits + self.zero_bits))

    def bits_per_weight(self, in_features: int) -> float:
        return self.storage_bits(1, in_features) / in_features

    @property
    def name(self) -> str:
        return f"{'s' if self.symmetric else 'a'}{self.bits}g{self.group_size}"

    @classmethod
    def from_name(cls, name: str) -> QConfig:
        """The config a :attr:`name` stands for (``s4g32``: symmetric 4-bit codes in groups of 32)."""
        m = re.fullmatch(r"([as])(\d+)g(\d+)", name)
        if not m:
            raise LayerwiseError(f"{name!r} is not an integer config name (like s4g32 or a3g64)")
        return cls(int(m.group(2)), int(m.group(3)), m.group(1) == "s")


@dataclass
class QTensor:
    """Integer codes of a matrix with their group scales and zero points (zero points ``None`` when symmetric)."""

    codes: torch.Tensor  # (out, in) uint8
    scales: torch.Tensor  # (out, groups)
    zeros: torch.Tensor | None  # (out, groups), as integer codes
    config: QConfig

    def split_rows(self, sizes: list[int]) -> list[QTensor]:
        """The codes of consecutive blocks of rows (matrices quantized as one row-stacked matrix), each on its own."""
        parts = [
            [p.clone() for p in t.split(sizes)] if t is not None else [None] * len(sizes)
            for t in (self.codes, self.scales, self.zeros)
        ]
        return [QTensor(c, s, z, self.config) for c, s, z in zip(*parts)]

    @classmethod
    def cat(cls, parts: list[QTensor]) -> QTensor:
        """Matrices quantized alone under one config, as one row-stacked matrix (``split_rows`` undone)."""
        zeros = [p.zeros for p in parts]
        return cls(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scales for p in parts]),
            None if any(z is None for z in zeros) else torch.cat(cast(list[torch.Tensor], zeros)),
            parts[0].config,
        )

    def dequantize(self) -> torch.Tensor:
        out, n = self.codes.shape
        w = _grouped(self.codes.float(), self.config.group_size)  # each group's scale broadcast over it: no copies
        w.sub_(2 ** (self.config.bits - 1) if self.zeros is None else self.zeros.float()[..., None])
        return w.mul_(self.scales[..., None]).view(out, -1)[:, :n].contiguous()


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """``w`` (out, in) as (out, groups, ``g``), a short last group padded with zeros (to be cut off after)."""
    out, n = w.shape
    pad = -n % g
    return (torch.nn.functional.pad(w, (0, pad)) if pad else w).view(out, -1, g)


def group_params(
    w: torch.Tensor, cfg: QConfig, bits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero-point code) of every group of ``w`` (out, in), by METHODS.md's formulas.

    ``bits`` (out,) overrides ``cfg.bits`` row by row, so that one call serves
    several bit widths stacked along the rows (see :func:`quantize_gptq_many`).
    """
    out, n = w.shape
    g = cfg.group_size
    groups = math.ceil(n / g)
    pad = groups * g - n
    # Replicating the last column leaves each short group's min and max unchanged.
    padded = torch.nn.functional.pad(w.float()[None], (0, pad), mode="replicate")[0] if pad else w.float()
    blocks = padded.view(out, groups, g)
    b = cfg.bits if bits is None else bits.float()[:, None]
    qmax = 2**b - 1
    if cfg.symmetric:
        scale = blocks.abs().amax(dim=-1) / (2 ** (b - 1) - 1)
        return scale.clamp_min(1e-12).half().float(), None
    lo, hi = blocks.amin(dim=-1).clamp(max=0), blocks.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12).half().float()
    zero = torch.minimum(
        torch.round(-lo / scale).clamp_min(0), torch.as_tensor(qmax, dtype=scale.dtype, device=scale.device)
    )
    return scale, zero


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, cfg: QConfig, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes of ``w`` for given group parameters (columns may be a slice: ``scale`` is per column then).

    ``bits`` (out,) overrides ``cfg.bits`` row by row, as in :func:`group_params`.
    """
    b = cfg.bits if bits is None else bits.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    top = torch.as_tensor(2**b - 1, dtype=w.dtype, device=w.device)
    q = torch.round(w / scale)
    q.add_(2 ** (b - 1) if zero is None else zero).clamp_(min=1 if zero is None else 0)
    return torch.minimum(q, top, out=q)


def quantize_rtn(w: torch.Tensor, cfg: QConfig) -> QTensor:
    """Round every weight to the nearest code of its group's grid."""
    out, n = w.shape
    cfg.check(n)
    scale, zero = group_params(w, cfg)
    grouped = _grouped(w.float(), cfg.group_size)  # each group's scale broadcast over it: no copy per column
    codes = quantize_with(grouped, scale[..., None], None if zero is None else zero[..., None], cfg)
    codes = codes.view(out, -1)[:, :n].to(torch.uint8)
    return QTensor(codes, scale, zero.to(torch.uint8) if zero is not None else None, cfg)
