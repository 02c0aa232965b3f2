"""How cost grows with model size: profile, an RTN quantization measurement and a drop evaluation on random-weight
Llama checkpoints at the shapes of SmolLM2-135M, SmolLM2-360M, SmolLM2-1.7B and Llama-2-7B.

Each checkpoint is written in bfloat16 safetensors shard by shard (``shapes.py``: random weights are honest for time
and memory, never for quality) with SmolLM2's tokenizer, and each job runs in a fresh process in float32 on the
CPU, with the weights read one block at a time from disk (``--offload disk``) and, as the baseline beside it, with
every weight in memory (``--offload none``) where they fit (not the 7B shape: 25 GiB of float32 weights on a
24 GiB machine). The data is the built-in corpus: calibration windows for profile and the measurement, held-out
windows for the drop evaluation, as every command splits them.

  profile   `layerwise profile --seq-len 128 --samples 4 --batch-size 2 --positions 32 --ablation exact
            --ablation-samples 2 --max-memory 3GiB` (6GB for the 7B shape; exact ablation on 2 windows: quadratic
            in depth)
  measure   `measure(...)`: RTN at 3, 4 and 8 bits (group 128) of every quantization group, 4 windows of 128
  drop      `layerwise drop --units L<middle> --eval-samples 4 --seq-len 128 --export none --no-speed`

Peak memory is the process's VmHWM (see small_paths_memory.py); profile's and drop's plans are the ones they printed
and recorded.

Usage: python benchmarks/scale.py [--shapes 135m,360m,1.7b,7b] [--jobs profile,measure,drop] [--resume]
(the 7B shape alone takes about an hour on 2 cores, exact ablation most of it, and 14 GB of disk). Writes
benchmarks/results/scale.md and .json after every job; --resume goes on from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from small_paths_memory import REPORT, RESULTS, _machine, _python, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEQ, SAMPLES, BATCH = 128, 4, 2
COMMON = ["--seq-len", str(SEQ), "--samples", str(SAMPLES), "--batch-size", str(BATCH)]
PROFILE = [*COMMON, "--positions", "32", "--ablation", "exact", "--ablation-samples", "2"]
#: The profile's memory budget (``--max-memory``): the issue's targets, 3 GiB up to the 1.7B shape, 6 GB for 7B.
BUDGET = {"7b": "6GB"}
#: Each job's code in a fresh process; ``{model}``, ``{offload}`` and ``{out}`` are filled in.
JOBS = {
    "profile": """
from layerwise import cli
assert cli.main(["profile", "--model", {model!r}, *{profile!r}, "--offload", {offload!r}, "--out", {out!r},
                 "--json"]) == 0
""",
    "measure": """
import layerwise as lw
from layerwise.quant.measure import measure
from layerwise.quant.rtn import QConfig
lm = lw.load({model!r}, offload={offload!r})
w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len={seq}, samples={samples})
measure(lm, w, candidates=(QConfig(3, 128), QConfig(4, 128), QConfig(8, 128)), batch_size={batch}, progress=False)
""",
    "drop": """
from layerwise import cli
assert cli.main(["drop", "--model", {model!r}, *{common!r}, "--units", {unit!r}, "--eval-samples", "4",
                 "--export", "none", "--no-speed", "--offload", {offload!r}, "--out", {out!r}, "--json"]) == 0
""",
}


def job(name: str, model: Path, shape: str, offload: str, out: Path) -> dict:
    """One job in a fresh process: peak resident set, seconds, tokens per second and (profile) the planned peak."""
    layers = shapes.SHAPES[shape][1]
    code = JOBS[name].format(
        model=str(model),
        offload=offload,
        out=str(out),
        profile=[*PROFILE, "--max-memory", BUDGET.get(shape, "3GiB")],
        common=COMMON,
        seq=SEQ,
        samples=SAMPLES,
        batch=BATCH,
        unit=f"L{layers // 2}",
    )
    row = json.loads(
        _python("\n".join(["import json, resource, time", "t = time.perf_counter()", code, REPORT]), REPO / "src")
        .strip()
        .splitlines()[-1]
    )
    row["tokens_per_s"] = SAMPLES * SEQ / row["seconds"]
    result = {"profile": "profile.json", "drop": "eval.json"}.get(name)  # the commands that plan their memory
    if result:
        plan = json.loads((out / result).read_text())["meta"]["memory_plan"]
        row["planned_bytes"] = plan["resident" if offload == "none" else "streamed"]
    return row


def fits(n_params: int) -> bool:
    """Whether float32 weights leave room on this machine for the in-memory baseline (its peak is about 1.5 times
    the weights, offload_profile.md)."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 1.5 * 4 * n_params < 0.8 * ram


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(shapes.SHAPES))
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--resume", action="store_true", help="keep the jobs scale.json already holds; run the rest")
    args = ap.parse_args()
    out = json.loads((RESULTS / "scale.json").read_text()) if args.resume else {"rows": []}
    out |= {"date": date.today().isoformat(), "machine": _machine(), "seq_len": SEQ, "samples": SAMPLES}
    out |= {"batch_size": BATCH, "loadavg_start": out.get("loadavg_start", os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            row = next((r for r in out["rows"] if r["shape"] == shape), None)
            if row is None:
                row = {"shape": shape, "params": shapes.n_params(shape), "layers": shapes.SHAPES[shape][1], "jobs": {}}
                out["rows"].append(row)
            ways = ("disk", "none") if fits(row["params"]) else ("disk",)
            todo = [(n, o) for n in args.jobs.split(",") for o in ways if f"{n}/{o}" not in row["jobs"]]
            if not todo:
                continue
            model = Path(tmp) / shape
            shapes.write(shape, model)
            for name, offload in todo:
                row["jobs"][f"{name}/{offload}"] = job(name, model, shape, offload, Path(tmp) / f"{shape}-{name}")
                print(shape, name, offload, row["jobs"][f"{name}/{offload}"], flush=True)
                out["loadavg_end"] = os.getloadavg()
                _write(out, show=False)  # after every job, so that --resume goes on from here
            shutil.rmtree(model)
    out["rows"].sort(key=lambda r: list(shapes.SHAPES).index(r["shape"]))
    _write(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _write(out: dict, show: bool = True) -> None:

    lines = [
        heading("scale", out),
        "",
        "Random-weight Llama checkpoints (bfloat16 safetensors, SmolLM2's 49152-token vocabulary) run in float32 on "
        f"the CPU, {out['samples']} windows of {out['seq_len']} tokens of the built-in corpus, batch "
        f"{out['batch_size']}, each job a fresh process. *disk*: weights read one block at a time "
        "(`--offload disk`); *memory*: every weight in memory, the baseline, where it fits. Generated by "
        "`benchmarks/scale.py` (its docstring gives each job's command).",
        "",
        "| shape | params | layers | job | peak from disk (MiB) | planned | peak in memory (MiB) | planned | "
        "memory / disk | s from disk | s in memory | disk / memory time | tokens/s from disk |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        for name in sorted({k.split("/")[0] for k in r["jobs"]}, key=list(JOBS).index):
            d, mem = r["jobs"][f"{name}/disk"], r["jobs"].get(f"{name}/none")
            plan = _mib(d["planned_bytes"]) if "planned_bytes" in d else "—"
            if mem:
                mplan = _mib(mem["planned_bytes"]) if "planned_bytes" in mem else "—"
                resident = (
                    f"{_mib(mem['peak_rss_bytes'])} | {mplan} | {mem['peak_rss_bytes'] / d['peak_rss_bytes']:.2f}x"
                )
                times = f"{mem['seconds']:.0f} | {d['seconds'] / mem['seconds']:.2f}x"
            else:
                why = "not run (weights exceed memory)" if not fits(r["params"]) else "still to run"
                resident, times = f"{why} | — | —", "— | —"
            lines.append(
                f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {r['layers']} | {name} | {_mib(d['peak_rss_bytes'])} | "
                f"{plan} | {resident} | {d['seconds']:.0f} | {times} | {d['tokens_per_s']:.1f} |"
            )
    lines += [
        "",
        *_growth(out["rows"]),
        "",
        f"{load_average(out)}.",
    ]
    publish("scale", out, lines, show=show)


def _growth(rows: list[dict]) -> list[str]:
    """How time and peak from disk grow from the smallest shape to the largest, beside the parameters."""
    if len(rows) < 2:
        return []
    a, b = rows[0], rows[-1]
    out = [
        f"From {a['shape']} to {b['shape']}: parameters x{b['params'] / a['params']:.1f}, layers "
        f"x{b['layers'] / a['layers']:.2f}."
    ]
    for name in JOBS:
        key = f"{name}/disk"
        if key in a["jobs"] and key in b["jobs"]:
            ja, jb = a["jobs"][key], b["jobs"][key]
            out.append(
                f"- {name} from disk: time x{jb['seconds'] / ja['seconds']:.1f}, peak memory "
                f"x{jb['peak_rss_bytes'] / ja['peak_rss_bytes']:.1f}."
            )
    return out


if __name__ == "__main__":
    main()
