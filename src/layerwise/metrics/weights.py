"""Data-free weight statistics."""

from __future__ import annotations

import torch


def z_fraction(weight: torch.Tensor) -> float:
    """ZD score of one matrix: share of entries with z = (w - mean) / std above 1."""
    w = weight.detach().float()
    mean, std = w.mean(), w.std()  # two passes: std_mean's single pass is slower on CPU
    return int(torch.count_nonzero(w > mean + std)) / w.numel()
