"""The only module that knows module names, per architecture.

Every other part of layerwise talks about *units* (``L7``, ``L7.attn``,
``L7.mlp``) and asks an :class:`Anatomy` for the modules behind them. Adding
an architecture means adding one :class:`Spec` to ``SPECS`` and one tiny-model
test. In a mixture-of-experts block ``L7.mlp`` is the whole sparse MLP, and its
parts are units of their own: ``L7.mlp.e3`` (expert 3), ``L7.mlp.shared`` (the
always-on shared experts) and ``L7.router``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import torch
from torch import nn

from .errors import LayerwiseError

Kind = Literal["block", "attn", "mlp"]
KINDS: tuple[Kind, ...] = ("block", "attn", "mlp")
_UNIT_RE = re.compile(r"^L(\d+)(?:\.(attn|mlp))?$")
Part = Literal["expert", "shared", "router"]
_PART_RE = re.compile(r"^L(\d+)\.(?:mlp\.e(\d+)|mlp\.(shared)|(router))$")


@dataclass(frozen=True)
class MoE:
    """Where a sparse MLP keeps its parts, relative to a block. transformers stores a layer's experts as one module
    whose 3-D weights hold one matrix per expert along the first axis; the router is a linear map with a row per
    expert; shared experts are a plain MLP every token passes."""

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    shared: str | None = None
    #: gpt-oss stores each expert's matrices as (in, out).
    transposed: bool = False
    #: gpt-oss interleaves the gate's and the up map's rows in its fused gate_up tensor; the others put the gate's
    #: rows first.
    interleaved: bool = False
    #: gpt-oss's sparse MLP returns (update, router scores).
    pair_out: bool = False
    #: How the router turns its logits into each token's experts and weights: softmax over every expert, then the
    #: top k ("softmax_topk", renormalized where the router says so); the top k logits, then softmax over them
    #: (gpt-oss); sigmoid scores chosen by group and corrected by a bias (DeepSeek-V3).
    rule: Literal["softmax_topk", "topk_softmax", "sigmoid_groups"] = "softmax_topk"
    #: How the config says which blocks are sparse: every block ("all"), all but those Qwen's ``mlp_only_layers``
    #: lists ("listed", with ``decoder_sparse_step``), or all after DeepSeek's ``first_k_dense_replace`` ("prefix").
    layout: Literal["all", "listed", "prefix"] = "all"
    #: The config entry holding the routed experts' count (one count for every sparse block).
    count: str = "num_experts"
    #: The linear map that scales the shared experts' output per token (Qwen2-MoE's), where there is one.
    shared_gate: str | None = None
    #: llama.cpp's merged expert tensors (``blk.N.<name>.weight``, one matrix per expert) that read the inputs of each
    #: experts tensor's per-expert matrices: gate and up read the token, down the expert's hidden activation.
    gguf_experts: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("gate_up_proj", ("ffn_gate_exps", "ffn_up_exps")),
        ("down_proj", ("ffn_down_exps",)),
    )


@dataclass(frozen=True, eq=False)
class Weight:
    """One quantized weight: a linear map's, or one of a sparse block's experts tensors (gate, up or down of every
    expert), always seen as (out, in) matrices.

    Every consumer (measurement, plans, exports) reads and writes weights through this handle, so none of them needs
    to know that GPT-2 stores (in, out) or that transformers keeps all of a block's experts in one 3-D parameter with
    the gate's and the up map's rows fused. Handles compare by identity (dictionary keys within one plan).
    """

    module: nn.Module
    attr: str = "weight"
    #: Stored as (..., in, out): GPT-2's Conv1D, gpt-oss's experts.
    transposed: bool = False
    #: The rows of each (out, in) matrix that are this weight's (the gate's or the up map's of a fused tensor).
    rows: slice = field(default_factory=lambda: slice(None))

    def view(self) -> torch.Tensor:
        """The parameter as (..., out, in), this weight's rows only: a view, so writing it writes the model."""
        w = self.module.get_parameter(self.attr)
        return (w.transpose(-1, -2) if self.transposed else w)[..., self.rows, :]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, in), an experts tensor's matrices stacked by rows: how every format here stores it (each row is
        quantized on its own, and llama.cpp stores a merged experts tensor the same way)."""
        v = self.view()
        return v.numel() // v.shape[-1], v.shape[-1]


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
    #: Quantized maps a block has or lacks by its config (DeepSeek-V3's ``q_proj`` without a query rank, its
    #: ``q_a_proj`` and ``q_b_proj`` with one): left out of their group where the block lacks them.
    optional: tuple[str, ...] = ()
    #: Maps llama.cpp's converter writes as two tensors it multiplies by other inputs (DeepSeek's kv_b_proj), with
    #: the tensors' names.
    gguf_split: tuple[tuple[str, str], ...] = ()
    #: GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear.
    transposed: bool = False
    #: The sparse MLP's parts, in models whose blocks (all, or every k-th) route tokens to experts.
    moe: MoE | None = None


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
    "qwen3_moe": replace(_LLAMA_LIKE, moe=MoE(layout="listed")),
    "qwen2_moe": replace(
        _LLAMA_LIKE, moe=MoE(shared="mlp.shared_expert", layout="listed", shared_gate="mlp.shared_expert_gate")
    ),
    "mixtral": replace(_LLAMA_LIKE, moe=MoE(count="num_local_experts")),
    "olmoe": replace(_LLAMA_LIKE, moe=MoE()),
    "gpt_oss": replace(
        _LLAMA_LIKE,
        moe=MoE(
            router="mlp.router",
            transposed=True,
            interleaved=True,
            pair_out=True,
            rule="topk_softmax",
            count="num_local_experts",
        ),
    ),
    # Latent attention: the query and the key-value latent are made by down- and up-projections, the query's
    # down-projection absent where the config has no query rank. vLLM runs the two down-projections as one
    # (``fused_qkv_a_proj``), so they share a scheme; llama.cpp splits kv_b_proj into attn_k_b and attn_v_b.
    "deepseek_v3": replace(
        _LLAMA_LIKE,
        quant_groups=(
            ("attn.qkv_a", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
            ("attn.q", ("self_attn.q_proj",)),
            ("attn.q_b", ("self_attn.q_b_proj",)),
            ("attn.kv_b", ("self_attn.kv_b_proj",)),
            *_LLAMA_LIKE.quant_groups[1:],
        ),
        gguf_names=(
            ("self_attn.q_a_proj", "attn_q_a"),
            ("self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"),
            ("self_attn.q_b_proj", "attn_q_b"),
            *_LLAMA_LIKE.gguf_names,
        ),
        optional=("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj"),
        gguf_split=(("self_attn.kv_b_proj", "attn_k_b and attn_v_b"),),
        moe=MoE(shared="mlp.shared_experts", layout="prefix", rule="sigmoid_groups", count="n_routed_experts"),
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
    if not m and parse_part(name):
        raise LayerwiseError(
            f"{name} is a part of a sparse MLP; this takes blocks and sublayers: L<i>, L<i>.attn or L<i>.mlp"
        )
    if not m:
        raise LayerwiseError(f"bad unit name {name!r}: use L<i>, L<i>.attn or L<i>.mlp (e.g. L7.attn)")
    return int(m.group(1)), cast(Kind, m.group(2) or "block")


def unit_name(layer: int, kind: Kind) -> str:
    """Inverse of :func:`parse_unit`."""
    return f"L{layer}" if kind == "block" else f"L{layer}.{kind}"


def parse_part(name: str) -> tuple[int, Part, int | None] | None:
    """``"L7.mlp.e3"`` -> ``(7, "expert", 3)``, ``"L7.mlp.shared"`` -> ``(7, "shared", None)``, ``"L7.router"`` ->
    ``(7, "router", None)``; None for any other name."""
    m = _PART_RE.match(name)
    if not m:
        return None
    part: Part = "expert" if m.group(2) is not None else "shared" if m.group(3) else "router"
    return int(m.group(1)), part, None if m.group(2) is None else int(m.group(2))


def part_name(layer: int, part: Part, expert: int | None = None) -> str:
    """Inverse of :func:`parse_part`."""
    return (
        f"L{layer}.router" if part == "router" else f"L{layer}.mlp." + ("shared" if part == "shared" else f"e{expert}")
    )


def depth_key(name: str) -> tuple[int, int, int]:
    """Sorts unit and part names in depth order: ``L3``, ``L3.attn``, ``L3.mlp``, ``L3.router``, ``L3.mlp.e0``, ...,
    ``L3.mlp.shared``, ``L4``."""
    parsed = parse_part(name)
    if parsed is None:
        layer, kind = parse_unit(name)
        return layer, KINDS.index(kind), 0
    layer, part, expert = parsed
    return layer, len(KINDS) + ("router", "expert", "shared").index(part), expert or 0


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


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
        moe = self.spec.moe
        #: The blocks whose MLP routes tokens to experts: every block, or every k-th, or all but the first few.
        self.moe_layers: list[int] = (
            [] if moe is None else [i for i, b in enumerate(self.blocks) if _has(b, moe.experts)]
        )

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
        """A dense MLP's output projection; its input is the MLP hidden activation."""
        if layer in self.moe_layers:
            raise LayerwiseError(f"L{layer}.mlp routes to experts and has no single output projection")
        return self.blocks[layer].get_submodule(self.spec.down_proj)

    def mlp_width(self, layer: int) -> int:
        """The widest hidden activation a token makes in this block's MLP: a dense MLP's width; in a sparse one,
        its chosen experts' and its shared experts' together."""
        if layer not in self.moe_layers:
            return self.linear_shape(self.down_proj(layer))[1]
        shared = self.shared(layer)
        wide = 0 if shared is None else self.linear_shape(shared.get_submodule("down_proj"))[1]
        down = next(w for n, w in self.expert_matrices(layer, 0) if n.endswith(".down_proj.0"))
        return self.top_k * down.shape[1] + wide

    def out_params(self, layer: int, kind: Kind) -> list[nn.Parameter]:
        """The last linear map of a branch (weight and bias; every expert's and the shared experts' in a sparse
        MLP): zeroing them makes the branch add nothing."""
        if kind == "block":
            raise LayerwiseError("a block has no single output projection; name L{i}.attn or L{i}.mlp")
        block, moe = self.blocks[layer], self.spec.moe
        if kind == "mlp" and moe is not None and layer in self.moe_layers:
            experts = self.experts(layer)
            shared = [] if moe.shared is None else list(block.get_submodule(f"{moe.shared}.down_proj").parameters())
            return [p for n, p in experts.named_parameters() if n.startswith("down_proj")] + shared
        return list(block.get_submodule(self.spec.attn_out if kind == "attn" else self.spec.down_proj).parameters())

    @property
    def top_k(self) -> int:
        """Experts each token is routed to."""
        return int(getattr(self.model.config, "num_experts_per_tok", 1))

    def experts(self, layer: int) -> nn.Module:
        """The module holding a sparse MLP's routed experts."""
        return self.blocks[layer].get_submodule(self._moe(layer).experts)

    def sparse_layers(self) -> dict[nn.Module, int]:
        """Each sparse block's experts module -> the block: which quantized weights hold every expert's matrix (an
        experts weight is an attribute of that module, so a weight's module tells)."""
        return {self.experts(k): k for k in self.moe_layers}

    def router(self, layer: int) -> nn.Module:
        """The linear map that scores each expert for each token (one row per expert)."""
        return self.blocks[layer].get_submodule(self._moe(layer).router)

    def router_bias(self, layer: int) -> torch.Tensor | None:
        """The router's per-expert bias that decides which experts are chosen (gpt-oss's logit bias, DeepSeek-V3's
        correction bias), where it has one: -inf there and an expert is never chosen, under every runtime."""
        router = self.router(layer)
        for name in ("e_score_correction_bias", "bias"):
            t = getattr(router, name, None)
            if isinstance(t, torch.Tensor):
                return t
        return None

    def shared(self, layer: int) -> nn.Module | None:
        """The shared experts every token passes, where the architecture has them."""
        path = self._moe(layer).shared
        return None if path is None else self.blocks[layer].get_submodule(path)

    def n_experts(self, layer: int) -> int:
        """Routed experts in this block (from the router's rows, one per expert, so a model with experts dropped
        counts right, and so does one whose expert tensors are split while it trains by expert)."""
        return self.router(layer).get_parameter("weight").shape[0]

    def kept_experts(self, layer: int, removed: list[int]) -> list[int]:
        """The experts of block ``layer`` left when ``removed`` go, in order: their new numbers are their places
        here."""
        gone = set(removed)
        return [j for j in range(self.n_experts(layer)) if j not in gone]

    @property
    def expert_groups(self) -> int:
        """The equal groups a router chooses its experts within (DeepSeek-V3's ``n_group``), 1 where it chooses among
        all: with more than one, deleting experts would reshape the groups."""
        moe = self.spec.moe
        grouped = moe is not None and moe.rule == "sigmoid_groups"
        return int(getattr(self.model.config, "n_group", 1) or 1) if grouped else 1

    def by_expert(self, layer: int) -> list[torch.Tensor]:
        """Every tensor of this block indexed by expert along its first axis: the experts' weights and biases, the
        router's rows, bias and correction bias (what deleting an expert cuts)."""
        return [
            t
            for m in (self.experts(layer), self.router(layer))
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
        ]

    def expert_matrices(self, layer: int, expert: int) -> list[tuple[str, torch.Tensor]]:
        """One expert's matrices as (out, in) views into its layer's 3-D weights, named
        ``<weight path>.<expert>``."""
        moe, prefix = self._moe(layer), f"{self.spec.layers}.{layer}.{self._moe(layer).experts}."
        return [
            (f"{prefix}{n}.{expert}", p[expert].T if moe.transposed else p[expert])
            for n, p in self.experts(layer).named_parameters()
            if p.ndim == 3
        ]

    def part_matrices(self, layer: int, part: Part, expert: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """A sparse MLP's part's weight matrices, named as :meth:`weight_matrices` names them: an expert's two, the
        router's, or the shared experts' maps."""
        moe, prefix = self._moe(layer), f"{self.spec.layers}.{layer}."
        if part == "expert":
            return self.expert_matrices(layer, int(expert or 0))
        path = moe.router if part == "router" else moe.shared
        module = self.blocks[layer].get_submodule(path or "")
        return [(f"{prefix}{path}.{n}", p) for n, p in module.named_parameters() if p.ndim == 2]

    def parts(self) -> list[str]:
        """The parts of every sparse MLP in depth order: L1.router, L1.mlp.e0, ..., L1.mlp.shared, L2.router, ..."""
        return [name for i in self.moe_layers for name in self.layer_parts(i)]

    def layer_parts(self, layer: int) -> list[str]:
        """The parts of one block's sparse MLP (none in a dense block): its router, experts and shared experts."""
        if layer not in self.moe_layers:
            return []
        return [
            part_name(layer, "router"),
            *(part_name(layer, "expert", j) for j in range(self.n_experts(layer))),
            *([part_name(layer, "shared")] if self.shared(layer) is not None else []),
        ]

    def check_part(self, name: str) -> tuple[int, Part, int | None]:
        """A sparse MLP's part by name, or one line saying which parts there are."""
        parsed = parse_part(name)
        if parsed is None:
            raise LayerwiseError(f"bad part name {name!r}: use L<i>.mlp.e<j>, L<i>.mlp.shared or L<i>.router")
        layer, part, expert = parsed
        if layer not in self.moe_layers:
            where = ", ".join(f"L{i}" for i in self.moe_layers) or "none in this model"
            raise LayerwiseError(f"{name}: L{layer} has no experts (blocks with experts: {where})")
        if part == "expert" and not (expert is not None and expert < self.n_experts(layer)):
            raise LayerwiseError(f"{name}: L{layer} has experts e0..e{self.n_experts(layer) - 1}")
        if part == "shared" and self.shared(layer) is None:
            raise LayerwiseError(f"{name}: {self.model_type} has no shared experts")
        return parsed

    def sparse_config(self, keep: list[int]) -> dict[str, Any]:
        """The config entries that keep blocks ``keep`` (in this order, renumbered from 0) dense or sparse as they
        are now: what a checkpoint with other blocks cut out needs to reload with its experts where they were."""
        moe = self.spec.moe
        if moe is None or moe.layout == "all":
            return {}
        sparse = [i in self.moe_layers for i in keep]
        if moe.layout == "listed":
            return {"mlp_only_layers": [j for j, s in enumerate(sparse) if not s], "decoder_sparse_step": 1}
        return {"first_k_dense_replace": sparse.index(True) if any(sparse) else len(sparse)}

    def _moe(self, layer: int) -> MoE:
        if self.spec.moe is None or layer not in self.moe_layers:
            raise LayerwiseError(f"L{layer}.mlp has no experts")
        return self.spec.moe

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(key-value heads, head dimension) of one attention layer's cache entry."""
        cfg: Any = self.model.config
        heads: int = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def quant_groups(
        self, layer: int, *, fused: bool | tuple[str, ...] = True
    ) -> list[tuple[str, list[tuple[str, Weight]]]]:
        """``[(group name like "L3.attn.qkv", [(weight path, weight), ...]), ...]`` for one block.

        ``fused=False`` gives every weight a group of its own (``L3.attn.q_proj``): llama.cpp stores and types each
        tensor separately. A tuple of the spec's group names (``("mlp.gate_up",)``) keeps those together (in a sparse
        block, the experts' and the shared experts' gate and up too) and splits the rest.

        A sparse block's experts are weights of their own, each holding every expert's matrix: ``L3.mlp.experts.gate``,
        ``.up`` and ``.down``, one type for each of llama.cpp's merged ``*_exps`` tensors. Fused (``True``), they
        are one group, ``L3.mlp.experts``: vLLM's fused MoE kernels run a layer's experts under one scheme. Shared
        experts are a plain MLP (``L3.mlp.shared.gate_up``, ``L3.mlp.shared.down``).
        """
        kept = {g for g, _ in self.spec.quant_groups} if fused is True else set(fused or ())
        out: list[tuple[str, list[tuple[str, Weight]]]] = []
        for key, group, members in self._quant_table(layer):
            paths = [(f"{self.spec.layers}.{layer}.{p}", w) for p, _, w in members]
            if fused is True and group.startswith("mlp.experts."):
                named = [("mlp.experts", paths)]  # vLLM's fused MoE kernels: one scheme for gate, up and down
            elif key in kept:
                named = [(group, paths)]
            else:
                named = [(f"{group.rsplit('.', 1)[0]}.{path.rsplit('.', 1)[-1]}", [(path, w)]) for path, w in paths]
            for g, ws in named:
                if out and out[-1][0] == f"L{layer}.{g}":
                    out[-1][1].extend(ws)
                else:
                    out.append((f"L{layer}.{g}", ws))
        return out

    def _quant_table(self, layer: int) -> list[tuple[str, str, list[tuple[str, str, Weight]]]]:
        """Block ``layer``'s quantized weights: ``[(the spec's group they fuse as, group, [(path in the block,
        llama.cpp's name, weight), ...]), ...]``. A sparse block's router stays as it is: llama.cpp keeps
        ``ffn_gate_inp`` unquantized and vLLM's configs leave the gate out."""
        block, moe = self.blocks[layer], self.spec.moe
        names = dict(self.spec.gguf_names)
        sparse = moe is not None and layer in self.moe_layers
        dense = [
            (g, kept)
            for g, paths in self.spec.quant_groups
            if not (sparse and g.startswith("mlp."))
            and (kept := tuple(p for p in paths if p not in self.spec.optional or _has(block, p)))
        ]
        missing = [p for _, paths in dense for p in paths if not _has(block, p)]
        if missing:
            raise LayerwiseError(
                f"{self.model_type}'s block has no {missing[0]}: layerwise does not know its matrices or llama.cpp's "
                "names for them"
            )
        table = [
            (g, g, [(p, names.get(p, ""), self._linear(block.get_submodule(p))) for p in paths]) for g, paths in dense
        ]
        if not sparse or moe is None:
            return table
        return table + self._experts_table(layer, moe) + self._shared_table(layer, moe)

    def _experts_table(self, layer: int, moe: MoE) -> list[tuple[str, str, list[tuple[str, str, Weight]]]]:
        """:meth:`_quant_table`'s rows for a sparse block's experts tensors: gate, up and down (each every expert's),
        in the rows of the fused gate_up tensor that the model's experts forward reads as each."""
        experts, table = self.experts(layer), []
        for attr, merged in moe.gguf_experts:
            short = [n.removeprefix("ffn_").removesuffix("_exps") for n in merged]
            n, k = experts.get_parameter(attr).shape[-1 if moe.transposed else -2], len(merged)
            rows = [slice(i, None, k) if moe.interleaved else slice(i * n // k, (i + 1) * n // k) for i in range(k)]
            members = [
                (f"{moe.experts}.{s}", m, Weight(experts, attr, moe.transposed, r))
                for s, m, r in zip(short, merged, rows)
            ]
            table.append((f"mlp.{'_'.join(short)}", f"mlp.experts.{'_'.join(short)}", members))
        return table

    def _shared_table(self, layer: int, moe: MoE) -> list[tuple[str, str, list[tuple[str, str, Weight]]]]:
        """:meth:`_quant_table`'s rows for a sparse block's shared experts: a plain MLP (``ffn_*_shexp``)."""
        if moe.shared is None:
            return []
        names, block = dict(self.spec.gguf_names), self.blocks[layer]

        def member(path: str) -> tuple[str, str, Weight]:
            rel, name = f"{moe.shared}.{path.split('.', 1)[1]}", names.get(path, "")
            return rel, f"{name}_shexp" if name else "", self._linear(block.get_submodule(rel))

        return [
            (g, f"mlp.shared.{g.split('.', 1)[1]}", [member(p) for p in paths])
            for g, paths in self.spec.quant_groups
            if g.startswith("mlp.")
        ]

    def _linear(self, module: nn.Module) -> Weight:
        """A linear map's weight (GPT-2's Conv1D blocks store it (in, out); its head is a plain Linear)."""
        return Weight(module, transposed=self.spec.transposed and not isinstance(module, nn.Linear))

    def _member(self, path: str) -> tuple[int, str, str, Weight]:
        """(block, path in the block, llama.cpp's short name, the weight) of a quantized weight's path
        (``model.layers.3.mlp.experts.gate``)."""
        prefix = f"{self.spec.layers}."
        layer, _, rel = path.removeprefix(prefix).partition(".")
        if path.startswith(prefix) and layer.isdigit() and int(layer) < self.n_layers:
            for _, _, members in self._quant_table(int(layer)):
                for p, name, w in members:
                    if p == rel:
                        return int(layer), rel, name, w
        raise LayerwiseError(f"{path} is not a weight layerwise quantizes in this {self.model_type} model")

    def weight(self, path: str) -> Weight:
        """The quantized weight at ``path`` (a path :meth:`quant_groups` gives, as a saved plan holds it)."""
        return self._member(path)[3]

    def gguf_name(self, path: str) -> str:
        """llama.cpp's tensor name for a quantized weight's path (``blk.3.attn_q.weight``, ``blk.3.ffn_up_exps.weight``
        for every expert's up map)."""
        return self._tensor_name(*self._member(path)[:3])

    def _tensor_name(self, layer: int, rel: str, name: str) -> str:
        """llama.cpp's tensor name of block ``layer``'s quantized weight ``rel``; one line where it has none."""
        split = dict(self.spec.gguf_split).get(rel)
        if split:
            raise LayerwiseError(
                f"llama.cpp splits {self.model_type}'s {rel} into {split} and multiplies them by other inputs than "
                "the ones it reads here, so layerwise cannot weigh them; make this model's importance matrix with "
                "llama-imatrix on its GGUF file"
            )
        if not name:
            raise LayerwiseError(f"{self.spec.layers}.{layer}.{rel} has no llama.cpp tensor name for {self.model_type}")
        return f"blk.{layer}.{name}.weight"

    def gguf_matrices(self, layer: int) -> dict[str, nn.Module]:
        """Block ``layer``'s linear maps by llama.cpp's tensor names (``blk.3.attn_q.weight``): the quantized ones but
        the experts tensors (:meth:`gguf_experts`), and in a sparse block its router (``ffn_gate_inp``) and shared
        experts' gate (``ffn_gate_inp_shexp``), every one llama.cpp runs as a matrix product; one line where the block
        lacks one of the spec's (an attention llama.cpp names otherwise) or llama.cpp has no tensor of one."""
        out = {
            self._tensor_name(layer, rel, name): w.module
            for _, _, members in self._quant_table(layer)
            for rel, name, w in members
            if w.attr == "weight"
        }
        moe = self.spec.moe
        if moe is None or layer not in self.moe_layers:
            return out
        out[f"blk.{layer}.ffn_gate_inp.weight"] = self.router(layer)
        if moe.shared_gate is not None:
            out[f"blk.{layer}.ffn_gate_inp_shexp.weight"] = self.blocks[layer].get_submodule(moe.shared_gate)
        return out

    def gguf_experts(self, layer: int) -> dict[str, tuple[str, ...]]:
        """A sparse block's experts tensors (by attribute of :meth:`experts`) and llama.cpp's merged tensors that
        read the inputs of their per-expert matrices (``blk.3.ffn_gate_exps.weight``, ...)."""
        return {attr: tuple(f"blk.{layer}.{n}.weight" for n in names) for attr, names in self._moe(layer).gguf_experts}

    def linear_shape(self, module: nn.Module) -> tuple[int, int]:
        """(out, in) of a linear map (the head too: its rows are the vocabulary)."""
        return self._linear(module).shape

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
        """Named 2-D weights of a unit (Linear and GPT-2 Conv1D alike; each expert's matrix of a 3-D expert weight,
        named ``<weight path>.<expert>``)."""
        root = self.blocks[layer] if kind == "block" else self.branch(layer, kind)
        prefix = f"{self.spec.layers}.{layer}." + (
            "" if kind == "block" else (self.spec.attn if kind == "attn" else self.spec.mlp) + "."
        )
        # a sparse MLP's 2-D expert tensors are biases
        experts = {id(p) for p in self.experts(layer).parameters()} if layer in self.moe_layers else set()
        stacked = [(f"{prefix}{n}.{j}", p[j]) for n, p in root.named_parameters() if p.ndim == 3 for j in range(len(p))]
        return [(prefix + n, p) for n, p in root.named_parameters() if p.ndim == 2 and id(p) not in experts] + stacked

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
