"""Time and memory of reading gpt-oss's MXFP4 experts from disk, beside the same model stored in bfloat16.

gpt-oss-20b's shape (hidden 2880, 32 experts of width 2880, 4 per token, 64 query and 8 key-value heads) with 4 of its
24 blocks and SmolLM2's 49152-token vocabulary (so its tokenizer serves), random weights, written three times:

  bfloat16   every tensor in bfloat16, the experts fused as transformers holds them (``shapes.write_config``)
  mxfp4      the same checkpoint with each experts tensor replaced by MXFP4 blocks and scales (random codes, scales
             2^-5..2^1), as gpt-oss's published files store them, and the config's ``quantization_config``
  gguf       the same model as llama.cpp's converter writes a GGUF file of it: MXFP4 experts (random codes and
             scales, as above), other matrices in float16, vectors in float32; layerwise reads it itself (transformers
             cannot), dequantizing each MXFP4 tensor with the ``gguf`` package as its block is read

Each runs `layerwise profile --offload disk` (the PROFILE arguments of ``moe_scale.py``) in a fresh process in float32
on the CPU: the mxfp4 one dequantizes every experts tensor as its block is read, by transformers' own operations.
The row gives seconds, peak resident set (VmHWM) and what the memory plan planned. The bfloat16 run is the baseline.
Random weights: time and memory only, never quality.

Usage: python benchmarks/mxfp4_read.py (about 8 minutes on 2 cores, 12 GB of disk). Writes
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


def gguf_copy(source: Path, out: Path, seed: int = 0) -> None:
    """``source`` as llama.cpp's converter writes gpt-oss: experts as MXFP4 tensors ``ffn_{gate,up,down}_exps``
    (random codes, scales 2^-5..2^1, gate and up split), their biases de-interleaved, other matrices in float16,
    vectors (norms, biases, sinks) in float32, with the rope, window and expert metadata and the default GGUF's
    tokenizer."""
    import gguf
    import numpy as np
    import transformers as tf
    from safetensors import safe_open

    from layerwise import ggufio
    from layerwise.loading import default_gguf

    cfg = tf.AutoConfig.from_pretrained(source)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), arch="gpt-oss")
    _gguf_metadata(w, cfg)
    tokenizer = ggufio.reader(default_gguf())
    for f in tokenizer.fields.values():
        if f.name.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    rng = np.random.default_rng(seed)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(source / shard), "pt") as fh:
            for key in fh.keys():
                for gname, data in _gguf_tensors(key, fh.get_tensor(key).float().numpy(), names, rng):
                    kind = gguf.GGMLQuantizationType.MXFP4 if data.dtype == np.uint8 else None
                    w.add_tensor(gname, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_metadata(w, cfg) -> None:
    import gguf

    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_sliding_window(cfg.sliding_window)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _gguf_tensors(key: str, data, names, rng):
    """One checkpoint tensor as the GGUF tensors llama.cpp's converter makes of it (an MXFP4 one as raw bytes)."""
    import numpy as np

    block = key.split(".")[2] if key.startswith("model.layers.") else ""
    if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
        experts, n_in, n_out = data.shape
        parts = ("gate", "up") if "gate_up" in key else ("down",)
        for part in parts:
            raw = rng.integers(0, 256, (experts, n_out // len(parts), n_in // 32, 17), dtype=np.uint8)
            raw[..., 0] = rng.integers(122, 129, raw.shape[:-1], dtype=np.uint8)  # E8M0 scales 2^-5..2^1
            yield f"blk.{block}.ffn_{part}_exps.weight", raw.reshape(experts, n_out // len(parts), -1)
    elif key.endswith("experts.gate_up_proj_bias"):
        yield f"blk.{block}.ffn_gate_exps.bias", np.ascontiguousarray(data[..., ::2])
        yield f"blk.{block}.ffn_up_exps.bias", np.ascontiguousarray(data[..., 1::2])
    elif key.endswith("experts.down_proj_bias"):
        yield f"blk.{block}.ffn_down_exps.bias", data
    elif key.endswith("self_attn.sinks"):
        yield f"blk.{block}.attn_sinks.weight", data
    else:
        stem, kind = key.rsplit(".", 1)
        yield f"{names.get_name(stem)}.{kind}", data if data.ndim == 1 else data.astype(np.float16)


def main() -> None:
    out = {"date": date.today().isoformat(), "machine": _machine(), "loadavg_start": os.getloadavg(), "jobs": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("LAYERWISE_BENCH_TMP")) as tmp:
        models = {"bfloat16": Path(tmp) / "bf16", "mxfp4": Path(tmp) / "mxfp4", "gguf": Path(tmp) / "oss.gguf"}
        out["params"] = shapes.write_config(config(), models["bfloat16"])
        mxfp4_copy(models["bfloat16"], models["mxfp4"])
        gguf_copy(models["bfloat16"], models["gguf"])
        out["source_bytes"] = {k: sum(f.stat().st_size for f in _files(m)) for k, m in models.items()}
        os.environ["LAYERWISE_CACHE"] = str(Path(tmp) / "cache")  # the GGUF file's converted config and tokenizer
        for name, model in models.items():
            out["jobs"][name] = job(["profile", *PROFILE], "profile.json", model, Path(tmp) / f"out-{name}")
            print(name, out["jobs"][name], flush=True)
        out["loadavg_end"] = os.getloadavg()
    _write(out)


def _files(model: Path) -> list[Path]:
    return [model] if model.suffix == ".gguf" else list(model.glob("*.safetensors"))


def _write(out: dict) -> None:
    base = out["jobs"]["bfloat16"]
    lines = [
        heading("mxfp4_read", out),
        "",
        f"Random-weight gpt-oss-20b shape with {LAYERS} of its 24 blocks ({out['params'] / 1e9:.2f} B parameters), "
        "`layerwise profile --offload disk` in float32 on the CPU, each a fresh process; generated by "
        "`benchmarks/mxfp4_read.py` (its docstring gives the command). Random weights: time and memory only. "
        "bfloat16: the Hugging Face checkpoint, the baseline; mxfp4: its experts as gpt-oss's published files store "
        "them, dequantized by transformers; gguf: the model as llama.cpp's converter writes it (MXFP4 experts, "
        "float16 matrices), dequantized by the `gguf` package.",
        "",
        "| checkpoint | on disk (GB) | s | CPU s | peak (MiB) | planned (MiB) | time / bfloat16 | peak / bfloat16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["jobs"].items():
        other = None if name == "bfloat16" else base
        lines.append(
            f"| {name} | {out['source_bytes'][name] / 1e9:.2f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
            f"{_mib(r['peak_rss_bytes'])} | "
            f"{_mib(r['planned_bytes'])} | {ratio(r, other, 'seconds', 2)} | {ratio(r, other, 'peak_rss_bytes', 2)} |"
        )
    lines += ["", f"{load_average(out)}."]
    publish("mxfp4_read", out, lines)


if __name__ == "__main__":
    main()
