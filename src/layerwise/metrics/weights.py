"""Data-free weight statistics."""

from __future__ import annotations

import torch


def z_fraction(weight: torch.Tensor) -> torch.Tensor:
    """ZD score of one matrix: share of entries with z = (w - mean) / std above 1.

    Returned as a 0-dim tensor on the weight's device, so that the scores of
    every matrix reach the host in one copy rather than one stall each.
    """
    w = weight.detach().float()
    mean, std = w.mean(), w.std()  # two passes: std_mean's single pass is slower on CPU
    return torch.count_nonzero(w > mean + std).double() / w.numel()
