"""The statistics ``llama-perplexity --kl-divergence`` prints, streamed instead of stored per token.

llama.cpp users judge a quantized model by the distribution of the per-token
KL from the original (mean, median, tail percentiles), how often both pick
the same top token ("same top p") and how the probability of the true next
token moves (Δp: mean, RMS, percentiles). Storing every token's values would
make memory grow with the evaluation text, so percentiles come from
fixed-bin histograms whose bin width bounds their error (see
:class:`Histogram`); means, RMS and their standard errors come from running
sums of per-window means, like every other figure in :mod:`layerwise.evaluate`.
"""

from __future__ import annotations

import math

import torch

from . import stream as st

#: KL percentiles reported, as in llama.cpp's output (plus its max); key suffix -> quantile.
KL_PERCENTILES = {"max": 1.0, "p99_9": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "median": 0.5}
#: Δp percentiles reported, as llama.cpp prints them.
DP_PERCENTILES = {
    "max": 1.0,
    "p99_9": 0.999,
    "p99": 0.99,
    "p95": 0.95,
    "p90": 0.90,
    "p75": 0.75,
    "median": 0.5,
    "p25": 0.25,
    "p10": 0.10,
    "p5": 0.05,
    "p1": 0.01,
    "p0_1": 0.001,
    "min": 0.0,
}
#: Every key :meth:`Divergence.summary` returns, in display order.
KEYS: tuple[str, ...] = (
    *(f"kl_{k}" for k in KL_PERCENTILES),
    "same_top_p",
    "same_top_p_se",
    "dp_mean",
    "dp_mean_se",
    "dp_rms",
    "dp_rms_se",
    *(f"dp_{k}" for k in DP_PERCENTILES),
)


class Histogram:
    """Counts of values in fixed bins, for quantiles whose error is bounded by the bin width.

    Linear bins of width ``(hi - lo) / bins`` over ``[lo, hi]``, or with
    ``log=True`` bins of equal width in ``ln x`` (equal ratio ``(hi/lo)^(1/bins)``).
    A quantile is read as the centre of the bin holding it (the geometric
    centre on a log scale), clipped to the exact min and max seen, so it is
    within half a bin of the exact "inverted CDF" quantile (the smallest value
    with at least a fraction ``q`` of the values at or below it): an absolute
    error of at most ``half_width`` (linear) or a relative one of at most
    ``exp(half_width) - 1`` (log). Values below ``lo`` (on a log scale also
    zero and the negative float rounding of a zero KL) fall in one underflow
    bin read as the exact minimum; values above ``hi`` in one overflow bin read
    as the exact maximum, so the bound holds only inside ``[lo, hi]``.
    """

    def __init__(self, lo: float, hi: float, bins: int, *, log: bool = False) -> None:
        self.log = log
        self.lo, self.hi = (math.log(lo), math.log(hi)) if log else (lo, hi)
        self.bins = bins
        self.width = (self.hi - self.lo) / bins
        self.counts: torch.Tensor | None = None  # underflow, bins..., overflow
        self.min = math.inf
        self.max = -math.inf

    @property
    def half_width(self) -> float:
        """Largest error of a quantile inside ``[lo, hi]``: absolute, or in ``ln x`` on a log scale."""
        return self.width / 2

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten()
        if v.numel() == 0:
            return
        lo, hi = torch.aminmax(v)
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        x = v.clamp_min(1e-300).log() if self.log else v
        idx = torch.floor((x - self.lo) / self.width).clamp(-1, self.bins).long() + 1
        if self.log:
            idx = torch.where(v > 0, idx, 0)
        counts = torch.bincount(idx, minlength=self.bins + 2)
        self.counts = counts if self.counts is None else self.counts + counts

    @property
    def n(self) -> int:
        return int(self.counts.sum()) if self.counts is not None else 0

    def quantile(self, q: float) -> float:
        """The value below which a fraction ``q`` of the values lie, within the precision stated above."""
        if self.counts is None:
            return math.nan
        k = max(1, math.ceil(q * self.n - 1e-9))
        b = int(torch.searchsorted(self.counts.cumsum(0), torch.tensor(k, device=self.counts.device)))
        if b == 0:
            return self.min
        if b == self.bins + 1:
            return self.max
        centre = self.lo + (b - 0.5) * self.width
        return min(max(math.exp(centre) if self.log else centre, self.min), self.max)


class Divergence:
    """Running KL, top-1 agreement and Δp of one candidate against the reference, per token, summarized per window.

    KL percentiles: 100 log bins per decade over [1e-9, 1e3] nats (within
    1.2 % of the exact value); Δp percentiles: bins of 1e-4 over [-1, 1]
    (within 5e-5, i.e. 0.005 percentage points). Means and their standard
    errors are across windows, as for perplexity (llama.cpp's are across
    tokens, which understates them: tokens of one window are not independent).
    """

    def __init__(self) -> None:
        self.kl = Histogram(1e-9, 1e3, 1200, log=True)
        self.dp = Histogram(-1.0, 1.0, 20000)
        self.same_top = st.Moments()
        self.dp_mean = st.Moments()
        self.dp_square = st.Moments()

    def add(self, kl: torch.Tensor, same_top: torch.Tensor, dp: torch.Tensor, per_window: int) -> None:
        """Per-token KL, top-1 agreement (0/1) and Δp of whole windows, ``per_window`` tokens each."""
        self.kl.add(kl)
        self.dp.add(dp)
        self.same_top.add(st.window_means(same_top, per_window))
        self.dp_mean.add(st.window_means(dp, per_window))
        self.dp_square.add(st.window_means(dp.double() ** 2, per_window))

    def summary(self) -> dict[str, float | None]:
        """Every statistic named in :data:`KEYS`; a standard error is None with a single window."""
        out: dict[str, float | None] = {f"kl_{k}": self.kl.quantile(q) for k, q in KL_PERCENTILES.items()}
        out["same_top_p"], out["same_top_p_se"] = st.mean_se(self.same_top)
        out["dp_mean"], out["dp_mean_se"] = st.mean_se(self.dp_mean)
        ms, ms_se = st.mean_se(self.dp_square)
        out["dp_rms"] = rms = math.sqrt(ms)
        out["dp_rms_se"] = ms_se / (2 * rms) if ms_se is not None and ms > 0 else None  # delta method
        out |= {f"dp_{k}": self.dp.quantile(q) for k, q in DP_PERCENTILES.items()}
        out["kl_max"], out["dp_max"], out["dp_min"] = self.kl.max, self.dp.max, self.dp.min
        return {k: out[k] for k in KEYS}
