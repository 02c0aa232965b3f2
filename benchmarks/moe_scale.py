"""Time and memory of the mixture-of-experts work on a random-weight checkpoint at OLMoE-1B-7B's shape (hidden 2048,
16 sparse blocks of 64 experts, 8 per token, expert width 1024; 6.9 B parameters), read from disk.

No real MoE model is reachable from these machines, so this measures cost only: random weights are honest for time
and memory, never for quality. The checkpoint is written in bfloat16 safetensors (``shapes.write_config``, fused
expert tensors as transformers holds them) with SmolLM2's tokenizer; each job runs in a fresh process in float32
on the CPU with ``--offload disk`` (28 GB of float32 weights do not fit in memory here), beside its baseline:

  profile          `layerwise profile --seq-len 32 --samples 2 --batch-size 1 --positions 16 --ablation exact
                   --ablation-samples 1` (the built-in corpus's calibration windows)
  profile+experts  the same with `--expert-ablation`: every one of the 1024 experts ablated exactly
  drop block       `layerwise drop --units L8 --eval-samples 2 --export hf --no-speed` (held-out windows)
  drop experts     `layerwise drop --unit expert --per-layer 8 --order route_share --eval-samples 2 --export hf
                   --no-speed` (ranked on the calibration windows, evaluated on held-out ones, 8 of 64 experts cut
                   from every block, the checkpoint written)

Peak memory is the process's VmHWM; the plan is what the command planned and recorded. Usage: python
benchmarks/moe_scale.py (about 40 minutes on 2 cores and 27 GB of disk). Writes benchmarks/results/moe_scale.md
and .json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from small_paths_memory import REPORT, _machine, _python, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--seq-len", "32", "--samples", "2", "--batch-size", "1", "--offload", "disk", "--json"]
PROFILE = [*COMMON, "--positions", "16", "--ablation", "exact", "--ablation-samples", "1"]
DROP = [*COMMON, "--eval-samples", "2", "--export", "hf", "--no-speed"]
#: Each job's command line after the model, and the result file that records its memory plan.
JOBS = {
    "profile": (["profile", *PROFILE], "profile.json"),
    "profile+experts": (["profile", *PROFILE, "--expert-ablation"], "profile.json"),
    "drop block": (["drop", *DROP, "--units", "L8"], "eval.json"),
    "drop experts": (["drop", *DROP, "--unit", "expert", "--per-layer", "8", "--order", "route_share"], "eval.json"),
}
BASELINE = {"profile+experts": "profile", "drop experts": "drop block"}


def config():
    """OLMoE-1B-7B's shape with SmolLM2's vocabulary (so its tokenizer serves)."""
    import transformers as tf

    return tf.OlmoeConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=0,
    )


def job(argv: list[str], result: str, model: Path, out: Path) -> dict:
    """One command in a fresh process: its peak resident set, seconds and planned peak."""
    code = f"from layerwise import cli\nassert cli.main([{argv[0]!r}, '--model', {str(model)!r}, *{argv[1:]!r}, "
    code += f"'--out', {str(out)!r}]) == 0"
    lines = _python("\n".join(["import json, resource, time", "t = time.perf_counter()", code, REPORT]), REPO / "src")
    row = json.loads(lines.strip().splitlines()[-1])
    meta = json.loads((out / result).read_text())["meta"]
    row["planned_bytes"] = meta["memory_plan"]["streamed"]
    if argv[0] == "drop":
        ev = json.loads((out / "eval.json").read_text())
        (v,) = ev["variants"]
        row |= {"params_ratio": v["params_ratio"], "kl": v["kl"], "bytes": ev["exports"]["hf"]["bytes"]}
    return row


def main() -> None:
    out = {"date": date.today().isoformat(), "machine": _machine(), "loadavg_start": os.getloadavg(), "jobs": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("LAYERWISE_BENCH_TMP")) as tmp:
        model = Path(tmp) / "olmoe"
        out["params"] = shapes.write_config(config(), model)
        out["source_bytes"] = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for name, (argv, result) in JOBS.items():
            out["jobs"][name] = job(argv, result, model, Path(tmp) / name.replace(" ", "-"))
            print(name, out["jobs"][name], flush=True)
            out["loadavg_end"] = os.getloadavg()
            _write(out, show=False)
    _write(out)


def ratio(r: dict, base: dict | None, key: str, digits: int) -> str:
    """A job's ``key`` over its baseline's, or a dash for a job without one."""
    return f"{r[key] / base[key]:.{digits}f}x" if base else "—"


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def _write(out: dict, show: bool = True) -> None:
    lines = [
        heading("moe_scale", out),
        "",
        f"Random-weight OLMoE-1B-7B shape ({out['params'] / 1e9:.2f} B parameters, "
        f"{out['source_bytes'] / 1e9:.1f} GB of bfloat16 safetensors), float32 on the CPU, weights read one block at "
        "a time from disk, each job a fresh process; generated by `benchmarks/moe_scale.py` (its docstring gives "
        "each command). Random weights: time and memory only, never quality.",
        "",
        "| job | s | peak (MiB) | planned (MiB) | time / baseline | peak / baseline | written |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in out["jobs"].items():
        base = out["jobs"].get(BASELINE.get(name, ""))
        wrote = f"{r['bytes'] / 1e9:.2f} GB, {r['params_ratio']:.1%} of the parameters" if "bytes" in r else "profile"
        lines.append(
            f"| {name} | {r['seconds']:.0f} | {_mib(r['peak_rss_bytes'])} | {_mib(r['planned_bytes'])} | "
            f"{ratio(r, base, 'seconds', 1)} | {ratio(r, base, 'peak_rss_bytes', 2)} | {wrote} |"
        )
    lines += ["", f"{load_average(out)}."]
    publish("moe_scale", out, lines, show=show)


if __name__ == "__main__":
    main()
