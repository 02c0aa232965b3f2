"""A whole ``layerwise tune`` command: every strategy trained from the same starting weights, evaluated on both
domains, and saved as one :class:`TuneReport` (the model too, when there is one strategy)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs import TuneConfig
from ..errors import LayerwiseError
from ..io import load_result, provenance, write_json
from ..loading import LoadedModel
from ..memory import peak_memory
from ..profile import Profile
from .data import TuneData
from .evaluation import evaluate
from .loop import save_model, train
from .parallel import is_main_process, processes
from .selection import (
    RESTORE_ORDERS,
    SELECT_HELP,
    _is_peft,
    importance_weights,
    layer_rates,
    parse_layer_lr,
    parse_select,
)
from .snapshot import Snapshot, block_params, restore_order


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


#: The settings every run's row repeats, so that a row read alone says how it was trained.
TRAIN_SETTINGS = (
    "active",
    "interval",
    "temperature",
    "steps",
    "lr",
    "grad_accum",
    "train_embeddings",
    "lora",
    "lora_rank",
    "seed",
    "save_every",
)


def run(
    lm: LoadedModel,
    data: TuneData,
    config: TuneConfig | None = None,
    *,
    second: torch.Tensor | None = None,
    prof: Profile | None = None,
    out: str | Path | None = None,
    export: bool = True,
    progress: bool = True,
    **settings: Any,
) -> TuneReport:
    """Train each of the config's strategies from the same starting weights, evaluate it on both domains, and save;
    the results record the config.

    ``prof`` (else the config's ``profile`` file) supplies importance for ``importance:``/``top:`` selects and for
    ``restore_order="importance"`` (by the select's metric, else ``ablate_nll``).
    With one strategy the model is saved to ``out/model`` (restoration
    applied when asked); a checkpoint is kept there during training too.
    ``layer_lr="METRIC[:TAU]"`` gives every strategy per-unit learning rates
    from ``prof`` (:func:`layer_rates`); the run's key then ends in
    ``+layer_lr:METRIC:TAU`` and its ``unit_lr`` holds the rates.
    Started as several processes, each trains with DDP (:func:`train`) and
    evaluates the same weights alike; only the first shows progress and writes.
    ``settings`` are config fields (``select="lisa,full", steps=50``).
    """
    lm.check_resident("tune")
    cfg = TuneConfig.of(config, **settings)
    main = is_main_process(lm.device)
    progress = progress and main
    unit, restore, restore_order, layer_lr, batch_size = (
        cfg.unit,
        cfg.restore,
        cfg.restore_order,
        cfg.layer_lr,
        cfg.batch_size,
    )
    sels = [parse_select(s) for s in cfg.select]
    lr_spec = parse_layer_lr(layer_lr) if layer_lr else None
    if not sels:
        raise LayerwiseError(f"select names no strategy; use one of: {SELECT_HELP}")
    if restore and restore >= lm.anatomy.n_layers:
        raise LayerwiseError(f"restore={restore} would put back all {lm.anatomy.n_layers} blocks; use fewer")
    if restore_order not in RESTORE_ORDERS:
        raise LayerwiseError(f"unknown restore order {restore_order!r}; use change or importance")
    if prof is None and cfg.profile:
        prof = Profile.load(cfg.profile)
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
            lm, data, replace(cfg, select=(sel.key,)), weights=weights, checkpoint=ckpt, progress=progress, rates=rates
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
        trained = {k: getattr(cfg, k) for k in TRAIN_SETTINGS}
        runs.append(
            {"key": key, "select": sel.key, "unit": unit, "layer_lr": layer_lr, **trained, **r.summary(), "eval": ev}
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
    prov = provenance(seed=cfg.seed, batch_size=batch_size)
    prov["versions"] |= _peft_version()
    meta = {
        **lm.meta(),
        "data": data.meta,
        "second_windows": 0 if second is None else int(second.shape[0]),
        "restore": restore,
        "restore_order": restore_order,
        "processes": processes(lm.device).num_processes,  # DDP: each trained batch_size examples a step
        **prov,
        "config": cfg.to_dict(),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
        "memory_note": (
            "memory_bytes: max_memory_allocated on CUDA; on CPU the resident set size sampled after "
            "every optimizer step"
        ),
    }
    report = TuneReport(meta=meta, runs=runs, exports=exports)
    if out is not None and main:
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
