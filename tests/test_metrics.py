"""Streamed metrics against direct float64 computations of their definitions."""

import pytest
import torch

from layerwise.metrics import stream as st
from layerwise.metrics.weights import z_fraction
from layerwise.profile import profile
from layerwise.trace import tap

from .conftest import tiny_lm, tiny_windows


def _cos(x, y):
    return torch.nn.functional.cosine_similarity(x, y, dim=-1)


def test_geometry_matches_definitions():
    g = torch.Generator().manual_seed(0)
    h, a, m = (torch.randn(50, 40, generator=g) * s for s in (3.0, 0.5, 0.8))
    h[:, 7] += 40.0  # a massive channel, as real residual streams have
    cols = dict(zip(st.GEOMETRY, st.geometry(h, a, m).double().unbind(-1)))
    h, a, m = h.double(), a.double(), m.double()
    mid, out = h + a, h + a + m
    want = {
        "bi": 1 - _cos(h, out),
        "attn_cos": _cos(h, mid),
        "mlp_cos": _cos(mid, out),
        "block_rel": (out - h).norm(dim=-1) / h.norm(dim=-1),
        "attn_rel": a.norm(dim=-1) / h.norm(dim=-1),
        "mlp_rel": m.norm(dim=-1) / mid.norm(dim=-1),
        "norm_in": h.norm(dim=-1),
        "norm_mid": mid.norm(dim=-1),
    }
    for name, value in want.items():
        torch.testing.assert_close(cols[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_kurtosis_lazy_fraction_and_max():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 300, generator=g)
    x[3, 11] = 25.0
    c = x.double() - x.double().mean(-1, keepdim=True)
    want_k = (c**4).mean(-1) / (c**2).mean(-1) ** 2 - 3
    torch.testing.assert_close(st.excess_kurtosis(x).double(), want_k, rtol=1e-4, atol=1e-4)
    rms = x.double().pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(st.lazy_fraction(x).double(), (x.double().abs() <= 0.01 * rms).double().mean(-1))
    peak = st.MaxAbs()
    peak.add(x[:10])
    peak.add(-x[10:])
    assert peak.value == 25.0 and peak.channel == 11


def test_moments_stream_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(100, 3, generator=g)
    m = st.Moments()
    for part in v.split(7):
        m.add(part)
    torch.testing.assert_close(m.mean, v.double().mean(0))
    torch.testing.assert_close(m.std, v.double().std(0))
    assert m.n == 100


def test_z_fraction():
    w = torch.tensor([[0.0, 0.0, 0.0, 10.0]])
    assert float(z_fraction(w)) == 0.25


@pytest.mark.parametrize("blocks_per_run", [1, 2, 99])
def test_profile_stream_metrics_match_traced_tensors(monkeypatch, blocks_per_run):
    """sub_cos, rel_update, resid_norm, kurtosis and max_abs of a whole profile, from the raw traces.

    Blocks are reduced one at a time (the CPU's way), in runs of two, and all together (an accelerator's way).
    """
    from layerwise import reducers

    lm = tiny_lm("gemma3_text")
    w = tiny_windows(2)
    an = lm.anatomy
    per_block = w.calibration.numel() * (4 * an.embed.weight.shape[1] + an.linear_shape(an.down_proj(0))[1])
    monkeypatch.setattr(reducers, "_run_elements", lambda device: per_block * blocks_per_run)
    prof = profile(lm, w, ablation="none", lens=False, progress=False)
    traces = []
    with torch.no_grad(), tap(lm.anatomy, traces.append):
        lm.model(input_ids=w.ids, use_cache=False)
    for t in traces:
        h, a, m = (x.double().flatten(0, 1) for x in (t.h_in, t.attn, t.mlp))
        mid = h + a
        att, mlp = prof.unit(f"L{t.layer}.attn").metrics, prof.unit(f"L{t.layer}.mlp").metrics
        assert att["sub_cos"] == pytest.approx(_cos(h, mid).mean().item(), abs=1e-5)
        assert mlp["sub_cos"] == pytest.approx(_cos(mid, mid + m).mean().item(), abs=1e-5)
        assert mlp["rel_update"] == pytest.approx((m.norm(dim=-1) / mid.norm(dim=-1)).mean().item(), rel=1e-5)
        assert att["resid_norm"] == pytest.approx(h.norm(dim=-1).mean().item(), rel=1e-5)
        assert mlp["max_abs"] == pytest.approx(mid.abs().max().item(), rel=1e-5)
        assert mlp["kurtosis"] == pytest.approx(st.excess_kurtosis(mid).mean().item(), rel=1e-4)


def test_attention_metrics_match_probabilities(arch):
    lm = tiny_lm(arch)
    lm.model.config._attn_implementation = "eager"
    w = tiny_windows(2)
    prof = profile(lm, w, ablation="none", lens=False, attention=True, progress=False)
    traces = []
    with torch.no_grad(), tap(lm.anatomy, traces.append, attn_weights=True):
        lm.model(input_ids=w.ids, use_cache=False)
    for tr in traces:
        p = tr.attn_weights.double()[:, :, 1:]  # (batch, heads, queries 1.., keys)
        q = torch.arange(1, p.shape[-1]).double()
        ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
        dist = (p * (q[:, None] - torch.arange(p.shape[-1]).double())).sum(-1)
        details = prof.unit(f"L{tr.layer}.attn").details
        for key, want in (("attn_entropy", ent), ("attn_distance", dist), ("attn_sink", p[..., 0])):
            per_head = want.mean(dim=(0, 2))
            assert details[f"{key}_per_head"] == pytest.approx(per_head.tolist(), rel=1e-4, abs=1e-6), key
            assert prof.unit(f"L{tr.layer}.attn").metrics[key] == pytest.approx(
                per_head.mean().item(), rel=1e-4, abs=1e-6
            )
    assert prof.unit("L0").metrics["attn_sink"] is None


def test_attention_metrics_need_eager():
    from layerwise.errors import LayerwiseError

    lm = tiny_lm("llama")
    lm.model.config._attn_implementation = "sdpa"
    with pytest.raises(LayerwiseError, match="eager"):
        profile(lm, tiny_windows(1), ablation="none", attention=True, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_profile_is_finite_and_close(dtype):
    """Statistics are reduced in float32/float64 whatever the model's dtype."""
    lm32 = tiny_lm("qwen3")
    lm16 = tiny_lm("qwen3")
    lm16.model.to(dtype)
    w = tiny_windows(2)
    p32 = profile(lm32, w, ablation="exact", progress=False)
    p16 = profile(lm16, w, ablation="exact", progress=False)
    # Each metric within a few half-precision roundings of its own scale (the largest value over units):
    # 3% for bfloat16's 8-bit mantissa, 1.5% for float16's 11 bits: a tolerance in each metric's own units.
    tol = {torch.bfloat16: 0.03, torch.float16: 0.015}[dtype]
    for m in ("bi", "sub_cos", "rel_update", "resid_norm", "ablate_nll", "lens_kl"):
        pairs = [
            (u32.name, u32.metrics[m], u16.metrics[m])
            for u32, u16 in zip(p32.units, p16.units)
            if u32.metrics[m] is not None
        ]
        scale = max(abs(a) for _, a, _ in pairs)
        assert scale > 0 and all(abs(b - a) <= tol * scale for _, a, b in pairs), (m, [(n, a, b) for n, a, b in pairs])
