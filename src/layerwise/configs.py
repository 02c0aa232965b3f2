"""One frozen config per action: what a run was asked to do, recorded with its result so it can be run again.

Each action's ``run`` takes its config (or the same settings as keyword arguments, which build one); the CLI builds
the config from its flags, and the config's field names are the flags' names (``--eval-samples`` is
``eval_samples``), so ``layerwise ACTION --config RESULT`` reads a recorded config back as the flags' defaults
(:func:`read_config`) and any flag given beside it still wins. ``inputs`` holds the command line's model and data
options (``model``, ``data``, ``seq_len`` ...) as given; it is None when the caller loaded the model and the data
itself, and the result's ``meta`` says what they were either way.

A config checks its own values when made, the same for a Python caller and for a JSON file: each field has the type
its annotation names, and counts and sizes are in range. A failed check is one line naming the field in backticks,
which the CLI shows as its flag.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import LayerwiseError
from .io import read_json

C = TypeVar("C", bound="Config")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type: None, bool, int, float (an int will do), str, Literal, unions, a
    tuple of one type or a dict."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(_conforms(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _is_tuple(hint: Any) -> bool:
    """Whether the annotation is a tuple, or a union holding one."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return typing.get_origin(hint) is tuple


def _shown(hint: Any) -> str:
    """An annotation as a user reads it: ``int or None``, ``'gguf' or 'int'``, ``a list of float``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_shown(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_shown(args[0])}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


@dataclass(frozen=True)
class Config:
    """What every action's config shares: the command line's inputs, the type and range checks, and the JSON form."""

    #: The command line's model and data options as given (None: the caller loaded the model and data itself).
    inputs: dict | None = None

    #: Fields that are counts or sizes, each with its least value.
    AT_LEAST: typing.ClassVar[dict[str, float]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, str)) and _is_tuple(hints[f.name]):
                value = tuple(s.strip() for s in value.split(",") if s.strip()) if isinstance(value, str) else value
                object.__setattr__(self, f.name, tuple(value))
            if not _conforms(getattr(self, f.name), hints[f.name]):
                raise LayerwiseError(f"`{f.name}` takes {_shown(hints[f.name])} (got {value!r})")
        for name, low in self.AT_LEAST.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if any(v is not None and v < low for v in values):
                raise LayerwiseError(f"`{name}` must be at least {low:g} (got {value})")

    @classmethod
    def of(cls: type[C], config: C | None = None, **settings: Any) -> C:
        """``config`` with ``settings`` changed, or a config of ``settings`` alone: what every ``run`` starts with."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise LayerwiseError(
                f"{cls.__name__} has no setting {', '.join(unknown)}; its settings: {', '.join(names)}"
            )
        if config is not None and not isinstance(config, cls):
            raise LayerwiseError(f"give a {cls.__name__}, not a {type(config).__name__}")
        return replace(config, **settings) if config is not None else cls(**settings)

    def to_dict(self) -> dict:
        """The config as its JSON holds it (lists for tuples), the same before and after a save."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class DropConfig(Config):
    """``layerwise drop``: which units go (one of ``n``, ``sweep``, ``units`` or a saved ``plan``), ranked how, and
    how the result is checked and exported."""

    n: int | None = None
    #: Experts dropped from every sparse block (``unit`` expert): a plan whose checkpoint keeps one expert count.
    per_layer: int | None = None
    sweep: tuple[int, ...] | None = None
    units: tuple[str, ...] | None = None
    plan: str | None = None
    unit: tuple[str, ...] = ("block",)
    order: tuple[str, ...] = ("bi",)
    iterative: bool = False
    profile: str | None = None
    seed: int = 0
    #: None: hf when one plan is written to a folder, nothing for a sweep.
    export: tuple[str, ...] | None = None
    with_speed: bool = True
    eval_samples: int = 16
    batch_size: int = 4

    AT_LEAST: typing.ClassVar[dict[str, float]] = {
        "n": 1,
        "per_layer": 1,
        "sweep": 1,
        "seed": 0,
        "eval_samples": 1,
        "batch_size": 1,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        chosen = [k for k in ("n", "per_layer", "sweep", "units", "plan") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise LayerwiseError(
                f"give one of `n`, `per_layer`, `sweep`, `units` and `plan`, not {' and '.join(chosen)}"
            )


@dataclass(frozen=True)
class QuantizeConfig(Config):
    """``layerwise quantize``: the budget (``bits``, a ``sweep`` of them, or a saved ``plan``), the strategies, the
    format and quantizer, and how the result is checked and exported."""

    bits: float | None = None
    sweep: tuple[float, ...] | None = None
    plan: str | None = None
    #: The GGUF file's size to plan for, all tensors and metadata included (``90MB``, ``0.1GiB``): beside ``bits``.
    size: str | None = None
    strategy: tuple[str, ...] = ("measured",)
    format: Literal["gguf", "int"] = "gguf"
    method: Literal["rtn", "gptq"] = "rtn"
    group_size: int | None = None
    symmetric: bool | None = None
    #: None: the format's every export when one plan is written to a folder, nothing otherwise.
    export: tuple[str, ...] | None = None
    profile: str | None = None
    seed: int = 0
    eval_samples: int = 16
    batch_size: int = 4
    #: GGUF types' importance matrix: auto (made on the calibration windows), none, or a file (GGUF or legacy .dat).
    imatrix: str = "auto"
    #: GGUF: maps given one type because they run together, by short name (``gate,up``, ``q,k,v``).
    tie: tuple[str, ...] = ()
    #: GGUF: the candidate types (``Q4_K,IQ4_XS``); None: every K- and legacy type, and the IQ types with an imatrix.
    types: tuple[str, ...] | None = None
    #: GGUF: the token embedding's type (llama-quantize's ``--token-embedding-type``); None: as the source stores it.
    embedding: str | None = None

    AT_LEAST: typing.ClassVar[dict[str, float]] = {"group_size": 1, "seed": 0, "eval_samples": 1, "batch_size": 1}

    def __post_init__(self) -> None:
        super().__post_init__()
        budgets = [self.bits] if self.bits is not None else list(self.sweep or ())
        if any(b <= 0 for b in budgets):
            raise LayerwiseError(f"`budgets` must be positive bits per weight (got {', '.join(map(str, budgets))})")
        chosen = [k for k in ("bits", "sweep", "plan", "size") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise LayerwiseError(f"give one of `bits`, `sweep`, `size` and `plan`, not {' and '.join(chosen)}")
        if self.size is not None:
            from .memory_plan import parse_bytes

            parse_bytes(self.size, "size")
            if self.format != "gguf":
                raise LayerwiseError("`size` targets a GGUF file's size; for integer formats give `bits`")
        if self.types is not None and self.format != "gguf":
            raise LayerwiseError("`types` are GGUF types; integer formats choose among bits and `group_size`")
        if self.embedding is not None and self.format != "gguf":
            raise LayerwiseError("`embedding` is a GGUF type; integer formats keep the embedding as the model has it")
        if self.tie and self.format != "gguf":
            raise LayerwiseError("integer formats always give q/k/v and gate/up one config each; leave out `tie`")
        if self.tie and "q4km" in self.strategy:
            raise LayerwiseError("the q4km baseline types each tensor on its own; leave out `tie` to compare with it")

    @property
    def budgets(self) -> list[float]:
        """The bit budgets to plan for: the sweep's, sorted without repeats, or the one of ``bits``."""
        return sorted(set(self.sweep)) if self.sweep else ([self.bits] if self.bits is not None else [])

    @property
    def n_plans(self) -> int:
        """The plans a run makes: one per budget (or for ``size``) of each strategy, one for the q4km baseline."""
        return sum(1 if s == "q4km" else len(self.budgets) or int(self.size is not None) for s in self.strategy)


@dataclass(frozen=True)
class TuneConfig(Config):
    """``layerwise tune``: the selection strategies to compare (``select``), their settings, the optimizer, and
    restoration afterwards."""

    select: tuple[str, ...] = ("lisa",)
    unit: Literal["block", "attn", "mlp", "expert", "router"] = "block"
    active: int = 2
    interval: int = 20
    temperature: float = 1.0
    layer_lr: str | None = None
    steps: int = 100
    lr: float = 1e-4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    train_embeddings: bool = True
    lora: bool = False
    lora_rank: int = 8
    restore: int = 0
    restore_order: Literal["change", "importance"] = "change"
    profile: str | None = None
    save_every: int = 0
    seed: int = 0
    eval_samples: int = 16
    batch_size: int = 4

    AT_LEAST: typing.ClassVar[dict[str, float]] = {
        "active": 1,
        "interval": 1,
        "steps": 1,
        "grad_accum": 1,
        "lora_rank": 1,
        "restore": 0,
        "save_every": 0,
        "seed": 0,
        "eval_samples": 1,
        "batch_size": 1,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0:
            raise LayerwiseError(f"`lr` must be positive (got {self.lr})")


@dataclass(frozen=True)
class ProbeConfig(Config):
    """``layerwise probe``: which units are read and how, the cross-validation, and the importance curve beside it
    (a given ``profile``, or one measured on ``profile_samples`` windows of builtin:pydoc)."""

    units: tuple[str, ...] = ("blocks",)
    read: Literal["last", "mean"] = "last"
    folds: int = 5
    seed: int = 0
    c: float = 1.0
    profile: str | None = None
    profile_samples: int = 8
    profile_seq_len: int = 128
    max_bytes: int | None = None
    batch_size: int = 8

    AT_LEAST: typing.ClassVar[dict[str, float]] = {
        "folds": 2,
        "seed": 0,
        "profile_samples": 0,
        "profile_seq_len": 2,
        "max_bytes": 1,
        "batch_size": 1,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.c > 0:
            raise LayerwiseError(f"c (the inverse L2 strength) must be positive (got {self.c})")

    @property
    def unit_spec(self) -> str | list[str]:
        """``units`` as :func:`layerwise.features.collect` takes them: a keyword (blocks, all) or a list of names."""
        return self.units[0] if self.units in (("blocks",), ("all",), ("experts",)) else list(self.units)


@dataclass(frozen=True)
class SteerConfig(Config):
    """``layerwise steer``: how the vector is fitted, where and how strongly it is added, what is swept, and the
    exports."""

    method: Literal["diffmean", "pca", "probe"] = "diffmean"
    layers: str = "auto"
    alpha: float | Literal["auto"] = "auto"
    sweep_alpha: tuple[float, ...] = ()
    sweep_layers: str | None = None
    read: Literal["last", "mean"] = "last"
    seed: int = 0
    target: float = 2.0
    probe: str | None = None
    new_tokens: int = 24
    export: tuple[str, ...] = ()
    eval_samples: int = 16
    batch_size: int = 4

    AT_LEAST: typing.ClassVar[dict[str, float]] = {"seed": 0, "new_tokens": 1, "eval_samples": 1, "batch_size": 1}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target > 0:
            raise LayerwiseError(f"`target` must be positive (got {self.target})")


#: Each action's config class, by the name of its command and result kind.
CONFIGS: dict[str, type[Config]] = {
    "drop": DropConfig,
    "quantize": QuantizeConfig,
    "tune": TuneConfig,
    "probe": ProbeConfig,
    "steer": SteerConfig,
}


def read_config(path: str | Path, kind: str) -> Config:
    """The config a ``kind`` run recorded (its result folder or JSON file), or a JSON file of that config's fields.

    Checked like any config: an unknown field or a value of the wrong type is one line naming it.
    """
    from .results import REGISTRY, kind_of

    path = Path(path)
    if path.is_dir():
        found = kind_of(path)
        path = path / REGISTRY[found].file
    doc = read_json(path, f"a layerwise {kind} result or config")
    if not isinstance(doc, dict):
        raise LayerwiseError(f"{path} is not a layerwise {kind} result or config (a JSON object)")
    if "kind" in doc or "meta" in doc:
        doc.setdefault("kind", kind)
        if doc["kind"] != kind:
            raise LayerwiseError(f"{path} is a layerwise {doc['kind']} result; give a {kind} result or config")
        doc = (doc.get("meta") or {}).get("config")
        if doc is None:
            raise LayerwiseError(f"{path} records no config (written by an older layerwise); give the options as flags")
    try:
        return CONFIGS[kind].of(**doc)
    except LayerwiseError as exc:
        raise LayerwiseError(f"{path}: {exc}") from None


def flat(config: Config) -> dict:
    """The config as the command line's option values: its fields and, beside them, its inputs."""
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "inputs"}
    return {**(config.inputs or {}), **values}


__all__ = [
    "CONFIGS",
    "Config",
    "DropConfig",
    "ProbeConfig",
    "QuantizeConfig",
    "SteerConfig",
    "TuneConfig",
    "flat",
    "read_config",
]
