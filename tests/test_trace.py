"""Exactness of capture, skipping, ablation and the logit lens on tiny models of every architecture."""

import pytest
import torch

from layerwise.anatomy import Anatomy
from layerwise.errors import LayerwiseError
from layerwise.profile import profile
from layerwise.trace import run_blocks, scale_update, skip, tap

from .conftest import ARCHS, MOE_ARCHS, tiny_lm, tiny_model, tiny_windows


def _trace(lm, x):
    traces = []
    with torch.no_grad(), tap(lm.anatomy, traces.append):
        logits = lm.model(input_ids=x, use_cache=False).logits
    return traces, logits


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_updates_reconstruct_final_stream(arch):
    lm = tiny_lm(arch)
    x = tiny_windows(2).ids
    traces, logits = _trace(lm, x)
    assert [t.layer for t in traces] == [0, 1, 2]
    h = traces[0].h_in
    for t in traces:
        assert torch.allclose(t.h_in, h, atol=1e-5)
        h = h + t.attn + t.mlp
    assert torch.allclose(h, traces[-1].h_out, atol=1e-4)
    assert torch.allclose(lm.anatomy.logits(h), logits, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_bi_matches_independent_computation(arch):
    lm = tiny_lm(arch)
    w = tiny_windows(2)
    prof = profile(lm, w, ablation="none", progress=False)
    with torch.no_grad():
        hs = lm.model(input_ids=w.ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(len(hs) - 2):  # the last tuple entry is after the final norm, so skip it
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert prof.unit(f"L{i}").metrics["bi"] == pytest.approx(1 - cos.mean().item(), abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_lens_is_exact_at_last_layer(arch):
    prof = profile(tiny_lm(arch), tiny_windows(2), ablation="none", progress=False)
    last = prof.unit("L2").metrics
    assert abs(last["lens_kl"]) < 1e-5 and last["lens_top1"] == 1.0
    assert prof.unit("L0").metrics["lens_kl"] > 1e-6  # an earlier layer is not the final readout


def _manual_llama(model, x, drop):
    """A hand-written Llama forward that leaves out the units in ``drop``."""
    m = model.model
    h = m.embed_tokens(x)
    pos = torch.arange(x.shape[1])[None]
    pe = m.rotary_emb(h, pos)
    for i, layer in enumerate(m.layers):
        if f"L{i}" in drop:
            continue
        if f"L{i}.attn" not in drop:
            h = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
        if f"L{i}.mlp" not in drop:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h))


@pytest.mark.parametrize("drop", [["L1"], ["L0.attn"], ["L2.mlp"], ["L0.mlp", "L1.attn", "L2"]])
def test_skip_equals_hand_written_forward(drop):
    lm = tiny_lm("llama")
    x = tiny_windows(2).ids
    with torch.no_grad():
        with skip(lm.anatomy, drop):
            got = lm.model(input_ids=x, use_cache=False).logits
        want = _manual_llama(lm.model, x, set(drop))
        full = lm.model(input_ids=x, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)
    assert "forward" not in lm.anatomy.blocks[1].__dict__  # nothing left behind


@pytest.mark.parametrize("arch", ARCHS + MOE_ARCHS)
def test_exact_ablation_equals_naive_full_forward(arch):
    lm = tiny_lm(arch)
    w = tiny_windows(3)  # batches of 2 and 1: the stacked replay must tile masks and positions right
    prof = profile(lm, w, ablation="exact", batch_size=2, progress=False)
    x = w.ids
    with torch.no_grad():
        full = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1], -1)
        nll_full = -full.gather(-1, x[:, 1:, None]).mean()
        for name in ("L0", "L1.attn", "L2.mlp"):
            with skip(lm.anatomy, [name]):
                lp = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1], -1)
            dnll = -lp.gather(-1, x[:, 1:, None]).mean() - nll_full
            kl = (full.exp() * (full - lp)).sum(-1).mean()
            assert prof.unit(name).metrics["ablate_nll"] == pytest.approx(dnll.item(), abs=1e-4)
            assert prof.unit(name).metrics["ablate_kl"] == pytest.approx(kl.item(), abs=1e-4)


def test_taylor_matches_finite_difference():
    lm = tiny_lm("llama")
    w = tiny_windows(2)
    prof = profile(lm, w, ablation="taylor", progress=False)
    x = w.ids
    eps = 1e-3

    def nll():
        lp = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1].double(), -1)
        return -lp.gather(-1, x[:, 1:, None]).mean().item()

    with torch.no_grad():
        base = nll()
        for name in ("L0.attn", "L1.mlp", "L2"):
            with scale_update(lm.anatomy, name, 1 - eps):
                fd = (nll() - base) / eps
            assert prof.unit(name).metrics["taylor_nll"] == pytest.approx(fd, rel=0.05, abs=2e-4)


def test_run_blocks_replays_the_model():
    lm = tiny_lm("gemma3_text")
    x = tiny_windows(1).ids
    traces, logits = _trace(lm, x)
    calls = [(t.args, t.kwargs) for t in traces]
    with torch.no_grad():
        out = run_blocks(lm.anatomy, 0, traces[0].h_in, calls)
    assert torch.allclose(lm.anatomy.logits(out), logits, atol=1e-4)


def test_streaming_state_does_not_grow(monkeypatch):
    """The running sums a profile keeps (every metric, lens and exact ablation on) take the same bytes for 8
    windows as for 2: memory is set by the batch, never by the number of calibration windows."""
    import sys

    lp = sys.modules["layerwise.profile"]  # the package's ``profile`` attribute is the function
    state_bytes = []
    units = lp._units

    def measured(n_layers, red):
        stats = [s for r in red.all() for s in r.stats()]
        tensors = [getattr(s, k) for s in stats for k in s.STATE if getattr(s, k) is not None]
        state_bytes.append(sum({id(t): t.numel() * t.element_size() for t in tensors}.values()))
        return units(n_layers, red)

    monkeypatch.setattr(lp, "_units", measured)
    lm = tiny_lm("llama")
    small = profile(lm, tiny_windows(2), ablation="exact", batch_size=2, progress=False)
    big = profile(lm, tiny_windows(8), ablation="exact", batch_size=2, progress=False)
    assert big.meta["n_tokens"] == 4 * small.meta["n_tokens"]
    assert state_bytes[0] > 0 and state_bytes[0] == state_bytes[1]


def test_nan_activations_named_by_unit():
    lm = tiny_lm("llama")
    with torch.no_grad():
        lm.anatomy.down_proj(1).weight.fill_(float("nan"))
    with pytest.raises(LayerwiseError, match=r"L1\.mlp"):
        profile(lm, tiny_windows(1), ablation="none", progress=False)


def test_unknown_architecture_lists_supported():
    model = tiny_model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(LayerwiseError, match="gpt2.*llama"):
        Anatomy(model)
