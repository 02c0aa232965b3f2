"""llama.cpp-style KL statistics: streamed histograms and window sums against exact computations on stored values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerwise.metrics.divergence import DP_PERCENTILES, KEYS, KL_PERCENTILES, Histogram

from .conftest import tiny_lm


def _exact(values: np.ndarray, q: float) -> float:
    """The smallest value with at least a fraction q of the values at or below it (what Histogram.quantile
    estimates)."""
    return float(np.percentile(values, 100 * q, method="inverted_cdf"))


def test_log_histogram_quantiles_within_stated_relative_error():
    g = np.random.default_rng(0)
    kl = np.exp(g.normal(-6, 3, 20001))  # spans ~1e-9 .. 1e1 nats, as a quantized model's per-token KL does
    kl[:50] = 0.0
    kl[50:60] = -3e-8  # float rounding of a zero KL
    h = Histogram(1e-9, 1e3, 1200, log=True)
    for part in np.array_split(kl, 7):  # streamed in uneven batches
        h.add(torch.from_numpy(part))
    assert h.n == kl.size
    bound = math.exp(h.half_width) - 1
    assert bound < 0.012
    for q in (0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999):
        exact = _exact(kl, q)
        assert abs(h.quantile(q) - exact) <= bound * exact, q
    assert h.quantile(0.0) == kl.min() and h.quantile(1.0) == kl.max()
    # A rank that falls among the zeros (below the histogram's range) reads as the exact minimum, not a bin centre.
    assert _exact(kl, 0.001) == 0.0 and h.quantile(0.001) == kl.min()


def test_linear_histogram_quantiles_within_half_a_bin():
    g = np.random.default_rng(1)
    dp = np.clip(g.standard_t(3, 4999) * 0.02, -1, 1)  # q * n never a whole number: no rounding tie in the rank
    h = Histogram(-1.0, 1.0, 20000)
    h.add(torch.from_numpy(dp[:1234]))
    h.add(torch.from_numpy(dp[1234:]))
    assert h.half_width == pytest.approx(5e-5)
    errors = [abs(h.quantile(q) - _exact(dp, q)) for q in DP_PERCENTILES.values()]
    assert max(errors) <= h.half_width + 1e-12
    assert max(errors) > 0  # the bin centre is an estimate, not the stored value


def test_quality_reports_llama_cpp_statistics_exactly():
    """Every new key of quality() against the same figures computed from stored per-token values."""
    from layerwise.evaluate import KL_KEYS, next_token_logits, quality
    from layerwise.quant.measure import matrix, replaced
    from layerwise.quant.rtn import QConfig, quantize_rtn

    lm = tiny_lm("llama")
    an = lm.anatomy
    mods = [m for layer in range(an.n_layers) for _, ms in an.quant_groups(layer, fused=False) for _, m in ms]
    weights = {m: quantize_rtn(matrix(m), QConfig(2, 32)).dequantize() for m in mods}
    ids = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(3))
    cand = next_token_logits(lm.model, lambda: replaced(weights))
    q = quality(next_token_logits(lm.model), {"q2": cand}, ids, batch_size=4)["q2"]
    assert KL_KEYS == KEYS and set(KEYS) <= set(q)

    ref_logits, cand_logits = next_token_logits(lm.model)(ids).double(), cand(ids).double()
    t = ids[:, 1:].flatten()
    lp, lq = torch.log_softmax(ref_logits, -1), torch.log_softmax(cand_logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).numpy()
    same = (ref_logits.argmax(-1) == cand_logits.argmax(-1)).double().view(6, -1).mean(1).numpy()
    dp = (lq.gather(-1, t[:, None]).exp() - lp.gather(-1, t[:, None]).exp()).squeeze(-1).numpy()
    dp_w, dp2_w = dp.reshape(6, -1).mean(1), (dp**2).reshape(6, -1).mean(1)

    assert 0.05 < same.mean() < 0.95  # a 2-bit model disagrees on some tokens, not all: the check can fail both ways
    assert q["same_top_p"] == pytest.approx(same.mean(), abs=1e-12)
    assert q["same_top_p_se"] == pytest.approx(same.std(ddof=1) / math.sqrt(6), rel=1e-9)
    assert q["dp_mean"] == pytest.approx(dp.mean(), abs=1e-6)
    assert q["dp_mean_se"] == pytest.approx(dp_w.std(ddof=1) / math.sqrt(6), rel=1e-4)
    rms = math.sqrt(dp2_w.mean())
    assert q["dp_rms"] == pytest.approx(rms, rel=1e-5)
    assert q["dp_rms_se"] == pytest.approx(dp2_w.std(ddof=1) / math.sqrt(6) / (2 * rms), rel=1e-4)
    # Percentiles: within the histograms' stated precision, plus the float32 rounding of a per-token KL (~1e-6 nats).
    for k, p in KL_PERCENTILES.items():
        exact = _exact(kl, p)
        assert abs(q[f"kl_{k}"] - exact) <= 0.0116 * exact + 2e-6, k
    for k, p in DP_PERCENTILES.items():
        assert abs(q[f"dp_{k}"] - _exact(dp, p)) <= 5e-5 + 1e-6, k
    assert q["kl"] == pytest.approx(kl.mean(), rel=1e-4)  # the existing key is unchanged in meaning


def test_drop_and_quantize_results_carry_and_show_the_statistics(tmp_path):
    import json

    from layerwise import quantize as qz
    from layerwise.drop import DropPlan, run

    from .conftest import tiny_windows

    lm, w = tiny_lm("llama"), tiny_windows(5)
    w.n_calib = 2
    run(
        lm,
        w,
        plans=[DropPlan(["L1"], "block", "given")],
        out=tmp_path / "d",
        eval_samples=3,
        with_speed=False,
        progress=False,
    )
    qz.run(lm, w, bits=4.8, strategy="measured", format="int", out=tmp_path / "q", eval_samples=3, progress=False)
    from layerwise import cli

    for folder, rows in (("d", "variants"), ("q", "rows")):
        assert cli.main(["report", str(tmp_path / folder)]) == 0  # results are JSON; the report module renders the page
        (row,) = json.loads((tmp_path / folder / "eval.json").read_text())[rows]
        assert set(KEYS) <= set(row)
        assert 0 <= row["same_top_p"] <= 1 and row["kl_median"] <= row["kl_p90"] <= row["kl_p99"] <= row["kl_max"]
        assert row["dp_min"] <= row["dp_p1"] <= row["dp_median"] <= row["dp_p99"] <= row["dp_max"]
        page = (tmp_path / folder / "report.html").read_text()
        assert "same top p" in page and "KL 99.9%" in page and f"{row['same_top_p']:.4g}" in page
