"""`layerwise profile` with the weights in memory against `--offload disk` (one block's weights read at a time), on
random-weight Llama checkpoints at the shapes of SmolLM2-360M and SmolLM2-1.7B: peak resident memory, time, and
whether the two profiles agree.

Random weights are honest for time and memory, never for quality. Each checkpoint is written in bfloat16
safetensors with SmolLM2's tokenizer (that of the default model); each profile runs in a fresh process in float32:
`--seq-len 128 --samples 4 --batch-size 2 --ablation taylor --positions 32` (exact ablation costs quadratic time in
depth, the same in both modes, and is left out to keep the 1.7B run short), logit lens included. Peak memory is the
process's VmHWM (see small_paths_memory.py).

Usage: python benchmarks/offload_profile.py [--shapes 360m,1.7b]   (about 20 minutes on 2 cores)
Writes benchmarks/results/offload_profile.md and .json.
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
from small_paths_memory import REPORT, _machine, _python, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: Llama shapes (hidden, layers, heads, key-value heads, MLP width); SmolLM2's 49152-token vocabulary, tied head.
SHAPES = {
    "360m": (960, 32, 15, 5, 2560),
    "1.7b": (2048, 24, 32, 32, 8192),
}
ARGS = "--seq-len 128 --samples 4 --batch-size 2 --ablation taylor --positions 32".split()

BUILD = """
import shutil, torch, transformers as tf
from pathlib import Path
from layerwise.loading import checkpoint_folder
hidden, layers, heads, kv, mlp = {shape}
cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
    num_key_value_heads=kv, intermediate_size=mlp, max_position_embeddings=8192, rope_theta=100000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-5)
torch.manual_seed(0)
model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained({out!r}, max_shard_size="1GB")
default, _ = checkpoint_folder("default")
for f in Path(default).iterdir():
    if f.name.startswith(("tokenizer", "special_tokens")):
        shutil.copy(f, {out!r})
"""

RUN = """
from layerwise import cli
assert cli.main(["profile", "--model", {model!r}, *{args!r}, "--offload", {offload!r}, "--out", {out!r}, "--json"]) == 0
"""


def profile_run(model: Path, offload: str, out: Path) -> dict:
    """One profile in a fresh process: its peak resident set, seconds and CPU seconds, and the peak its memory plan
    predicted for that way of running."""
    code = RUN.format(model=str(model), args=ARGS, offload=offload, out=str(out))
    text = _python("\n".join(["import json, resource, time", "t = time.perf_counter()", code, REPORT]), REPO / "src")
    plan = json.loads((out / "profile.json").read_text())["meta"]["memory_plan"]
    return {
        **json.loads(text.strip().splitlines()[-1]),
        "planned_bytes": plan["resident" if offload == "none" else "streamed"],
    }


def largest_difference(a: Path, b: Path) -> float:
    """The largest relative difference between two profiles' metrics."""
    ua, ub = (json.loads((p / "profile.json").read_text())["units"] for p in (a, b))
    worst = 0.0
    for x, y in zip(ua, ub, strict=True):
        for k, v in x["metrics"].items():
            w = y["metrics"][k]
            if v is not None and w is not None:
                worst = max(worst, abs(v - w) / max(abs(v), 1e-12))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    shapes = ap.parse_args().shapes.split(",")
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            model = Path(tmp) / shape
            _python(BUILD.format(shape=SHAPES[shape], out=str(model)), REPO / "src")
            bytes_ = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            runs = {o: profile_run(model, o, Path(tmp) / f"{shape}-{o}") for o in ("none", "disk")}
            diff = largest_difference(Path(tmp) / f"{shape}-none", Path(tmp) / f"{shape}-disk")
            n_params = bytes_ // 2
            rows.append({"shape": shape, "params": n_params, "float32_bytes": 4 * n_params, **runs, "max_rel": diff})
            print(rows[-1], flush=True)
    out = {
        "date": date.today().isoformat(),
        "machine": _machine(),
        "args": ARGS,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "rows": rows,
    }
    _write(out)


def _write(out: dict) -> None:

    lines = [
        heading("offload_profile", out),
        "",
        "Random-weight Llama checkpoints (bfloat16 safetensors) at SmolLM2 shapes, profiled in float32 on the CPU with "
        f"`layerwise profile {' '.join(out['args'])}`, each run a fresh process: weights in memory (`--offload none`) "
        "against weights read one block at a time (`--offload disk`). Generated by `benchmarks/offload_profile.py`.",
        "",
        "| shape | params | float32 weights (MiB) | peak, in memory (MiB) | planned | peak, from disk (MiB) | "
        "planned | memory / disk | s in memory | s from disk | largest relative difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        a, b = r["none"], r["disk"]
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {r['float32_bytes'] / 2**20:.0f} | "
            f"{a['peak_rss_bytes'] / 2**20:.0f} | {a['planned_bytes'] / 2**20:.0f} | "
            f"{b['peak_rss_bytes'] / 2**20:.0f} | {b['planned_bytes'] / 2**20:.0f} | "
            f"{a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}x | {a['seconds']:.0f} | {b['seconds']:.0f} | "
            f"{r['max_rel']:.1e} |"
        )
    lines += [
        "",
        "From disk, the weights in memory are one block's at a time (the embedding and the final norm for the first "
        "pass, the head for the readouts), plus the hidden states kept for the readouts and the backward pass: each "
        "block's input for every calibration window (layers x windows x seq-len x hidden floats), which is what "
        f"grows with depth and data there. {load_average(out)}.",
    ]
    publish("offload_profile", out, lines)


if __name__ == "__main__":
    main()
