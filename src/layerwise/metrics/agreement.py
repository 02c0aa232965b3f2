"""How far each cheap metric's ranking agrees with the causal reference."""

from __future__ import annotations

import math

from scipy.stats import spearmanr


def spearman(xs: list[float | None], ys: list[float | None]) -> tuple[float | None, int]:
    """Spearman rho over the pairs where both values are finite, and that count."""
    pairs = [
        (x, y) for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if len(pairs) < 3:
        return None, len(pairs)
    a, b = zip(*pairs)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None, len(pairs)
    rho = float(spearmanr(a, b).statistic)
    return (rho if math.isfinite(rho) else None), len(pairs)
