"""Quantization strategies: each turns one measurement into plans at a budget. ``measured`` is the budgeted
solver (:mod:`.allocate`) with floors on the width tried, checked on the calibration windows
(:func:`calibration_loss`); ``ranked:METRIC`` gives the least important blocks by a Profile metric the lower of
the two widths that :func:`bracket` the budget (Layer-Wise Quantization; :func:`block_order`); ``uniform`` is the
dearest single config within the budget; ``q4km`` is llama.cpp's Q4_K_M rule."""

from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import replace
from functools import partial

import torch
from tqdm.auto import tqdm

from ..anatomy import parse_unit
from ..data import Windows
from ..errors import LayerwiseError
from ..evaluate import BlockVariant, LogitsFn, next_token_logits, quality, streamed_quality
from ..loading import LoadedModel
from ..profile import Profile, needs, profile
from . import gguf as qg
from .allocate import Allocation, ranked, solve, uniform
from .apply import BlockPlan, plan_weights, weight_config
from .measure import Candidates, Measurement, replaced


def _uniform_bpw(meas: Measurement) -> list[tuple[float, str]]:
    names = next(iter(meas.groups.values()))["configs"]
    return sorted((uniform(meas, c).bpw, c) for c in names)


def bracket(meas: Measurement, target: float) -> tuple[str, str]:
    """The two configs whose uniform plans lie just below and just above ``target`` bits per weight."""
    levels = _uniform_bpw(meas)
    below = [c for b, c in levels if b <= target + 1e-9]
    above = [c for b, c in levels if b > target + 1e-9]
    if not below:
        raise LayerwiseError(
            f"{target} bits per weight is below the cheapest config ({levels[0][0]:.3f} with {levels[0][1]}); "
            "raise `budgets`"
        )
    return below[-1], (above[0] if above else below[-1])


def block_order(
    lm: LoadedModel, windows: Windows, metric: str, prof: Profile | None, *, seed: int = 0, progress: bool = True
) -> list[int]:
    """Blocks from least to most important by ``metric`` (``random``: a seeded shuffle)."""
    if metric == "random":
        order = list(range(lm.anatomy.n_layers))
        random.Random(seed).shuffle(order)
        return order
    if prof is None:
        prof = profile(lm, windows, **needs(metric), progress=progress)
    prof.check(lm)
    return [parse_unit(u)[0] for u in prof.rank(metric, "block")]


def check_strategies(strategies: list[str]) -> None:
    for s in strategies:
        if s not in ("measured", "uniform", "q4km") and not s.startswith("ranked:"):
            raise LayerwiseError(
                f"unknown `strategies` entry {s!r}; use measured, ranked:METRIC, ranked:random, uniform or q4km"
            )


def measured(
    lm: LoadedModel,
    windows: Windows,
    meas: Measurement,
    cands: Candidates,
    target: float,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> Allocation:
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
    ``progress`` shows bars for making and scoring the plans.
    """
    levels = _uniform_bpw(meas)
    choices: dict[str, set[str] | None] = {"any width": None}
    choices |= {
        f"floor {w}": {c for b, c in levels if int(b) >= w}
        for w in sorted({int(b) for b, _ in levels if b <= target + 1e-9})
    }
    if levels[0][0] <= target + 1e-9:
        band = bracket(meas, target)
        choices[f"band {'-'.join(dict.fromkeys(band))}"] = set(band)
    tried: dict[tuple, tuple[str, Allocation]] = {}
    for name, allowed in choices.items():
        a = solve(meas, target, allowed=allowed)
        tried.setdefault(tuple(sorted(a.configs.items())), (name, a))
    if len(tried) == 1:
        return next(iter(tried.values()))[1]
    loss = calibration_loss(
        lm,
        windows,
        meas,
        cands,
        dict(tried.values()),
        batch_size=batch_size,
        progress=progress,
        what=f"plans at {target:g} bits",
    )
    best_name, best = min(tried.values(), key=lambda na: loss[na[0]])
    best.meta |= {
        "choice": best_name,
        "calibration_delta_nll": loss,
        "predicted_delta_nll": {name: a.predicted_error for name, a in tried.values()},
    }
    return best


def calibration_loss(
    lm: LoadedModel,
    windows: Windows,
    meas: Measurement,
    cands: Candidates,
    allocs: dict[str, Allocation],
    *,
    batch_size: int = 4,
    progress: bool = False,
    what: str = "plans",
) -> dict[str, float]:
    """Each plan's mean NLL increase over the calibration windows.

    Weights rounded to a grid (RTN, GGUF types) do not depend on data, so each
    plan is scored on all calibration windows. GPTQ fits its weights to the
    windows it runs on, and a plan's coarsest groups fit them far better than
    they generalize: on the default model at 3.25 bits, the plan that scored
    worst of three on its own windows was the best of them held out. GPTQ
    plans are therefore cross-fitted: made on the even calibration windows
    and scored on the odd ones, then the other way round (with a single
    window there is nothing to hold out, and it scores itself). ``progress``
    shows a bar while the plans are made and one while they are scored, each named after ``what``.
    """
    c = windows.calibration
    folds = [(c[0::2], c[1::2]), (c[1::2], c[0::2])] if cands.needs_hessian and len(c) > 1 else [(c, c)]
    deltas: dict[str, list[float]] = {name: [] for name in allocs}
    for fit, score in folds:
        part = replace(windows, ids=fit, n_calib=len(fit))
        q = plan_quality(
            lm, meas, cands, allocs, part, score, batch_size=batch_size, progress=progress, what=what, verb="score"
        )
        for name in allocs:
            deltas[name] += q[name]["window_delta_nll"]
    return {name: sum(d) / len(d) for name, d in deltas.items()}


def plan_variants(
    lm: LoadedModel,
    meas: Measurement,
    cands: Candidates,
    allocs: dict[str, Allocation],
    windows: Windows,
    *,
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[str, LogitsFn]:
    """Each plan's weights made (GPTQ: on ``windows``; a bar over the plans, named ``desc``) and the logits with them in
    place."""
    made = {
        name: plan_weights(lm, meas, a, cands, windows, batch_size=batch_size)
        for name, a in tqdm(allocs.items(), desc=desc, unit="plan", disable=not progress)
    }
    return {name: next_token_logits(lm.model, partial(replaced, w)) for name, w in made.items()}


def plan_quality(
    lm: LoadedModel,
    meas: Measurement,
    cands: Candidates,
    allocs: dict[str, Allocation],
    windows: Windows,
    ids: torch.Tensor,
    *,
    batch_size: int,
    progress: bool,
    what: str,
    verb: str = "evaluate",
) -> dict[str, dict]:
    """:func:`layerwise.evaluate.quality` of each plan (its weights made on ``windows`` for GPTQ) on ``ids``: with the
    plans' weights made whole in memory, or block by block for a model whose weights stay on disk (bars named
    after ``what``)."""
    if lm.streamed is not None:
        with ExitStack() as stack:
            blocks: dict[str, BlockVariant] = {
                name: stack.enter_context(BlockPlan(lm, weight_config(meas, a), cands, windows, batch_size=batch_size))
                for name, a in allocs.items()
            }
            outside = cands.outside_reads(lm) if isinstance(cands, qg.GGUFCandidates) else None
            return streamed_quality(
                lm,
                blocks,
                ids,
                batch_size=batch_size,
                progress=progress,
                desc=f"{verb} {what}",
                reads=dict.fromkeys(blocks, outside) if outside is not None else None,
            )
    variants = plan_variants(
        lm, meas, cands, allocs, windows, batch_size=batch_size, progress=progress, desc=f"make {what}"
    )
    return quality(
        next_token_logits(lm.model),
        variants,
        ids,
        batch_size=batch_size,
        device=lm.device,
        progress=progress,
        desc=f"{verb} {what}",
    )


def plans(
    lm: LoadedModel,
    windows: Windows,
    meas: Measurement,
    cands: Candidates,
    budgets: list[float],
    strategies: list[str],
    *,
    prof: Profile | None = None,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> list[Allocation]:
    """Every strategy at every budget (a rule that ignores the budget, like ``q4km``, once); duplicates removed."""
    check_strategies(strategies)
    out: list[Allocation] = []
    for strategy in strategies:
        if strategy == "q4km":
            if "Q4_K" not in next(iter(meas.groups.values()))["configs"]:
                raise LayerwiseError("the q4km baseline is a GGUF rule; use it with `family` gguf")
            out.append(qg.q4km(meas, lm.anatomy))
            continue
        order = (
            block_order(lm, windows, strategy.split(":", 1)[1], prof, seed=seed, progress=progress)
            if strategy.startswith("ranked:")
            else []
        )
        for b in budgets:
            if strategy == "measured":
                out.append(measured(lm, windows, meas, cands, b, batch_size=batch_size, progress=progress))
            elif strategy == "uniform":
                fits = [c for bpw, c in _uniform_bpw(meas) if bpw <= b + 1e-9]
                if not fits:
                    raise LayerwiseError(f"no single config fits {b} bits per weight; raise `budgets`")
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
