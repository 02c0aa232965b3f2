"""Data-free weight statistics."""

from __future__ import annotations

import torch


def z_fraction(weight: torch.Tensor) -> float:
    """ZD score of one matrix: share of entries with z = (w - mean) / std above 1."""
    w = weight.detach().double()
    z = (w - w.mean()) / w.std().clamp_min(1e-30)
    return float((z > 1).double().mean())
