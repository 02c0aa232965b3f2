"""Random-weight Llama checkpoints at real shapes, written shard by shard without building the model.

A 7B model in float32 does not fit beside anything else on a 24 GB machine, so the checkpoint is written from the
shapes of a skeleton (the model on the meta device): each tensor is drawn, put in the current shard and the shard
written once it reaches ``shard_bytes``. Weights are normal with the config's initializer range and norms are ones,
as transformers initializes a new model. Random weights are honest for time and memory, never for quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

#: Llama shapes: (hidden, layers, heads, key-value heads, MLP width, tied head). Every shape has SmolLM2's
#: 49152-token vocabulary, so that the default model's tokenizer serves them all (Llama-2-7B's own has 32000).
SHAPES = {
    "135m": (576, 30, 9, 3, 1536, True),
    "360m": (960, 32, 15, 5, 2560, True),
    "1.7b": (2048, 24, 32, 32, 8192, True),
    "7b": (4096, 32, 32, 32, 11008, False),
}


def config(shape: str):
    """The Llama config of ``shape``."""
    import transformers as tf

    hidden, layers, heads, kv, mlp, tied = SHAPES[shape]
    return tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=mlp,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )


def n_params(shape: str) -> int:
    """The parameters of ``shape`` (a tied head counted once), from its skeleton."""
    import transformers as tf
    from accelerate import init_empty_weights

    cfg = config(shape)
    with init_empty_weights():
        skeleton = tf.LlamaForCausalLM(cfg)
    skeleton.tie_weights()
    return sum(p.numel() for p in skeleton.parameters())


def write(shape: str, out: Path, *, dtype=torch.bfloat16, shard_bytes: int = 2**30, seed: int = 0) -> int:
    """Write a random checkpoint of ``shape`` to ``out`` (safetensors shards, their index, the config and the default
    model's tokenizer); return its parameter count."""
    return write_config(config(shape), out, dtype=dtype, shard_bytes=shard_bytes, seed=seed)


def write_config(
    cfg, out: Path, *, dtype=torch.bfloat16, shard_bytes: int = 2**30, seed: int = 0, published: bool = False
) -> int:
    """Write a random checkpoint of any causal LM ``cfg`` as :func:`write` does: its tensors as the model holds them
    (a mixture of experts' fused 3-D weights, which transformers loads as they are), or, ``published``, as
    ``save_pretrained`` and published files store them (each expert's maps apart, which transformers fuses as it
    loads; buffers the checkpoint holds, such as DeepSeek's routing correction bias, included)."""
    import transformers as tf
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    from layerwise.loading import checkpoint_folder

    with init_empty_weights():
        skeleton = tf.AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    n_params = 0

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    params = dict(skeleton.named_parameters())
    for name, p in (skeleton.state_dict() if published else params).items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # a tied head is the embedding's tensor
        t = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
        saved = revert_weight_conversion(skeleton, {name: t.to(dtype)}) if published else {name: t.to(dtype)}
        shard |= {k: v.contiguous().clone() for k, v in saved.items()}  # an expert's rows alone, not a view
        n_params += p.numel() if name in params else 0
        if sum(v.numel() * v.element_size() for v in shard.values()) >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": n_params * torch.finfo(dtype).bits // 8}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.dtype = dtype
    cfg.save_pretrained(out)
    default, _ = checkpoint_folder("default")
    for f in Path(default).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out)
    return n_params
