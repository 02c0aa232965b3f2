"""Layer-selective fine-tuning: train only the units that matter, with optimizer memory really saved.

Selection lives in one place, :class:`LayerSelector`, a ``transformers``
``TrainerCallback``: a user adds it to their own ``Trainer``, and the plain
loop here (:func:`train`) drives the very same object. Modes (``select``):

- ``full``: every unit trains (the baseline; ``lora`` is ``full`` over a peft LoRA model);
- ``lisa``: every ``interval`` steps, ``active`` units drawn uniformly (LISA);
- ``importance:METRIC``: drawn with probability ∝ importance^τ from a Profile
  (``temperature`` τ; τ = 0 is LISA);
- ``top:METRIC``: the ``active`` most important units, fixed;
- ``adaptive``: IST-style scores learned online: after each optimizer step a
  trained unit's score moves (EMA) toward the loss decrease its own update
  achieved to first order, ``-<g_u, Δθ_u>``; units are drawn ∝ score^τ, with
  10% uniform exploration, never-trained units counting as the best seen;
- ``badam:ascending|descending|random``: BAdam's block coordinate descent, the
  next ``active`` units in that order every ``interval`` steps.

Memory is real, by construction rather than by care:

- the optimizer is built once over every tunable parameter, so a unit switched
  on later is always in it; the selector refuses an optimizer that lacks any of
  them (the widely copied LISA bug, where blocks frozen when the optimizer was
  built are never updated, cannot happen silently);
- a frozen parameter has ``requires_grad=False``, so it gets no ``.grad``, and
  AdamW skips parameters without a gradient, so it never gets state;
- when a unit is switched off its Adam state is deleted (freed); when it comes
  back its state is *reset* (fresh moments, step count from zero, as BAdam does).

Embeddings, final norm and head (tied in SmolLM2: one tensor, counted once)
train with every mode unless ``train_embeddings=False``. With ``unit="attn"``
or ``"mlp"`` the block norms stay frozen. On a peft model only the adapter
parameters are tunable (IST's setting), and peft keeps embeddings frozen.

Per-unit learning rates (``layer_lr="METRIC[:TAU]"``, :func:`layer_rates`)
are the Profile's other use: every unit (block, or attn/mlp with ``unit``)
gets its own AdamW parameter group at ``lr × w_k``, ``w_k ∝ importance_k^τ``
scaled to mean 1 over units, so the step budget matches a flat ``lr``;
embeddings, norms and head keep ``lr``. τ > 0 (default 1) speeds up the
important units, τ < 0 slows them (protects them). Selection only flips
``requires_grad`` and drops state, never the groups, so the rates hold under
every ``select``, and over LoRA they apply to each unit's adapters.

bf16: load the model in bfloat16 (``dtype="bfloat16"``, ``--dtype bfloat16``)
and it trains in bf16 as it is: weights, gradients and AdamW moments all in
bf16 (no float32 master copy, so updates smaller than half a bf16 step of a
weight are lost: prefer a larger ``lr`` or float32 for very small rates); the
checkpoint is saved in bf16 too (safetensors tensors and ``config.json``
``dtype``). Verified on CPU only (tests: the training loss falls on a tiny
model and on the default model; the tiny model's checkpoint is bf16); no
CUDA device was available to verify it there.

The schedule is a function of (seed, step) for every mode except
``adaptive``, whose scores and current units are saved with a Trainer
checkpoint (``ExportableState``), so resuming keeps the schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState

from .anatomy import Anatomy, Kind, parse_unit, unit_name
from .data import Corpus, TextFile, Windows, parse_jsonl, read_corpus, read_file, windows
from .errors import LayerwiseError
from .evaluate import Variant, next_token_logits, quality
from .io import atomic_dir, load_result, provenance, write_json
from .loading import LoadedModel
from .memory import memory_bytes, peak_memory, rss_bytes
from .profile import DIRECTION, METRICS, Profile, needs_hint

if TYPE_CHECKING:
    from peft import PeftModel

    from .loading import CausalLM

    Tunable = CausalLM | PeftModel  # a transformers model, or one peft wraps (LoRA)

MODES = ("full", "lisa", "importance", "top", "adaptive", "badam", "lora")
SELECT_HELP = "full, lora, lisa, importance:METRIC, top:METRIC, adaptive, badam:ascending|descending|random"
UNITS = ("block", "attn", "mlp")
BADAM_ORDERS = ("ascending", "descending", "random")
RESTORE_ORDERS = ("change", "importance")
EXPLORE = 0.1  # adaptive: share of uniform exploration
LAYER_LR_FLOOR = 0.01  # per-unit rates: importance floored at this share of the largest


@dataclass(frozen=True)
class Selection:
    """A parsed ``select`` string: the mode and its argument (a metric or a BAdam order)."""

    mode: str
    metric: str | None = None
    order: str | None = None

    @property
    def key(self) -> str:
        return self.mode + (f":{self.metric}" if self.metric else "") + (f":{self.order}" if self.order else "")


def parse_select(text: str) -> Selection:
    """``"importance:ablate_nll"`` -> ``Selection("importance", metric="ablate_nll")``; one-line errors otherwise."""
    mode, _, arg = text.strip().partition(":")
    if mode not in MODES:
        raise LayerwiseError(f"unknown select {text!r}; use one of: {SELECT_HELP}")
    if mode in ("importance", "top"):
        if arg not in METRICS:
            raise LayerwiseError(
                f"{mode} needs a Profile metric, e.g. {mode}:ablate_nll (got {text!r}); metrics: {', '.join(METRICS)}"
            )
        if not DIRECTION.get(arg):
            ok = [m for m in METRICS if DIRECTION.get(m)]
            raise LayerwiseError(f"{arg} has no agreed direction of importance; use one of {', '.join(ok)}")
        return Selection(mode, metric=arg)
    if mode == "badam":
        order = arg or "ascending"
        if order not in BADAM_ORDERS:
            raise LayerwiseError(f"unknown BAdam order {arg!r}; use badam:ascending, badam:descending or badam:random")
        return Selection(mode, order=order)
    if arg:
        raise LayerwiseError(f"select {mode} takes no argument (got {text!r}); use one of: {SELECT_HELP}")
    return Selection(mode)


def importance_weights(prof: Profile, metric: str, unit: str) -> dict[str, float]:
    """Per-unit importance from a Profile, signed so that larger means more important.

    Sampling needs positive weights: values at or below zero (a unit whose
    removal helped) are raised to 1e-6 of the largest, so every unit keeps a
    small chance and the order is kept.
    """
    if unit not in UNITS:
        raise LayerwiseError(f"unknown unit {unit!r}; use block, attn or mlp")
    sign = DIRECTION.get(metric) or 1
    vals = prof.values(metric, cast(Kind, unit))
    if not vals or any(v is None for v in vals.values()):
        raise LayerwiseError(
            f"the profile has no {metric} values for {unit} units; re-profile with {needs_hint(metric)}"
        )
    signed = {k: sign * float(v) for k, v in vals.items() if v is not None}
    top = max(max(signed.values()), 1e-12)
    return {k: max(v, 1e-6 * top) for k, v in signed.items()}


def parse_layer_lr(text: str) -> tuple[str, float]:
    """``"ablate_nll:1"`` -> ``("ablate_nll", 1.0)``; τ defaults to 1; one-line errors otherwise."""
    metric, _, tau = text.strip().partition(":")
    if metric not in METRICS or not DIRECTION.get(metric):
        ok = ", ".join(m for m in METRICS if DIRECTION.get(m))
        raise LayerwiseError(
            f"layer_lr needs METRIC[:TAU] with a metric of known direction ({ok}), e.g. ablate_nll:1 (got {text!r})"
        )
    try:
        t = float(tau) if tau else 1.0
    except ValueError:
        t = math.nan
    if not math.isfinite(t):
        raise LayerwiseError(
            f"the layer_lr exponent TAU must be a finite number, e.g. ablate_nll:1 or ablate_nll:-0.5 (got {text!r})"
        )
    return metric, t


def layer_rates(prof: Profile, metric: str, unit: str, tau: float = 1.0) -> dict[str, float]:
    """Per-unit learning-rate multipliers ``w_k ∝ importance_k^τ``, scaled so their mean over units is 1.

    The mean of 1 keeps the total step budget that of a flat rate: the rule
    moves learning rate between units rather than adding any. τ > 0 gives
    the units the Profile finds important larger steps (the bet of importance
    sampling: the gain is made where the output depends most); τ < 0 gives
    them smaller steps (protect what matters, let the rest adapt: less
    forgetting, as layer-wise rate decay does for the bottom layers);
    τ = 0 is a flat rate. Importance is floored at ``LAYER_LR_FLOOR`` of the
    largest (a unit whose removal helped still gets a rate), which also bounds
    the ratio of two rates by ``(1 / LAYER_LR_FLOOR)^|τ|``.
    """
    imp = importance_weights(prof, metric, unit)
    top = max(imp.values())
    w = {k: max(v, LAYER_LR_FLOOR * top) ** tau for k, v in imp.items()}
    mean = sum(w.values()) / len(w)
    return {k: v / mean for k, v in w.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base else model


def _is_peft(model: nn.Module) -> TypeGuard[PeftModel]:
    return hasattr(model, "peft_config")


def _unique(params) -> list[nn.Parameter]:
    """Parameters without repeats: SmolLM2's tied embedding and head are one tensor, counted once."""
    return list({id(p): p for p in params}.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer holds in state tensors right now."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


class LayerSelector(TrainerCallback, ExportableState):
    """Chooses which units train at every step, freezes the rest and frees their optimizer state.

    Use it inside a plain ``transformers.Trainer``: build the Trainer while
    every unit is trainable (do not freeze anything yourself; the selector
    freezes at the start of training), then::

        sel = LayerSelector(select="lisa", active=2, interval=20)
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[sel]).train()
        sel.records   # per optimizer step: active units, trainable parameters, optimizer-state bytes

    Only JSON values go into the constructor, because a Trainer rebuilds the
    callback from its saved arguments when it resumes; the model and the
    optimizer come with the callback events.
    """

    def __init__(
        self,
        select: str = "lisa",
        unit: str = "block",
        active: int = 2,
        interval: int = 20,
        temperature: float = 1.0,
        weights: dict[str, float] | None = None,
        seed: int = 0,
        train_embeddings: bool = True,
        ema: float = 0.9,
    ):
        sel = parse_select(select)
        if sel.mode == "lora":
            raise LayerwiseError(
                "select 'lora' means select 'full' over a peft LoRA model: wrap the model with peft and use "
                "select='full' (train() does this)"
            )
        if unit not in UNITS:
            raise LayerwiseError(f"unknown unit {unit!r}; use block, attn or mlp")
        if interval < 1:
            raise LayerwiseError(f"interval must be at least 1 step (got {interval})")
        if sel.mode != "full" and active < 1:
            raise LayerwiseError(f"active must be at least 1 unit (got {active})")
        if temperature < 0:
            raise LayerwiseError(f"temperature must be 0 or more (got {temperature})")
        if sel.mode in ("importance", "top") and not weights:
            raise LayerwiseError(
                f"select {select} needs importance weights from a Profile (importance_weights(prof, metric, unit))"
            )
        self.select, self.active, self.interval = select, active, interval
        self.unit = cast(Kind, unit)
        self.temperature, self.weights, self.seed, self.train_embeddings, self.ema = (
            temperature,
            weights,
            seed,
            train_embeddings,
            ema,
        )
        self.sel = sel
        self.scores: dict[str, float] = {}  # adaptive: EMA of each unit's first-order loss decrease
        self.current: list[str] | None = None  # units training now (saved with a Trainer checkpoint)
        self.records: list[dict] = []
        self.params: dict[str, list[nn.Parameter]] = {}
        self.always: list[nn.Parameter] = []
        self._dots: dict[str, float] = {}
        self._model: nn.Module | None = None

    # ---- ExportableState: what a Trainer checkpoint keeps
    def state(self) -> dict:
        return {
            "args": {
                "select": self.select,
                "unit": self.unit,
                "active": self.active,
                "interval": self.interval,
                "temperature": self.temperature,
                "weights": self.weights,
                "seed": self.seed,
                "train_embeddings": self.train_embeddings,
                "ema": self.ema,
            },
            "attributes": {"scores": self.scores, "current": self.current},
        }

    # ---- binding to a model and its optimizer
    def units(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Each tunable unit's parameters (on a peft model: its adapter parameters), by unit name."""
        base = _unwrap(model)
        an = Anatomy(base)
        peft = _is_peft(model)
        skipped = set((getattr(base.config, "layerwise", None) or {}).get("dropped_sublayers") or [])
        kinds: tuple[Kind, ...] = ("attn", "mlp") if self.unit == "block" else (self.unit,)
        out = {}
        for i in range(an.n_layers):
            if all(unit_name(i, k) in skipped for k in kinds):
                continue  # a sublayer `layerwise drop` removed computes nothing; training it is pointless
            mod = an.blocks[i] if self.unit == "block" else an.branch(i, self.unit)
            ps = [p for p in mod.parameters() if p.requires_grad or not peft]
            if ps:
                out[unit_name(i, self.unit)] = ps
        return out

    def param_groups(self, model: nn.Module, lr: float, rates: dict[str, float] | None = None) -> list[dict]:
        """Optimizer parameter groups: one per unit at ``lr × rates[unit]``, then the rest (embeddings, norms, head) at
        ``lr``.

        Build the optimizer from these before training (``AdamW(sel.param_groups(model, lr, rates))``)
        to give units their own rates; every group carries its unit's ``name``.
        Switching units on and off never touches the groups, only
        ``requires_grad`` and the state, so the rates hold under every mode.
        Without ``rates`` it is one group at ``lr``.
        """
        rest = [p for p in model.parameters() if p.requires_grad]
        if rates is None:
            return [{"params": rest, "lr": lr, "name": "all"}]
        units = self.units(model)
        missing = sorted(set(units) - set(rates), key=parse_unit)
        if missing:
            raise LayerwiseError(
                f"the layer rates lack {len(missing)} {self.unit} units of this model (e.g. {missing[0]}); "
                "profile this model"
            )
        groups = [{"params": ps, "lr": lr * rates[u], "name": u} for u, ps in units.items()]
        held = {id(p) for ps in units.values() for p in ps}
        rest = [p for p in rest if id(p) not in held]
        return groups + ([{"params": rest, "lr": lr, "name": "rest"}] if rest else [])

    def always_params(self, model: nn.Module) -> list[nn.Parameter]:
        """Embeddings, final norm and head (tied ones once), trained with every unit; none with
        ``train_embeddings=False``."""
        if not self.train_embeddings:
            return []
        an, peft = Anatomy(_unwrap(model)), _is_peft(model)
        return _unique(
            p for m in (an.embed, an.final_norm, an.head) for p in m.parameters() if (p.requires_grad or not peft)
        )

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Find the units' parameters, freeze everything else for good, and check the optimizer holds them all."""
        self.params = self.units(model)
        if not self.params:
            raise LayerwiseError(
                f"this model has no trainable {self.unit} units left; choose another unit, or a model with blocks"
            )
        if self.sel.mode != "full" and self.active > len(self.params):
            raise LayerwiseError(
                f"active={self.active} is more than the {len(self.params)} {self.unit} units this model has; use "
                f"{len(self.params)} or fewer"
            )
        if self.weights is not None and self.sel.mode in ("importance", "top"):
            missing = set(self.params) - set(self.weights)
            if missing:
                raise LayerwiseError(
                    f"the importance weights lack {len(missing)} units of this model (e.g. {sorted(missing)[0]}); "
                    "profile this model"
                )
        self.always = self.always_params(model)
        keep = {id(p) for ps in self.params.values() for p in ps} | {id(p) for p in self.always}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
                p.grad = None
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        lacking = [u for u, ps in self.params.items() if any(id(p) not in held for p in ps)]
        if lacking or any(id(p) not in held for p in self.always):
            raise LayerwiseError(
                f"the optimizer was built without the parameters of {len(lacking)} units (e.g. "
                f"{(lacking or ['embeddings'])[0]}), so they could never train; build it while every unit is "
                "trainable (the selector freezes units itself)"
            )
        self._model = model

    # ---- the schedule
    def _generator(self, period: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + period)

    def _draw(self, weights: list[float], period: int) -> list[str]:
        names = list(self.params)
        w = torch.tensor(weights, dtype=torch.float64) ** self.temperature
        p = w / w.sum()
        if self.sel.mode == "adaptive":
            p = (1 - EXPLORE) * p + EXPLORE / len(names)
        picked = torch.multinomial(p, self.active, replacement=False, generator=self._generator(period))
        return sorted((names[i] for i in picked.tolist()), key=parse_unit)

    def choose(self, step: int) -> list[str]:
        """The units that train during ``step`` (a function of seed and step, plus the learned scores for adaptive)."""
        names, period, mode = list(self.params), step // self.interval, self.sel.mode
        weights = self.weights or {}  # importance and top have them (checked when made)
        if mode == "full":
            return names
        if mode == "lisa":
            return self._draw([1.0] * len(names), period)
        if mode == "importance":
            return self._draw([weights[u] for u in names], period)
        if mode == "top":
            return sorted(sorted(names, key=lambda u: -weights[u])[: self.active], key=parse_unit)
        if mode == "adaptive":
            best = max(self.scores.values(), default=1.0)
            return self._draw([max(self.scores.get(u, best), 1e-12 * max(best, 1e-30)) for u in names], period)
        order = names[::-1] if self.sel.order == "descending" else names
        if self.sel.order == "random":  # a fresh permutation every full pass
            n_per = math.ceil(len(names) / self.active)
            perm = torch.randperm(len(names), generator=self._generator(period // n_per)).tolist()
            order = [names[i] for i in perm]
        n_per = math.ceil(len(order) / self.active)
        start = (period % n_per) * self.active
        return sorted(order[start : start + self.active], key=parse_unit)

    def switch(self, units: list[str], optimizer: torch.optim.Optimizer) -> None:
        """Train exactly ``units`` (plus the always-trained set); free the optimizer state of everything else."""
        on = set(units)
        for u, ps in self.params.items():
            for p in ps:
                p.requires_grad_(u in on)
                if u not in on:
                    p.grad = None
                    optimizer.state.pop(p, None)
        for p in self.always:
            p.requires_grad_(True)
        self.current = list(units)

    def trainable(self) -> int:
        """Parameters training now, shared tensors once."""
        on = set(self.current or [])
        return sum(p.numel() for p in _unique([p for u in on for p in self.params[u]] + self.always))

    # ---- TrainerCallback events (the plain loop calls the same ones)
    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **kw):
        self.bind(model, optimizer)
        self.switch(self.current if self.current is not None else self.choose(state.global_step), optimizer)

    def on_step_begin(self, args, state: TrainerState, control: TrainerControl, optimizer=None, **kw):
        if state.global_step % self.interval == 0 and self.sel.mode not in ("full", "top"):
            self.switch(self.choose(state.global_step), optimizer)

    def _grad_dots(self) -> dict[str, float]:
        return {
            u: sum(float((p.grad.double() * p.detach().double()).sum()) for p in self.params[u] if p.grad is not None)
            for u in self.current or []
        }

    def on_pre_optimizer_step(self, args, state: TrainerState, control: TrainerControl, **kw):
        if self.sel.mode == "adaptive":
            self._dots = self._grad_dots()

    def on_optimizer_step(self, args, state: TrainerState, control: TrainerControl, optimizer=None, **kw):
        if self.sel.mode == "adaptive":  # the gradient is still in .grad: <g, θ_before> - <g, θ_after> = -<g, Δθ>
            for u, after in self._grad_dots().items():
                gain = self._dots.get(u, after) - after
                self.scores[u] = gain if u not in self.scores else self.ema * self.scores[u] + (1 - self.ema) * gain
        self.records.append(
            {
                "step": state.global_step,
                "active": list(self.current or []),
                "trainable_params": self.trainable(),
                "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                "memory_bytes": memory_bytes(next(iter(self.params.values()))[0].device),
            }
        )


# ---------------------------------------------------------------- data


@dataclass
class TuneData:
    """Training examples (inputs, labels with -100 where no loss is taken, attention mask) and held-out windows.

    ``eval_ids`` never overlaps the training examples: for text, the windows
    after the training windows; for chat data, the held-out conversations
    rendered with the chat template. ``prompts`` are the held-out chat prompts
    (for the diversity of sampled responses).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    eval_ids: torch.Tensor
    prompts: list[list[dict]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_windows(cls, w: Windows, eval_samples: int = 16) -> TuneData:
        """Text: train on every token of the calibration windows; evaluate on the windows after them."""
        ids = w.calibration
        return cls(
            ids, ids.clone(), torch.ones_like(ids), w.evaluation[:eval_samples], [], {**w.meta(), "kind": "text"}
        )

    def as_windows(self) -> Windows:
        """The training examples as calibration windows (to measure a Profile on what is trained on)."""
        n = int(self.ids.shape[0])
        return Windows(
            ids=self.ids,
            n_calib=n,
            source=str(self.meta.get("source")),
            data_hash=str(self.meta.get("data_hash")),
            n_text_tokens=int(self.mask.sum()),
        )


def _conversations(f: TextFile) -> list[list[dict]] | None:
    """A JSONL file's conversations (``prompt``/``response`` or chat ``messages``), or None for plain ``text`` lines."""
    rows = parse_jsonl(f, want='"text", or "prompt" and "response", or "messages"')
    if not rows or "text" in rows[0][1]:
        return None
    return [_conversation(f.path, n, r) for n, r in rows]


def _conversation(path: str, n: int, r: dict) -> list[dict]:
    """One JSONL line as chat messages, or a one-line error naming the line and what it lacks."""
    if "prompt" in r and "response" in r:
        return [{"role": "user", "content": str(r["prompt"])}, {"role": "assistant", "content": str(r["response"])}]
    msgs = r.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise LayerwiseError(
            f'line {n} of {path} needs "prompt" and "response", or a "messages" list (or "text" on every line)'
        )
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise LayerwiseError(
                f'line {n} of {path}: each message must be an object with "role" and "content" (got '
                f"{json.dumps(m)[:60]})"
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise LayerwiseError(
            f"line {n} of {path}: the messages have no assistant turn, so there is nothing to train on"
        )
    return [{"role": m["role"], "content": str(m["content"])} for m in msgs]


def _render(tokenizer, conv: list[dict], seq_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids of a conversation and its labels: assistant tokens only, everything else -100."""
    ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
    labels = [-100] * len(ids)
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(conv[:i], tokenize=True, add_generation_prompt=True, return_dict=False)
        )
        end = len(tokenizer.apply_chat_template(conv[: i + 1], tokenize=True, return_dict=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:seq_len], labels[:seq_len]
    return (ids, labels) if any(x != -100 for x in labels[1:]) else None


@dataclass(frozen=True)
class Chats:
    """Conversations read from a JSONL file, in file order."""

    source: str
    convs: list[list[dict]]


def read_tuning(ref: str, encoding: str | None = None) -> Corpus | Chats:
    """The tuning data, read and checked without a model: conversations from a chat JSONL file, else a text corpus."""
    path = Path(ref)
    if path.suffix == ".jsonl" and path.is_file():
        f = read_file(path, encoding)
        convs = _conversations(f)
        if convs is not None:
            return Chats(ref, convs)
    return read_corpus(ref, encoding)


def tuning_data(
    ref: str | Corpus | Chats,
    tokenizer,
    *,
    seq_len: int = 256,
    samples: int = 64,
    eval_samples: int = 16,
    max_len: int | None = None,
) -> TuneData:
    """Text trains on every token; JSONL prompt/response or messages trains on response tokens, with the chat template.

    The first ``samples`` windows (or conversations) train; the rest are held out.
    ``ref`` may be what :func:`read_tuning` read before the model loaded.
    """
    src = read_tuning(ref) if isinstance(ref, str) else ref
    ref = src.source
    if isinstance(src, Corpus):
        w = windows(src, tokenizer, seq_len=seq_len, samples=samples, max_len=max_len)
        if w.evaluation.shape[0] == 0:
            raise LayerwiseError(
                f"data {ref} gives {w.ids.shape[0]} windows and training takes them all; lower samples "
                "(--samples) so some are held out"
            )
        return TuneData.from_windows(w, eval_samples)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LayerwiseError(
            f"{ref} holds chat examples, but this model's tokenizer has no chat template; give plain text instead"
        )
    convs = src.convs
    if len(convs) <= samples:
        raise LayerwiseError(
            f"{ref} has {len(convs)} examples; training on {samples} leaves none held out: lower samples "
            f"(--samples) below {len(convs)}"
        )
    rendered = [r for r in (_render(tokenizer, c, seq_len) for c in convs[:samples]) if r is not None]
    if not rendered:
        raise LayerwiseError(
            f"no training example of {ref} keeps a response token within {seq_len} tokens; raise seq_len (--seq-len)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(rendered)
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (x, y) in enumerate(rendered):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    held = convs[samples:]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in held]
    ev = windows(ref, tokenizer, seq_len=seq_len, samples=1, max_len=max_len, texts=texts)
    meta = {
        "source": ref,
        "kind": "chat",
        "data_hash": ev.data_hash,
        "seq_len": seq_len,
        "n_train_examples": n,
        "n_heldout_examples": len(held),
        "n_eval_windows": min(eval_samples, int(ev.ids.shape[0])),
    }
    return TuneData(
        ids, labels, mask, ev.ids[:eval_samples], [c[:-1] for c in held if c[-1]["role"] == "assistant"], meta
    )


# ---------------------------------------------------------------- weights kept from before training


class Snapshot:
    """The tunable parameters' values before training: the reference model, restoration, and resets between runs."""

    def __init__(self, params: list[nn.Parameter]):
        self.values = {id(p): (p, p.detach().clone()) for p in _unique(params)}

    @contextlib.contextmanager
    def swapped(self, params: list[nn.Parameter] | None = None) -> Iterator[None]:
        """Put the saved values in for the duration (all of them by default); the trained ones come back after."""
        chosen = (
            [self.values[id(p)] for p in _unique(params) if id(p) in self.values]
            if params is not None
            else list(self.values.values())
        )
        kept = [(p, p.detach().clone()) for p, _ in chosen]
        try:
            with torch.no_grad():
                for p, v in chosen:
                    p.copy_(v)
            yield
        finally:
            with torch.no_grad():
                for p, v in kept:
                    p.copy_(v)

    def reset(self) -> None:
        with torch.no_grad():
            for p, v in self.values.values():
                p.copy_(v)


def block_params(model: nn.Module, layer: int) -> list[nn.Parameter]:
    return list(Anatomy(_unwrap(model)).blocks[layer].parameters())


def restore_order(model: nn.Module, snap: Snapshot, order: str, weights: dict[str, float] | None = None) -> list[int]:
    """Blocks in the order restoration takes them.

    ``change``: largest relative weight change first, ``||θ - θ0|| / ||θ0||``
    over the block's tunable tensors (the blocks that moved furthest from the
    base model are where forgetting is likeliest). ``importance``: least
    important first by the Profile (their tuning should matter least to the gain).
    """
    n = Anatomy(_unwrap(model)).n_layers
    if order == "importance":
        if not weights:
            raise LayerwiseError(
                "restore order 'importance' needs a Profile (--profile, or an importance:/top: select that "
                "measured one)"
            )
        return sorted(range(n), key=lambda i: weights.get(f"L{i}", 0.0))
    if order != "change":
        raise LayerwiseError(f"unknown restore order {order!r}; use change or importance")

    def rel(i: int) -> float:
        pairs = [snap.values[id(p)] for p in block_params(model, i) if id(p) in snap.values]
        num = sum(float((p.detach() - v).double().norm() ** 2) for p, v in pairs)
        den = sum(float(v.double().norm() ** 2) for _, v in pairs)
        return math.sqrt(num / den) if den else 0.0

    return sorted(range(n), key=lambda i: -rel(i))


# ---------------------------------------------------------------- the plain loop


@dataclass
class TuneRun:
    """One strategy's training: per-step loss and records, the selector, and the model it trained."""

    key: str
    losses: list[float]
    records: list[dict]
    seconds: float
    selector: LayerSelector
    model: Tunable
    memory_start: int
    start: Snapshot | None = None  # a peft model's adapter weights before training (the base model is them at init)
    unit_lr: dict[str, float] = field(default_factory=dict)  # each unit's learning rate, read back from the optimizer

    def summary(self) -> dict:
        steps = max(len(self.losses), 1)
        peak = max((r["memory_bytes"] for r in self.records), default=0)
        return {
            "steps": len(self.losses),
            "loss": self.losses,
            "seconds_per_step": self.seconds / steps,
            "memory_start_bytes": self.memory_start,
            "memory_added_bytes": max(peak - self.memory_start, 0),
            "trainable_params_max": max((r["trainable_params"] for r in self.records), default=0),
            "optimizer_state_bytes_max": max((r["optimizer_state_bytes"] for r in self.records), default=0),
            "memory_bytes_max": max((r["memory_bytes"] for r in self.records), default=0),
            "unit_lr": self.unit_lr,
            "records": self.records,
        }


def max_active(model: nn.Module, unit: str = "block", share: float = 0.5, train_embeddings: bool = True) -> int:
    """The most units that may train at once with optimizer state at most ``share`` of full fine-tuning's.

    AdamW keeps two moments per trainable parameter, so its state is in
    proportion to the trainable count, counted as the selector counts it:
    the units' parameters plus embeddings, final norm and head (tied once),
    against every unit and those for ``full``. The largest units are assumed
    drawn together, so the bound holds whichever are sampled.
    """
    sel = LayerSelector("full", unit, train_embeddings=train_embeddings)
    sizes = sorted((sum(p.numel() for p in ps) for ps in sel.units(model).values()), reverse=True)
    fixed = sum(p.numel() for p in sel.always_params(model))
    budget = share * (sum(sizes) + fixed) - fixed
    k = 0
    while k < len(sizes) and sum(sizes[: k + 1]) <= budget:
        k += 1
    if k == 0:
        raise LayerwiseError(
            f"not even one {unit} unit fits in {share:g} of full fine-tuning's optimizer state; raise share or "
            "freeze embeddings"
        )
    return k


def with_lora(model: CausalLM, rank: int = 8) -> PeftModel:
    """A peft LoRA model over every linear map of the blocks (peft's ``all-linear`` leaves the head out)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LayerwiseError("select lora (and adaptive over LoRA) needs peft: pip install peft") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"))


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Example indices, a fresh seeded permutation per pass over the data."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i : i + batch_size]
        epoch += 1


def save_model(model: Tunable, tokenizer, out: str | Path) -> Path:
    """A plain HF checkpoint (safetensors), or a PEFT adapter for a peft model, written atomically."""
    with atomic_dir(out, "checkpoint") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def train(
    lm: LoadedModel,
    data: TuneData | Windows,
    *,
    select: str = "lisa",
    unit: str = "block",
    active: int = 2,
    interval: int = 20,
    temperature: float = 1.0,
    weights: dict[str, float] | None = None,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    train_embeddings: bool = True,
    lora: bool = False,
    lora_rank: int = 8,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    save_every: int = 0,
    progress: bool = True,
    rates: dict[str, float] | None = None,
) -> TuneRun:
    """Train ``lm.model`` in place with one selection strategy (AdamW, constant learning rate).

    ``select="lora"`` (or ``lora=True`` with any select, IST's setting for
    ``adaptive``) wraps the model in a peft LoRA adapter first; the returned
    run's ``model`` is then the peft model. A non-finite loss stops with the
    step named; the weights then are still those of the last good step, and
    are written to ``checkpoint`` when one is given (so are they every
    ``save_every`` steps, atomically, so Ctrl-C leaves the last complete one).
    ``rates`` (from :func:`layer_rates`) gives every unit its own learning
    rate ``lr × rates[unit]`` in its own parameter group (on a LoRA model:
    its adapters'); embeddings, norms and head keep ``lr``. The rates the
    optimizer held at the end are in the run's ``unit_lr``.
    """
    sel = parse_select(select)
    data = TuneData.from_windows(data) if isinstance(data, Windows) else data
    if steps < 1 or grad_accum < 1 or batch_size < 1:
        raise LayerwiseError(
            f"`steps`, `grad_accum` and `batch_size` must each be at least 1 (got {steps}, {grad_accum}, {batch_size})"
        )
    if data.ids.shape[0] == 0:
        raise LayerwiseError("no training examples; give more data")
    lm.model.requires_grad_(True)  # every unit in the optimizer; the selector freezes what does not train now
    model = with_lora(lm.model, lora_rank) if (lora or sel.mode == "lora") else lm.model
    selector = LayerSelector(
        "full" if sel.mode == "lora" else select, unit, active, interval, temperature, weights, seed, train_embeddings
    )
    start = Snapshot([p for p in model.parameters() if p.requires_grad]) if _is_peft(model) else None
    torch.manual_seed(seed)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    mem0 = torch.cuda.memory_allocated(lm.device) if lm.device.type == "cuda" else rss_bytes()
    optimizer = torch.optim.AdamW(selector.param_groups(model, lr, rates), lr=lr, weight_decay=0.0)
    state, control = TrainerState(), TrainerControl()
    selector.on_train_begin(None, state, control, model=model, optimizer=optimizer)
    model.train()
    order = _batches(int(data.ids.shape[0]), min(batch_size, int(data.ids.shape[0])), seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"tune {sel.key}", disable=not progress)
    try:
        for step in bar:
            state.global_step = step
            selector.on_step_begin(None, state, control, model=model, optimizer=optimizer)
            total = 0.0
            for _ in range(grad_accum):
                idx = next(order)
                dev = lm.device
                loss = model(
                    input_ids=data.ids[idx].to(dev),
                    attention_mask=data.mask[idx].to(dev),
                    labels=data.labels[idx].to(dev),
                    use_cache=False,
                ).loss
                if not torch.isfinite(loss):
                    _stop_on_nan(model, lm.tokenizer, step, checkpoint)
                (loss / grad_accum).backward()
                total += float(loss.detach()) / grad_accum
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
            selector.on_pre_optimizer_step(None, state, control, model=model, optimizer=optimizer)
            optimizer.step()
            selector.on_optimizer_step(None, state, control, model=model, optimizer=optimizer)
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}")
            if checkpoint is not None and save_every and (step + 1) % save_every == 0:
                save_model(model, lm.tokenizer, checkpoint)
    finally:
        model.eval()
    optimizer.state.clear()
    unit_lr = {g["name"]: g["lr"] for g in optimizer.param_groups if g["name"] != "rest"} if rates is not None else {}
    return TuneRun(
        sel.key + ("" if sel.mode == "lora" or not lora else "+lora"),
        losses,
        selector.records,
        time.perf_counter() - t0,
        selector,
        model,
        mem0,
        start,
        unit_lr,
    )


def _stop_on_nan(model: Tunable, tokenizer, step: int, checkpoint: str | Path | None) -> None:
    """The loss is not finite before this step's update: the weights are the last good ones; keep them and stop."""
    if checkpoint is not None:
        save_model(model, tokenizer, checkpoint)
        kept = f"the weights after step {step} (the last good ones) are in {checkpoint}"
    else:
        kept = "no checkpoint was asked for"
    raise LayerwiseError(
        f"the training loss became NaN/inf at step {step + 1}; {kept}; lower the learning rate (--lr) or use "
        "--dtype float32"
    )


# ---------------------------------------------------------------- evaluation


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of whitespace tokens, pooled over responses (diversity)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def diversity(
    model: Tunable,
    tokenizer,
    prompts: list[list[dict]],
    *,
    variant=None,
    new_tokens: int = 48,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "diversity",
) -> dict:
    """Distinct-1/2 of responses sampled (temperature 1, top-p 0.95, seeded) to held-out chat prompts (a bar over them:
    ``progress``)."""
    texts = []
    with torch.no_grad(), variant() if variant else contextlib.nullcontext():
        for i, conv in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=not progress)):
            x = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            torch.manual_seed(seed + i)
            y = model.generate(
                input_ids=x["input_ids"].to(device),
                attention_mask=x["attention_mask"].to(device),
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
            texts.append(tokenizer.decode(y[0, x["input_ids"].shape[1] :], skip_special_tokens=True))
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "n_prompts": len(texts),
        "samples": texts[:4],
    }


_KEEP = (
    "ref_ppl",
    "ref_ppl_se",
    "ppl",
    "ppl_se",
    "ref_nll",
    "nll",
    "delta_nll",
    "delta_nll_se",
    "kl",
    "kl_se",
    "n_windows",
    "window_delta_nll",
)


def evaluate(
    run: TuneRun,
    snap: Snapshot,
    data: TuneData,
    second: torch.Tensor | None,
    *,
    restored: Sequence[int] = (),
    tokenizer=None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    diversity_prompts: int = 8,
    progress: bool = False,
) -> dict:
    """The tuned model (and its restored variant) against the base model on both domains, same code as drop/quantize.

    The base model is the tuned one with every tunable tensor swapped back to
    its value before training, so no second copy is kept. ``progress`` shows a
    bar for each pass over the held-out windows and each round of sampling.
    """
    model, snap = run.model, run.start or snap
    base = next_token_logits(model, snap.swapped)
    variants: dict[str, Variant | None] = {"tuned": None}
    if restored:
        params = [p for i in restored for p in block_params(model, i)]
        variants["restored"] = lambda: snap.swapped(params)
    cands = {name: next_token_logits(model, v) for name, v in variants.items()}
    out: dict = {"restored_blocks": list(restored)}
    domains = {"train": data.eval_ids, "second": second}
    for dom, ids in domains.items():
        if ids is None or ids.shape[0] == 0:
            continue
        q = quality(
            base,
            cands,
            ids,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc=f"evaluate {run.key} on {dom}",
        )
        out[dom] = {name: {k: r[k] for k in _KEEP} for name, r in q.items()}
    if data.prompts and tokenizer is not None:
        prompts = data.prompts[:diversity_prompts]
        out["diversity"] = {
            name: diversity(
                model, tokenizer, prompts, variant=v, device=device, progress=progress, desc=f"diversity {name}"
            )
            for name, v in {"base": snap.swapped, **variants}.items()
        }
    return out


# ------------------------------------------------------------- a whole command: several strategies, evaluated and saved


@dataclass
class TuneReport:
    """What ``layerwise tune`` measured: one entry per strategy, and the files written."""

    meta: dict
    runs: list[dict]
    exports: dict

    def to_dict(self) -> dict:
        return {"kind": "tune", **asdict(self)}

    def save(self, out: str | Path) -> Path:
        """``tune.json`` into ``out``, atomically; returns its path. The page is the report module's job
        (``layerwise.report.tune``), as for every result."""
        return write_json(Path(out) / "tune.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> TuneReport:
        """A saved result: its folder or its ``tune.json``."""
        return load_result(cls, path, "tune.json", "tune")


def run(
    lm: LoadedModel,
    data: TuneData,
    selects: list[str],
    *,
    second: torch.Tensor | None = None,
    prof: Profile | None = None,
    unit: str = "block",
    restore: int = 0,
    restore_order: str = "change",
    out: str | Path | None = None,
    export: bool = True,
    batch_size: int = 4,
    progress: bool = True,
    layer_lr: str | None = None,
    **train_kw,
) -> TuneReport:
    """Train each strategy from the same starting weights, evaluate it on both domains, and save.

    ``prof`` supplies importance for ``importance:``/``top:`` selects and for
    ``restore_order="importance"`` (by the select's metric, else ``ablate_nll``).
    With one strategy the model is saved to ``out/model`` (restoration
    applied when asked); a checkpoint is kept there during training too.
    ``layer_lr="METRIC[:TAU]"`` gives every strategy per-unit learning rates
    from ``prof`` (:func:`layer_rates`); the run's key then ends in
    ``+layer_lr:METRIC:TAU`` and its ``unit_lr`` holds the rates.
    """
    sels = [parse_select(s) for s in selects]
    lr_spec = parse_layer_lr(layer_lr) if layer_lr else None
    if not sels:
        raise LayerwiseError(f"select names no strategy; use one of: {SELECT_HELP}")
    if restore and restore >= lm.anatomy.n_layers:
        raise LayerwiseError(f"restore={restore} would put back all {lm.anatomy.n_layers} blocks; use fewer")
    if restore_order not in RESTORE_ORDERS:
        raise LayerwiseError(f"unknown restore order {restore_order!r}; use change or importance")
    if prof is not None:
        prof.check(lm)
    rates = layer_rates(_need(prof, lr_spec[0]), lr_spec[0], unit, lr_spec[1]) if lr_spec else None
    ckpt = Path(out) / "model" if out is not None and export and len(sels) == 1 else None
    start = time.perf_counter()
    snap = Snapshot(list(lm.model.parameters()))
    runs, exports = [], {}
    for sel in sels:
        metric = sel.metric or "ablate_nll"
        needs = sel.mode in ("importance", "top") or (restore and restore_order == "importance")
        weights = importance_weights(_need(prof, metric), metric, unit) if needs else None
        snap.reset()
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = train(
            lm,
            data,
            select=sel.key,
            unit=unit,
            weights=weights,
            batch_size=batch_size,
            checkpoint=ckpt,
            progress=progress,
            rates=rates,
            **train_kw,
        )
        block_w = (
            importance_weights(_need(prof, metric), metric, "block")
            if restore and restore_order == "importance"
            else None
        )
        restored = restore_order_blocks(r.model, r.start or snap, restore, restore_order, block_w)
        ev = evaluate(
            r,
            snap,
            data,
            second,
            restored=restored,
            tokenizer=lm.tokenizer,
            batch_size=batch_size,
            device=lm.device,
            progress=progress,
        )
        key = r.key + (f"+layer_lr:{lr_spec[0]}:{lr_spec[1]:g}" if lr_spec else "")
        runs.append(
            {"key": key, "select": sel.key, "unit": unit, "layer_lr": layer_lr, **train_kw, **r.summary(), "eval": ev}
        )
        if ckpt is not None:
            params = [p for i in restored for p in block_params(r.model, i)]
            with (r.start or snap).swapped(params) if restored else contextlib.nullcontext():
                path = save_model(r.model, lm.tokenizer, ckpt)
            exports["model"] = {
                "path": str(path),
                "kind": "peft-adapter" if _is_peft(r.model) else "hf",
                "restored_blocks": restored,
            }
        if _is_peft(r.model):
            lm.model = r.model.unload()  # peft's LoRA layers out again, weights untouched
    prov = provenance(seed=train_kw.get("seed", 0), batch_size=batch_size)
    prov["versions"] |= _peft_version()
    meta = {
        **lm.meta(),
        "data": data.meta,
        "second_windows": 0 if second is None else int(second.shape[0]),
        "restore": restore,
        "restore_order": restore_order,
        **prov,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
        "memory_note": (
            "memory_bytes: max_memory_allocated on CUDA; on CPU the resident set size sampled after "
            "every optimizer step"
        ),
    }
    report = TuneReport(meta=meta, runs=runs, exports=exports)
    if out is not None:
        report.save(out)
    return report


def restore_order_blocks(
    model: nn.Module, snap: Snapshot, n: int, order: str, weights: dict[str, float] | None
) -> list[int]:
    """The ``n`` blocks restoration puts back (none for ``n == 0``)."""
    return sorted(restore_order(model, snap, order, weights)[:n]) if n else []


def _need(prof: Profile | None, metric: str) -> Profile:
    if prof is None:
        raise LayerwiseError(
            f"ranking units by {metric} (importance:/top: selects, layer_lr, restore order importance) needs a Profile "
            "of this model: pass prof (CLI: --profile, or let it measure one)"
        )
    return prof


def _peft_version() -> dict:
    try:
        import peft

        return {"peft": peft.__version__}
    except ImportError:
        return {}
