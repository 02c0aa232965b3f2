"""Real default model: the llama.cpp-style statistics against exact ones, and a sampled profile's page states its
precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerwise import cli

pytestmark = pytest.mark.real


def test_kl_statistics_on_the_real_model(real_cache):
    import layerwise as lw
    from layerwise.evaluate import next_token_logits, quality
    from layerwise.trace import skip

    lm = lw.load("default")
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2)
    ids = w.evaluation[:3]
    cand = next_token_logits(lm.model, lambda: skip(lm.anatomy, ["L20.mlp"]))
    q = quality(next_token_logits(lm.model), {"v": cand}, ids)["v"]
    ref, got = next_token_logits(lm.model)(ids).double(), cand(ids).double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).numpy()
    t = ids[:, 1:].flatten()[:, None]
    dp = (lq.gather(-1, t).exp() - lp.gather(-1, t).exp()).squeeze(-1).numpy()
    assert q["same_top_p"] == pytest.approx((ref.argmax(-1) == got.argmax(-1)).double().mean().item(), abs=1e-12)
    for key, p in (("kl_median", 50), ("kl_p99", 99), ("kl_max", 100)):
        exact = float(np.percentile(kl, p, method="inverted_cdf"))
        assert abs(q[key] - exact) <= 0.0116 * exact + 1e-5, key
    assert q["dp_rms"] == pytest.approx(float(np.sqrt((dp**2).reshape(3, -1).mean(1).mean())), rel=1e-4)
    assert q["dp_mean"] == pytest.approx(float(dp.mean()), abs=1e-5)  # float32 logits: ~2e-6 on a 49152-way softmax


def test_sampled_profile_states_its_precision(tmp_path, real_cache):
    out = tmp_path / "p"
    assert (
        cli.main(
            [
                "profile",
                "--seq-len",
                "64",
                "--samples",
                "4",
                "--batch-size",
                "2",
                "--positions",
                "16",
                "--ablation-samples",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "profile.json").read_text())
    assert (
        data["meta"]["positions"] == 16
        and data["meta"]["ablation_windows"] == 2
        and data["meta"]["n_windows_used"] == 4
    )
    ses = [u["details"]["ablate_nll_se"] for u in data["units"]]
    assert all(se is not None and se >= 0 for se in ses)
    page = (out / "report.html").read_text()
    assert "16 random positions of each of 2 windows" in page and "median standard error" in page
