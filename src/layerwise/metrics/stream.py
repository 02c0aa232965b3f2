"""Per-token statistics of the residual stream, reduced into float64 running sums.

Each function maps tensors of shape ``(tokens, hidden)`` to one value per
token; :class:`Moments` and :class:`MaxAbs` keep fixed-size running state, so
memory does not grow with the number of calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Running count, sum and sum of squares in float64."""

    n: float = 0.0
    total: float = 0.0
    squares: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double()
        self.n += v.numel()
        self.total += float(v.sum())
        self.squares += float((v * v).sum())

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        var = (self.squares - self.total**2 / self.n) / (self.n - 1)
        return max(var, 0.0) ** 0.5


@dataclass
class MaxAbs:
    """Largest |x| seen and the channel it sat in."""

    value: float = 0.0
    channel: int = -1

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().abs()
        per_channel = a.amax(dim=0)
        c = int(per_channel.argmax())
        v = float(per_channel[c])
        if v > self.value:
            self.value, self.channel = v, c


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a[t], b[t]) per token, computed in float32 or wider."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)


def norm_ratio(update: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """||update[t]|| / ||stream[t]|| per token."""
    return update.float().norm(dim=-1) / stream.float().norm(dim=-1).clamp_min(1e-12)


def token_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1)


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of each token's channel values (0 for a Gaussian)."""
    x = x.float()
    c = x - x.mean(dim=-1, keepdim=True)
    var = (c * c).mean(dim=-1)
    return (c**4).mean(dim=-1) / var.clamp_min(1e-30) ** 2 - 3.0


def lazy_fraction(hidden: torch.Tensor) -> torch.Tensor:
    """Fraction of MLP hidden units with |x| <= 0.01 * rms(x), per token."""
    h = hidden.float()
    rms = h.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (h.abs() <= 0.01 * rms).float().mean(dim=-1)
