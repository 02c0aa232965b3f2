"""The memory a run records, and the small paths' memory: computed in slices, the numbers are the whole-tensor way's."""

from __future__ import annotations

import sys

import pytest
import torch

from layerwise.memory import peak_memory, rss_bytes
from layerwise.metrics import lens as lens_m
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
    monkeypatch.setattr(lens_m, "SLICE_ELEMENTS", 97 * slice_rows)
    lm, w = tiny_lm(arch), tiny_windows(2)
    prof = profile(lm, w, ablation="taylor", lens=False, batch_size=2, progress=False)
    want = _taylor_from_full_logits(lm, w.ids)
    for name, value in want.items():
        assert prof.unit(name).metrics["taylor_nll"] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def _whole_tensor_readout(logits: torch.Tensor, targets: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The reference's NLL and a candidate's KL and NLL, as lens.py computed them before slicing: on whole tensors."""
    z, zc = logits.float(), cand.float()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    mass = p.sum(-1, dtype=torch.float64)
    neg_entropy = torch.linalg.vecdot(p, z).double() - mass * torch.logsumexp(z, dim=-1).double()
    lse = torch.logsumexp(zc, dim=-1)
    kl = (neg_entropy - (torch.linalg.vecdot(p, zc).double() - mass * lse.double())).float()
    return -logp.gather(-1, targets[:, None]).squeeze(-1), kl, lse - zc.gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("rows", [3, 10**6])
def test_readout_comparison_in_row_slices_equals_whole_tensors(rows, monkeypatch):
    """3 rows a slice cuts 20 rows unevenly; 10**6 keeps them whole."""
    monkeypatch.setattr(lens_m, "SLICE_ELEMENTS", 97 * rows)
    g = torch.Generator().manual_seed(0)
    logits, cand = torch.randn(2, 20, 97, generator=g) * 3
    targets = torch.randint(0, 97, (20,), generator=g)
    ref = lens_m.Reference.from_logits(logits, targets)
    kl, nll = lens_m.compare(cand, ref)
    for got, want in zip((ref.nll, kl, nll), _whole_tensor_readout(logits, targets, cand)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref.probs, torch.softmax(logits, -1), rtol=0, atol=1e-7)
    assert (lens_m.compare(logits, ref)[0].abs() < 1e-6).all()  # a readout equal to the reference is at KL 0


def test_peak_memory_is_in_bytes_and_never_falls():
    before = peak_memory()["rss_bytes"]
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    now = rss_bytes()
    after = peak_memory()["rss_bytes"]
    # The kernel's resident counters lag by a few pages; a unit slip (KiB for bytes) would be a factor 1024.
    assert after >= before and after >= now - 2**20 and now >= big.numel() * 4


def test_a_process_spawned_by_a_large_one_records_its_own_peak():
    """ru_maxrss would count the parent's resident set, folded in when the child execs; the record must not."""
    import subprocess

    big = torch.ones(768 * 2**20 // 4)  # the parent holds 768 MiB
    code = "from layerwise.memory import peak_memory; print(peak_memory()['rss_bytes'])"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < rss_bytes() - big.numel() * 4 // 2


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_conversion_tensor_by_tensor_equals_transformers_gguf_loader(arch, tmp_path, monkeypatch):
    """Shards of about 4 KiB: every tensor in its own file. The same weights, config and tokenizer as transformers'
    from_pretrained(gguf_file=...), which held them all at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerwise import loading

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "SHARD_BYTES", 4096)
    tokens = (
        ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"\u2581w{i}" for i in range(68)]
    )
    path = write_gguf(tiny_model(arch), tmp_path / "tiny.gguf", tokens)
    lm = loading.load(str(path), device="cpu")
    want = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).state_dict()
    got = lm.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    (cached,) = (loading.cache_root() / "models").iterdir()
    assert len(list(cached.glob("model-*-of-*.safetensors"))) > 3 and (cached / "model.safetensors.index.json").exists()
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert lm.tokenizer("a w3 b").input_ids == theirs("a w3 b").input_ids
