"""Quantization measurement and GPTQ's sequential pass stream by batch: same results, memory flat in the number of
windows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerwise.quant.rtn import QConfig

from .conftest import tiny_lm, tiny_windows

SMALL = tuple(QConfig(b, 16) for b in (2, 4))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_measurement_is_the_same_whatever_the_batch_size(method):
    from layerwise.quant.measure import measure

    lm, w = tiny_lm("qwen2"), tiny_windows(5)
    whole = measure(lm, w, candidates=SMALL, method=method, progress=False, batch_size=5)
    # 5 batches of one window; batches of 2, 2 and 1; the same with every block a run of its own (one gradient pass
    # each)
    for b, cache in ((1, 2**31), (2, 2**31), (2, 1)):
        parts = measure(lm, w, candidates=SMALL, method=method, progress=False, batch_size=b, cache_bytes=cache)
        assert parts.meta["batch_size"] == b
        assert parts.groups.keys() == whole.groups.keys()
        for g, entry in whole.groups.items():
            for name, c in entry["configs"].items():
                got = parts.groups[g]["configs"][name]
                assert got["bits"] == c["bits"] and got["stored"] == c["stored"]
                assert got["err"] == pytest.approx(c["err"], rel=1e-9) and got["rel"] == pytest.approx(
                    c["rel"], rel=1e-9
                )


def test_gptq_sequential_pass_is_the_same_whatever_the_batch_size():
    from layerwise.quant.allocate import fixed
    from layerwise.quant.apply import plan_codes
    from layerwise.quant.measure import GroupCandidates, measure

    lm, w = tiny_lm("llama"), tiny_windows(5)
    cands = GroupCandidates(SMALL, "gptq")
    meas = measure(lm, w, candidates=cands, progress=False)
    alloc = fixed(meas, {g: SMALL[0].name for g in meas.groups}, "uniform")
    whole = plan_codes(lm, meas, alloc, cands, w, batch_size=5)
    parts = plan_codes(lm, meas, alloc, cands, w, batch_size=2)
    assert whole.keys() == parts.keys()
    for p, q in whole.items():  # codes agree except where float noise tips a weight across a rounding boundary
        assert (q.codes != parts[p].codes).float().mean() < 1e-3
        assert torch.allclose(q.scales, parts[p].scales, rtol=1e-5)


_PROBE = """
import json, resource, sys, torch
sys.path[:0] = [{src!r}, {root!r}]
from tests.conftest import tiny_model
from layerwise.anatomy import Anatomy
from layerwise.data import Windows
from layerwise.loading import LoadedModel
from layerwise.quant.measure import measure
from layerwise.quant.rtn import QConfig
import transformers as tf
torch.manual_seed(0)
model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
lm = LoadedModel(model=model, tokenizer=None, anatomy=Anatomy(model), source={{"ref": "probe", "model_hash": "probe"}})
ids = torch.randint(0, 8192, ({n}, 64), generator=torch.Generator().manual_seed(0))
w = Windows(ids=ids, n_calib={n}, source="random", data_hash="x", n_text_tokens=ids.numel())
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
measure(lm, w, candidates=(QConfig(4, 16),), progress=False, batch_size=4)
print(json.dumps({{"peak_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before}}))
"""


def _peak_growth(n: int) -> int:
    """Bytes the process's peak resident memory grew by during one measurement of ``n`` windows (fresh process)."""
    root = Path(__file__).resolve().parents[1]
    import layerwise

    src = str(Path(layerwise.__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(src=src, root=str(root), n=n)],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]


def test_measurement_memory_is_flat_in_the_number_of_windows():
    """Peak memory of the measurement at 8 and 64 calibration windows, batch size 4.

    Holding every window at once, the gradient pass alone keeps the logits,
    their log-softmax and its gradient for all windows: the code before
    streaming grew by 505 MB from 8 to 64 windows here (4.4 copies of the
    extra windows' logits), the streaming code by 8.5 MB (allocator noise).
    The peak must not grow by a quarter of one copy of the extra logits.
    """
    small, large = _peak_growth(8), _peak_growth(64)
    one_copy_of_extra_logits = 56 * 63 * 8192 * 4
    assert large - small < one_copy_of_extra_logits / 4, (small, large)
