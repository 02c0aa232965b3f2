"""The steering vector: unit-norm directions with their residual-norm scales, added at a block's output by a
hook that always comes off, saved and loaded with the hash of the model it was measured on."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..anatomy import first_tensor, parse_unit
from ..errors import LayerwiseError
from ..io import atomic_dir, check_same_model, write_json
from ..loading import LoadedModel
from ..memory import peak_memory

#: Candidate strengths for ``alpha="auto"``, in multiples of the layer's mean residual norm, tried smallest first.
ALPHA_GRID: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
DEFAULT_ALPHA = 0.25


def _hidden(lm: LoadedModel) -> int:
    return int(lm.anatomy.embed.weight.shape[1])


def _model_id(lm: LoadedModel) -> dict:
    return {
        "model_hash": lm.source.get("model_hash"),
        "model_id": lm.source.get("model_id"),
        "n_layers": lm.anatomy.n_layers,
        "hidden_size": _hidden(lm),
        "model_type": lm.anatomy.model_type,
    }


def check_alpha(alpha: float | str) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise LayerwiseError(f"alpha must be a number (got {alpha!r})") from None
    if not math.isfinite(a):
        raise LayerwiseError(
            f"alpha must be finite (got {alpha}); give a multiple of the layer's residual norm such as 0.25"
        )
    return a


def _adder(delta: torch.Tensor, from_token: int) -> Callable:
    """A block forward hook that returns the block's output plus ``delta`` (a new tensor: the model is not touched)."""

    def hook(_m: torch.nn.Module, _args: tuple, kwargs: dict, output: Any) -> Any:
        h = first_tensor(output)
        add = delta.to(device=h.device, dtype=h.dtype)
        if from_token:
            pos = kwargs.get("position_ids")
            if pos is None:
                raise LayerwiseError(
                    "from_token needs the token positions, which this architecture does not pass to its blocks; "
                    "use from_token=0"
                )
            add = add * (pos >= from_token).unsqueeze(-1).to(h.dtype)
        new = h + add
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@dataclass
class SteeringVector:
    """Unit directions per block output, each scaled by its layer's mean residual norm times ``alpha`` when applied."""

    directions: dict[str, torch.Tensor]
    scales: dict[str, float]
    alpha: float = DEFAULT_ALPHA
    method: str = "diffmean"
    read: str = "last"
    model: dict = field(default_factory=dict)  # what it was measured on (hash, n_layers, hidden_size)
    meta: dict = field(default_factory=dict)  # provenance: versions, command line, seed, the choice

    @property
    def units(self) -> list[str]:
        return sorted(self.directions, key=lambda u: parse_unit(u)[0])

    def delta(self, unit: str, alpha: float | None = None) -> torch.Tensor:
        """What is added at ``unit``: ``alpha * scale * direction``."""
        a = check_alpha(self.alpha if alpha is None else alpha)
        return self.directions[unit] * (a * self.scales[unit])

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse a model other than the one the vector was measured on (its hash, else its shape)."""
        check_same_model(
            self.model.get("model_hash"),
            lm.source.get("model_hash"),
            "this steering vector was measured on",
            "train a vector on this model",
        )
        if (self.model.get("hidden_size"), self.model.get("n_layers")) != (_hidden(lm), lm.anatomy.n_layers):
            raise LayerwiseError(
                f"this steering vector is for a model with {self.model.get('n_layers')} blocks of width "
                f"{self.model.get('hidden_size')}, this one has {lm.anatomy.n_layers} of width {_hidden(lm)}; "
                "train a vector on this model"
            )

    @contextmanager
    def apply(self, lm: LoadedModel, alpha: float | None = None, *, from_token: int = 0) -> Iterator[None]:
        """Steer ``lm`` inside the ``with`` block by forward hooks, removed on exit even on error.

        Every position whose position id is ``from_token`` or more is steered:
        with the default 0, the prompt and every generated token (with a KV
        cache, each decoding step's new position is steered as it is computed,
        and the cached prompt positions were steered when the prompt ran), as
        llama.cpp does. A ``from_token`` above 0 leaves the first tokens of the
        prompt unsteered; it counts position ids, which ``generate`` derives
        from the attention mask, so left padding is not counted.
        """
        self.check_model(lm)
        if not isinstance(from_token, int) or from_token < 0:
            raise LayerwiseError(f"from_token must be a whole number, 0 or more (got {from_token!r})")
        deltas = {u: self.delta(u, alpha) for u in self.units}
        handles = []
        try:
            for u, d in deltas.items():
                layer, _ = lm.anatomy.check_unit(u)
                handles.append(lm.anatomy.blocks[layer].register_forward_hook(_adder(d, from_token), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def to_dict(self) -> dict:
        return {
            "units": self.units,
            "scales": self.scales,
            "alpha": self.alpha,
            "method": self.method,
            "read": self.read,
            "model": self.model,
            "format": "layerwise steering vector: vector.safetensors holds one unit direction per unit name",
        }

    def save(self, out: str | Path, extra: dict | None = None) -> Path:
        """``vector.safetensors`` and ``steer.json`` (this vector, its provenance and ``extra``) into ``out``,
        atomically."""
        with atomic_dir(out, "steer") as tmp:
            self.write(tmp, extra)
        return Path(out)

    def write(self, folder: Path, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        save_file({u: self.directions[u].contiguous() for u in self.units}, str(folder / "vector.safetensors"))
        write_json(
            folder / "steer.json", {"kind": "steer", "vector": self.to_dict(), "meta": self.meta, **(extra or {})}
        )

    @classmethod
    def load(cls, folder: str | Path, lm: LoadedModel | None = None) -> SteeringVector:
        """The vector saved in ``folder``; with ``lm``, checked to come from that model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        folder = folder.parent if folder.name in ("steer.json", "vector.safetensors") else folder
        try:
            doc = json.loads((folder / "steer.json").read_text())
            v = doc["vector"]
            tensors = load_file(str(folder / "vector.safetensors"))
            vec = cls(
                directions={u: tensors[u].float() for u in v["units"]},
                scales={u: float(v["scales"][u]) for u in v["units"]},
                alpha=float(v["alpha"]),
                method=v["method"],
                read=v["read"],
                model=v["model"],
                meta=doc.get("meta", {}),
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise LayerwiseError(
                f"{folder} is not a layerwise steering vector ({exc.__class__.__name__}); give a folder written "
                "by `layerwise steer`"
            ) from None
        if lm is not None:
            vec.check_model(lm)
        return vec


def run_meta(lm: LoadedModel, seed: int, batch_size: int, **extra: Any) -> dict:
    """Provenance every steering result carries: the model, package versions, the command line, the seed and the batch
    size."""
    from ..io import provenance

    return {
        **lm.meta(),
        **provenance(seed=seed, batch_size=batch_size),
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
    }


def parse_layers(spec: str, n_layers: int) -> list[tuple[str, ...]] | None:
    """``auto`` -> None; ``L12`` / ``L6,L12`` -> one single-block variant each; ``L10-L14`` -> one variant steering that
    whole range."""
    if spec == "auto":
        return None
    variants = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        ends = part.split("-")
        try:
            lo, hi = (parse_unit(e.strip()) for e in (ends[0], ends[-1]))
        except (LayerwiseError, ValueError):
            raise LayerwiseError(
                f"layers {part!r} is not a block name; write auto, L12, L10-L14 or L6,L12,L18"
            ) from None
        if len(ends) > 2 or lo[1] != "block" or hi[1] != "block" or hi[0] < lo[0]:
            raise LayerwiseError(
                f"layers {part!r} is not a block or an increasing range of blocks; write auto, L12, L10-L14 or "
                "L6,L12,L18"
            )
        for k in (lo[0], hi[0]):
            if k >= n_layers:
                raise LayerwiseError(f"layer L{k} does not exist; this model has blocks L0 to L{n_layers - 1}")
        variants.append(tuple(f"L{k}" for k in range(lo[0], hi[0] + 1)))
    if not variants:
        raise LayerwiseError("layers names no block; write auto, L12, L10-L14 or L6,L12,L18")
    return list(dict.fromkeys(variants))
