"""The block-streamed engine (issue 23, section 1): weights read from the checkpoint one block at a time give the
resident model's numbers exactly, and are given back after each block."""

import json
import math

import pytest

from layerwise import cli, load
from layerwise.engine import Checkpoint, Streamed, skeleton
from layerwise.errors import LayerwiseError
from layerwise.loading import LoadedModel
from layerwise.profile import profile

from .conftest import tiny_lm, tiny_windows


def _streamed(lm: LoadedModel, folder, attn_implementation=None) -> LoadedModel:
    """``lm`` saved to ``folder`` and loaded back as a skeleton whose weights stay there."""
    lm.model.save_pretrained(folder)
    return load(str(folder), offload="disk", attn_implementation=attn_implementation)


def _same_metrics(a, b) -> None:
    for ua, ub in zip(a.units, b.units, strict=True):
        assert ua.name == ub.name
        for key, va in ua.metrics.items():
            vb = ub.metrics[key]
            assert (va is None) == (vb is None), (ua.name, key)
            if va is not None:
                assert math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9), (ua.name, key, va, vb)
        assert ua.details == ub.details, ua.name


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen3"])
@pytest.mark.parametrize("kw", [{}, {"positions": 5, "ablation_samples": 2}])
def test_streamed_profile_equals_the_resident_one(arch, kw, tmp_path):
    """Every metric (stream statistics, zd, logit lens, exact ablation, Taylor estimate) and every detail, also with
    sampled positions and ablation on the first windows only; afterwards no weight is left in memory."""
    lm, w = tiny_lm(arch, layers=3), tiny_windows(5)
    w.n_calib = 5
    disk = _streamed(lm, tmp_path / arch)
    resident = profile(lm, w, batch_size=2, progress=False, **kw)
    streamed = profile(disk, w, batch_size=2, progress=False, **kw)
    _same_metrics(resident, streamed)
    assert all(p.device.type == "meta" for p in disk.model.parameters())
    assert streamed.meta["offload"] == "disk" and "offload" not in resident.meta
    assert (streamed.meta["n_params"], streamed.meta["dtype"]) == (resident.meta["n_params"], resident.meta["dtype"])


def test_streamed_attention_metrics_equal_the_resident_ones(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerwise.anatomy import Anatomy

    lm = tiny_lm("llama", layers=3)
    lm.model.save_pretrained(tmp_path / "m")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    resident = LoadedModel(eager, None, Anatomy(eager))
    disk = load(str(tmp_path / "m"), offload="disk", attn_implementation="eager")
    w = tiny_windows(4)
    w.n_calib = 4
    kw = dict(attention=True, ablation="none", batch_size=2, progress=False)
    _same_metrics(profile(resident, w, **kw), profile(disk, w, **kw))


def test_a_checkpoint_without_a_weight_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    lm = tiny_lm("llama", layers=2)
    lm.model.save_pretrained(tmp_path)
    (shard,) = tmp_path.glob("*.safetensors")
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        LayerwiseError, match=r"^the checkpoint holds no tensor for model.layers.1.mlp.down_proj.weight"
    ):
        Streamed(skeleton(tmp_path), Checkpoint.of(tmp_path))
    with pytest.raises(LayerwiseError, match="unknown `offload` 'cpu'"):
        load(str(tmp_path), offload="cpu")


@pytest.mark.real
def test_default_model_profiles_the_same_from_disk(tmp_path, real_cache):
    """``layerwise profile --offload disk`` on the default model gives the resident profile's every metric."""
    argv = ["--seq-len", "64", "--samples", "2", "--positions", "16", "--ablation-samples", "1"]
    assert cli.main(["profile", *argv, "--offload", "disk", "--out", str(tmp_path), "--json"]) == 0
    lm = load("default")
    from layerwise import windows
    from layerwise.profile import Profile

    w = windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2, max_len=lm.anatomy.context_length)
    resident = profile(lm, w, positions=16, ablation_samples=1, progress=False)
    streamed = Profile.load(tmp_path / "profile.json")
    _same_metrics(resident, streamed)
    assert json.loads((tmp_path / "profile.json").read_text())["meta"]["offload"] == "disk"


def test_every_other_action_refuses_a_model_on_disk_in_one_line(tmp_path):
    """Only profile reads weights block by block so far; every action says so before touching a weight."""
    from layerwise import drop, quantize, steer, tune
    from layerwise.probe import Examples, probe

    disk = _streamed(tiny_lm("llama", layers=2), tmp_path / "m")
    w = tiny_windows(4)
    calls = [
        lambda: drop.run(disk, w, n=1),
        lambda: drop.choose(disk, w, n=1),
        lambda: drop.sweep_plans(disk, w, sweep=[1]),
        lambda: drop.export_plan(disk, drop.DropPlan(["L1"], "block", "given"), tmp_path / "d", ("hf",)),
        lambda: quantize.run(disk, w, bits=4.8, format="int"),
        lambda: tune.run(disk, tune.TuneData.from_windows(w), select="full"),
        lambda: tune.train(disk, w, select="full"),
        lambda: probe(disk, Examples(labels=[0, 1] * 5, ids=[[1, 2, 3]] * 10)),
        lambda: steer.run(disk, [("a", "b")] * 4, ["p"], w.ids),
    ]
    for call in calls:
        with pytest.raises(LayerwiseError, match=r"needs the weights in memory, .* load it with `offload` none$"):
            call()
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bfloat16_checkpoint_runs_in_the_dtype_asked_for(dtype, tmp_path):
    """Weights stored in bfloat16 and read block by block run in `dtype`, as the loaded model does (they were once
    left in the checkpoint's dtype, which a float32 run from disk does not match)."""
    import torch

    lm = tiny_lm("llama", layers=3)
    lm.model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    resident, disk = (load(str(tmp_path / "m"), dtype=dtype, offload=o) for o in ("none", "disk"))
    w = tiny_windows(4)
    w.n_calib = 4
    a, b = (profile(m, w, batch_size=2, ablation="taylor", progress=False) for m in (resident, disk))
    _same_metrics(a, b)
    assert a.meta["dtype"] == b.meta["dtype"] == dtype
