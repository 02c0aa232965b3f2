"""A whole ``layerwise steer`` command: fit, choose the layer and strength, measure every swept variant on the
report prompts and the cost text, and save the vector, the :class:`SteerReport` and the exports."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import SteerConfig
from ..errors import LayerwiseError
from ..io import atomic_dir, load_result
from ..loading import LoadedModel
from .export import export_gguf
from .fitting import fit, rank_variants
from .measuring import _key, choose_alpha, measure, prompt_sets
from .vector import DEFAULT_ALPHA, SteeringVector, check_alpha, parse_layers, run_meta


@dataclass
class SteerReport:
    """What ``layerwise steer`` measured: the choice, every (layer, alpha) evaluated, the unsteered baseline, files
    written."""

    meta: dict
    vector: dict
    choice: dict
    unsteered: dict
    rows: list[dict]
    prompts: list[str]
    exports: dict

    def to_dict(self) -> dict:
        return {
            "kind": "steer",
            "meta": self.meta,
            "vector": self.vector,
            "choice": self.choice,
            "unsteered": self.unsteered,
            "rows": self.rows,
            "prompts": self.prompts,
            "exports": self.exports,
        }

    @classmethod
    def load(cls, path: str | Path) -> SteerReport:
        """A saved result: its folder or its ``steer.json``."""
        return load_result(cls, path, "steer.json", "steer")


def run(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    prompts: Sequence[str],
    eval_ids: torch.Tensor,
    config: SteerConfig | None = None,
    *,
    report_prompts: Sequence[str] | None = None,
    scorer: Callable[[str], float] | None = None,
    data: dict | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    **settings: Any,
) -> SteerReport:
    """Fit, choose the layer and the strength, measure every swept (layer, alpha), write the vector, report and exports;
    the result records the config.

    ``prompts`` calibrate ``alpha="auto"``; effects are measured on ``report_prompts`` (module docstring: which set is
    which) and the cost on the first ``eval_samples`` of ``eval_ids``. ``sweep_alpha`` values are measured at every
    variant of ``layers``; with ``sweep_layers`` (a layer spec) they are measured at the chosen units and those layers
    instead, and every variant of ``layers`` once at the chosen alpha. ``settings`` are config fields
    (``layers="L6", alpha=0.25``); ``data`` describes where the pairs and prompts came from, for the record.
    """
    cfg = SteerConfig.of(config, **settings)
    method, layers, alpha, read, seed, batch_size = (
        cfg.method,
        cfg.layers,
        cfg.alpha,
        cfg.read,
        cfg.seed,
        cfg.batch_size,
    )
    export, sweep_layers, eval_ids = cfg.export, cfg.sweep_layers, eval_ids[: cfg.eval_samples]
    start = time.perf_counter()
    unknown = set(export) - {"gguf"}
    if unknown:
        raise LayerwiseError(
            f"unknown export {', '.join(sorted(unknown))}; the vector is always saved, and gguf adds a llama.cpp "
            "control vector"
        )
    sweep = [check_alpha(a) for a in cfg.sweep_alpha]
    fixed = None if alpha == "auto" else check_alpha(alpha)
    variants = parse_layers(layers, lm.anatomy.n_layers)
    also_swept = None if sweep_layers is None else parse_layers(sweep_layers, lm.anatomy.n_layers) or []
    if "gguf" in export and any("L0" in v for v in variants or []):
        raise LayerwiseError(
            "llama.cpp control vectors cannot steer L0 (its first slot, direction.1, is block 1's output); choose "
            "layers from L1 on"
        )
    f = fit(
        lm, pairs, method=method, read=read, seed=seed, probe=cfg.probe, batch_size=2 * batch_size, progress=progress
    )
    ranking = rank_variants(f, variants)
    if "gguf" in export and variants is None:
        ranking = [r for r in ranking if r["units"] != ["L0"]]  # llama.cpp cannot take it
    chosen = tuple(ranking[0]["units"])
    ps = prompt_sets(lm, prompts, pairs, f.held_out, seed=seed, report=report_prompts)
    probe_vec = f.vector(chosen, lm, DEFAULT_ALPHA, {})
    alpha_choice = (
        choose_alpha(lm, probe_vec, ps, target=cfg.target) if fixed is None else {"alpha": fixed, "given": True}
    )
    a = float(alpha_choice["alpha"])
    listed = variants or [chosen]
    if also_swept is None:
        configs = [(v, s) for v in listed for s in (sweep or [a])]
    else:
        configs = [(v, a) for v in listed] + [(v, s) for v in [chosen, *also_swept] for s in sweep]
    configs = list(dict.fromkeys([*configs, (chosen, a)]))
    m = measure(
        lm, f, configs, ps, eval_ids, new_tokens=cfg.new_tokens, scorer=scorer, batch_size=batch_size, progress=progress
    )
    choice = {
        "layers": layers,
        "chosen": list(chosen),
        "chosen_key": _key(chosen, a),
        "alpha": alpha_choice,
        "ranking": ranking,
        "split": {
            "rule": "torch.randperm(n) under manual_seed(seed); first ceil(n/2) calibrate, the rest are held out "
            "(pairs: rank the layers); prompts: seed + 1, the rest are development when report prompts are given, "
            "else the report set",
            "pairs_calibration": f.calibration,
            "pairs_held_out": f.held_out,
            "n_prompts_calibration": len(ps.calibration),
            "n_prompts_development": len(ps.roles["development"]),
            "n_prompts_report": len(ps.report),
            "n_continuation_pairs": len(ps.conts),
        },
        "prompts": {
            "uses": {
                "calibration": "chooses alpha='auto'",
                "development": "not used by this run (the built-in demo's: looked at while the defaults were set)",
                "report": "every reported effect",
            },
            **ps.roles,
        },
        "scales": f.scales,
        "gaps": f.gaps,
    }
    meta = run_meta(
        lm,
        seed,
        batch_size,
        data=data or {},
        method=method,
        read=read,
        target=cfg.target,
        new_tokens=cfg.new_tokens,
        config=cfg.to_dict(),
        eval_windows=int(eval_ids.shape[0]),
        eval_seq_len=int(eval_ids.shape[1]),
        wall_time_s=round(time.perf_counter() - start, 3),
    )
    vec = f.vector(chosen, lm, a, meta)
    report = SteerReport(
        meta=meta,
        vector=vec.to_dict(),
        choice=choice,
        unsteered=m["unsteered"],
        rows=m["rows"],
        prompts=ps.roles["report"],
        exports={},
    )
    if out is not None:
        _write(vec, report, lm, Path(out), export)
    return report


def _write(vec: SteeringVector, report: SteerReport, lm: LoadedModel, out: Path, export: Sequence[str]) -> None:
    """Everything into ``out`` at once: a failure leaves no partial folder. The page is the report module's job."""
    with atomic_dir(out, "steer") as tmp:
        if "gguf" in export:
            path = export_gguf(vec, lm, tmp / "control_vector.gguf")
            report.exports["gguf"] = {"path": str(out / path.name), "bytes": path.stat().st_size, "alpha": vec.alpha}
        d = report.to_dict()
        vec.write(tmp, {k: v for k, v in d.items() if k not in ("vector", "meta")})
