"""`layerwise quantize`: mixed precision at any fractional bit budget, checked on held-out text and exported.

Two families of candidate formats:

* ``gguf`` (default for a GGUF-loaded model): llama.cpp's own types
  (Q2_K ... Q8_0), produced by llama.cpp and measured from the tensors it
  wrote. Each tensor is typed on its own, as llama.cpp stores them. Exports:
  a mixed-type GGUF file and the ``llama-quantize`` command that makes it.
* ``int``: integer codes with group scales (RTN or GPTQ), q/k/v and gate/up
  sharing one config as vLLM requires. Evaluated by fake quantization.

Strategies (:mod:`layerwise.quant.strategies`, next to the solver they call) turn one measurement into plans:
``measured`` (the budgeted
solver, with floors on the width tried and checked on the calibration
windows), ``ranked:METRIC`` (Layer-Wise Quantization: the least important
blocks by a Profile metric get the lower of the two candidate widths that
bracket the budget; ``ranked:random`` orders blocks at random), ``uniform``
(the dearest single config within the budget) and ``q4km`` (llama.cpp's
Q4_K_M rule, GGUF family only). Bits per weight count codes, scales and zero
points, over the quantized tensors; ``bpw_model`` adds every other tensor as
stored (embeddings, norms).

A run's plans are saved in ``plan.json``; :class:`QuantPlan` loads one back,
applies it to a freshly loaded model and exports it without measuring again.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import torch

from .anatomy import Weight
from .configs import QuantizeConfig
from .data import Windows
from .errors import LayerwiseError
from .evaluate import KL_KEYS
from .io import provenance, write_atomic, write_json
from .loading import LoadedModel
from .memory import peak_memory
from .memory_plan import parse_bytes
from .plans import EXPORTS, check_plan_model, load_plans, save_plans
from .profile import Profile
from .quant import gguf as qg
from .quant import hf
from .quant.allocate import Allocation, check_budget
from .quant.apply import BlockPlan, config_codes, config_weights
from .quant.imatrix import Imatrix, tensor_columns
from .quant.imatrix import compute as imatrix_compute
from .quant.measure import Candidates, GroupCandidates, Measurement, Method, bit_range, measure, replaced
from .quant.rtn import QConfig, QTensor
from .quant.strategies import check_strategies, label, plan_quality, plans

Family = Literal["gguf", "int"]
#: Plans evaluated at once, sharing the original's forward pass (each holds its quantized weights meanwhile).
PLANS_AT_ONCE = 4
#: The importance matrix's file in a run's folder, beside the plans made with it.
IMATRIX_FILE = "imatrix.gguf"
#: The plan's types as ``llama-quantize --tensor-type-file`` reads them, beside ``recipe.sh``.
TENSOR_TYPE_FILE = "tensor-types.txt"


def candidates_for(
    lm: LoadedModel,
    family: Family,
    *,
    method: str = "rtn",
    group_size: int | None = None,
    symmetric: bool | None = None,
    sizes: tuple[int, ...] = (32, 64, 128),
    imatrix: Imatrix | None = None,
    tie: tuple[str, ...] = (),
    types: tuple[str, ...] | None = None,
    embedding: str | None = None,
) -> Candidates:
    """The candidate set of a family: GGUF ``types`` (by default every one there is: the IQ types need ``imatrix``;
    each made with ``imatrix`` when given; the groups ``tie`` names typed as one; the token embedding at type
    ``embedding``, else as the source stores it), or 2-8 bit integer codes at one group size (else at each of
    ``sizes``)."""
    if family == "gguf":
        if method != "rtn" or group_size is not None or symmetric is not None:
            raise LayerwiseError(
                "`method`, `group_size` and `symmetric` choose integer formats; GGUF types fix their own (use "
                "`family` int)"
            )
        return qg.GGUFCandidates.of(lm, types, imatrix=imatrix, tie=tie, embedding=embedding)
    if family != "int":
        raise LayerwiseError(f"unknown `family` {family!r}; use gguf or int")
    sizes = (group_size,) if group_size else sizes
    configs = tuple(QConfig(b, g, bool(symmetric)) for b in (2, 3, 4, 5, 6, 8) for g in sizes)
    return GroupCandidates(configs, cast(Method, method))


def _other_bits(lm: LoadedModel, meas: Measurement, cands: Candidates) -> tuple[int, int]:
    """(bits, weights) of every tensor outside the plan, as the export stores it, so that a plan's ``bytes``
    is the size of the tensors in the file written: GGUF tensors as the source file holds them; for integer
    codes, what the compressed-tensors export writes (the model's own dtype, tied weights once, and one
    int64 ``weight_shape`` pair beside each quantized weight)."""
    planned = {p for e in meas.groups.values() for p in e["modules"]}
    if isinstance(cands, qg.GGUFCandidates):
        rest = cands.kept({lm.anatomy.gguf_name(p) for p in planned})
        return sum(qg.ggufio.tensor_bits(t) for t in rest), sum(int(t.n_elements) for t in rest)
    modules = {m: n for n, m in lm.model.named_modules()}
    handles = [lm.anatomy.weight(p) for p in planned]
    replaced = {f"{modules[w.module]}.{w.attr}" for w in handles}
    shapes = sum(math.prod(w.view().shape[:-2]) for w in handles)  # an experts weight is a module per expert

    def kept(name: str) -> bool:
        return name not in replaced

    tensors: dict[object, torch.Tensor]
    if lm.streamed is not None:  # a skeleton's tensors have no storage: tied ones share a checkpoint tensor
        keys, buffers = lm.streamed.keys, lm.streamed.buffers  # buffers: DeepSeek's routing correction bias
        tensors = {keys[n]: lm.model.get_parameter(n) for n in keys if kept(n)}
        tensors |= {key: lm.model.get_buffer(n) for n, key in buffers.items()}
    else:
        tensors = {(t.data_ptr(), t.numel()): t for name, t in lm.model.state_dict().items() if kept(name)}
    return 8 * sum(t.numel() * t.element_size() for t in tensors.values()) + 128 * shapes, sum(
        t.numel() for t in tensors.values()
    )


def evaluate(
    lm: LoadedModel,
    windows: Windows,
    meas: Measurement,
    cands: Candidates,
    allocs: list[Allocation],
    eval_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    chunk: int = PLANS_AT_ONCE,
    progress: bool = False,
) -> tuple[dict, list[dict], dict]:
    """Held-out quality and size of every plan beside the original: (original, one row per plan, plans as JSON).

    Plans are evaluated a few at a time (each holds a dequantized copy of the
    quantized weights), sharing the original's forward pass within a chunk;
    ``progress`` shows bars for making and evaluating each chunk.
    """
    other_bits, other_n = _other_bits(lm, meas, cands)
    quant_n = sum(e["numel"] for e in meas.groups.values())
    q: dict[str, dict] = {}
    for i in range(0, len(allocs), chunk):
        part = f"plans {i + 1}-{min(i + chunk, len(allocs))} of {len(allocs)}"
        chosen = {label(a): a for a in allocs[i : i + chunk]}
        q |= plan_quality(
            lm, meas, cands, chosen, windows, eval_ids, batch_size=batch_size, progress=progress, what=part
        )
    first = next(iter(q.values()))
    original = {
        "ppl": first["ref_ppl"],
        "ppl_se": first["ref_ppl_se"],
        "nll": first["ref_nll"],
        "n_windows": first["n_windows"],
        "n_tokens": first["n_tokens"],
        "quantized_weights": quant_n,
        "other_weights": other_n,
    }
    rows, plan_json = [], {}
    for a in allocs:
        key = label(a)
        bits = a.bpw * quant_n
        rows.append(
            {
                "plan": key,
                "strategy": a.strategy,
                "target_bpw": a.target_bpw,
                "bpw": a.bpw,
                "bpw_model": (bits + other_bits) / (quant_n + other_n),
                "bytes": math.ceil((bits + other_bits) / 8),
                "predicted_delta_nll": a.predicted_error,
                **{
                    k: q[key][k]
                    for k in ("ppl", "ppl_se", "delta_nll", "delta_nll_se", "kl", "kl_se", *KL_KEYS, "window_delta_nll")
                },
            }
        )
        plan_json[key] = {
            "strategy": a.strategy,
            "target_bpw": a.target_bpw,
            "bpw": a.bpw,
            "meta": a.meta,
            "groups": {
                g: {
                    "config": c,
                    "layer": meas.groups[g]["layer"],
                    "modules": meas.groups[g]["modules"],
                    "stored": meas.groups[g]["configs"][c]["stored"],
                    "bits": meas.groups[g]["configs"][c]["bits"],
                    "numel": meas.groups[g]["numel"],
                }
                for g, c in a.configs.items()
            },
        }
    return original, rows, plan_json


@dataclass(frozen=True)
class GGUFType:
    """A llama.cpp tensor type (``Q4_K``...) and the type llama.cpp really stored for this tensor
    (it falls back to another where a row does not fit a K-type's 256-wide blocks)."""

    name: str
    stored: str


@dataclass(frozen=True)
class QuantPlan:
    """Mixed precision as torchao writes it: one small frozen config per quantized module, by module path
    (:class:`QConfig` for integer codes, :class:`GGUFType` for llama.cpp types), and one verb that applies it.

    ``QuantPlan.load("runs/q46/plan.json").apply(lm)`` gives the fake-quantized
    model for the duration of a ``with``, with the weights the run that made
    the plan evaluated; the loaded model gets its weights back on exit. GPTQ
    weights are fitted to calibration windows, so a GPTQ plan applies with the
    same windows (``windows``, checked against ``calibration``).
    """

    configs: dict[str, QConfig | GGUFType]
    method: str  # rtn, gptq or llama.cpp
    model_hash: str | None = None
    calibration: dict | None = None  # data_hash, n_calib and seq_len of the windows a GPTQ plan was fitted to
    key: str = ""
    imatrix: Path | None = None  # the importance matrix a GGUF plan's types were made with
    embedding: str | None = None  # the GGUF type of the token embedding, when not the source's

    @property
    def family(self) -> Family:
        return "gguf" if self.method == "llama.cpp" else "int"

    def apply(
        self, lm: LoadedModel, windows: Windows | None = None, *, batch_size: int = 4
    ) -> AbstractContextManager[None]:
        """The model with the plan's weights for the duration of a ``with`` (GPTQ: fitted ``batch_size`` windows at a
        time)."""
        return replaced(self.weights(lm, windows, batch_size=batch_size))

    def weights(
        self, lm: LoadedModel, windows: Windows | None = None, *, batch_size: int = 4
    ) -> dict[Weight, torch.Tensor]:
        """Each quantized module's (out, in) weight as the plan stores it."""
        return config_weights(lm, self._names(), self.candidates(lm), self._windows(lm, windows), batch_size=batch_size)

    def codes(self, lm: LoadedModel, windows: Windows | None = None, *, batch_size: int = 4) -> dict[str, QTensor]:
        """Each module's integer codes, by module path (integer plans; what ``--export hf`` writes)."""
        cands = self.candidates(lm)
        if not isinstance(cands, GroupCandidates):
            raise LayerwiseError("a GGUF plan has no integer codes; export it with --export gguf")
        return config_codes(lm, self._names(), cands, self._windows(lm, windows), batch_size=batch_size)

    def block_plan(self, lm: LoadedModel, windows: Windows | None = None, *, batch_size: int = 4) -> BlockPlan:
        """The plan for a model whose weights stay on disk, made one block at a time as they are read: its weights
        (a :data:`layerwise.evaluate.BlockVariant`) or its codes."""
        return BlockPlan(lm, self._names(), self.candidates(lm), self._windows(lm, windows), batch_size=batch_size)

    def candidates(self, lm: LoadedModel) -> Candidates:
        """The candidate set that makes the plan's weights (only its own configs)."""
        check_plan_model(self.model_hash, lm)
        if self.family == "gguf":
            im = Imatrix.load(self.imatrix) if self.imatrix is not None else None
            types = tuple(dict.fromkeys(c.name for c in self.configs.values()))
            return qg.GGUFCandidates.of(lm, types, im, embedding=self.embedding)
        return GroupCandidates(self.int_configs(), cast(Method, self.method))

    def int_configs(self) -> tuple[QConfig, ...]:
        """The integer configs the plan uses, each once (an integer plan's candidates)."""
        configs = tuple(dict.fromkeys(self.configs.values()))
        if not all(isinstance(c, QConfig) for c in configs):
            raise LayerwiseError("a GGUF plan has no integer configs; export it with --export gguf")
        return cast(tuple[QConfig, ...], configs)

    def gguf_types(self, lm: LoadedModel) -> dict[str, tuple[str, str]]:
        """Per GGUF tensor name: (the plan's type, the type llama.cpp stored), for the GGUF export and recipe."""
        return {lm.anatomy.gguf_name(p): (c.name, c.stored) for p, c in self.configs.items() if isinstance(c, GGUFType)}

    def _names(self) -> dict[str, str]:
        return {p: c.name for p, c in self.configs.items()}

    def _windows(self, lm: LoadedModel, windows: Windows | None) -> Windows | None:
        if self.method != "gptq":
            return windows
        if windows is None:
            raise LayerwiseError(
                "a GPTQ plan is fitted to calibration windows; pass `windows` (the ones the plan was made with)"
            )
        got = {k: windows.meta()[k] for k in ("data_hash", "n_calib", "seq_len")}
        if self.calibration and got != self.calibration:
            raise LayerwiseError(
                f"the GPTQ plan was fitted to other calibration windows ({self.calibration}); "
                "give the data, `seq_len` and `samples` it was made with"
            )
        return windows

    def save(self, folder: str | Path) -> Path:
        """``plan.json`` holding this plan alone, one entry per module, atomically (a run saves all its plans)."""
        groups = {
            p: {"config": c.name, "modules": [p], "stored": [c.stored if isinstance(c, GGUFType) else c.name]}
            for p, c in self.configs.items()
        }
        meta = {"model_hash": self.model_hash, "method": self.method, "data": self.calibration or {}}
        if self.embedding is not None:
            meta["embedding"] = {"type": self.embedding}
        if self.imatrix is not None:  # beside the plan, which names it
            meta["imatrix"] = keep_imatrix(Imatrix.load(self.imatrix), Path(folder))
        return save_plans(folder, "quantize", meta, {self.key or "plan": {"groups": groups}})

    @classmethod
    def from_json(cls, meta: dict, key: str, entry: dict, folder: Path | None = None) -> QuantPlan:
        """A plan from its ``plan.json`` entry and the run's metadata (``folder``: where the plan file is, and the
        importance matrix it names)."""
        method = meta.get("method", "llama.cpp")
        configs: dict[str, QConfig | GGUFType] = {}
        for g in entry["groups"].values():
            for path, stored in zip(g["modules"], g["stored"]):
                configs[path] = (
                    GGUFType(g["config"], stored) if method == "llama.cpp" else QConfig.from_name(g["config"])
                )
        data = meta.get("data") or {}
        calibration = {k: data[k] for k in ("data_hash", "n_calib", "seq_len")} if method == "gptq" and data else None
        im = meta.get("imatrix") or {}
        imatrix = (folder or Path()) / im["file"] if "file" in im else None
        embedding = (meta.get("embedding") or {}).get("type")
        return cls(configs, method, meta.get("model_hash"), calibration, key, imatrix, embedding)

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> QuantPlan:
        """A plan from a quantize result's ``plan.json`` (or its folder); ``key`` picks one plan of a sweep."""
        path = Path(path)
        return cls.from_json(*load_plans(path, "quantize", key), folder=path if path.is_dir() else path.parent)


@dataclass
class QuantReport:
    """What ``layerwise quantize`` measured: the original, one row per plan, the plans and the files written."""

    meta: dict
    original: dict
    rows: list[dict]
    plans: dict
    exports: dict

    def save(self, out: str | Path) -> Path:
        """``plan.json`` (for :meth:`QuantPlan.load`) and ``eval.json`` into ``out``, atomically; returns the eval path.
        The page is the report module's job (``layerwise.report.quant``), as for a Profile."""
        out = Path(out)
        save_plans(out, "quantize", self.meta, self.plans)
        return write_json(
            out / "eval.json",
            {
                "kind": "quantize",
                "meta": self.meta,
                "original": self.original,
                "rows": self.rows,
                "exports": self.exports,
            },
        )

    @classmethod
    def load(cls, out: str | Path) -> QuantReport:
        out = Path(out)
        out = out.parent if out.is_file() else out
        try:
            ev, pl = json.loads((out / "eval.json").read_text()), json.loads((out / "plan.json").read_text())
            return cls(ev["meta"], ev["original"], ev["rows"], pl["plans"], ev["exports"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LayerwiseError(f"{out} holds no layerwise quantize result ({exc.__class__.__name__})") from None

    def to_dict(self) -> dict:
        return {"kind": "quantize", **asdict(self)}


def run(
    lm: LoadedModel,
    windows: Windows,
    config: QuantizeConfig | None = None,
    *,
    prof: Profile | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    **settings: Any,
) -> QuantReport:
    """Measure, plan every strategy at every budget, evaluate each plan on held-out windows, export one plan; the
    results record the config.

    ``settings`` are config fields (``bits=4.8, format="int"``); ``prof`` (else the config's ``profile`` file)
    ranks units for ``ranked:METRIC`` strategies.
    """
    start = time.perf_counter()
    cfg = QuantizeConfig.of(config, **settings)
    budgets, strategies, family, method = cfg.budgets, list(cfg.strategy), cfg.format, cfg.method
    seed, batch_size, symmetric = cfg.seed, cfg.batch_size, cfg.symmetric
    if prof is None and cfg.profile:
        prof = Profile.load(cfg.profile)
    if not budgets and cfg.size is None and any(s != "q4km" for s in strategies):
        raise LayerwiseError("give `budgets` or `size` (or use only the q4km strategy)")
    check_strategies(strategies)
    n_plans = cfg.n_plans
    export = cfg.export
    if export is None:
        export = EXPORTS[family] if n_plans == 1 and out is not None else ()
    _check_export(family, export)
    if export and n_plans != 1:
        raise LayerwiseError(
            f"`export` writes one model but this run makes {n_plans} plans; give one budget and one strategy"
        )
    if family == "int" and symmetric is None:
        symmetric = "hf" in export
    sizes: tuple[int, ...] = (32, 64, 128)
    if "hf" in export:  # only whole groups load: keep the default sizes that tile every row
        sizes = tuple(g for g in sizes if all(w % g == 0 for w in hf.row_widths(lm))) or sizes
    im = resolve_imatrix(lm, windows, cfg.imatrix, out, batch_size=batch_size, progress=progress, family=family)
    cands = candidates_for(
        lm,
        family,
        method=method,
        group_size=cfg.group_size,
        symmetric=symmetric,
        sizes=sizes,
        imatrix=im,
        tie=lm.anatomy.ties(cfg.tie),
        types=cfg.types,
        embedding=cfg.embedding,
    )
    if "hf" in export and isinstance(cands, GroupCandidates):
        hf.check(lm, cands.configs)
    lo, hi = bit_range(lm, cands)
    if cfg.size is not None:
        budgets = [size_budget(lm, cands, parse_bytes(cfg.size, "size"), lo, hi)]
    for b in budgets:
        check_budget(b, lo, hi)
    meas = measure(
        lm,
        windows,
        candidates=cands,
        path=Path(out) / "measurement.json" if out else None,
        progress=progress,
        batch_size=batch_size,
    )
    if out is not None:  # how it was made, as every result file says (the last command to complete it)
        meas.meta |= provenance(seed=seed, batch_size=batch_size)
        meas.save(Path(out) / "measurement.json")
    allocs = plans(
        lm, windows, meas, cands, budgets, strategies, prof=prof, seed=seed, batch_size=batch_size, progress=progress
    )
    eval_ids = windows.evaluation[: cfg.eval_samples]
    original, rows, plan_json = evaluate(
        lm, windows, meas, cands, allocs, eval_ids, batch_size=batch_size, progress=progress
    )
    meta = {
        **lm.meta(),
        "data": windows.meta(),
        **provenance(seed=seed, batch_size=batch_size),
        "config": cfg.to_dict(),
        "format": family,
        "method": method if family == "int" else "llama.cpp",
        "candidates": list(cands.names),
        # written with the results, so that a failed run leaves no file behind
        "imatrix": None if im is None else keep_imatrix(im, Path(out)) if out is not None else {"digest": im.digest},
        "embedding": embedding_record(cands),
        "measurement_s": meas.meta.get("seconds"),
        "eval_windows": int(eval_ids.shape[0]),
    }
    exports: dict = {}
    if out is not None and export:
        key = label(allocs[0])
        exports = export_plan(
            lm,
            QuantPlan.from_json(meta, key, plan_json[key], Path(out)),
            Path(out),
            export,
            eval_ids,
            windows,
            batch_size=batch_size,
            progress=progress,
        )
    meta |= {
        "wall_time_s": round(time.perf_counter() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
    }
    report = QuantReport(meta, original, rows, plan_json, exports)
    if out is not None:
        report.save(out)
    return report


def export_plan(
    lm: LoadedModel,
    plan: QuantPlan,
    out: str | Path,
    export: tuple[str, ...],
    eval_ids: torch.Tensor,
    windows: Windows | None = None,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Write one plan's files (``windows``: a GPTQ plan's calibration windows); each model written is run in its
    consumer (llama.cpp, transformers) on the held-out ``eval_ids``, with a bar over the windows when ``progress``.
    Nothing is measured again."""
    out = Path(out)
    _check_export(plan.family, export)
    exports: dict = {}
    if "hf" in export:
        hf.check(lm, plan.int_configs())
        if lm.streamed is not None:
            with plan.block_plan(lm, windows, batch_size=batch_size) as blocks:
                path = hf.export_streamed(lm, blocks, out / "model")
            found: dict[str, str | float] = {
                "not_measured": "transformers perplexity: not measured when blocks run one at a time (it loads the "
                "whole model)"
            }
        else:
            path = hf.export(lm, plan.codes(lm, windows, batch_size=batch_size), out / "model")
            found = _transformers_ppl(lm, plan, path, eval_ids, progress=progress)
        exports["hf"] = {"path": str(path), "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")), **found}
    if not {"gguf", "recipe"} & set(export):
        return exports
    types, cands = plan.gguf_types(lm), plan.candidates(lm)
    if not isinstance(cands, qg.GGUFCandidates):
        raise LayerwiseError("an integer plan has no GGUF types; export it with --export hf")
    im = keep_imatrix(cands.imatrix, out) if cands.imatrix is not None else None
    if "recipe" in export:
        made = qg.recipe(types, cands.source, imatrix=im["file"] if im else None, embedding=cands.embedding)
        path = write_atomic(out / "recipe.sh", made)
        listed = write_atomic(out / TENSOR_TYPE_FILE, qg.tensor_type_file(types))
        exports["recipe"] = {
            "path": str(path),
            "tensor_type_file": str(listed),
            **({"imatrix": str(out / im["file"])} if im else {}),
        }
    if "gguf" in export:
        path = qg.export(cands, types, out / "model.gguf")
        nll = qg.llama_nll(path, eval_ids, progress=progress)
        exports["gguf"] = {
            "path": str(path),
            "bytes": path.stat().st_size,
            "llama_cpp_ppl": math.exp(sum(nll) / len(nll)),
            "stored_types": {t: s for t, (_, s) in types.items()},
        }
    return exports


def _transformers_ppl(
    lm: LoadedModel, plan: QuantPlan, path: Path, eval_ids: torch.Tensor, *, progress: bool
) -> dict[str, str | float]:
    """The perplexity of the exported checkpoint as plain transformers loads it, where transformers reads it right."""
    if not hf.one_experts_scheme(lm, plan.configs):
        return {
            "not_measured": "transformers perplexity: not measured: transformers decompresses every layer's experts "
            "with one scheme, and this plan's layers have different ones (vLLM reads each layer's own)"
        }
    nll = hf.transformers_nll(path, eval_ids, device=lm.device, progress=progress)
    return {"transformers_ppl": math.exp(sum(nll) / len(nll))}


def size_budget(lm: LoadedModel, cands: Candidates, size: int, lo: float, hi: float) -> float:
    """The bits per weight over the quantized tensors that keep a plan's GGUF file within ``size`` bytes, all
    tensors and metadata included (rounded down at the fourth decimal; at most the dearest plan's, ``hi``); one
    line naming the smallest size there is when even the cheapest plan (``lo``) does not fit."""
    if not isinstance(cands, qg.GGUFCandidates):
        raise LayerwiseError("`size` targets a GGUF file's size; for integer formats give `bits`")
    an = lm.anatomy
    mods = [(p, w) for layer in range(an.n_layers) for _, ms in an.quant_groups(layer, fused=False) for p, w in ms]
    n = sum(math.prod(w.shape) for _, w in mods)
    fixed = qg.fixed_bytes(cands.source, {an.gguf_name(p) for p, _ in mods}, cands.embedding)
    smallest = fixed + math.ceil(lo * n / 8)
    if size < smallest:
        raise LayerwiseError(
            f"a {size}-byte file is smaller than the cheapest plan's ({smallest} bytes); ask for {smallest} or more "
            "(`size`)"
        )
    return max(math.floor(min(8 * (size - fixed) / n, hi) * 1e4) / 1e4, lo)


def resolve_imatrix(
    lm: LoadedModel,
    windows: Windows,
    setting: str,
    out: str | Path | None,
    *,
    batch_size: int,
    progress: bool,
    family: Family = "gguf",
) -> Imatrix | None:
    """The importance matrix ``setting`` asks for: ``none``; ``auto`` (GGUF types only), made on the calibration
    windows, or the one a previous run of this folder made on the same model and windows; or a file (llama.cpp's
    GGUF or legacy format), checked against the model."""
    if family != "gguf":
        if setting not in ("auto", "none"):
            raise LayerwiseError("`imatrix` weighs llama.cpp's GGUF types; integer formats do not use one")
        return None
    if setting == "none":
        return None
    if setting != "auto":
        im = Imatrix.load(setting)
        im.check(tensor_columns(lm), setting)
        return im
    made = Path(out) / IMATRIX_FILE if out is not None else None
    if made is not None and made.is_file():
        im = Imatrix.load(made)
        if im.meta.get("model_hash") == lm.source.get("model_hash") and im.meta.get("data") == windows.meta():
            return im
    return imatrix_compute(lm, windows, batch_size=batch_size, dataset=windows.source, progress=progress)


def embedding_record(cands: Candidates) -> dict | None:
    """What a GGUF plan records of its token embedding when it is not the source's: the type asked and the type
    llama.cpp stored (its fallback where rows do not fit the type's blocks)."""
    if not isinstance(cands, qg.GGUFCandidates) or cands.embedding is None:
        return None
    return {"type": cands.embedding.stem, "stored": qg.embedding_type(cands.embedding)}


def keep_imatrix(im: Imatrix, folder: Path) -> dict:
    """``im`` written into ``folder`` (llama.cpp's GGUF format) unless the same matrix is there: what a plan
    records of it."""
    path = folder / IMATRIX_FILE
    if not (path.is_file() and Imatrix.load(path).digest == im.digest):
        im.save(path)
    return {"file": IMATRIX_FILE, "digest": im.digest, "datasets": im.datasets, "chunks": im.chunk_count}


def _check_export(family: Family, export: tuple[str, ...]) -> None:
    unknown = set(export) - set(EXPORTS[family])
    if unknown:
        allowed = ", ".join(EXPORTS[family]) or "none yet"
        raise LayerwiseError(
            f"`export` {', '.join(sorted(unknown))} is not available for `family` {family} (available: {allowed})"
        )
