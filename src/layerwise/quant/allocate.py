"""Bit allocation under a budget: which candidate config each quantization group gets.

``solve`` minimizes ``sum_u w_u e_u(c_u)`` subject to
``sum_u bits_u(c_u) <= B * N`` (B the target bits per weight, N the weights in
the quantized groups): a multiple-choice knapsack, solved exactly by dynamic
programming over the budget discretized into ``resolution`` steps (costs are
rounded up, so the plan never exceeds the budget). ``uniform`` and ``ranked``
are the baselines a measured plan must beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import LayerwiseError
from .measure import Measurement


@dataclass
class Allocation:
    """A config name per group, with what the measurement predicts for it."""

    configs: dict[str, str]
    strategy: str
    target_bpw: float | None
    bpw: float  # achieved, over the quantized groups
    predicted_error: float  # sum of the groups' weighted relative errors
    meta: dict = field(default_factory=dict)


def _bits_of(meas: Measurement, configs: dict[str, str]) -> tuple[float, float]:
    """(achieved bits per weight, predicted error) of a choice, unweighted error."""
    bits = sum(meas.groups[g]["configs"][c]["bits"] for g, c in configs.items())
    err = sum(meas.groups[g]["configs"][c]["err"] for g, c in configs.items())
    return bits / _numel(meas), err


def _numel(meas: Measurement) -> int:
    return sum(g["numel"] for g in meas.groups.values())


def _options(meas: Measurement, allowed: set[str] | None) -> dict[str, list[tuple[str, int, float]]]:
    opts = {}
    for g, entry in meas.groups.items():
        row = [(c, v["bits"], v["err"]) for c, v in entry["configs"].items() if allowed is None or c in allowed]
        if not row:
            raise LayerwiseError(
                f"no candidate config in `allowed` was measured for {g}; allow at least one of "
                f"{', '.join(entry['configs'])}"
            )
        opts[g] = row
    return opts


def check_budget(target_bpw: float, lo: float, hi: float) -> None:
    """A budget outside [cheapest, dearest] plan has no answer: say which way to move it."""
    if target_bpw < lo - 1e-9:
        raise LayerwiseError(
            f"{target_bpw} bits per weight is below the cheapest plan ({lo:.3f}); ask for {lo:.3f} or more (`budgets`)"
        )
    if target_bpw > hi + 1e-9:
        raise LayerwiseError(
            f"{target_bpw} bits per weight is above the dearest plan ({hi:.3f}); ask for {hi:.3f} or less (`budgets`)"
        )


def solve(
    meas: Measurement,
    target_bpw: float,
    *,
    weights: dict[str, float] | None = None,
    allowed: set[str] | None = None,
    resolution: int = 20000,
) -> Allocation:
    """The measured plan: least weighted error within ``target_bpw`` bits per weight (exact DP)."""
    opts = _options(meas, allowed)
    names = list(opts)
    N = _numel(meas)
    budget = target_bpw * N
    lo = sum(min(b for _, b, _ in opts[g]) for g in names)
    hi = sum(max(b for _, b, _ in opts[g]) for g in names)
    check_budget(target_bpw, lo / N, hi / N)
    spare = budget - lo
    unit = max(spare / resolution, 1.0)
    K = int(spare // unit)
    dp = np.zeros(K + 1)
    choice = np.zeros((len(names), K + 1), dtype=np.int16)
    for gi, g in enumerate(names):
        base = min(b for _, b, _ in opts[g])
        w = (weights or {}).get(g, 1.0)
        new = np.full(K + 1, np.inf)
        for ci, (_, bits, err) in enumerate(opts[g]):
            cost = int(np.ceil((bits - base) / unit - 1e-9))
            if cost > K:
                continue
            cand = np.full(K + 1, np.inf)
            cand[cost:] = dp[: K + 1 - cost] + w * err
            better = cand < new
            new[better] = cand[better]
            choice[gi, better] = ci
        dp = new
    b = K  # dp[b] is the least error with spare cost <= b, so the whole budget is the optimum
    configs = {}
    for gi in range(len(names) - 1, -1, -1):
        g = names[gi]
        c, bits, _ = opts[g][choice[gi, b]]
        configs[g] = c
        base = min(x for _, x, _ in opts[g])
        b -= int(np.ceil((bits - base) / unit - 1e-9))
    configs = {g: configs[g] for g in names}
    bpw, _ = _bits_of(meas, configs)
    predicted = sum((weights or {}).get(g, 1.0) * meas.groups[g]["configs"][c]["err"] for g, c in configs.items())
    return Allocation(configs, "measured", target_bpw, bpw, predicted, {"resolution_bits": unit})


def fixed(meas: Measurement, configs: dict[str, str], strategy: str) -> Allocation:
    """A plan given group by group (a rule, not a solver), with what the measurement predicts for it."""
    for g, c in configs.items():
        if c not in meas.groups[g]["configs"]:
            raise LayerwiseError(
                f"config {c} was not measured; measure it or pick one of {', '.join(meas.groups[g]['configs'])}"
            )
    bpw, err = _bits_of(meas, configs)
    return Allocation(configs, strategy, None, bpw, err)


def uniform(meas: Measurement, config: str) -> Allocation:
    """Every group at one config (what most tools do)."""
    return fixed(meas, {g: config for g in meas.groups}, f"uniform:{config}")


def ranked(meas: Measurement, order: list[int], target_bpw: float, low: str, high: str, *, metric: str) -> Allocation:
    """Layer-Wise Quantization: the least important blocks (``order``, least first) at ``low``, the rest at ``high``.

    The number of lowered blocks is the one whose average lands closest to
    ``target_bpw`` without exceeding it.
    """
    layers = sorted({e["layer"] for e in meas.groups.values()})
    if sorted(order) != layers:
        raise LayerwiseError("the ranking does not cover this model's blocks; profile this model")
    best = None
    for k in range(len(layers) + 1):
        lowered = set(order[:k])
        configs = {g: (low if e["layer"] in lowered else high) for g, e in meas.groups.items()}
        bpw, err = _bits_of(meas, configs)
        if bpw <= target_bpw + 1e-9:
            best = Allocation(
                configs, f"ranked:{metric}", target_bpw, bpw, err, {"lowered_blocks": sorted(lowered), "k": k}
            )
            break
    if best is None:
        raise LayerwiseError(
            f"even with every block at {low}, the plan exceeds {target_bpw} bits per weight; raise `budgets`"
        )
    return best
