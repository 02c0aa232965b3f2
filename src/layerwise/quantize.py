"""`layerwise quantize`: mixed precision at any fractional bit budget, checked on held-out text and exported.

Two families of candidate formats:

* ``gguf`` (default for a GGUF-loaded model): llama.cpp's own types
  (Q2_K ... Q8_0), produced by llama.cpp and measured from the tensors it
  wrote. Each tensor is typed on its own, as llama.cpp stores them. Exports:
  a mixed-type GGUF file and the ``llama-quantize`` command that makes it.
* ``int``: integer codes with group scales (RTN or GPTQ), q/k/v and gate/up
  sharing one config as vLLM requires. Evaluated by fake quantization.

Strategies turn one measurement into plans: ``measured`` (the budgeted
solver, with floors on the width tried and checked on the calibration
windows), ``ranked:METRIC`` (Layer-Wise Quantization: the least important
blocks by a Profile metric get the lower of the two candidate widths that
bracket the budget; ``ranked:random`` orders blocks at random), ``uniform``
(the dearest single config within the budget) and ``q4km`` (llama.cpp's
Q4_K_M rule, GGUF family only). Bits per weight count codes, scales and zero
points, over the quantized tensors; ``bpw_model`` adds every other tensor as
stored (embeddings, norms).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch

from .data import Windows
from .drop import ablation_for, check_profile, rank
from .errors import LayerwiseError
from .evaluate import KL_KEYS, next_token_logits, quality
from .io import write_atomic, write_json
from .loading import LoadedModel
from .profile import Profile, profile
from .quant import gguf as qg
from .quant.allocate import Allocation, check_budget, ranked, solve, uniform
from .quant import hf
from .quant.apply import plan_codes, plan_weights, quantized
from .quant.measure import Candidates, GroupCandidates, Measurement, bit_range, measure
from .quant.rtn import QConfig

Family = Literal["gguf", "int"]
EXPORTS = {"gguf": ("gguf", "recipe"), "int": ("hf",)}


def candidates_for(lm: LoadedModel, family: Family, *, method: str = "rtn", group_size: int | None = None,
                   symmetric: bool | None = None, sizes: tuple[int, ...] = (32, 64, 128)) -> Candidates:
    """The candidate set of a family: GGUF types, or 2-8 bit integer codes at one group size (else at each of ``sizes``)."""
    if family == "gguf":
        if method != "rtn" or group_size is not None or symmetric is not None:
            raise LayerwiseError("--method, --group-size and --symmetric choose integer formats; GGUF types fix their own (use --format int)")
        return qg.GGUFCandidates.of(lm)
    if family != "int":
        raise LayerwiseError(f"unknown --format {family!r}; use gguf or int")
    sizes = (group_size,) if group_size else sizes
    return GroupCandidates(tuple(QConfig(b, g, bool(symmetric)) for b in (2, 3, 4, 5, 6, 8) for g in sizes), method)  # type: ignore[arg-type]


def _uniform_bpw(meas: Measurement) -> list[tuple[float, str]]:
    names = next(iter(meas.groups.values()))["configs"]
    return sorted((uniform(meas, c).bpw, c) for c in names)


def bracket(meas: Measurement, target: float) -> tuple[str, str]:
    """The two configs whose uniform plans lie just below and just above ``target`` bits per weight."""
    levels = _uniform_bpw(meas)
    below = [c for b, c in levels if b <= target + 1e-9]
    above = [c for b, c in levels if b > target + 1e-9]
    if not below:
        raise LayerwiseError(f"{target} bits per weight is below the cheapest config ({levels[0][0]:.3f} with {levels[0][1]}); raise --bits")
    return below[-1], (above[0] if above else below[-1])


def block_order(lm: LoadedModel, windows: Windows, metric: str, prof: Profile | None, *, seed: int = 0,
                progress: bool = True) -> list[int]:
    """Blocks from least to most important by ``metric`` (``random``: a seeded shuffle)."""
    if metric == "random":
        order = list(range(lm.anatomy.n_layers))
        random.Random(seed).shuffle(order)
        return order
    if prof is None:
        prof = profile(lm, windows, ablation=ablation_for(metric), lens=metric.startswith("lens_"), progress=progress)  # type: ignore[arg-type]
    check_profile(prof, lm)
    return [int(u[1:]) for u, _ in rank(prof, "block", metric)]


def check_strategies(strategies: list[str]) -> None:
    for s in strategies:
        if s not in ("measured", "uniform", "q4km") and not s.startswith("ranked:"):
            raise LayerwiseError(f"unknown --strategy {s!r}; use measured, ranked:METRIC, ranked:random, uniform or q4km")


def measured(lm: LoadedModel, windows: Windows, meas: Measurement, cands: Candidates, target: float, *,
             batch_size: int = 4) -> Allocation:
    """The solver's plan, with the solver's error model checked on the calibration windows.

    The solver adds up per-group predicted loss changes: a second-order model
    that is right near the original but under-counts large errors, which
    compound through the later blocks. At a low budget it may therefore buy
    many fine configs with a few very coarse ones, and lose. So the plan is
    also solved under narrower choices: with a floor on the width (no config
    whose uniform plan has fewer than w whole bits per weight, for each w up
    to the budget), and within the band of the two configs whose uniform plans
    bracket the budget. Every distinct plan is scored on the calibration
    windows (the measurement's own data, never the held-out windows; see
    ``calibration_loss``) and the one with the least NLL is kept. The
    unrestricted solution is always among them; ``meta`` lists them all.
    """
    levels = _uniform_bpw(meas)
    choices: dict[str, set[str] | None] = {"any width": None}
    choices |= {f"floor {w}": {c for b, c in levels if int(b) >= w} for w in sorted({int(b) for b, _ in levels if b <= target + 1e-9})}
    if levels[0][0] <= target + 1e-9:
        band = bracket(meas, target)
        choices[f"band {'-'.join(dict.fromkeys(band))}"] = set(band)
    tried: dict[tuple, tuple[str, Allocation]] = {}
    for name, allowed in choices.items():
        a = solve(meas, target, allowed=allowed)
        tried.setdefault(tuple(sorted(a.configs.items())), (name, a))
    if len(tried) == 1:
        return next(iter(tried.values()))[1]
    loss = calibration_loss(lm, windows, meas, cands, dict(tried.values()), batch_size=batch_size)
    best_name, best = min(tried.values(), key=lambda na: loss[na[0]])
    best.meta |= {"choice": best_name, "calibration_delta_nll": loss,
                  "predicted_delta_nll": {name: a.predicted_error for name, a in tried.values()}}
    return best


def calibration_loss(lm: LoadedModel, windows: Windows, meas: Measurement, cands: Candidates, allocs: dict[str, Allocation], *,
                     batch_size: int = 4) -> dict[str, float]:
    """Each plan's mean NLL increase over the calibration windows.

    Weights rounded to a grid (RTN, GGUF types) do not depend on data, so each
    plan is scored on all calibration windows. GPTQ fits its weights to the
    windows it runs on, and a plan's coarsest groups fit them far better than
    they generalize: on the default model at 3.25 bits, the plan that scored
    worst of three on its own windows was the best of them held out. GPTQ
    plans are therefore cross-fitted: made on the even calibration windows
    and scored on the odd ones, then the other way round (with a single
    window there is nothing to hold out, and it scores itself).
    """
    c = windows.calibration
    folds = [(c[0::2], c[1::2]), (c[1::2], c[0::2])] if cands.needs_hessian and len(c) > 1 else [(c, c)]
    deltas: dict[str, list[float]] = {name: [] for name in allocs}
    for fit, score in folds:
        part = replace(windows, ids=fit, n_calib=len(fit))
        variants = {name: next_token_logits(lm.model, lambda pw=plan_weights(lm, meas, a, cands, part, batch_size=batch_size): quantized(lm, pw))
                    for name, a in allocs.items()}
        q = quality(next_token_logits(lm.model), variants, score, batch_size=batch_size, device=lm.device)
        for name in allocs:
            deltas[name] += q[name]["window_delta_nll"]
    return {name: sum(d) / len(d) for name, d in deltas.items()}


def plans(lm: LoadedModel, windows: Windows, meas: Measurement, cands: Candidates, budgets: list[float], strategies: list[str], *,
          prof: Profile | None = None, seed: int = 0, batch_size: int = 4, progress: bool = True) -> list[Allocation]:
    """Every strategy at every budget (a rule that ignores the budget, like ``q4km``, once); duplicates removed."""
    check_strategies(strategies)
    out: list[Allocation] = []
    for strategy in strategies:
        if strategy == "q4km":
            if "Q4_K" not in next(iter(meas.groups.values()))["configs"]:
                raise LayerwiseError("the q4km baseline is a GGUF rule; use it with --format gguf")
            out.append(qg.q4km(meas, lm.anatomy))
            continue
        order = block_order(lm, windows, strategy.split(":", 1)[1], prof, seed=seed, progress=progress) if strategy.startswith("ranked:") else []
        for b in budgets:
            if strategy == "measured":
                out.append(measured(lm, windows, meas, cands, b, batch_size=batch_size))
            elif strategy == "uniform":
                fits = [c for bpw, c in _uniform_bpw(meas) if bpw <= b + 1e-9]
                if not fits:
                    raise LayerwiseError(f"no single config fits {b} bits per weight; raise --bits")
                out.append(uniform(meas, fits[-1]))
            else:
                low, high = bracket(meas, b)
                out.append(ranked(meas, order, b, low, high, metric=strategy.split(":", 1)[1]))
    unique: dict[tuple, Allocation] = {}
    for a in out:
        unique.setdefault((a.strategy, tuple(sorted(a.configs.items()))), a)
    return list(unique.values())


def label(a: Allocation) -> str:
    return a.strategy if a.target_bpw is None else f"{a.strategy}@{a.target_bpw:g}"


def _other_bits(lm: LoadedModel, meas: Measurement, cands: Candidates) -> tuple[int, int]:
    """(bits, weights) of every parameter outside the plan, as the export stores it."""
    planned = {p for e in meas.groups.values() for p in e["modules"]}
    if isinstance(cands, qg.GGUFCandidates):
        names = {lm.anatomy.gguf_name(p) for p in planned}
        rest = [t for t in qg.ggufio.reader(cands.source).tensors if t.name not in names]
        return sum(qg.ggufio.tensor_bits(t) for t in rest), sum(int(t.n_elements) for t in rest)
    params = {id(p): p for name, p in lm.model.named_parameters() if name.rsplit(".", 1)[0] not in planned}
    n = sum(p.numel() for p in params.values())
    return 16 * n, n


def evaluate(lm: LoadedModel, windows: Windows, meas: Measurement, cands: Candidates, allocs: list[Allocation],
             eval_ids: torch.Tensor, *, batch_size: int = 4, chunk: int = 4) -> tuple[dict, list[dict], dict]:
    """Held-out quality and size of every plan beside the original: (original, one row per plan, plans as JSON).

    Plans are evaluated a few at a time (each holds a dequantized copy of the
    quantized weights), sharing the original's forward pass within a chunk.
    """
    other_bits, other_n = _other_bits(lm, meas, cands)
    quant_n = sum(e["numel"] for e in meas.groups.values())
    q: dict[str, dict] = {}
    for i in range(0, len(allocs), chunk):
        variants = {label(a): next_token_logits(lm.model, lambda w=plan_weights(lm, meas, a, cands, windows, batch_size=batch_size): quantized(lm, w))
                    for a in allocs[i:i + chunk]}
        q |= quality(next_token_logits(lm.model), variants, eval_ids, batch_size=batch_size, device=lm.device)
        del variants
    first = next(iter(q.values()))
    original = {"ppl": first["ref_ppl"], "ppl_se": first["ref_ppl_se"], "nll": first["ref_nll"], "n_windows": first["n_windows"],
                "n_tokens": first["n_tokens"], "quantized_weights": quant_n, "other_weights": other_n}
    rows, plan_json = [], {}
    for a in allocs:
        key = label(a)
        bits = a.bpw * quant_n
        rows.append({"plan": key, "strategy": a.strategy, "target_bpw": a.target_bpw, "bpw": a.bpw,
                     "bpw_model": (bits + other_bits) / (quant_n + other_n), "bytes": math.ceil((bits + other_bits) / 8),
                     "predicted_delta_nll": a.predicted_error,
                     **{k: q[key][k] for k in ("ppl", "ppl_se", "delta_nll", "delta_nll_se", "kl", "kl_se", *KL_KEYS, "window_delta_nll")}})
        plan_json[key] = {"strategy": a.strategy, "target_bpw": a.target_bpw, "bpw": a.bpw, "meta": a.meta,
                          "groups": {g: {"config": c, "layer": meas.groups[g]["layer"], "modules": meas.groups[g]["modules"],
                                         "stored": meas.groups[g]["configs"][c]["stored"], "bits": meas.groups[g]["configs"][c]["bits"],
                                         "numel": meas.groups[g]["numel"]} for g, c in a.configs.items()}}
    return original, rows, plan_json


@dataclass
class QuantReport:
    """What ``layerwise quantize`` measured: the original, one row per plan, the plans and the files written."""

    meta: dict
    original: dict
    rows: list[dict]
    plans: dict
    exports: dict

    def save(self, out: str | Path) -> Path:
        """``plan.json``, ``eval.json`` and ``report.html`` into ``out``, atomically; returns the eval path."""
        from .report.quant import write_quant_report

        out = Path(out)
        write_json(out / "plan.json", {"meta": self.meta, "plans": self.plans})
        path = write_json(out / "eval.json", {"meta": self.meta, "original": self.original, "rows": self.rows, "exports": self.exports})
        write_quant_report(self, out / "report.html")
        return path

    @classmethod
    def load(cls, out: str | Path) -> "QuantReport":
        out = Path(out)
        out = out.parent if out.is_file() else out
        try:
            ev, pl = json.loads((out / "eval.json").read_text()), json.loads((out / "plan.json").read_text())
            return cls(ev["meta"], ev["original"], ev["rows"], pl["plans"], ev["exports"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LayerwiseError(f"{out} holds no layerwise quantize result ({exc.__class__.__name__})") from None

    def to_dict(self) -> dict:
        return asdict(self)


def run(lm: LoadedModel, windows: Windows, *, budgets: list[float], strategies: list[str], family: Family = "gguf",
        method: str = "rtn", group_size: int | None = None, symmetric: bool | None = None, export: tuple[str, ...] | None = None,
        out: str | Path | None = None, prof: Profile | None = None, eval_samples: int = 16, seed: int = 0,
        batch_size: int = 4, progress: bool = True) -> QuantReport:
    """Measure, plan every strategy at every budget, evaluate each plan on held-out windows, export one plan."""
    start = time.perf_counter()
    if not budgets and any(s != "q4km" for s in strategies):
        raise LayerwiseError("give --bits or --sweep (or use only --strategy q4km)")
    check_strategies(strategies)
    n_plans = sum(1 if s == "q4km" else len(budgets) for s in strategies)
    if export is None:
        export = EXPORTS[family] if n_plans == 1 and out is not None else ()
    unknown = set(export) - set(EXPORTS[family])
    if unknown:
        allowed = ", ".join(EXPORTS[family]) or "none yet"
        raise LayerwiseError(f"--export {', '.join(sorted(unknown))} is not available for --format {family} (available: {allowed})")
    if export and n_plans != 1:
        raise LayerwiseError(f"--export writes one model but this run makes {n_plans} plans; give one --bits and one --strategy")
    if family == "int" and symmetric is None:
        symmetric = "hf" in export
    sizes = (32, 64, 128)
    if "hf" in export:  # only whole groups load: keep the default sizes that tile every row
        sizes = tuple(g for g in sizes if all(w % g == 0 for w in hf.row_widths(lm))) or sizes
    cands = candidates_for(lm, family, method=method, group_size=group_size, symmetric=symmetric, sizes=sizes)
    if "hf" in export:
        hf.check(lm, cands.configs)  # type: ignore[attr-defined]
    lo, hi = bit_range(lm, cands)
    for b in budgets:
        check_budget(b, lo, hi)
    meas = measure(lm, windows, candidates=cands, path=Path(out) / "measurement.json" if out else None, progress=progress,
                   batch_size=batch_size)
    allocs = plans(lm, windows, meas, cands, budgets, strategies, prof=prof, seed=seed, batch_size=batch_size, progress=progress)
    eval_ids = windows.evaluation[:eval_samples]
    original, rows, plan_json = evaluate(lm, windows, meas, cands, allocs, eval_ids, batch_size=batch_size)
    exports: dict = {}
    if out is not None and export:
        exports = _export(lm, windows, meas, allocs[0], cands, Path(out), export, eval_ids, batch_size)
    meta = {**lm.meta(), "data": windows.meta(), "format": family, "method": method if family == "int" else "llama.cpp",
            "candidates": list(cands.names), "measurement_s": meas.meta.get("seconds"), "eval_windows": int(eval_ids.shape[0]),
            "wall_time_s": round(time.perf_counter() - start, 3), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    report = QuantReport(meta, original, rows, plan_json, exports)
    if out is not None:
        report.save(out)
    return report


def _export(lm: LoadedModel, windows: Windows, meas: Measurement, alloc: Allocation, cands: Candidates, out: Path,
            export: tuple[str, ...], eval_ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Write one plan's files; each model written is run in its consumer (llama.cpp, transformers) on the held-out windows."""
    exports: dict = {}
    if "hf" in export:
        path = hf.export(lm, plan_codes(lm, meas, alloc, cands, windows, batch_size=batch_size), out / "model")  # type: ignore[arg-type]
        nll = hf.transformers_nll(path, eval_ids, device=lm.device)
        exports["hf"] = {"path": str(path), "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
                         "transformers_ppl": math.exp(sum(nll) / len(nll))}
    if not {"gguf", "recipe"} & set(export):
        return exports
    types = qg.tensor_types(meas, alloc, lm.anatomy)
    if "recipe" in export:
        path = write_atomic(out / "recipe.sh", qg.recipe(types, cands.source))  # type: ignore[attr-defined]
        exports["recipe"] = {"path": str(path)}
    if "gguf" in export:
        path = qg.export(cands, types, out / "model.gguf")  # type: ignore[arg-type]
        nll = qg.llama_nll(path, eval_ids)
        exports["gguf"] = {"path": str(path), "bytes": path.stat().st_size, "llama_cpp_ppl": math.exp(sum(nll) / len(nll)),
                           "stored_types": {t: s for t, (_, s) in types.items()}}
    return exports
