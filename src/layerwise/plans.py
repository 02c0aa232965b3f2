"""Saved plans: the one ``plan.json`` layout that drop and quantize share, read back and checked.

A plan file holds ``{"kind": "drop" | "quantize", "meta": {...}, "plans": {key: plan}}``:
one plan per key (a sweep saves several), the metadata of the run that made
them (model hash included). A plan is applied only to the model it was made
for, since a plan is only as good as the measurement of those weights.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LayerwiseError
from .io import check_same_model, read_json, write_json
from .loading import LoadedModel

#: The files a quantization plan of each format exports (``--export``): a GGUF file and llama.cpp's recipe, or a
#: compressed-tensors checkpoint; the page's commands and the CLI's default both read it here.
EXPORTS = {"gguf": ("gguf", "recipe"), "int": ("hf",)}


def save_plans(folder: str | Path, kind: str, meta: dict, plans: dict[str, dict]) -> Path:
    """Write ``plan.json`` into ``folder`` atomically."""
    return write_json(Path(folder) / "plan.json", {"kind": kind, "meta": meta, "plans": plans})


#: What one plan of each kind must hold to be applied.
FIELDS = {"drop": "units", "quantize": "groups"}


def load_plans(path: str | Path, kind: str, key: str | None = None) -> tuple[dict, str, dict]:
    """``(meta, key, plan)`` of one plan in a ``plan.json`` (or the folder holding it); ``key`` picks one of several."""
    path = Path(path)
    path = path / "plan.json" if path.is_dir() else path
    d = read_json(path, "a layerwise plan file (the plan.json a run wrote)")
    try:
        meta, plans = d["meta"], d["plans"]
        found = d.get("kind", kind)  # files written before plans carried their kind are quantize plans
        if not isinstance(plans, dict) or not all(
            isinstance(p, dict) and FIELDS.get(found, "") in p for p in plans.values()
        ):
            raise TypeError("malformed plans")
    except (KeyError, TypeError, AttributeError) as exc:
        raise LayerwiseError(
            f"{path} is not a layerwise plan file ({exc.__class__.__name__}); give the plan.json a run wrote"
        ) from None
    if found != kind:
        raise LayerwiseError(f"{path} holds a {found} plan, not a {kind} plan; use it with `layerwise {found}`")
    if key is None and len(plans) != 1:
        raise LayerwiseError(f"{path} holds {len(plans)} plans; choose one with `key` (one of {', '.join(plans)})")
    key = next(iter(plans)) if key is None else key
    if key not in plans:
        raise LayerwiseError(f"{path} has no plan {key!r}; choose one of {', '.join(plans)}")
    return meta, key, plans[key]


def check_plan_model(model_hash: str | None, lm: LoadedModel) -> None:
    """Refuse a plan made for other weights (when both hashes are known)."""
    check_same_model(
        model_hash,
        lm.source.get("model_hash"),
        "the plan was made for",
        "load the model the plan was made for, or make a new plan",
    )
