"""How much memory a run took: the figure every result file records beside its numbers.

A run that needs 8 GB on a small model fails on a laptop, so the peak is as
much a result as a perplexity. The resident set is the process's (file
pages of memory-mapped weights included, as the operating system counts
them), from its start: loading and a first-run GGUF conversion count toward
the result made after them in the same process.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

#: What :func:`peak_memory` measures, in the words a result file carries.
PEAK_NOTE = ("rss_bytes: the process's peak resident set since it started (ru_maxrss), loading included; "
             "cuda_bytes: torch.cuda.max_memory_allocated summed over devices since the last reset (null without CUDA)")


def _peak_rss_bytes() -> int:
    """ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()


def memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated (CUDA), or the resident set size now (CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes()


def peak_memory() -> dict:
    """The peak record of a result's meta: ``rss_bytes``, ``cuda_bytes`` and what they mean (``note``).

    CUDA is read only when this process has already used it, so a CPU run
    never starts a CUDA context just to report zero.
    """
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return {"rss_bytes": _peak_rss_bytes(), "cuda_bytes": cuda, "note": PEAK_NOTE}
