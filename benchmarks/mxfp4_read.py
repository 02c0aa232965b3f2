"""Time and memory of reading gpt-oss's MXFP4 experts from disk, beside the same model stored in bfloat16.

gpt-oss-20b's shape (hidden 2880, 32 experts of width 2880, 4 per token, 64 query and 8 key-value heads) with 4 of its
24 blocks and SmolLM2's 49152-token vocabulary (so its tokenizer serves), random weights, written twice:

  bfloat16   every tensor in bfloat16, the experts fused as transformers holds them (``shapes.write_config``)
  mxfp4      the same checkpoint with each experts tensor replaced by MXFP4 blocks and scales (random codes, scales
             2^-5..2^1), as gpt-oss's published files store them, and the config's ``quantization_config``

Each runs `layerwise profile --offload disk` (the PROFILE arguments of ``moe_scale.py``) in a fresh process in float32
on the CPU: the mxfp4 one dequantizes every experts tensor as its block is read, by transformers' own operations.
The row gives seconds, peak resident set (VmHWM) and what the memory plan planned. The bfloat16 run is the baseline.
Random weights: time and memory only, never quality.

Usage: python benchmarks/mxfp4_read.py (about 10 minutes on 2 cores, 9 GB of disk). Writes
benchmarks/results/mxfp4_read.md and .json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402
from moe_scale import PROFILE, _mib, job, ratio  # noqa: E402
from small_paths_memory import _machine, heading, load_average, publish  # noqa: E402

LAYERS = 4
#: Modules gpt-oss's own files leave unquantized: attention, routers, embedding and head.
UNQUANTIZED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def config():
    """gpt-oss-20b's shape with LAYERS blocks and SmolLM2's vocabulary."""
    import transformers as tf

    return tf.GptOssConfig(
        vocab_size=49152,
        num_hidden_layers=LAYERS,
        num_local_experts=32,
        num_experts_per_tok=4,
        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=0,
    )


def mxfp4_copy(source: Path, out: Path, seed: int = 0) -> None:
    """``source`` with every experts tensor (E, in, out) stored as MXFP4: blocks (E, out, in/32, 16) of two 4-bit
    codes a byte and a power-of-two scale a block of 32 (E, out, in/32), shard by shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir()
    g = torch.Generator().manual_seed(seed)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(str(source / shard), "pt") as fh:
            for key in fh.keys():
                if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    tensors[key] = fh.get_tensor(key)
                    continue
                experts, n_in, n_out = fh.get_slice(key).get_shape()
                tensors[f"{key}_blocks"] = torch.randint(0, 256, (experts, n_out, n_in // 32, 16), generator=g).byte()
                tensors[f"{key}_scales"] = torch.randint(122, 129, (experts, n_out, n_in // 32), generator=g).byte()
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": UNQUANTIZED}
    (out / "config.json").write_text(json.dumps(cfg | {"quantization_config": qc}, indent=1))


def main() -> None:
    out = {"date": date.today().isoformat(), "machine": _machine(), "loadavg_start": os.getloadavg(), "jobs": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("LAYERWISE_BENCH_TMP")) as tmp:
        models = {"bfloat16": Path(tmp) / "bf16", "mxfp4": Path(tmp) / "mxfp4"}
        out["params"] = shapes.write_config(config(), models["bfloat16"])
        mxfp4_copy(models["bfloat16"], models["mxfp4"])
        out["source_bytes"] = {k: sum(f.stat().st_size for f in m.glob("*.safetensors")) for k, m in models.items()}
        for name, model in models.items():
            out["jobs"][name] = job(["profile", *PROFILE], "profile.json", model, Path(tmp) / f"out-{name}")
            print(name, out["jobs"][name], flush=True)
        out["loadavg_end"] = os.getloadavg()
    _write(out)


def _write(out: dict) -> None:
    base = out["jobs"]["bfloat16"]
    lines = [
        heading("mxfp4_read", out),
        "",
        f"Random-weight gpt-oss-20b shape with {LAYERS} of its 24 blocks ({out['params'] / 1e9:.2f} B parameters), "
        "`layerwise profile --offload disk` in float32 on the CPU, each a fresh process; generated by "
        "`benchmarks/mxfp4_read.py` (its docstring gives the command). Random weights: time and memory only.",
        "",
        "| checkpoint | on disk (GB) | s | peak (MiB) | planned (MiB) | time / bfloat16 | peak / bfloat16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["jobs"].items():
        other = None if name == "bfloat16" else base
        lines.append(
            f"| {name} | {out['source_bytes'][name] / 1e9:.2f} | {r['seconds']:.0f} | {_mib(r['peak_rss_bytes'])} | "
            f"{_mib(r['planned_bytes'])} | {ratio(r, other, 'seconds', 2)} | {ratio(r, other, 'peak_rss_bytes', 2)} |"
        )
    lines += ["", f"{load_average(out)}."]
    publish("mxfp4_read", out, lines)


if __name__ == "__main__":
    main()
