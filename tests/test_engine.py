"""The block-streamed engine (issue 23, section 1): weights read from the checkpoint one block at a time give the
resident model's numbers exactly, and are given back after each block."""

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
def test_default_model_profiles_the_same_from_disk(tmp_path, real_cache, capsys):
    """On the default model, a ``--max-memory`` budget under the planned in-memory peak and over the planned from-disk
    one reads the weights block by block, and gives the in-memory profile's every metric; the plan is printed first
    and recorded. A budget under both is refused in one line before the model loads."""
    import torch

    from layerwise import windows
    from layerwise.loading import checkpoint_folder
    from layerwise.memory_plan import profile_plan
    from layerwise.profile import Profile

    argv = ["--seq-len", "64", "--samples", "2", "--positions", "16", "--ablation-samples", "1", "--batch-size", "2"]
    plan = profile_plan(
        checkpoint_folder("default")[0],
        dtype=torch.float32,
        windows=2,
        seq_len=64,
        batch_size=2,
        ablation="exact",
        ablation_windows=2,
    )
    budget = (plan.streamed + plan.resident) // 2
    assert cli.main(["profile", *argv, "--max-memory", str(budget), "--out", str(tmp_path / "p"), "--json"]) == 0
    assert "runs reading one block at a time from disk" in capsys.readouterr().err
    streamed = Profile.load(tmp_path / "p" / "profile.json")
    assert streamed.meta["offload"] == "disk" and streamed.meta["memory_plan"]["streamed"] == plan.streamed
    lm = load("default")
    w = windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2, max_len=lm.anatomy.context_length)
    _same_metrics(profile(lm, w, positions=16, ablation_samples=1, batch_size=2, progress=False), streamed)
    rc = cli.main(["profile", *argv, "--max-memory", "1MiB", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and "even reading one block at a time, over the 1 MiB budget; lower --batch-size" in err, err
    assert not (tmp_path / "never").exists()


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


def test_the_memory_plan_chooses_where_the_weights_stay_and_refuses_what_cannot_fit(tmp_path):
    import torch

    from layerwise.memory_plan import RUNTIME, MemoryPlan, parse_bytes, profile_plan

    assert [parse_bytes(t) for t in ("4GiB", "512 MiB", "3.5GB", "1000")] == [
        4 * 2**30,
        512 * 2**20,
        3_500_000_000,
        1000,
    ]
    with pytest.raises(LayerwiseError, match=r"^`max_memory` takes a size such as 4GiB"):
        parse_bytes("lots")
    lm = tiny_lm("llama", layers=3)
    lm.model.save_pretrained(tmp_path)
    kw = dict(windows=4, seq_len=16, batch_size=2, ablation="exact", ablation_windows=2)
    plan = profile_plan(tmp_path, dtype=torch.float32, **kw)
    n = sum(p.numel() for p in lm.model.parameters())
    assert plan.runtime == RUNTIME and plan.weights == 4 * n
    assert plan.files == sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    hidden, layers = lm.anatomy.embed.weight.shape[1], 3
    assert plan.states == (layers * 4 + 3 * layers * 2) * 16 * hidden * 4
    assert profile_plan(tmp_path, dtype=torch.bfloat16, **kw).weights == 2 * n
    small = MemoryPlan(runtime=10, weights=100, files=50, block=20, stem=30, states=5, work=40, block_work=4)
    assert (small.resident, small.streamed) == (220, 75)  # with 10 % headroom
    assert [small.choose("auto", b) for b in (220, 219, 75)] == ["none", "disk", "disk"]
    assert small.choose("none", 1) == "none" and small.choose("disk", 10**9) == "disk"
    with pytest.raises(LayerwiseError, match=r"^the profile needs about 0 MiB even reading one block at a time, over"):
        small.choose("auto", 74)
    assert "runs reading one block at a time from disk" in small.line("disk", 100)
