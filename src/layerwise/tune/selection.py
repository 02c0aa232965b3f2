"""Which units train when: the ``select`` modes, importance weights and per-unit learning rates, all in one
``TrainerCallback`` (:class:`LayerSelector`) that a user's own ``Trainer`` and the plain loop drive alike."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard, cast

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState

from ..anatomy import KINDS, Anatomy, Kind, unit_name
from ..errors import LayerwiseError
from ..memory import memory_bytes
from ..profile import APPLIES, DIRECTION, METRICS, UNIT_KINDS, Profile, needs_hint
from .experts import part_params

if TYPE_CHECKING:
    from peft import PeftModel


MODES = ("full", "lisa", "importance", "top", "adaptive", "badam", "lora")
SELECT_HELP = "full, lora, lisa, importance:METRIC, top:METRIC, adaptive, badam:ascending|descending|random"
#: What is switched on and off: blocks, sublayers, or (mixture-of-experts models) routed experts or routers.
UNITS = ("block", "attn", "mlp", "expert", "router")
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
        raise LayerwiseError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    kinds = UNIT_KINDS.get(unit, (unit,))
    fits = [m for m in METRICS if DIRECTION.get(m) and all(k in APPLIES.get(m, KINDS) for k in kinds)]
    if metric not in fits:
        use = f"rank them by one of {', '.join(fits)}" if fits else "train them with full, lisa, adaptive or badam"
        raise LayerwiseError(f"{metric} does not rank {unit} units; {use}")
    sign = DIRECTION.get(metric) or 1
    vals = prof.filled(metric, (unit,))
    if not vals or any(v is None for v in vals.values()):
        hint = needs_hint(metric, unit == "expert")
        raise LayerwiseError(f"the profile has no {metric} values for {unit} units; re-profile with {hint}")
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
            raise LayerwiseError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
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
        self.unit = unit
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
        peft = _is_peft(model)
        if self.unit in ("expert", "router"):
            if peft:
                raise LayerwiseError(
                    f"unit {self.unit} trains the {self.unit}s' own weights, which LoRA adapters do not reach; leave "
                    "out lora"
                )
            return part_params(base, self.unit)
        an = Anatomy(base)
        skipped = set((getattr(base.config, "layerwise", None) or {}).get("dropped_sublayers") or [])
        kind = cast(Kind, self.unit)
        kinds: tuple[Kind, ...] = ("attn", "mlp") if kind == "block" else (kind,)
        out = {}
        for i in range(an.n_layers):
            if all(unit_name(i, k) in skipped for k in kinds):
                continue  # a sublayer `layerwise drop` removed computes nothing; training it is pointless
            mod = an.blocks[i] if kind == "block" else an.branch(i, kind)
            ps = [p for p in mod.parameters() if p.requires_grad or not peft]
            if ps:
                out[unit_name(i, kind)] = ps
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
        missing = [u for u in units if u not in rates]
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
        return self._in_depth_order(names[i] for i in picked.tolist())

    def _in_depth_order(self, names: Iterable[str]) -> list[str]:
        chosen = set(names)
        return [u for u in self.params if u in chosen]

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
            return self._in_depth_order(sorted(names, key=lambda u: -weights[u])[: self.active])
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
        return self._in_depth_order(order[start : start + self.active])

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
