"""The mixture-of-experts paths on a CUDA GPU compute what they compute on the CPU, on the same tiny random models:
exact per-expert ablation (in memory and block by block from disk), an expert drop and the checkpoint it writes,
training by expert, and llama.cpp's importance matrix. Skipped where torch sees no GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from layerwise import drop, load, tune
from layerwise.loading import LoadedModel
from layerwise.profile import profile
from layerwise.quant.imatrix import compute

from .conftest import MOE_ARCHS, same_checkpoint, tiny_lm, tiny_windows
from .test_engine import _same_metrics
from .test_moe_tune import _expert_slices, _shared

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ("cpu", "cuda")


def _on(device: str, arch: str) -> LoadedModel:
    """The tiny model of ``arch`` (the same weights every call), on ``device``."""
    lm = tiny_lm(arch)
    lm.model.to(device)
    return lm


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_ablation_on_cuda_equals_the_cpu_s(arch, tmp_path):
    w, kw = tiny_windows(3), dict(batch_size=2, expert_ablation=True, progress=False)
    cpu = profile(_on("cpu", arch), w, **kw)
    _same_metrics(cpu, profile(_on("cuda", arch), w, **kw), rel=1e-3, abs_=1e-5)
    tiny_lm(arch).model.save_pretrained(tmp_path / "m")
    disk = load(str(tmp_path / "m"), device="cuda", offload="disk")
    assert disk.device.type == "cuda"
    _same_metrics(cpu, profile(disk, w, **kw), rel=1e-3, abs_=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_an_expert_drop_on_cuda_writes_the_cpu_s_checkpoint(arch, tmp_path):
    """The same experts chosen by route share, measured alike, written as the same tensors; reloaded on the GPU, the
    checkpoint computes the CPU's logits."""
    w = tiny_windows(4)
    w.n_calib = 2
    kw = dict(unit=("expert",), per_layer=1, order=("route_share",), with_speed=False, eval_samples=2, progress=False)
    (a,), (b,) = (drop.run(_on(d, arch), w, out=tmp_path / d, **kw).variants for d in DEVICES)
    assert a["units"] == b["units"] and a["scores"] == b["scores"]
    for key in ("ppl", "nll", "delta_nll", "kl", "same_top_p", "params"):
        assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])
    same_checkpoint(tmp_path / "cpu" / "model", tmp_path / "cuda" / "model")
    x = w.ids[:2]
    with torch.no_grad():
        want, got = (
            AutoModelForCausalLM.from_pretrained(tmp_path / d / "model").to(d).eval()(input_ids=x.to(d)).logits
            for d in DEVICES
        )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_training_by_expert_on_cuda_moves_what_the_cpu_moves(arch):
    """LISA over experts, two a step for three steps: on either device only the drawn experts' slices move (nothing
    else does), and the GPU's draws, losses and weights are the CPU's."""
    w, runs = tiny_windows(4, 16), {}
    kw = dict(
        select="lisa", unit="expert", active=2, interval=1, steps=3, lr=1e-3, train_embeddings=False, progress=False
    )
    for d in DEVICES:
        lm = _on(d, arch)
        shared = _shared(lm)
        slices = _expert_slices(lm, shared)
        rest = {n: p.detach().clone() for n, p in lm.model.named_parameters() if ".experts." not in n}
        run = tune.train(lm, w, **kw)
        moved = {k for k, v in _expert_slices(lm, shared).items() if not torch.equal(v, slices[k])}
        drawn = {(int(u[1:].split(".")[0]), int(u.rsplit("e", 1)[1])) for r in run.records for u in r["active"]}
        assert moved and {(i, j) for i, j, _ in moved} <= drawn, (moved, drawn)
        assert all(torch.equal(p, rest[n]) for n, p in lm.model.named_parameters() if n in rest)
        runs[d] = (run, moved, {n: p.detach().cpu() for n, p in lm.model.named_parameters()})
    (cpu, moved, want), (gpu, moved_gpu, got) = runs["cpu"], runs["cuda"]
    assert [r["active"] for r in gpu.records] == [r["active"] for r in cpu.records] and moved_gpu == moved
    assert gpu.losses == pytest.approx(cpu.losses, rel=1e-5)
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=1e-4, atol=5e-5, msg=n)  # lr 1e-3: float64 moves them 4e-6


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss"])
def test_a_moe_imatrix_on_cuda_equals_the_cpu_s(arch):
    w = tiny_windows(3)
    lms = {d: _on(d, arch) for d in DEVICES}
    cpu, gpu = (compute(lms[d], w, batch_size=2, progress=False) for d in DEVICES)
    assert lms["cuda"].model.config._experts_implementation == lms["cpu"].model.config._experts_implementation
    assert sorted(gpu.sums) == sorted(cpu.sums) and gpu.chunk_count == cpu.chunk_count
    for name, sums in cpu.sums.items():
        assert gpu.counts[name].tolist() == cpu.counts[name].tolist(), name
        np.testing.assert_allclose(gpu.sums[name], sums, rtol=1e-4, atol=1e-6, err_msg=name)


def test_loading_onto_cuda_runs_the_model_s_own_forwards(tmp_path):
    """``load(..., device="cuda")`` needs no network (transformers' Hub kernels stay off: they are fetched at load
    time and replace the forwards layerwise hooks) and computes the CPU's logits."""
    tiny_lm("qwen3_moe").model.save_pretrained(tmp_path / "m")
    cpu, gpu = (load(str(tmp_path / "m"), device=d) for d in DEVICES)
    assert gpu.device.type == "cuda" and not gpu.model.use_kernels
    x = tiny_windows(2).ids
    with torch.no_grad():
        want, got = (lm.model(input_ids=x.to(lm.device)).logits.cpu() for lm in (cpu, gpu))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_moe_int_plan_on_cuda_is_the_cpu_s(offload, tmp_path):
    """Experts measured and planned as one group per layer (RTN, held in memory or read block by block) give the
    CPU's plans and figures."""
    from layerwise import quantize as qz

    from .test_quant import _split_windows

    tiny_lm("olmoe").model.save_pretrained(tmp_path / "m")
    w, kw = _split_windows(4, 3), dict(bits=4.5, format="int", group_size=16, export=(), progress=False)
    cpu, gpu = (qz.run(load(str(tmp_path / "m"), device=d, offload=offload), w, **kw) for d in DEVICES)
    assert [r["plan"] for r in gpu.rows] == [r["plan"] for r in cpu.rows]
    for a, b in zip(cpu.rows, gpu.rows, strict=True):
        for key in ("bpw", "ppl", "kl"):
            assert math.isclose(a[key], b[key], rel_tol=1e-3, abs_tol=1e-6), (key, a[key], b[key])
