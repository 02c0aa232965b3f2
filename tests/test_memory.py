"""The memory a run records, and the small paths' memory: computed in slices, the numbers are the whole-tensor way's."""

from __future__ import annotations

import sys

import pytest
import torch

from layerwise.memory import peak_memory, rss_bytes
from layerwise.profile import profile
from layerwise.trace import tap

from .conftest import tiny_lm, tiny_model, tiny_windows, write_gguf


def _taylor_from_full_logits(lm, x: torch.Tensor) -> dict[str, float]:
    """The Taylor estimate as profile computed it before: the model's (batch, seq, vocab) logits, one backward pass."""
    updates: list[torch.Tensor] = []
    with torch.enable_grad(), tap(lm.anatomy, lambda tr: updates.extend((tr.attn, tr.mlp, tr.h_out))):
        logits = lm.model(input_ids=x, use_cache=False, logits_to_keep=torch.arange(x.shape[1] - 1)).logits
    logp = torch.log_softmax(logits.flatten(0, 1).float(), dim=-1)
    grads = torch.autograd.grad(-logp.gather(-1, x[:, 1:].flatten()[:, None]).sum(), updates)
    tokens = x.shape[0] * (x.shape[1] - 1)
    out = {}
    for i in range(lm.anatomy.n_layers):
        a, m = updates[3 * i].detach(), updates[3 * i + 1].detach()
        ga, g_out = grads[3 * i], grads[3 * i + 2]
        for name, est in ((f"L{i}.attn", ga * a), (f"L{i}.mlp", g_out * m), (f"L{i}", g_out * (a + m))):
            out[name] = -est.double().sum().item() / tokens
    return out


@pytest.mark.parametrize("slice_rows", [7, 1000])
def test_taylor_in_head_slices_equals_the_full_logits_backward(arch, slice_rows, monkeypatch):
    """7 rows a slice cuts 2 x 15 positions into uneven slices; 1000 keeps them in one."""
    lp = sys.modules["layerwise.profile"]
    monkeypatch.setattr(lp, "HEAD_SLICE_ELEMENTS", 97 * slice_rows)
    lm, w = tiny_lm(arch), tiny_windows(2)
    prof = profile(lm, w, ablation="taylor", lens=False, batch_size=2, progress=False)
    want = _taylor_from_full_logits(lm, w.ids)
    for name, value in want.items():
        assert prof.unit(name).metrics["taylor_nll"] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_peak_memory_is_in_bytes_and_never_falls():
    before = peak_memory()["rss_bytes"]
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    now = rss_bytes()
    after = peak_memory()["rss_bytes"]
    # The kernel's resident counters lag by a few pages; a unit slip (ru_maxrss is in KiB) would be a factor 1024.
    assert after >= before and after >= now - 2**20 and now >= big.numel() * 4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_conversion_tensor_by_tensor_equals_transformers_gguf_loader(arch, tmp_path, monkeypatch):
    """Shards of about 4 KiB: every tensor in its own file. The same weights, config and tokenizer as transformers'
    from_pretrained(gguf_file=...), which held them all at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerwise import loading

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "SHARD_BYTES", 4096)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"\u2581w{i}" for i in range(68)]
    path = write_gguf(tiny_model(arch), tmp_path / "tiny.gguf", tokens)
    lm = loading.load(str(path), device="cpu")
    want = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).state_dict()
    got = lm.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (cached,) = (loading.cache_root() / "models").iterdir()
    assert len(list(cached.glob("model-*-of-*.safetensors"))) > 3 and (cached / "model.safetensors.index.json").exists()
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert lm.tokenizer("a w3 b").input_ids == theirs("a w3 b").input_ids
