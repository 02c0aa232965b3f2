"""The only module that knows module names, per architecture.

Every other part of layerwise talks about *units* (``L7``, ``L7.attn``,
``L7.mlp``) and asks an :class:`Anatomy` for the modules behind them. Adding
an architecture means adding one :class:`Spec` to ``SPECS`` and one tiny-model
test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
from torch import nn

from .errors import LayerwiseError

Kind = Literal["block", "attn", "mlp"]
KINDS: tuple[Kind, ...] = ("block", "attn", "mlp")
_UNIT_RE = re.compile(r"^L(\d+)(?:\.(attn|mlp))?$")


@dataclass(frozen=True)
class Spec:
    """Dotted module paths of one architecture family, relative to the model.

    ``attn_update`` / ``mlp_update`` name the module, inside a block, whose
    output is exactly what that branch adds to the residual stream: the
    branch itself for plain pre-norm blocks, the post-branch norm for Gemma's
    sandwich norms.
    """

    layers: str
    attn: str
    mlp: str
    attn_out: str
    down_proj: str
    final_norm: str
    head: str
    embed: str
    attn_update: str | None = None
    mlp_update: str | None = None
    context_attr: str = "max_position_embeddings"
    #: Linear maps quantized together (engines fuse q/k/v and gate/up, so they share one config), per sublayer.
    quant_groups: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("attn.o", ("self_attn.o_proj",)),
        ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.down", ("mlp.down_proj",)),
    )
    #: llama.cpp's name (``blk.N.<name>.weight``) of each quantized linear map.
    gguf_names: tuple[tuple[str, str], ...] = (
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    )
    #: GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear.
    transposed: bool = False


_LLAMA_LIKE = Spec(
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    attn_out="self_attn.o_proj",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    head="lm_head",
    embed="model.embed_tokens",
)

SPECS: dict[str, Spec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    # Gemma's sandwich norms: a branch's update is its post-norm's output.
    "gemma3_text": replace(
        _LLAMA_LIKE, attn_update="post_attention_layernorm", mlp_update="post_feedforward_layernorm"
    ),
    "gpt2": Spec(
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        attn_out="attn.c_proj",
        down_proj="mlp.c_proj",
        final_norm="transformer.ln_f",
        head="lm_head",
        embed="transformer.wte",
        context_attr="n_positions",
        quant_groups=(
            ("attn.qkv", ("attn.c_attn",)),
            ("attn.o", ("attn.c_proj",)),
            ("mlp.up", ("mlp.c_fc",)),
            ("mlp.down", ("mlp.c_proj",)),
        ),
        gguf_names=(
            ("attn.c_attn", "attn_qkv"),
            ("attn.c_proj", "attn_output"),
            ("mlp.c_fc", "ffn_up"),
            ("mlp.c_proj", "ffn_down"),
        ),
        transposed=True,
    ),
}


def supported() -> list[str]:
    """Model types (``config.model_type``) layerwise can analyse."""
    return sorted(SPECS)


def parse_unit(name: str) -> tuple[int, Kind]:
    """``"L7.attn"`` -> ``(7, "attn")``; ``"L7"`` -> ``(7, "block")``."""
    m = _UNIT_RE.match(name)
    if not m:
        raise LayerwiseError(f"bad unit name {name!r}: use L<i>, L<i>.attn or L<i>.mlp (e.g. L7.attn)")
    return int(m.group(1)), cast(Kind, m.group(2) or "block")


def unit_name(layer: int, kind: Kind) -> str:
    """Inverse of :func:`parse_unit`."""
    return f"L{layer}" if kind == "block" else f"L{layer}.{kind}"


def first_tensor(output: object) -> torch.Tensor:
    """Attention modules return ``(output, weights)``; other modules a tensor."""
    return cast(torch.Tensor, output[0] if isinstance(output, tuple) else output)


class Anatomy:
    """A model seen as a stack of blocks, each an attention and an MLP branch."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SPECS:
            raise LayerwiseError(
                f"unsupported architecture {model_type!r}; layerwise supports: {', '.join(supported())} "
                "(add an adapter in layerwise/anatomy.py)"
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = SPECS[model_type]
        self.blocks = cast(nn.ModuleList, model.get_submodule(self.spec.layers))

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, self.spec.context_attr, None)

    def units(self) -> list[str]:
        """All unit names in depth order: L0, L0.attn, L0.mlp, L1, ..."""
        return [unit_name(i, k) for i in range(self.n_layers) for k in KINDS]

    def check_unit(self, name: str) -> tuple[int, Kind]:
        layer, kind = parse_unit(name)
        if not 0 <= layer < self.n_layers:
            raise LayerwiseError(f"unit {name} is out of range: this model has blocks L0..L{self.n_layers - 1}")
        return layer, kind

    def branch(self, layer: int, kind: Kind) -> nn.Module:
        """The attention or MLP module of a block (what skipping replaces)."""
        block = self.blocks[layer]
        return block.get_submodule(self.spec.attn if kind == "attn" else self.spec.mlp)

    def update_module(self, layer: int, kind: Kind) -> nn.Module:
        """The module whose output (first tensor) is the branch's residual update."""
        path = self.spec.attn_update if kind == "attn" else self.spec.mlp_update
        return self.blocks[layer].get_submodule(path) if path else self.branch(layer, kind)

    def down_proj(self, layer: int) -> nn.Module:
        """The MLP's output projection; its input is the MLP hidden activation."""
        return self.blocks[layer].get_submodule(self.spec.down_proj)

    def out_proj(self, layer: int, kind: Kind) -> nn.Module:
        """The last linear map of a branch: zeroing it (and its bias) makes the branch add nothing."""
        if kind == "block":
            raise LayerwiseError("a block has no single output projection; name L{i}.attn or L{i}.mlp")
        return self.blocks[layer].get_submodule(self.spec.attn_out if kind == "attn" else self.spec.down_proj)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(key-value heads, head dimension) of one attention layer's cache entry."""
        cfg: Any = self.model.config
        heads: int = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def quant_groups(
        self, layer: int, *, fused: bool | tuple[str, ...] = True
    ) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
        """``[(group name like "L3.attn.qkv", [(module path, module), ...]), ...]`` for one block.

        ``fused=False`` gives every linear map a group of its own (``L3.attn.q_proj``):
        llama.cpp stores and types each tensor separately. A tuple of group names (``("mlp.gate_up",)``) keeps
        those together and splits the rest.
        """
        block = self.blocks[layer]
        kept = {g for g, _ in self.spec.quant_groups} if fused is True else set(fused or ())
        groups = [
            one
            for g, paths in self.spec.quant_groups
            for one in (
                [(g, list(paths))] if g in kept else [(f"{g.split('.')[0]}.{p.rsplit('.', 1)[-1]}", [p]) for p in paths]
            )
        ]
        return [
            (f"L{layer}.{g}", [(f"{self.spec.layers}.{layer}.{p}", block.get_submodule(p)) for p in paths])
            for g, paths in groups
        ]

    def gguf_name(self, path: str) -> str:
        """llama.cpp's tensor name for a quantized linear map's module path (``blk.3.attn_q.weight``)."""
        prefix = f"{self.spec.layers}."
        layer, _, rel = path.removeprefix(prefix).partition(".")
        names = dict(self.spec.gguf_names)
        if not path.startswith(prefix) or not layer.isdigit() or rel not in names:
            raise LayerwiseError(f"{path} has no llama.cpp tensor name for {self.model_type}")
        return f"blk.{layer}.{names[rel]}.weight"

    def linear_weight(self, module: nn.Module) -> torch.Tensor:
        """A linear map's weight as (out, in), whatever the storage convention (GPT-2's Conv1D blocks store it (in,
        out); its head is a plain Linear)."""
        weight = module.get_parameter("weight")
        return weight.T if self.spec.transposed and not isinstance(module, nn.Linear) else weight

    def linear_shape(self, module: nn.Module) -> tuple[int, int]:
        """(out, in) of a linear map (the head too: its rows are the vocabulary)."""
        out_features, in_features = self.linear_weight(module).shape
        return out_features, in_features

    def ties(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The quantization groups whose maps ``names`` lists by short name (``q,k,v``, ``gate,up``: each map's last
        name without ``_proj``): the groups a plan gives one type. One line naming the ties there are otherwise."""
        short = {
            g: [p.rsplit(".", 1)[-1].removesuffix("_proj") for p in paths]
            for g, paths in self.spec.quant_groups
            if len(paths) > 1
        }
        tied = tuple(g for g, members in short.items() if set(members) <= set(names))
        left = set(names) - {m for g in tied for m in short[g]}
        if left:
            there = " or ".join(",".join(m) for m in short.values()) or "none"
            raise LayerwiseError(
                f"`tie` names maps that run together, all of a group ({there} for {self.model_type}); "
                f"{','.join(n for n in names if n in left)} is not such a group"
            )
        return tied

    def weight_matrices(self, layer: int, kind: Kind) -> list[tuple[str, torch.Tensor]]:
        """Named 2-D weights of a unit (Linear and GPT-2 Conv1D alike)."""
        root = self.blocks[layer] if kind == "block" else self.branch(layer, kind)
        prefix = f"{self.spec.layers}.{layer}." + (
            "" if kind == "block" else (self.spec.attn if kind == "attn" else self.spec.mlp) + "."
        )
        return [(prefix + n, p) for n, p in root.named_parameters() if p.ndim == 2]

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.spec.head)

    @property
    def embed(self) -> nn.Embedding:
        return cast(nn.Embedding, self.model.get_submodule(self.spec.embed))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Read the residual stream out as the model does: final norm, head, softcap."""
        norm, head = self.final_norm, self.head
        h = h.to(next(norm.parameters()).device)
        z = norm(h)
        where = head.get_parameter("weight").device  # meta: the engine reads the head a slice at a time
        logits = head(z if where.type == "meta" else z.to(where))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
