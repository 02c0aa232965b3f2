"""Tiny random-config models of every supported architecture, for fast exact tests."""

from __future__ import annotations

import os
import shlex

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from layerwise.anatomy import Anatomy  # noqa: E402
from layerwise.data import Windows  # noqa: E402
from layerwise.loading import LoadedModel  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"]
#: Mixture-of-experts architectures: 4 experts, 2 per token; Qwen3-MoE and DeepSeek-V3 with a dense first block.
MOE_ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"]
#: The mixture-of-experts architectures :func:`moe_gguf` writes as GGUF files that llama.cpp runs.
GGUF_MOE_ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"]
_MOE = {
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=4, moe_intermediate_size=16, mlp_only_layers=[0])),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    "mixtral": ("Mixtral", dict(num_local_experts=4)),
    "olmoe": ("Olmoe", dict(num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)),
    "gpt_oss": (
        "GptOss",
        dict(num_local_experts=4, sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "deepseek_v3": (
        "DeepseekV3",
        dict(
            n_routed_experts=4,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            head_dim=4,
            num_key_value_heads=4,  # latent attention has a key and a value per head
        ),
    ),
}


def tiny_model(arch: str, layers: int = 3):
    import transformers as tf

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        head_dim=8,
    )
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=97,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
        cls = tf.GPT2LMHeadModel
    elif arch == "gemma3_text":
        cfg = tf.Gemma3TextConfig(
            **common,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"][:layers]
            + ["full_attention"] * max(0, layers - 3),
        )
        cls = tf.Gemma3ForCausalLM
    elif arch in _MOE:
        prefix, extra = _MOE[arch]
        cfg = getattr(tf, f"{prefix}Config")(**common | dict(num_experts_per_tok=2) | extra)
        cls = getattr(tf, f"{prefix}ForCausalLM")
    else:
        cfg_cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
        }[arch]
        cfg = cfg_cls(**common)
        cls = {
            "llama": tf.LlamaForCausalLM,
            "mistral": tf.MistralForCausalLM,
            "qwen2": tf.Qwen2ForCausalLM,
            "qwen3": tf.Qwen3ForCausalLM,
        }[arch]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random norms/weights so no branch is trivially zero
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_lm(arch: str, layers: int = 3) -> LoadedModel:
    model = tiny_model(arch, layers)
    return LoadedModel(
        model=model, tokenizer=None, anatomy=Anatomy(model), source={"ref": f"tiny-{arch}", "model_hash": "tiny"}
    )


def tiny_windows(n: int = 3, seq_len: int = 16, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    return Windows(
        ids=torch.randint(0, 97, (n, seq_len), generator=g),
        n_calib=n,
        source="random",
        data_hash="x",
        n_text_tokens=n * seq_len,
    )


def tiny_folder(path, arch: str = "llama", layers: int = 4):
    """A tiny model saved as a Hugging Face folder with a character-level tokenizer of its 97 tokens (printable
    ASCII and an unknown token), so that the CLI can load it and read any corpus; returns the folder."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", *string.printable[:96]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tiny_model(arch, layers).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture
def tiny_cli(monkeypatch):
    """The CLI running on a tiny 6-block model with 2 calibration and 3 held-out windows."""
    from layerwise import cli

    lm, w = tiny_lm("llama", layers=6), tiny_windows(5)
    w.n_calib = 2
    monkeypatch.setattr(cli, "_load", lambda args, attn_implementation=None, **_: (lm, w))
    monkeypatch.setattr(cli, "_memory_plan", lambda args, make: ("none", None))  # the tiny model is in memory
    return lm, w


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """Converted default model shared by real-model tests (reuses the user cache if set)."""
    os.environ.setdefault("LAYERWISE_CACHE", str(tmp_path_factory.mktemp("lwcache")))
    return os.environ["LAYERWISE_CACHE"]


def one_error_line(err: str) -> bool:
    """stderr holds exactly one `layerwise: error:` line and no traceback (progress bars may come before it)."""
    lines = err.replace("\r", "\n").splitlines()
    return (
        sum(line.startswith("layerwise: error:") for line in lines) == 1
        and "Traceback" not in err
        and lines[-1].startswith("layerwise: error:")
    )


def records_peak(meta: dict) -> bool:
    """A result's meta holds the process's peak memory: in bytes (not ru_maxrss's KiB), at most the peak now, and a CUDA
    figure exactly when this process has used CUDA."""
    from layerwise.memory import peak_memory, rss_bytes

    p = meta["peak_memory"]
    in_bytes = rss_bytes() // 2 <= p["rss_bytes"] <= peak_memory()["rss_bytes"]
    return (
        in_bytes and (p["cuda_bytes"] is None) == (not torch.cuda.is_initialized()) and "peak resident set" in p["note"]
    )


#: llama.cpp's names of the architectures whose transformers name differs.
GGUF_ARCH = {
    "gemma3_text": "gemma3",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "mixtral": "llama",
    "gpt_oss": "gpt-oss",
}


def write_gguf(model, path, tokens: list[str], *, quantized: bool = True, mxfp4: bool = False):
    """A GGUF file of a llama, gemma3, qwen3_moe, qwen2_moe or mixtral transformers model (Mixtral as llama.cpp
    writes it: a llama with experts), as llama.cpp names its tensors, matrices in Q8_0 (float32 unless
    ``quantized``), with a sentencepiece vocabulary of ``tokens`` (the first three: unknown, BOS, EOS). A llama's
    q and k rows are permuted into llama.cpp's rotary layout, as its converter does."""
    import gguf

    cfg = model.config
    arch = GGUF_ARCH.get(cfg.model_type, cfg.model_type)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers
    )
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    if arch in ("gemma3", "gpt-oss"):
        w.add_sliding_window(cfg.sliding_window)
    if experts := getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch in ("qwen3moe", "qwen2moe"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "gpt-oss":  # as llama.cpp's converter writes it: the experts' width, YaRN's factor and context
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        rope = cfg.rope_parameters
        if rope["rope_type"] == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    with torch.no_grad():
        for gname, data in _gguf_tensors(model, names):
            if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
                data = _rotary_rows(data, cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads)
            kind = MXFP4 if mxfp4 and gname.endswith("_exps.weight") else gguf.GGMLQuantizationType.Q8_0
            if data.ndim == 1:  # llama.cpp stores Gemma's norm weights plus one
                w.add_tensor(gname, data + 1 if arch == "gemma3" else data)
            elif not quantized and kind != MXFP4:
                w.add_tensor(gname, data)
            else:
                w.add_tensor(gname, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


#: The type llama.cpp's converter writes gpt-oss's experts in (the published checkpoints' MXFP4, repacked).
MXFP4 = 39


def _mxfp4_exact(model) -> None:
    """gpt-oss's expert matrices rounded to what MXFP4 holds, along the axis llama.cpp's blocks run (the input of
    each output row), so that a file of MXFP4 experts holds this model exactly."""
    import gguf

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                rows = p.transpose(1, 2).contiguous().numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(rows, MXFP4), MXFP4)
                p.copy_(torch.from_numpy(back).transpose(1, 2))


def _rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows of a llama in llama.cpp's rotary layout: each head's two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model, names):
    """Each parameter as llama.cpp names it, float32 in numpy; a sparse MLP's fused gate and up split in two (gpt-oss's
    columns interleaved, its experts stored (in, out) and transposed, as llama.cpp's converter does)."""
    for name, p in model.named_parameters():  # a tied head is the embedding, listed once
        data = p.float().numpy()
        block = name.rsplit(".experts.", 1)[0].removeprefix("model.layers.")
        if model.config.model_type == "gpt_oss" and ".experts." in name:
            yield from _gpt_oss_experts(name, data, block.split(".")[0])
        elif name.endswith("self_attn.sinks"):
            yield f"blk.{block.split('.')[0]}.attn_sinks.weight", data
        elif name.endswith("experts.gate_up_proj"):
            gate, up = np.split(data, 2, axis=1)
            yield f"blk.{block.split('.')[0]}.ffn_gate_exps.weight", gate
            yield f"blk.{block.split('.')[0]}.ffn_up_exps.weight", up
        elif name.endswith("experts.down_proj"):
            yield f"blk.{block.split('.')[0]}.ffn_down_exps.weight", data
        elif name.endswith("shared_expert_gate.weight"):  # one row, which llama.cpp stores as a vector
            yield names.get_name(name.removesuffix(".weight")) + ".weight", data[0]
        else:
            stem, kind = name.rsplit(".", 1)
            yield f"{names.get_name(stem)}.{kind}", data


def _gpt_oss_experts(name: str, data: np.ndarray, block: str):
    """gpt-oss's experts as llama.cpp's converter writes them: gate and up de-interleaved, matrices (out, in)."""
    kind = name.rsplit(".", 1)[1]
    if kind.startswith("gate_up_proj"):
        suffix = "bias" if kind.endswith("_bias") else "weight"
        for part, cols in (("gate", data[..., ::2]), ("up", data[..., 1::2])):
            cols = cols if suffix == "bias" else cols.swapaxes(1, 2)
            yield f"blk.{block}.ffn_{part}_exps.{suffix}", np.ascontiguousarray(cols)
    elif kind == "down_proj":
        yield f"blk.{block}.ffn_down_exps.weight", np.ascontiguousarray(data.swapaxes(1, 2))
    else:
        yield f"blk.{block}.ffn_down_exps.bias", data


def same_checkpoint(a, b) -> None:
    """Two safetensors checkpoints hold the same tensors (however sharded) and the same config."""
    import json

    from safetensors.torch import load_file

    ta, tb = ({k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()} for p in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), sorted(ta.keys() ^ tb.keys())
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca | {"_name_or_path": None} == cb | {"_name_or_path": None}


def sparse_inputs(lm: LoadedModel, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each sparse MLP's input in a plain forward of ``ids``, as (tokens, hidden), by block."""
    an = lm.anatomy
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in an.moe_layers}
    handles = [an.branch(i, "mlp").register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0])) for i in seen]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(xs).reshape(-1, xs[0].shape[-1]) for i, xs in seen.items()}


#: gpt-oss's rope, not at its defaults (so that a reader that misses it fails): YaRN over 4x the 32 positions.
_YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "rope_theta": 10000.0,
}


def moe_gguf(
    path,
    *,
    arch: str = "qwen3_moe",
    hidden: int = 32,
    width: int = 16,
    experts: int = 4,
    tie: bool = False,
    mxfp4: bool = False,
    layers: int = 2,
):
    """A Qwen3-MoE (or Qwen2-MoE: biased q, k and v maps, a gated shared expert; Mixtral, which llama.cpp writes
    as a llama with experts; or gpt-oss: biases everywhere, attention sinks, a sliding window every other block,
    YaRN) model with every block sparse (as llama.cpp's graphs have them) and its float32 GGUF file, which llama.cpp
    reads as this model (``width``: each expert's hidden width; ``tie``: the head is the token embedding; ``mxfp4``:
    the experts stored in MXFP4, as llama.cpp's converter writes gpt-oss's published checkpoints, rounded to it in
    the model, and ``width`` rounded up to its blocks of 32)."""
    import string

    import transformers as tf

    prefix, extra = {
        "qwen3_moe": ("Qwen3Moe", dict(norm_topk_prob=True, num_experts=experts, moe_intermediate_size=width)),
        "qwen2_moe": (
            "Qwen2Moe",
            dict(num_experts=experts, moe_intermediate_size=width, shared_expert_intermediate_size=2 * width),
        ),
        "mixtral": ("Mixtral", dict(num_local_experts=experts)),
        "gpt_oss": ("GptOss", dict(num_local_experts=experts, sliding_window=4, rope_parameters=_YARN)),
    }[arch]
    assert arch == "gpt_oss" or not mxfp4, "MXFP4 experts are gpt-oss's"
    if mxfp4:  # blocks of 32 along each expert matrix's input
        width = -(-width // 32) * 32
    cfg = getattr(tf, f"{prefix}Config")(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=width if arch in ("mixtral", "gpt_oss") else 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        num_experts_per_tok=2,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(tf, f"{prefix}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.2)
    if mxfp4:
        _mxfp4_exact(model)
    tokens = ["<unk>", "<s>", "</s>", *string.printable[:94]]
    return model, write_gguf(model, path, tokens, quantized=False, mxfp4=mxfp4)


def gguf_tensors(path) -> dict:
    """A GGUF file's tensors by name."""
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def recipe_reproduces(folder, tmp_path) -> int:
    """The folder's recipe, run by llama.cpp's quantizer, writes its model.gguf byte for byte; returns how many
    tensor types it sets."""
    from layerwise.quant.gguf import llama_quantize
    from layerwise.quant.imatrix import Imatrix

    args = shlex.split((folder / "recipe.sh").read_text().replace("\\\n", " "))
    overrides = [tuple(a.rsplit("=", 1)) for a in args[args.index("--tensor-type") + 1 :: 2] if "=" in a]
    assert args[args.index("--imatrix") + 1] == "imatrix.gguf"
    embd = args[args.index("--token-embedding-type") + 1]
    head = args[args.index("--output-tensor-type") + 1] if "--output-tensor-type" in args else None
    im = Imatrix.load(folder / "imatrix.gguf")
    again = llama_quantize(
        args[-3],
        tmp_path / "again.gguf",
        args[-1],
        overrides,
        token_embedding_type=embd,
        output_tensor_type=head,
        imatrix=im,
    )
    listed = [tuple(ln.rsplit("=", 1)) for ln in (folder / "tensor-types.txt").read_text().split()]
    assert listed == overrides  # the same types for llama-quantize --tensor-type-file
    ours, theirs = gguf_tensors(folder / "model.gguf"), gguf_tensors(again)
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert theirs[name].tensor_type == t.tensor_type, name
        assert bytes(theirs[name].data) == bytes(t.data), name
    return len(overrides)
