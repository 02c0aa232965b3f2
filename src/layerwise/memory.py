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


def _peak_rss() -> tuple[int, str]:
    """The process's peak resident set in bytes, and where it was read.

    Linux: ``VmHWM`` of ``/proc/self/status``. ``ru_maxrss`` would also count the program this process was started
    from (the kernel folds the old image's peak in at exec), so a run spawned by a large process would read too high.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), "ru_maxrss"


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss()[0]


def memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated (CUDA), or the resident set size now (CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes()


def peak_memory() -> dict:
    """The peak record of a result's meta: ``rss_bytes``, ``cuda_bytes`` and what they mean (``note``).

    CUDA is read only when this process has already used it, so a CPU run
    never starts a CUDA context just to report nothing.
    """
    rss, source = _peak_rss()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return {
        "rss_bytes": rss,
        "cuda_bytes": cuda,
        "note": f"rss_bytes: this process's peak resident set since it started ({source}), loading included; "
        "cuda_bytes: torch.cuda.max_memory_allocated summed over devices since the last reset (null without CUDA)",
    }
