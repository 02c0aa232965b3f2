"""Dropping blocks and sublayers: choose them from a Profile, apply them, save what can be loaded.

Choosing (:func:`choose`): the least important units by any Profile metric
(ShortGPT's ``bi``, LLM-Drop's ``sub_cos`` with attention and MLP ranked
jointly, ``ablate_nll``...), the best contiguous run of blocks
(``argmax_i cos(h_i, h_{i+n})``), a seeded random choice, or the same
metric re-measured after each drop (``iterative``).

Applying: at run time :func:`layerwise.trace.skip` removes the units without
computing them. Saving (:func:`save_checkpoint`): dropped blocks are cut out
of the layer list, with the config's layer count, its per-layer lists and
every module's ``layer_idx`` renumbered, so plain transformers loads the
checkpoint and its KV cache works; a dropped sublayer has its output
projection zeroed (the same outputs anywhere) and is listed in the config,
so :func:`layerwise.load` skips it. :func:`export_gguf` writes the same cut
into a copy of the source GGUF file, for llama.cpp.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ggufio
from .anatomy import Anatomy, parse_part, parse_unit, unit_name
from .configs import DropConfig
from .data import Windows
from .engine import Streamed
from .errors import LayerwiseError
from .evaluate import (
    KL_KEYS,
    BlockVariant,
    folder_bytes,
    next_token_logits,
    param_count,
    quality,
    speed,
    streamed_quality,
)
from .experts import check_removable, cut, shut, without_experts
from .io import atomic_dir, load_result, provenance, read_json, save_model_config, save_shards, write_json
from .loading import LoadedModel
from .memory import peak_memory
from .metrics import stream as st
from .plans import check_plan_model, load_plans, save_plans
from .profile import UNIT_KINDS, Profile, check_order, needs, profile
from .trace import BlockTrace, skip, tap

if TYPE_CHECKING:
    from .loading import CausalLM

UnitChoice = Literal["block", "attn", "mlp", "any", "expert"]
UNIT_CHOICES: tuple[str, ...] = ("block", "attn", "mlp", "any", "expert")
SPECIAL_ORDERS = ("random", "contiguous")


@dataclass(frozen=True)
class DropPlan:
    """Which units to drop, in the order they were chosen, and why; made for the model whose hash it records.

    Saved beside the results (``plan.json``) so that a later run applies or
    exports it without measuring again: ``DropPlan.load(path).apply(lm)``.
    """

    units: list[str]
    unit: str
    order: str
    iterative: bool = False
    seed: int | None = None
    scores: dict[str, float] | None = None  # the order's value for each chosen unit, when it has one
    model_hash: str | None = None

    def apply(self, lm: LoadedModel) -> AbstractContextManager[nn.Module]:
        """The smaller model for the duration of a ``with`` (see :func:`applied`); refused for another model."""
        check_plan_model(self.model_hash, lm)
        return applied(lm, self)

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> DropPlan:
        """A plan from a drop result's ``plan.json`` (or its folder); ``key`` picks one plan of a sweep."""
        meta, _, d = load_plans(path, "drop", key)
        return cls(
            **{k: v for k, v in d.items() if k in cls.__dataclass_fields__} | {"model_hash": meta.get("model_hash")}
        )

    @property
    def blocks(self) -> list[int]:
        return sorted(parse_unit(u)[0] for u in _sublayers(self.units) if parse_unit(u)[1] == "block")

    @property
    def sublayers(self) -> list[str]:
        """Dropped sublayers that do not sit inside a dropped block, in depth order."""
        blocks = set(self.blocks)
        subs = [u for u in _sublayers(self.units) if parse_unit(u)[1] != "block" and parse_unit(u)[0] not in blocks]
        return sorted(subs, key=lambda u: (parse_unit(u)[0], parse_unit(u)[1]))

    @property
    def experts(self) -> dict[int, list[int]]:
        """Dropped experts by block, each block's in the order they were chosen."""
        return _experts(self.units)

    @property
    def key(self) -> str:
        """The plan's name in results and in ``plan.json``: ``unit/order/n``."""
        return f"{self.unit}/{self.order}/{len(self.units)}" + ("/iterative" if self.iterative else "")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        """``plan.json`` holding this plan alone, atomically (a run saves all its plans with its metadata)."""
        return save_plans(folder, "drop", {"model_hash": self.model_hash}, {self.key: self.to_dict()})


def _sublayers(units: list[str]) -> list[str]:
    """The blocks and sublayers among ``units`` (the rest name experts)."""
    return [u for u in units if parse_part(u) is None]


def _experts(units: list[str]) -> dict[int, list[int]]:
    """``{block: [expert, ...]}`` for the experts among ``units``, in their order."""
    out: dict[int, list[int]] = {}
    for u in units:
        parsed = parse_part(u)
        if parsed is not None:
            out.setdefault(parsed[0], []).append(int(parsed[2] or 0))
    return out


@contextmanager
def dropped(an: Anatomy, units: list[str]) -> Iterator[None]:
    """These units out of the forward for the duration: blocks and sublayers skipped, experts out of routing."""
    with skip(an, _sublayers(units)), without_experts(an, _experts(units)):
        yield


def given(an: Anatomy, units: list[str]) -> DropPlan:
    """A plan from unit names the user wrote (``--units L3,L7.attn``), checked against this model."""
    names = list(dict.fromkeys(u.strip() for u in units if u.strip()))
    if not names:
        raise LayerwiseError("`units` names no unit; name some, e.g. L3,L7.attn")
    plan = DropPlan(names, "given", "given")
    validate(an, plan)
    return plan


def validate(an: Anatomy, plan: DropPlan) -> None:
    """Every unit exists in this model, at least one block survives, and every sparse block keeps as many experts
    as each token is routed to."""
    subs = _sublayers(plan.units)
    if subs and len(subs) < len(plan.units):
        raise LayerwiseError("a plan drops experts, or blocks and sublayers, not both; drop them in two runs")
    for u in subs:
        an.check_unit(u)
    for u in plan.units:
        if parse_part(u) is None:
            continue
        layer, part, _ = an.check_part(u)
        if part != "expert":
            raise LayerwiseError(
                f"{u}: drop removes routed experts (L<i>.mlp.e<j>); drop L{layer}.mlp for the whole sparse MLP"
            )
    for layer, experts in plan.experts.items():
        check_removable(an, layer, experts)
    if len(plan.blocks) >= an.n_layers:
        raise LayerwiseError(f"the plan drops all {an.n_layers} blocks, which leaves no model; drop fewer blocks")


def candidates(an: Anatomy, unit: str) -> list[str]:
    if unit not in UNIT_KINDS:
        raise LayerwiseError(f"unknown `unit` {unit!r}; use one of {', '.join(UNIT_CHOICES)}")
    if unit == "expert":
        if not an.moe_layers:
            raise LayerwiseError(f"`unit` expert needs a model with experts; this {an.model_type} model has none")
        return [u for u in an.parts() if (parse_part(u) or (0, ""))[1] == "expert"]
    return [unit_name(i, k) for i in range(an.n_layers) for k in UNIT_KINDS[unit]]  # type: ignore[arg-type]


def _room(an: Anatomy, per_layer: int | None) -> dict[int, int]:
    """How many experts each sparse block can give up: ``per_layer``, or all but the ``top_k`` each token needs."""
    most = {i: an.n_experts(i) - an.top_k for i in an.moe_layers}
    if per_layer is not None and per_layer > min(most.values(), default=0):
        raise LayerwiseError(
            f"`per_layer` {per_layer} leaves a block fewer experts than the {an.top_k} each token is routed to; use "
            f"`per_layer` {min(most.values())} or fewer"
        )
    return most if per_layer is None else dict.fromkeys(most, per_layer)


def _pick(
    an: Anatomy, ranked: list[str], n: int, per_layer: int | None = None, taken: Collection[str] = ()
) -> list[str]:
    """The first ``n`` units of ``ranked`` (least important first) that can go beside ``taken``: experts only while
    their block has room (:func:`_room`)."""
    room = _room(an, per_layer) if an.moe_layers else {}
    for u in taken:
        parsed = parse_part(u)
        if parsed is not None:
            room[parsed[0]] -= 1
    out: list[str] = []
    for u in ranked:
        parsed = parse_part(u)
        if len(out) == n:
            break
        if parsed is None or room[parsed[0]] > 0:
            out.append(u)
            if parsed is not None:
                room[parsed[0]] -= 1
    return out


def _check_n(an: Anatomy, unit: str, n: int) -> None:
    pool = len(candidates(an, unit))
    if unit == "expert":
        pool = sum(_room(an, None).values())
    if n < 1:
        raise LayerwiseError(f"`n` must be at least 1 (got {n})")
    if unit == "block" and n >= an.n_layers:
        raise LayerwiseError(
            f"dropping {n} of {an.n_layers} blocks leaves no model; use `n` {an.n_layers - 1} or fewer"
        )
    if n > pool:
        what = (
            "experts this model can lose (each block keeps top-k)"
            if unit == "expert"
            else f"{unit} units this model has"
        )
        raise LayerwiseError(f"`n` {n} is more than the {pool} {what}; use `n` {pool} or fewer")


def needed(orders: list[str], units: tuple[str, ...] = ()) -> dict:
    """:func:`profile` options that measure every metric these orders rank by (``random`` and ``contiguous`` need
    none), for every expert too when ``units`` has ``expert``."""
    want = [needs(o, "expert" in units) for o in orders if o not in SPECIAL_ORDERS]
    return {
        "ablation": max((w["ablation"] for w in want), key=("none", "taylor", "exact").index, default="none"),
        "lens": any(w["lens"] for w in want),
        "attention": any(w["attention"] for w in want),
        "expert_ablation": any(w.get("expert_ablation", False) for w in want),
    }


def contiguous_scores(lm: LoadedModel, windows: Windows, n: int, *, batch_size: int = 4) -> list[float]:
    """``mean_t cos(h_i, h_{i+n})`` for every start i (ShortGPT's contiguous criterion), on the calibration windows."""
    an = lm.anatomy
    L = an.n_layers
    sums = [st.Moments() for _ in range(L - n + 1)]
    for batch in torch.split(windows.calibration, batch_size):
        stream: list[torch.Tensor] = []

        def on_block(tr: BlockTrace) -> None:
            if tr.layer == 0:
                stream.append(tr.h_in.detach().flatten(0, 1))
            stream.append(tr.h_out.detach().flatten(0, 1))

        with torch.no_grad(), tap(an, on_block, mlp_hidden=False):
            lm.model(input_ids=batch.to(lm.device), use_cache=False, logits_to_keep=1)
        for i, acc in enumerate(sums):
            acc.add(torch.nn.functional.cosine_similarity(stream[i].float(), stream[i + n].float(), dim=-1))
    return [float(acc.mean) for acc in sums]


def choose(
    lm: LoadedModel,
    windows: Windows,
    config: DropConfig | None = None,
    *,
    prof: Profile | None = None,
    progress: bool = True,
    **settings: Any,
) -> DropPlan:
    """Pick the config's ``n`` units (4 when not given) of its ``unit`` kind to drop, in its ``order``.

    Metric orders use ``prof`` when given (after checking it belongs to this
    model) and otherwise measure one on the calibration windows, with exact
    ablation only when the metric needs it. ``iterative`` re-measures after
    each drop with the dropped units skipped, then takes the next least
    important unit. ``settings`` are config fields (``n=6, order="bi"``).
    """
    cfg = DropConfig.of(config, **settings)
    if len(cfg.unit) != 1 or len(cfg.order) != 1:
        raise LayerwiseError("one plan takes one `unit` and one `order`; give several with `sweep`")
    return _ranked(lm, windows, cfg, _count(lm.anatomy, cfg), prof, progress)


def _count(an: Anatomy, cfg: DropConfig) -> int:
    """How many units one plan drops: ``n`` (4 when not given), or ``per_layer`` experts from every sparse block."""
    if cfg.per_layer is None:
        return 4 if cfg.n is None else cfg.n
    if cfg.unit != ("expert",):
        raise LayerwiseError("`per_layer` counts the experts dropped from each sparse block; use it with `unit` expert")
    candidates(an, "expert")
    _room(an, cfg.per_layer)
    return cfg.per_layer * len(an.moe_layers)


def _ranked(
    lm: LoadedModel, windows: Windows, cfg: DropConfig, n: int, prof: Profile | None, progress: bool
) -> DropPlan:
    """The ``n`` least important units of the config's first unit kind by its first order."""
    unit, order, iterative, seed, batch_size = cfg.unit[0], cfg.order[0], cfg.iterative, cfg.seed, cfg.batch_size
    an, made_for = lm.anatomy, lm.source.get("model_hash")
    pool = candidates(an, unit)
    _check_n(an, unit, n)
    if order in SPECIAL_ORDERS and iterative:
        raise LayerwiseError(f"`iterative` re-measures a metric after each drop; it does not apply to `order` {order}")
    if order == "random":
        shuffled = random.Random(seed).sample(pool, len(pool))
        return DropPlan(_pick(an, shuffled, n, cfg.per_layer), unit, order, seed=seed, model_hash=made_for)
    if order == "contiguous":
        if unit != "block":
            raise LayerwiseError("`order` contiguous removes a run of whole blocks; use it with `unit` block")
        if lm.streamed is not None:
            raise LayerwiseError(
                f"`order` contiguous compares whole streams of the model in memory; with `offload` "
                f"{lm.streamed.offload} rank by a profile metric (e.g. bi) or load the model with `offload` none"
            )
        runs = contiguous_scores(lm, windows, n, batch_size=batch_size)
        start = max(range(len(runs)), key=runs.__getitem__)
        units = [unit_name(i, "block") for i in range(start, start + n)]
        return DropPlan(units, unit, order, scores={units[0]: runs[start]}, model_hash=made_for)
    check_order(unit, order)
    if prof is not None:
        prof.check(lm)
    elif not iterative:
        prof = profile(lm, windows, **needs(order, unit == "expert"), batch_size=batch_size, progress=progress)
    if not iterative:
        assert prof is not None
        values = dict(prof.ranked(order, unit))
        units = _pick(an, list(values), n, cfg.per_layer)
        return DropPlan(units, unit, order, scores={u: values[u] for u in units}, model_hash=made_for)
    chosen_units: list[str] = []
    scores: dict[str, float] = {}
    for step in tqdm(range(n), desc="iterative drop", disable=not progress):
        if step > 0 or prof is None:
            with dropped(an, chosen_units):
                prof = profile(lm, windows, **needs(order, unit == "expert"), batch_size=batch_size, progress=False)
        values = dict(prof.ranked(order, unit, exclude=_covered(chosen_units)))
        name = _pick(an, list(values), 1, cfg.per_layer, chosen_units)[0]
        chosen_units.append(name)
        scores[name] = values[name]
    return DropPlan(chosen_units, unit, order, iterative=True, scores=scores, model_hash=made_for)


def _covered(units: list[str]) -> set[str]:
    """Units already gone: the chosen ones and the sublayers of chosen blocks."""
    out = set(units)
    for u in _sublayers(units):
        layer, kind = parse_unit(u)
        if kind == "block":
            out |= {unit_name(layer, "attn"), unit_name(layer, "mlp")}
    return out


@contextmanager
def without_blocks(lm: LoadedModel, blocks: list[int]) -> Iterator[CausalLM]:
    """Make ``lm.model`` the smaller model for the duration: blocks cut out, config and ``layer_idx`` renumbered.

    Everything is put back on exit, so the original stays usable; this is how
    a block-dropped checkpoint is saved and how its real speed is measured.
    """
    an, model = lm.anatomy, lm.model
    L = an.n_layers
    keep = [i for i in range(L) if i not in set(blocks)]
    if not keep:
        raise LayerwiseError("dropping every block leaves no model; drop fewer blocks")
    cfg = model.config
    parent_path, attr = an.spec.layers.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    old_layers = getattr(parent, attr)
    per_layer = {k: v for k, v in vars(cfg).items() if isinstance(v, list) and len(v) == L}
    sparse = an.sparse_config(keep)
    before = {k: getattr(cfg, k) for k in sparse}
    renumbered = [
        (m, m.layer_idx)
        for new, old in enumerate(keep)
        for m in old_layers[old].modules()
        if isinstance(getattr(m, "layer_idx", None), int)
    ]
    index = {old: new for new, old in enumerate(keep)}
    try:
        setattr(parent, attr, nn.ModuleList([old_layers[i] for i in keep]))
        cfg.num_hidden_layers = len(keep)
        for k, v in per_layer.items():
            setattr(cfg, k, [v[i] for i in keep])
        for k, v in sparse.items():
            setattr(cfg, k, v)
        for m, old in renumbered:
            m.layer_idx = index[old]
        yield model
    finally:
        setattr(parent, attr, old_layers)
        cfg.num_hidden_layers = L
        for k, v in (per_layer | before).items():
            setattr(cfg, k, v)
        for m, old in renumbered:
            m.layer_idx = old


@contextmanager
def zeroed(an: Anatomy, sublayers: list[str]) -> Iterator[list[nn.Parameter]]:
    """Zero the output projection (weight and bias; every expert's in a sparse MLP) of each sublayer for the
    duration; yield those parameters."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    params = [p for u in sublayers for p in an.out_params(*an.check_unit(u))]
    try:
        with torch.no_grad():
            for p in params:
                saved.append((p, p.detach().clone()))
                p.zero_()
        yield params
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


def renumbered_sublayers(plan: DropPlan) -> list[str]:
    """The plan's surviving dropped sublayers, named by their block's index in the smaller model."""
    blocks = plan.blocks
    out = []
    for u in plan.sublayers:
        layer, kind = parse_unit(u)
        out.append(unit_name(layer - sum(b < layer for b in blocks), kind))
    return out


@contextmanager
def applied(lm: LoadedModel, plan: DropPlan) -> Iterator[CausalLM]:
    """The real smaller model for the duration, as its checkpoint holds it: blocks cut out, dropped sublayers skipped,
    dropped experts deleted or, those a checkpoint can only list (:func:`saved_experts`), out of routing."""
    validate(lm.anatomy, plan)
    deleted, masked = saved_experts(lm.anatomy, plan)
    with (
        without_blocks(lm, plan.blocks) as small,
        skip(Anatomy(small), renumbered_sublayers(plan)),
        cut(lm.anatomy, deleted),
        without_experts(lm.anatomy, masked),
    ):
        yield small


@contextmanager
def _set(obj: object, values: dict[str, Any]) -> Iterator[None]:
    """Attributes of ``obj`` set for the duration, then put back as they were (or deleted if they were not)."""
    before = {k: getattr(obj, k) for k in values if hasattr(obj, k)}
    try:
        for k, v in values.items():
            setattr(obj, k, v)
        yield
    finally:
        for k in values:
            if k in before:
                setattr(obj, k, before[k])
            else:
                delattr(obj, k)


def saved_experts(an: Anatomy, plan: DropPlan) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The experts a checkpoint deletes, and those it can only list, by block (numbered as saved).

    transformers' config holds one expert count, so every sparse block deletes as many as the block that drops
    fewest (none under DeepSeek's grouped routing, whose equal groups deleting would reshape). A block's further
    experts stay in the file, listed in ``config.layerwise["masked_experts"]`` for :func:`layerwise.load` to route
    around; nothing pads the file silently.
    """
    experts = plan.experts
    m = 0 if an.expert_groups > 1 or len(experts) < len(an.moe_layers) else min(map(len, experts.values()), default=0)
    masked = {}
    for i, v in experts.items():
        keep = an.kept_experts(i, v[:m])
        if v[m:]:
            masked[i] = sorted(keep.index(j) for j in v[m:])
    return {i: v[:m] for i, v in experts.items() if m}, masked


def save_checkpoint(lm: LoadedModel, plan: DropPlan, out: str | Path) -> Path:
    """Write the smaller model as a plain Hugging Face checkpoint (safetensors) into ``out``, atomically.

    Dropped experts are deleted where the config's one expert count allows (:func:`saved_experts`); the rest get a
    -inf router bias where the router has one (:func:`layerwise.experts.shut`) and are otherwise listed in
    ``config.layerwise["masked_experts"]`` for :func:`layerwise.load` to route around.
    """
    validate(lm.anatomy, plan)
    if lm.anatomy.model_type == "gpt2" and getattr(lm.model.config, "scale_attn_by_inverse_layer_idx", False):
        raise LayerwiseError(
            "this GPT-2 scales attention by layer index, which renumbering would change; it cannot be saved with "
            "blocks dropped"
        )
    an = lm.anatomy
    deleted, masked = saved_experts(an, plan)
    # original names, before the renumbering
    names = {id(t): n for n, t in (*lm.model.named_parameters(remove_duplicate=False), *lm.model.named_buffers())}
    kept = {names[id(t)]: an.kept_experts(i, v) for i, v in deleted.items() for t in an.by_expert(i)}
    counts = {_count_key(an): len(next(iter(kept.values())))} if kept else {}
    with (
        without_blocks(lm, plan.blocks) as small,
        zeroed(an, plan.sublayers) as zero,
        cut(an, deleted),
        shut(an, masked) as listed,
        _set(small.config, {"layerwise": _record(lm, plan, listed), **counts}),
        atomic_dir(out, "checkpoint") as tmp,
    ):
        if lm.streamed is None:
            small.save_pretrained(tmp, safe_serialization=True)
        else:
            edits: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
            for p in zero:
                edits.setdefault(names[id(p)], []).append(torch.zeros_like)
            for name, keep in kept.items():
                edits.setdefault(name, []).append(partial(_rows, keep))
            for i, experts in masked.items():  # a bias parameter is empty in the skeleton: shut it as it is copied
                bias = an.router_bias(i)
                if isinstance(bias, nn.Parameter):
                    edits.setdefault(names[id(bias)], []).append(partial(_shut, experts))
            _copy_streamed(lm.streamed, small, names, edits, tmp)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
    return Path(out)


def _record(lm: LoadedModel, plan: DropPlan, masked: dict[int, list[int]]) -> dict:
    """What a dropped checkpoint's config says of the drop (``config.layerwise``)."""
    return {
        "dropped": plan.units,
        "dropped_sublayers": renumbered_sublayers(plan),
        "order": plan.order,
        "original_num_hidden_layers": lm.anatomy.n_layers,
        "source_model_hash": lm.source.get("model_hash"),
        **({"masked_experts": {str(i): v for i, v in masked.items()}} if masked else {}),
    }


def _rows(keep: list[int], t: torch.Tensor) -> torch.Tensor:
    return t[keep]


def _shut(experts: list[int], t: torch.Tensor) -> torch.Tensor:
    return t.index_fill(0, torch.tensor(experts), -torch.inf)


def _count_key(an: Anatomy) -> str:
    """The config entry holding the routed experts' count."""
    if an.spec.moe is None:
        raise LayerwiseError(f"this {an.model_type} model has no experts")
    return an.spec.moe.count


def _copy_streamed(
    s: Streamed,
    small: CausalLM,
    names: dict[int, str],
    edits: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]],
    out: Path,
    shard_bytes: int = 2**30,
) -> None:
    """Write ``small`` (the skeleton with blocks cut out) as a checkpoint by copying each tensor from the source
    checkpoint in its stored dtype, through its ``edits`` (by original name) in order, and the buffers the source
    holds from the skeleton, ``shard_bytes`` at most in memory.

    ``names`` gives each tensor's original name; a tied head (the embedding's tensor) is written once, as
    ``save_pretrained`` does.
    """
    stored: Counter[torch.dtype] = Counter()  # weights per stored dtype

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        written: set[str] = set()
        for new, param in small.named_parameters(remove_duplicate=False):
            key = s.keys[names[id(param)]]
            if key not in written:
                written.add(key)
                t = s.checkpoint.tensor(key)
                for edit in edits.get(names[id(param)], []):
                    t = edit(t)
                stored[t.dtype] += t.numel()
                yield new, t
        for new, buf in small.named_buffers():
            if names.get(id(buf)) in s.buffers:
                yield new, buf.detach().cpu()

    save_shards(tensors(), out, shard_bytes=shard_bytes)
    save_model_config(small, out, dtype=stored.most_common(1)[0][0])


#: llama.cpp's tensor names for a branch's output projection.
_GGUF_OUT = {"attn": "attn_output.", "mlp": "ffn_down."}
#: llama.cpp's tensors indexed by expert along their first (numpy) axis: the experts' matrices and biases, the
#: router's rows and bias, and DeepSeek's correction bias (not Qwen2-MoE's shared-expert gate, ``ffn_gate_inp_shexp``).
_GGUF_BY_EXPERT = re.compile(r"^(ffn_(gate|up|down|gate_up)_exps|ffn_gate_inp|exp_probs_b)\.")


def export_gguf(source: str | Path, plan: DropPlan, out: str | Path) -> Path:
    """Copy a GGUF file with the plan applied: dropped blocks removed and renumbered, dropped sublayers zeroed,
    dropped experts cut out of every tensor indexed by expert (the same number from every sparse block: the file
    holds one expert count).

    Tensors keep their stored types, so the file is exactly as big as the
    source minus what was removed; metadata (tokenizer included) is copied,
    with the block count, any per-layer arrays and the expert count cut to what is kept, and the blocks that
    slide over a window named where llama.cpp would otherwise choose them by their new index.
    """
    import gguf
    import numpy as np

    edit = _gguf_edit(source, plan)
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=edit.arch)
    count_experts = gguf.Keys.LLM.EXPERT_COUNT.format(arch=edit.arch)
    index = {old: new for new, old in enumerate(edit.keep)}
    zero = {(parse_unit(u)[0], _GGUF_OUT[parse_unit(u)[1]]) for u in plan.sublayers}

    def tensor(t) -> ggufio.Tensor | None:
        m = ggufio.BLOCK_TENSOR.match(t.name)
        if not m:
            return t.name, t.data, t.tensor_type
        layer, rest = int(m.group(1)), m.group(2)
        if layer not in index:
            return None
        data = t.data
        if any(layer == zl and rest.startswith(prefix) for zl, prefix in zero):
            data = np.zeros_like(data)  # all-zero blocks dequantize to zero in every GGML type
        if layer in edit.experts and _GGUF_BY_EXPERT.match(rest):
            data = data[edit.experts[layer]]  # whole rows: every GGML type quantizes along the innermost axis
        return f"blk.{index[layer]}.{rest}", data, t.tensor_type

    def field(name: str, value):
        if name == count_key:
            return len(edit.keep)
        if name == count_experts and edit.experts:
            return len(next(iter(edit.experts.values())))
        if name.startswith(f"{edit.arch}.") and isinstance(value, list) and len(value) == edit.blocks:
            return [value[i] for i in edit.keep]
        return value

    return ggufio.rewrite(source, out, tensor, field, edit.added)


@dataclass(frozen=True)
class _GGUFEdit:
    """What a plan changes in a GGUF file, known (and refused, if the file cannot hold it) before anything is
    written: the blocks it keeps, the experts each sparse block keeps, and the metadata keys written anew."""

    arch: str
    blocks: int
    keep: list[int]
    experts: dict[int, list[int]]
    added: dict[str, Any]


def _gguf_edit(source: str | Path, plan: DropPlan) -> _GGUFEdit:
    """The plan's edit of the GGUF file ``source``, from its header; one line for a plan the file cannot hold."""
    import gguf

    meta, infos = ggufio.header(source)
    arch = str(meta.get(gguf.Keys.General.ARCHITECTURE))
    L = int(meta[gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)])
    dropped = set(plan.blocks)
    if any(b >= L for b in dropped):
        raise LayerwiseError(f"{source} has {L} blocks; the plan drops block {max(dropped)}")
    keep = [i for i in range(L) if i not in dropped]
    experts = _gguf_experts(meta, [t.name for t in infos], arch, plan)
    return _GGUFEdit(arch, L, keep, experts, _swa_pattern(meta, arch, L, keep))


def _swa_pattern(meta: dict[str, Any], arch: str, L: int, keep: list[int]) -> dict[str, list[bool]]:
    """The kept blocks' sliding-window pattern, written block by block: without it, llama.cpp would slide blocks by
    their new indices, not the ones the model slides (a dropped block shifts every block after it). One line for a
    copy where no block slides, which llama.cpp's graph for these architectures asserts against."""
    import gguf

    slides = ggufio.sliding(meta, arch, L)
    if slides is None or len(keep) == L:
        return {}
    kept = [slides[i] for i in keep]
    if not any(kept):
        raise LayerwiseError(
            f"llama.cpp runs a {arch} GGUF file only with a sliding-window block, and this plan keeps none (blocks "
            f"{', '.join(str(i) for i in range(L) if slides[i])} slide); keep one, or export hf"
        )
    return {gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch): kept}


def _gguf_experts(meta: dict[str, Any], names: list[str], arch: str, plan: DropPlan) -> dict[int, list[int]]:
    """Per sparse block, the experts it keeps; one line for a plan a GGUF file cannot hold: it has one expert count
    and no way to shut an expert off, so every sparse block must drop as many."""
    import gguf

    if not plan.experts:
        return {}
    count = meta.get(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch))
    routers = (ggufio.BLOCK_TENSOR.match(t) for t in names)
    sparse = sorted({int(m.group(1)) for m in routers if m and m.group(2).startswith("ffn_gate_inp.")})
    if count is None or not sparse:
        raise LayerwiseError("the plan drops experts, but the GGUF file has none; drop blocks or sublayers")
    counts = {i: len(plan.experts.get(i, [])) for i in sparse}
    if len(set(counts.values())) > 1:
        uneven = ", ".join(f"L{i} {n}" for i, n in counts.items() if n != max(counts.values()))
        raise LayerwiseError(
            f"a GGUF file holds one expert count for every block, and this plan drops {max(counts.values())} experts "
            f"from some blocks but fewer from others ({uneven}); drop with `per_layer` (--per-layer N), or export hf"
        )
    return {i: [j for j in range(int(count)) if j not in plan.experts[i]] for i in sparse}


def _effective_params(model: nn.Module, an: Anatomy, sublayers: list[str], *, in_bytes: bool = False) -> int:
    """Parameters that still compute: a skipped sublayer's whole branch counts for nothing."""
    return param_count(model, [an.branch(*an.check_unit(u)) for u in sublayers], in_bytes=in_bytes)


def measure(
    lm: LoadedModel,
    plans: dict[str, DropPlan],
    eval_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    with_speed: bool = True,
    speed_repeats: int = 5,
    progress: bool = False,
) -> tuple[dict, dict[str, dict]]:
    """Held-out quality of each plan against the original, and parameters and speed of every model.

    Returns the original's figures and one dict per plan. Quality runs with
    the units skipped (the same numbers as the saved model, which a test
    checks); speed and parameters come from the real smaller model. A model whose weights stay on disk is
    evaluated block by block (:func:`streamed_quality`) and has no speed: its rate would be the disk's.
    """
    an, model = lm.anatomy, lm.model
    if lm.streamed is not None:
        if with_speed:
            raise LayerwiseError(
                "speed is not measured on a model run one block at a time (it would time the weights' reads); "
                "turn `with_speed` off"
            )
        variants: dict[str, BlockVariant] = {key: partial(_skipped_in, an, plan.units) for key, plan in plans.items()}
        q = streamed_quality(lm, variants, eval_ids, batch_size=batch_size, progress=progress, desc="held-out quality")
    else:
        cands = {key: next_token_logits(model, partial(dropped, an, plan.units)) for key, plan in plans.items()}
        q = quality(
            next_token_logits(model),
            cands,
            eval_ids,
            batch_size=batch_size,
            device=lm.device,
            progress=progress,
            desc="held-out quality",
        )
    vocab = int(model.config.vocab_size)
    first = next(iter(q.values()))
    original: dict = {
        "ppl": first["ref_ppl"],
        "ppl_se": first["ref_ppl_se"],
        "nll": first["ref_nll"],
        "params": param_count(model),
        "weight_bytes": param_count(model, in_bytes=True),
        "n_windows": first["n_windows"],
        "n_tokens": first["n_tokens"],
    }

    def original_speed() -> dict:
        return speed(model, vocab=vocab, device=lm.device, repeats=speed_repeats)

    before = original_speed() if with_speed else {}
    results = {}
    for key, plan in tqdm(plans.items(), desc="speed", disable=not (progress and with_speed)):
        r = {k: q[key][k] for k in ("ppl", "ppl_se", "nll", "delta_nll", "delta_nll_se", "kl", "kl_se", *KL_KEYS)}
        with applied(lm, plan) as small:
            small_an, subs = Anatomy(small), renumbered_sublayers(plan)
            r["params"] = _effective_params(small, small_an, subs)
            r["weight_bytes"] = _effective_params(small, small_an, subs, in_bytes=True)
            if with_speed:
                r |= speed(small, vocab=vocab, device=lm.device, repeats=speed_repeats)
        r["params_ratio"] = r["params"] / original["params"]
        results[key] = r
    if with_speed:
        # The original is timed before and after the variants, and its faster run kept,
        # so a disturbance of the machine at either end cannot inflate every speedup.
        after = original_speed()
        original |= {k: max(before[k], after[k]) for k in before}
        for r in results.values():
            r["prefill_speedup"] = r["prefill_tok_s"] / original["prefill_tok_s"]
            r["generate_speedup"] = r["generate_tok_s"] / original["generate_tok_s"]
    return original, results


def _skipped_in(an: Anatomy, units: list[str], layer: int) -> AbstractContextManager[None]:
    """The plan's units of block ``layer`` dropped (a streamed model runs one block at a time)."""
    return dropped(an, [u for u in units if (parse_part(u) or parse_unit(u))[0] == layer])


def sweep_plans(
    lm: LoadedModel,
    windows: Windows,
    config: DropConfig | None = None,
    *,
    prof: Profile | None = None,
    progress: bool = True,
    **settings: Any,
) -> list[DropPlan]:
    """One plan per (unit kind, order, n) of the config's ``sweep``. Rankings are nested: the n-unit plan is the first
    n of the largest."""
    cfg = DropConfig.of(config, **settings)
    ns = sorted(set(cfg.sweep or ()))
    if not ns:
        raise LayerwiseError("give `sweep`, the counts of units to drop, e.g. 1,2,4")
    if prof is None and any(o not in SPECIAL_ORDERS for o in cfg.order) and not cfg.iterative:
        prof = profile(lm, windows, **needed(list(cfg.order), cfg.unit), batch_size=cfg.batch_size, progress=progress)
    plans = []
    for unit in cfg.unit:
        for order in cfg.order:
            one = replace(cfg, unit=(unit,), order=(order,))
            if order == "contiguous":  # the best run of n is not nested in the best run of n + 1
                plans += [_ranked(lm, windows, one, n, None, False) for n in ns]
                continue
            top = _ranked(lm, windows, one, max(ns), prof, progress)
            for n in ns:
                _check_n(lm.anatomy, unit, n)
                scores = {u: top.scores[u] for u in top.units[:n]} if top.scores else None
                plans.append(replace(top, units=top.units[:n], scores=scores))
    return plans


def chosen_plans(
    lm: LoadedModel, windows: Windows, config: DropConfig, *, prof: Profile | None = None, progress: bool = True
) -> list[DropPlan]:
    """The plans a config asks for: its ``sweep``'s, its given ``units``, or the ``n`` it ranks (4 when none is
    given). ``prof`` (else the config's ``profile`` file) ranks by metric, after checking it is this model's."""
    if prof is None and config.profile:
        prof = Profile.load(config.profile)
    if prof is not None:
        prof.check(lm)
    if config.sweep:
        return sweep_plans(lm, windows, config, prof=prof, progress=progress)
    if config.units:
        return [given(lm.anatomy, list(config.units))]
    return [choose(lm, windows, config, prof=prof, progress=progress)]


@dataclass
class DropReport:
    """What ``layerwise drop`` measured: the original, one entry per plan, and the files written."""

    meta: dict
    original: dict
    variants: list[dict]
    exports: dict

    def to_dict(self) -> dict:
        return {"kind": "drop", **asdict(self)}

    def save(self, out: str | Path) -> Path:
        """``eval.json`` and ``plan.json`` (every plan, for :meth:`DropPlan.load`) into ``out``, atomically; returns
        the eval path. The page is the report module's job (``layerwise.report.drop``), as for a Profile."""
        out = Path(out)
        plans = {
            v["key"]: {k: v[k] for k in ("units", "unit", "order", "iterative", "seed", "scores")}
            for v in self.variants
        }
        save_plans(out, "drop", self.meta, plans)
        return write_json(out / "eval.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DropReport:
        """A saved result: its folder or its ``eval.json``."""
        return load_result(cls, path, "eval.json", "drop")


def check_export(lm: LoadedModel, export: tuple[str, ...], plan: DropPlan | None = None) -> None:
    """Refuse, before anything runs or is written, an export this model (or this ``plan`` of it) cannot have."""
    unknown = set(export) - {"hf", "gguf"}
    if unknown:
        raise LayerwiseError(f"unknown `export` {', '.join(sorted(unknown))}; use hf, gguf or both")
    if "gguf" in export and not lm.source.get("gguf_path"):
        raise LayerwiseError(
            f"`export` gguf copies the source GGUF file, but this model was loaded from a {lm.source.get('kind')}; "
            "convert it with llama.cpp's convert_hf_to_gguf.py, load that .gguf, and drop again"
        )
    if "gguf" in export and plan is not None:
        _gguf_edit(lm.source["gguf_path"], plan)


def export_plan(lm: LoadedModel, plan: DropPlan, out: str | Path, export: tuple[str, ...]) -> dict:
    """Write the plan's smaller model into ``out`` in each format (``model/``, ``model.gguf``); what was written."""
    check_plan_model(plan.model_hash, lm)
    check_export(lm, export, plan)
    exports: dict = {}
    if "hf" in export:
        folder = save_checkpoint(lm, plan, Path(out) / "model")
        exports["hf"] = {"path": str(folder), "bytes": folder_bytes(folder)}
        listed = read_json(folder / "config.json", "the saved config").get("layerwise", {}).get("masked_experts")
        if listed:
            n = sum(map(len, listed.values()))
            exports["hf"]["note"] = (
                f"transformers' config holds one expert count per model and these routers have no bias to shut "
                f"experts off, so {folder} keeps {n} dropped expert(s) in the file, listed in its config's "
                "layerwise.masked_experts: layerwise.load routes around them, plain transformers would route to "
                "them; --per-layer N drops as many experts from every sparse block and deletes them all"
            )
    if "gguf" in export:
        src = Path(lm.source["gguf_path"])
        path = export_gguf(src, plan, Path(out) / "model.gguf")
        exports["gguf"] = {"path": str(path), "bytes": path.stat().st_size, "source_bytes": src.stat().st_size}
    return exports


def run(
    lm: LoadedModel,
    windows: Windows,
    config: DropConfig | None = None,
    *,
    plans: list[DropPlan] | None = None,
    prof: Profile | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    **settings: Any,
) -> DropReport:
    """Choose the config's plans (or take ``plans`` already chosen), evaluate each on held-out windows, write the
    exports (one plan only) and the results, which record the config.

    ``settings`` are config fields (``n=6, order="bi", eval_samples=8``).
    """
    cfg = DropConfig.of(config, **settings)
    start = time.perf_counter()
    if plans is None:
        plans = chosen_plans(lm, windows, cfg, prof=prof, progress=progress)
    export = cfg.export if cfg.export is not None else (("hf",) if len(plans) == 1 and out is not None else ())
    eval_samples, batch_size = cfg.eval_samples, cfg.batch_size
    with_speed = cfg.with_speed and lm.streamed is None  # a model read from disk runs at the disk's rate
    if export and len(plans) != 1:
        raise LayerwiseError("`export` writes one model; give one plan, not a sweep")
    check_export(lm, export, plans[0] if export else None)
    eval_ids = windows.evaluation[:eval_samples]
    keys = {p.key: p for p in plans}
    original, results = measure(lm, keys, eval_ids, batch_size=batch_size, with_speed=with_speed, progress=progress)
    variants = [
        {
            "key": k,
            "n": len(p.units),
            "unit": p.unit,
            "order": p.order,
            "iterative": p.iterative,
            "units": p.units,
            "scores": p.scores,
            "seed": p.seed,
            **results[k],
        }
        for k, p in keys.items()
    ]
    exports = export_plan(lm, plans[0], out, export) if out is not None else {}
    meta = {
        **lm.meta(),
        "data": windows.meta(),
        **provenance(seed=cfg.seed, batch_size=batch_size),
        "config": cfg.to_dict(),
        "eval_windows": int(eval_ids.shape[0]),
        "with_speed": with_speed,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
    }
    report = DropReport(meta=meta, original=original, variants=variants, exports=exports)
    if out is not None:
        report.save(out)
    return report
