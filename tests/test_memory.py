"""The memory a run records, and the small paths' memory: computed in slices, the numbers are the whole-tensor way's."""

from __future__ import annotations

import torch

from layerwise.memory import peak_memory, rss_bytes


def test_peak_memory_is_in_bytes_and_never_falls():
    before = peak_memory()["rss_bytes"]
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    now = rss_bytes()
    after = peak_memory()["rss_bytes"]
    # The kernel's resident counters lag by a few pages; a unit slip (ru_maxrss is in KiB) would be a factor 1024.
    assert after >= before and after >= now - 2**20 and now >= big.numel() * 4
