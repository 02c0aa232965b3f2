"""Exact ablation scored at sampled positions and on the first windows: exact at what it samples, with its standard
error."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise import profile
from layerwise.profile import _sampled_rows
from layerwise.trace import skip

from .conftest import tiny_lm, tiny_windows


def test_sampled_positions_score_exactly_the_sampled_positions():
    lm, w = tiny_lm("llama"), tiny_windows(5, seq_len=16)
    prof = profile(lm, w, ablation="exact", batch_size=2, positions=5, seed=7, progress=False)
    assert prof.meta["positions"] == 5 and prof.meta["seed"] == 7 and prof.meta["ablation_windows"] == 5
    g = torch.Generator().manual_seed(7)  # the same draws, batch by batch, as the profile made
    rows = torch.cat([_sampled_rows(n, 15, 5, g) + 15 * start for start, n in ((0, 2), (2, 2), (4, 1))])
    assert rows.numel() == 25 and len(set(rows.tolist())) == 25  # five distinct positions in each window
    x = w.ids
    with torch.no_grad():
        full = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1], -1).flatten(0, 1)
        targets = x[:, 1:].flatten()
        for name in ("L0", "L1.attn", "L2.mlp"):
            with skip(lm.anatomy, [name]):
                lp = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1], -1).flatten(0, 1)
            dnll = (full - lp).gather(-1, targets[:, None]).squeeze(-1)[rows].view(5, 5).double().mean(1)
            kl = (full.exp() * (full - lp)).sum(-1)[rows].view(5, 5).double().mean(1)
            u = prof.unit(name)
            assert u.metrics["ablate_nll"] == pytest.approx(dnll.mean().item(), abs=1e-5)
            assert u.metrics["ablate_kl"] == pytest.approx(kl.mean().item(), abs=1e-5)
            assert u.details["ablate_nll_se"] == pytest.approx(dnll.std().item() / math.sqrt(5), rel=1e-3, abs=1e-6)
    # The lens at the same positions: the top-1 agreement of the last block's readout is the model's own, 1 everywhere.
    assert prof.unit("L2").metrics["lens_top1"] == pytest.approx(1.0)


def test_ablation_on_the_first_windows_equals_a_profile_of_those_windows():
    lm, w = tiny_lm("qwen2"), tiny_windows(6, seq_len=12)
    part = profile(lm, w, ablation="exact", batch_size=2, ablation_samples=3, progress=False)  # rounded up to 2 batches
    w4 = tiny_windows(6, seq_len=12)
    w4.ids, w4.n_calib = w4.ids[:4], 4
    first = profile(lm, w4, ablation="exact", batch_size=2, progress=False)
    assert part.meta["ablation_windows"] == 4 and part.meta["n_windows_used"] == 6
    for u in first.units:
        for key in ("ablate_nll", "ablate_kl"):
            assert part.unit(u.name).metrics[key] == pytest.approx(u.metrics[key], rel=1e-6, abs=1e-9)
    # Everything else still uses every window: bi differs from the four-window profile.
    assert any(
        part.unit(u.name).metrics["bi"] != pytest.approx(u.metrics["bi"], rel=1e-6)
        for u in first.units
        if u.kind == "block"
    )


def test_all_positions_is_the_unsampled_profile():
    lm, w = tiny_lm("llama"), tiny_windows(2)
    a = profile(lm, w, ablation="exact", positions=15, progress=False)  # every predicted position of a 16-token window
    b = profile(lm, w, ablation="exact", progress=False)
    assert a.meta["positions"] == 15 and b.meta["positions"] is None
    for u in b.units:
        assert a.unit(u.name).metrics == u.metrics
