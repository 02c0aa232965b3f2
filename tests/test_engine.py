"""The block-streamed engine (issue 23, section 1): weights read from the checkpoint one block at a time give the
resident model's numbers exactly, and are given back after each block."""

import json
import math
from pathlib import Path

import pytest
import torch

from layerwise import cli, load
from layerwise.engine import Checkpoint, Streamed, skeleton
from layerwise.errors import LayerwiseError
from layerwise.loading import LoadedModel
from layerwise.profile import profile

from .conftest import MOE_ARCHS, same_checkpoint, tiny_folder, tiny_lm, tiny_windows


def _streamed(lm: LoadedModel, folder, attn_implementation=None) -> LoadedModel:
    """``lm`` saved to ``folder`` and loaded back as a skeleton whose weights stay there."""
    lm.model.save_pretrained(folder)
    return load(str(folder), offload="disk", attn_implementation=attn_implementation)


def _same_metrics(a, b, rel: float = 1e-6, abs_: float = 1e-9) -> None:
    """Every unit's metrics and details (standard errors, per-head values) equal to ``rel`` and ``abs_``."""
    for ua, ub in zip(a.units, b.units, strict=True):
        assert ua.name == ub.name
        assert ua.metrics.keys() == ub.metrics.keys() and ua.details.keys() == ub.details.keys(), ua.name
        for key, va in [*ua.metrics.items(), *ua.details.items()]:
            vb = ub.metrics[key] if key in ub.metrics else ub.details[key]
            for x, y in zip(*(v if isinstance(v, list) else [v] for v in (va, vb)), strict=True):
                assert (x is None) == (y is None), (ua.name, key)
                if isinstance(x, float):
                    assert math.isclose(x, y, rel_tol=rel, abs_tol=abs_), (ua.name, key, x, y)
                else:
                    assert x == y, (ua.name, key, x, y)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen3", *MOE_ARCHS])
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


def test_streamed_stream_statistics_take_blocks_one_at_a_time_where_an_accelerator_would_stack_them(
    tmp_path, monkeypatch
):
    """On an accelerator the pass in memory reduces consecutive blocks' statistics together (a run of blocks, each
    batch through all of them in order); from disk every batch passes one block before the next is read, so its
    runs are single blocks: with runs as large as a whole model, the two passes still agree."""
    from layerwise import reducers

    monkeypatch.setattr(reducers, "_run_elements", lambda device: 2**40)  # every block in one run
    lm, w = tiny_lm("llama", layers=3), tiny_windows(4)
    disk = _streamed(lm, tmp_path / "m")
    kw = dict(batch_size=2, ablation="none", lens=False, progress=False)
    _same_metrics(profile(lm, w, **kw), profile(disk, w, **kw))


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
    with pytest.raises(LayerwiseError, match="unknown `offload` 'gpu'; use none .weights in memory., cpu or disk$"):
        load(str(tmp_path), offload="gpu")


@pytest.mark.real
def test_default_model_profiles_the_same_from_disk(tmp_path, real_cache, capsys):
    """On the default model, a ``--max-memory`` budget under the planned in-memory peak and over the planned from-disk
    one reads the weights block by block, and gives the in-memory profile's every metric; the plan is printed first
    and recorded. A budget under that, over the plan's peak with the hidden states spilled, spills them to a file
    in ``--out`` (removed after), with the same metrics. A budget under every way is refused in one line before the
    model loads."""
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
    spill = (plan.spilled + plan.streamed) // 2  # under the kept states: they go to a file in --out
    assert cli.main(["profile", *argv, "--max-memory", str(spill), "--out", str(tmp_path / "s"), "--json"]) == 0
    assert "its hidden states spilled to a file in the output folder" in capsys.readouterr().err
    spilled = Profile.load(tmp_path / "s" / "profile.json")
    assert spilled.meta["memory_plan"]["offload"] == "spill" and not list((tmp_path / "s").glob(".layerwise-*"))
    lm = load("default")
    w = windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2, max_len=lm.anatomy.context_length)
    resident = profile(lm, w, positions=16, ablation_samples=1, batch_size=2, progress=False)
    _same_metrics(resident, streamed)
    _same_metrics(resident, spilled)
    rc = cli.main(["profile", *argv, "--max-memory", "1MiB", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "even reading one block at a time, its hidden states in a file, over the 1 MiB budget; lower --batch-size"
        in err
    )
    assert not (tmp_path / "never").exists()


def test_tune_refuses_a_model_on_disk_in_one_line(tmp_path):
    """Every action but tune reads weights block by block so far; tune says so before touching a weight."""
    from layerwise import tune

    disk = _streamed(tiny_lm("llama", layers=2), tmp_path / "m")
    w = tiny_windows(4)
    calls = [
        lambda: tune.run(disk, tune.TuneData.from_windows(w), select="full"),
        lambda: tune.train(disk, w, select="full"),
    ]
    for call in calls:
        with pytest.raises(LayerwiseError, match=r"needs the weights in memory, .* load it with `offload` none$"):
            call()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bfloat16_checkpoint_runs_in_the_dtype_asked_for(dtype, tmp_path):
    """Weights stored in bfloat16 and read block by block run in `dtype`, as the loaded model does (they were once
    left in the checkpoint's dtype, which a float32 run from disk does not match)."""
    lm = tiny_lm("llama", layers=3)
    lm.model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    resident, disk = (load(str(tmp_path / "m"), dtype=dtype, offload=o) for o in ("none", "disk"))
    w = tiny_windows(4)
    w.n_calib = 4
    a, b = (profile(m, w, batch_size=2, ablation="taylor", progress=False) for m in (resident, disk))
    _same_metrics(a, b)
    assert a.meta["dtype"] == b.meta["dtype"] == dtype


def test_the_memory_plan_chooses_where_the_weights_stay_and_refuses_what_cannot_fit(tmp_path):
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
    # with 10 % headroom; from disk two blocks: the one running and the next, read ahead
    assert (small.resident, small.streamed) == (220, int(1.1 * (10 + 2 * 20 + 30 + 5 + 4))) == (220, 97)
    assert [small.choose("auto", b) for b in (220, 219, 97)] == ["none", "disk", "disk"]
    assert small.choose("none", 1) == "none" and small.choose("disk", 10**9) == "disk"
    assert small.line("none", 1).endswith(
        "runs in memory, as `offload` none asks, over the budget (`offload` auto would read from disk)"
    )
    assert small.line("none", small.resident).endswith("runs in memory")
    with pytest.raises(LayerwiseError, match=r"^the profile needs about 0 MiB even reading one block at a time, over"):
        small.choose("auto", 96)
    assert "runs reading one block at a time from disk" in small.line("disk", 100)
    assert small.held == int(1.1 * (10 + 100 + 50 + 5))  # every weight and the states, in the machine's memory
    assert [small.choose("auto", 97, host=h) for h in (small.held, small.held - 1)] == ["cpu", "disk"]
    assert small.choose("cpu", 97) == "cpu" and "one block at a time on the device" in small.line("cpu", 97)
    with pytest.raises(LayerwiseError, match=r"^the profile needs about 0 MiB on the device even one block at a time"):
        small.choose("cpu", 96)


def _drop_figures(report) -> list[dict]:
    keys = ("key", "params", "weight_bytes", "ppl", "delta_nll", "kl", "kl_p99", "same_top_p")
    return [{k: v.get(k) for k in keys} for v in report.variants]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_streamed_drop_evaluates_and_exports_as_the_resident_one(arch, tmp_path):
    """Held-out quality of block, attention and MLP drops equals the resident model's (1e-5 relative), without a
    speed; the exported smaller checkpoint, copied tensor by tensor from the source, holds the resident export's
    every tensor and config, and no weight stays in memory."""
    from transformers import AutoModelForCausalLM

    from layerwise import drop

    lm, w = tiny_lm(arch, layers=4), tiny_windows(8)
    w.n_calib = 3
    disk = _streamed(lm, tmp_path / "m")
    plans = [drop.given(lm.anatomy, u) for u in (["L1"], ["L0.attn", "L2.mlp"], ["L1", "L3.attn"])]
    kw = dict(plans=plans, eval_samples=4, batch_size=2, progress=False)
    resident = drop.run(lm, w, with_speed=False, **kw)
    streamed = drop.run(disk, w, **kw)
    assert streamed.meta["with_speed"] is False and "prefill_tok_s" not in streamed.variants[0]
    for a, b in zip(_drop_figures(resident), _drop_figures(streamed), strict=True):
        key = a.pop("key")
        assert key == b.pop("key")
        assert a == pytest.approx(b, rel=1e-5, abs=1e-9), key
    plan = plans[2]
    outs = [drop.export_plan(m, plan, tmp_path / name, ("hf",)) for m, name in ((lm, "r"), (disk, "d"))]
    ra, da = (AutoModelForCausalLM.from_pretrained(o["hf"]["path"]) for o in outs)
    ca, cb = (
        {k: v for k, v in m.config.to_dict().items() if k not in ("_name_or_path", "layerwise")} for m in (ra, da)
    )
    assert ca == cb
    ia, ib = ({k: v for k, v in m.config.layerwise.items() if k != "source_model_hash"} for m in (ra, da))
    assert ia == ib and ia["dropped_sublayers"] == ["L2.attn"]
    sa, sb = ra.state_dict(), da.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p.device.type == "meta" for p in disk.model.parameters())


def test_streamed_drop_ranks_by_a_streamed_profile_and_refuses_contiguous(tmp_path):
    """A plan chosen from disk (its profile measured from disk, iteratively too) is the resident model's plan;
    ``contiguous`` is refused in one line."""
    from layerwise import drop

    lm, w = tiny_lm("llama", layers=4), tiny_windows(8)
    disk = _streamed(lm, tmp_path / "m")
    for kw in ({"n": 2, "order": ("bi",)}, {"n": 2, "order": ("ablate_nll",), "iterative": True}):
        a, b = (drop.choose(m, w, progress=False, **kw) for m in (lm, disk))
        assert a.units == b.units and a.scores == pytest.approx(b.scores, rel=1e-6)
    with pytest.raises(LayerwiseError, match=r"^`order` contiguous compares whole streams .* `offload` none$"):
        drop.choose(disk, w, n=2, order=("contiguous",))
    with pytest.raises(
        LayerwiseError, match="^speed is not measured on a model run one block at a time .* turn `with_speed` off$"
    ):
        drop.measure(disk, {"p": drop.given(lm.anatomy, ["L1"])}, w.evaluation[:2])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_quant_measurement_equals_the_resident_one(method, tmp_path):
    """Every group's relative error, Fisher-weighted loss change and bits, measured from disk (backward block by
    block, one config of one group at a time), equal the resident measurement's to 1e-5; a rerun measures only the
    groups missing from its file."""

    from layerwise.quant.measure import measure
    from layerwise.quant.rtn import QConfig

    lm, w = tiny_lm("llama", layers=3), tiny_windows(6)
    w.n_calib = 4
    disk = _streamed(lm, tmp_path / "m")
    kw = dict(candidates=(QConfig(2, 16), QConfig(4, 16), QConfig(8, 32)), method=method, batch_size=2, progress=False)
    a = measure(lm, w, **kw)
    b = measure(disk, w, path=tmp_path / "meas.json", **kw)
    assert a.groups.keys() == b.groups.keys() and len(a.groups) == 12
    for g, ea in a.groups.items():
        eb = b.groups[g]
        assert (ea["layer"], ea["numel"], ea["modules"]) == (eb["layer"], eb["numel"], eb["modules"])
        for c, va in ea["configs"].items():
            vb = eb["configs"][c]
            assert (va["bits"], va["stored"]) == (vb["bits"], vb["stored"])
            assert va["err"] == pytest.approx(vb["err"], rel=1e-5) and va["rel"] == pytest.approx(vb["rel"], rel=1e-5)
    saved = json.loads((tmp_path / "meas.json").read_text())
    del saved["groups"]["L1.mlp.down"]
    (tmp_path / "meas.json").write_text(json.dumps(saved))
    again = measure(disk, w, path=tmp_path / "meas.json", **kw)
    assert again.groups == b.groups
    assert all(p.device.type == "meta" for p in disk.model.parameters())


def _live_reads(monkeypatch) -> list[int]:
    """Counts, while patched, the tensors read back from a spill file that are still alive: ``[now, most]``."""
    import weakref

    from layerwise.engine import Spilled, States

    live = [0, 0]
    load = States.load

    def counted(self, kept):
        t = load(self, kept)
        if isinstance(kept, Spilled):
            live[0] += 1
            live[1] = max(live)
            weakref.finalize(t, _release, live)
        return t

    monkeypatch.setattr(States, "load", counted)
    return live


def _release(live: list[int]) -> None:
    live[0] -= 1


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_quant_measurement_holds_one_batch_at_a_time(method, tmp_path, monkeypatch):
    """From disk with the hidden states spilled, each batch's sublayer inputs, updates and gradients are kept in the
    spill file and read back one batch at a time: as many tensors read back are alive at once with six batches as
    with two, and the GPTQ plan's quantized stream lies in the file too."""
    from layerwise.quant.allocate import fixed
    from layerwise.quant.apply import BlockPlan, weight_config
    from layerwise.quant.measure import GroupCandidates, measure
    from layerwise.quant.rtn import QConfig

    lm = tiny_lm("llama", layers=2)
    lm.model.save_pretrained(tmp_path / "m")
    disk = load(str(tmp_path / "m"), offload="disk", spill=tmp_path / "spill")
    cands = GroupCandidates((QConfig(2, 16), QConfig(4, 16)), method)
    live = _live_reads(monkeypatch)
    most = []
    for n in (2, 6):
        w = tiny_windows(n + 1)
        w.n_calib = n
        live[:] = [0, 0]
        meas = measure(disk, w, candidates=cands, batch_size=1, progress=False)
        most.append(live[1])
    assert most[0] == most[1] > 0
    alloc = fixed(meas, {g: cands.names[0] for g in meas.groups}, "uniform")
    assert disk.streamed is not None
    with BlockPlan(disk, weight_config(meas, alloc), cands, w, batch_size=1) as plan:
        for i in disk.streamed.blocks():
            plan.codes(i)
            if method == "gptq" and i == 0:
                assert len(plan.stream) == 6 and all(not isinstance(k, torch.Tensor) for k in plan.stream)
                assert len(list((tmp_path / "spill").glob("*.bin"))) == 1
    assert not list((tmp_path / "spill").glob("*"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_quantize_plans_and_evaluates_as_the_resident_one(method, tmp_path):
    """quantize from disk (measurement, the measured strategy's plans scored on calibration windows, GPTQ weights
    made block by block from the quantized stream, held-out evaluation) chooses the resident run's plans and gives
    their figures to 1e-5; the compressed-tensors export, written block by block as each block's codes are made,
    holds the in-memory export's every tensor and config."""
    from layerwise import quantize as qz

    lm, w = tiny_lm("llama", layers=3), tiny_windows(8)
    w.n_calib = 4
    disk = _streamed(lm, tmp_path / "m")
    kw = dict(bits=4.8, strategy=["measured", "uniform", "ranked:bi"], format="int", method=method, group_size=32)
    kw |= dict(symmetric=True)  # as the hf export needs
    kw |= dict(eval_samples=4, batch_size=2, progress=False)
    resident, streamed = (qz.run(m, w, **kw) for m in (lm, disk))
    keys = ("plan", "bpw", "bpw_model", "bytes", "ppl", "delta_nll", "kl", "same_top_p")
    for a, b in zip(resident.rows, streamed.rows, strict=True):
        ra, rb = ({k: r[k] for k in keys} for r in (a, b))
        assert ra.pop("plan") == rb.pop("plan")
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-9), a["plan"]
    assert resident.plans.keys() == streamed.plans.keys()
    for key, plan in resident.plans.items():
        assert {g: e["config"] for g, e in plan["groups"].items()} == {
            g: e["config"] for g, e in streamed.plans[key]["groups"].items()
        }
    key = next(iter(resident.plans))
    plan = qz.QuantPlan.from_json({**resident.meta, "model_hash": None}, key, resident.plans[key])  # tiny's is fake
    exports = [
        qz.export_plan(m, plan, tmp_path / name, ("hf",), w.evaluation, w) for m, name in ((lm, "r"), (disk, "d"))
    ]
    assert "transformers_ppl" in exports[0]["hf"] and "not measured when blocks run" in exports[1]["hf"]["not_measured"]
    same_checkpoint(tmp_path / "r" / "model", tmp_path / "d" / "model")
    assert all(p.device.type == "meta" for p in disk.model.parameters())


def test_a_missing_or_truncated_shard_is_one_line_before_anything_runs(tmp_path, capsys):
    """Every shard's header is read when the checkpoint is opened: a shard cut short, a shard the index names but
    the folder lacks, a tensor the index puts in the wrong shard and an unreadable index are each one line, from
    the API and from the CLI (exit 2, no result folder)."""

    lm = tiny_lm("llama", layers=4)
    lm.model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    folder = tmp_path / "m"
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2
    Checkpoint.of(folder)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-100])
    with pytest.raises(LayerwiseError, match=r"is not a whole safetensors file \(.*\); download it again$"):
        Checkpoint.of(folder)
    capsys.readouterr()
    argv = ["--seq-len", "16", "--samples", "2", "--offload", "disk", "--out", str(tmp_path / "never")]
    rc = cli.main(["profile", "--model", str(folder), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not a whole safetensors file" in err[0], err
    assert not (tmp_path / "never").exists()
    shards[1].unlink()
    with pytest.raises(LayerwiseError, match=r"is missing; the checkpoint's index names it: download the complete"):
        Checkpoint.of(folder)
    shards[1].write_bytes(data)
    index = folder / "model.safetensors.index.json"
    saved = json.loads(index.read_text())
    name = next(n for n, f in saved["weight_map"].items() if f != shards[0].name)
    saved["weight_map"][name] = shards[0].name
    index.write_text(json.dumps(saved))
    with pytest.raises(LayerwiseError, match=rf"lacks {name}, which its index names; download the shard again$"):
        Checkpoint.of(folder)
    index.write_text("{")
    with pytest.raises(LayerwiseError, match=r"is not a readable safetensors index; download it again$"):
        Checkpoint.of(folder)


def test_drop_and_quantize_plan_their_memory_and_run_from_disk_when_it_does_not_fit(tmp_path, capsys):
    """drop and quantize print their plan first and, with a budget between the planned peak from disk and the one
    in memory, read the weights block by block; the result records the plan. The plans count what each keeps: the
    original's and every plan's stream of the held-out windows (drop), every block's input and one block's
    sublayer streams, or each evaluated plan's stream (quantize); spilled, one batch's streams."""

    from layerwise.memory_plan import Shape, drop_plan, quantize_plan

    folder = tiny_folder(tmp_path / "m")
    shape = Shape.of(folder, dtype=torch.float32, seq_len=16)
    unit = 16 * shape.hidden * 4  # one window's hidden states
    kw = dict(dtype=torch.float32, seq_len=16, batch_size=2, calibration=4, evaluation=3)
    assert drop_plan(folder, plans=2, ablation=None, **kw).states == 3 * 3 * unit
    assert drop_plan(folder, plans=1, ablation="taylor", **kw).states == 4 * 4 * unit  # the profile's inputs
    q = quantize_plan(folder, configs=3, gptq=False, **kw)
    assert q.states == max((4 + 6) * 4, 5 * 3) * unit and q.extra > 0
    assert quantize_plan(folder, configs=3, gptq=True, **kw).states == max((4 + 6) * 4, 5 * 3 + 4 * 4) * unit
    # spilled, one batch's streams stay in memory however many windows are calibrated on
    assert {quantize_plan(folder, configs=3, gptq=True, **{**kw, "calibration": n}).live for n in (4, 64)} == {q.live}
    plan = drop_plan(folder, plans=1, ablation=None, **{**kw, "calibration": 2})
    budget = (plan.streamed + plan.resident) // 2
    argv = ["--model", str(folder), "--seq-len", "16", "--samples", "2", "--eval-samples", "3", "--batch-size", "2"]
    argv += ["--max-memory", str(budget), "--json"]
    capsys.readouterr()
    assert cli.main(["drop", *argv, "--units", "L1", "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert "runs reading one block at a time from disk" in err and "no speed is measured" in err
    meta = json.loads((tmp_path / "d" / "eval.json").read_text())["meta"]
    assert meta["offload"] == "disk" and meta["memory_plan"]["streamed"] == plan.streamed
    # one group size's 6 candidates and one plan, whose weights are the only ones held beside the candidates'
    qplan = quantize_plan(folder, configs=6, gptq=False, chunk=1, **{**kw, "calibration": 2})
    qargv = [*argv[:-3], "--max-memory", str((qplan.streamed + qplan.resident) // 2), "--format", "int"]
    qargv += ["--bits", "5", "--group-size", "32", "--strategy", "uniform", "--export", "none", "--json"]
    assert cli.main(["quantize", *qargv, "--out", str(tmp_path / "q")]) == 0
    assert "runs reading one block at a time from disk" in capsys.readouterr().err
    meta = json.loads((tmp_path / "q" / "eval.json").read_text())["meta"]
    assert meta["offload"] == "disk" and meta["memory_plan"]["streamed"] == qplan.streamed
    assert meta["memory_plan"]["resident"] == qplan.resident
    rc = cli.main(["drop", *argv[:-3], "--max-memory", "1MiB", "--units", "L1", "--out", str(tmp_path / "never")])
    assert rc == 2 and "drop needs about" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


_WIDE_RUN = """
import json, torch
import layerwise as lw
from layerwise import drop
from layerwise.memory import _peak_rss, rss_bytes
from layerwise.memory_plan import RUNTIME, SLACK, drop_plan, profile_plan
kw = dict(dtype=torch.float32, seq_len=32, batch_size=2)
plans = {{"profile": profile_plan({folder!r}, windows=2, ablation="taylor", ablation_windows=0, **kw),
          "evaluate": drop_plan({folder!r}, calibration=2, evaluation=2, plans=1, ablation=None, **kw)}}
lm = lw.load({folder!r}, offload="disk")
w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=32, samples=2)
work = {{"profile": lambda: lw.profile(lm, w, batch_size=2, ablation="taylor", progress=False),
         "evaluate": lambda: drop.measure(lm, {{"L3": drop.given(lm.anatomy, ["L3"])}}, w.evaluation[:2],
                                          batch_size=2, with_speed=False)}}
found = {{"weights": plans["profile"].weights}}
for name, run in work.items():
    run()  # torch's one-time state: the runtime's
    with open("/proc/self/clear_refs", "w") as fh:  # the peak resident set starts again from here
        fh.write("5")
    base = rss_bytes()
    run()
    found[name] = {{"used": _peak_rss()[0] - base, "budget": plans[name].streamed - int(SLACK * RUNTIME)}}
print(json.dumps(found))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak resident set is reset on Linux only")
def test_a_wide_model_ten_times_its_budget_runs_from_disk_within_the_plan(tmp_path):
    """A 56-block model of width 512 (900 MiB of float32 weights), profiled and evaluated as drop evaluates (the
    next block read ahead) from disk in a fresh process: what each run adds to the resident set once the
    interpreter, torch and the tokenizer are loaded (and torch has run it once, making its one-time state) stays
    under what its plan counts for it (the plan's peak from disk without :data:`RUNTIME`: two blocks, the one
    running and the next), which is under a tenth of the weights."""
    import subprocess
    import sys

    import transformers as tf

    from . import conftest

    cfg = tf.LlamaConfig(
        vocab_size=97, hidden_size=512, intermediate_size=2048, num_hidden_layers=56, num_attention_heads=4
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "tiny_model", lambda arch, layers: tf.LlamaForCausalLM(cfg).eval())
        folder = str(tiny_folder(tmp_path / "wide"))
    run = subprocess.run([sys.executable, "-c", _WIDE_RUN.format(folder=folder)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.splitlines()[-1])
    for name in ("profile", "evaluate"):
        assert found["weights"] >= 10 * found[name]["budget"], name
        assert 0 < found[name]["used"] <= found[name]["budget"], found


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen2_moe"])
def test_streamed_features_and_probe_equal_the_resident_ones(arch, tmp_path):
    """Readouts of examples of different lengths (right-padded in batches) at every block and sublayer, the last
    token's and the mean, and the probe fitted on them, from disk as in memory; blocks after the last unit read are
    never read from disk."""
    from layerwise.features import collect_ids
    from layerwise.probe import Examples, probe

    lm = tiny_lm(arch, layers=3)
    disk = _streamed(lm, tmp_path / arch)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in [3, 9, 5, 12, 4, 7, 6, 8]]
    for read, units in [("last", "all"), ("mean", "all")] + [("mean", "experts")] * (arch in MOE_ARCHS):
        kw = dict(units=units, read=read, skip_first=True, batch_size=3)
        a, b = collect_ids(lm, ids, **kw), collect_ids(disk, ids, **kw)
        for u in a.units:
            assert torch.allclose(a.values[u], b.values[u], rtol=1e-5, atol=1e-6), (read, u)
    ex = Examples(labels=[0, 1] * 4, ids=ids)
    ra, rb = (probe(m, ex, folds=2, batch_size=3, profile_samples=0) for m in (lm, disk))
    assert [r["unit"] for r in ra.units] == [r["unit"] for r in rb.units]
    for x, y in zip(ra.units, rb.units):
        for key in ("accuracy", "auc", "control", "selectivity"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-6), (x["unit"], key)
    read: list[str] = []
    real = Checkpoint.tensor

    def spy(self, name):
        read.append(name)
        return real(self, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoint, "tensor", spy)
        collect_ids(disk, ids, units=["L0"], batch_size=3)
    assert read and not any(".layers.1." in n or ".h.1." in n for n in read)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gpt_oss"])
def test_streamed_steering_measures_as_the_resident_one(arch, tmp_path):
    """From disk, steer's three measurements give the in-memory model's: log-prob margins (no cache: each head
    runs with each tail), greedy continuations (every prompt a step at a time, a KV cache filled block by block;
    a row that reaches an end-of-text token is padded after it, as generate pads it), steered too; and a whole
    run's choice, effects and cost."""
    from layerwise.steer import generate, margins, run
    from layerwise.steer.vector import SteeringVector

    folder = tiny_folder(tmp_path / arch, arch, layers=3)
    lm, disk = load(str(folder)), load(str(folder), offload="disk")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 6, 4)]
    conts = [([5, 6, 7, 8], [5, 6, 9]), ([11], [12, 13]), ([20, 21], [22, 21])]
    d = torch.randn(32, generator=g)
    shape = {"model_hash": lm.source["model_hash"], "n_layers": 3, "hidden_size": 32}
    vec = SteeringVector({"L1": d / d.norm()}, {"L1": 3.0}, alpha=1.0, model=shape)
    first = generate(lm, prompts, 1)[0]
    for m in (lm, disk):  # the first prompt's first new token ends its row
        m.model.generation_config.eos_token_id = lm.tokenizer.convert_tokens_to_ids(first)
    for steer in (False, True):
        with vec.apply(lm) if steer else torch.no_grad(), vec.apply(disk) if steer else torch.no_grad():
            got, want = margins(disk, prompts, conts, batch_size=2), margins(lm, prompts, conts)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            texts = generate(lm, prompts, 6)
            assert generate(disk, prompts, 6) == texts
            assert steer or texts[0] == first, texts  # padded after its end
    pairs = [(f"it was good {i}", f"it was bad {i}") for i in range(6)]
    kw = dict(report_prompts=["fresh one", "fresh two"], layers="L0,L1,L2", new_tokens=2, batch_size=2)
    ids = tiny_windows(3, 12).ids
    a, b = (run(m, pairs, [f"prompt {c}" for c in "abcdef"], ids, **kw) for m in (lm, disk))
    assert a.choice["chosen"] == b.choice["chosen"] and a.choice["alpha"]["alpha"] == b.choice["alpha"]["alpha"]
    for x, y in zip(a.rows, b.rows, strict=True):
        assert x["key"] == y["key"]
        for key in ("margin_shift", "proj_shift", "delta_nll", "kl", "same_top_p"):
            assert math.isclose(x[key], y[key], rel_tol=1e-4, abs_tol=1e-5), (x["key"], key, x[key], y[key])
    assert b.meta["offload"] == "disk"


def test_probe_and_steer_plan_their_memory_and_run_from_disk_when_it_does_not_fit(tmp_path, capsys):
    """probe and steer print their plan first and, with a budget between the planned peak from disk and the one in
    memory, read the weights block by block; the result records the plan. The plans count every batch's hidden
    states at its padded width and the readouts kept."""

    from transformers import AutoTokenizer

    from layerwise.memory_plan import Shape, probe_plan, steer_plan

    folder = tiny_folder(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    texts = [f"example {'x' * (i % 5)} {i}" for i in range(12)]
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
    lengths = [len(x) for x in AutoTokenizer.from_pretrained(folder)(texts)["input_ids"]]
    kw = dict(dtype=torch.float32, lengths=lengths, batch_size=4)
    plan = probe_plan(folder, units="all", profile_windows=0, profile_seq_len=16, **kw)
    widths = sorted(lengths)
    padded = sum(len(widths[i : i + 4]) * max(widths[i : i + 4]) for i in range(0, 12, 4))
    hidden = Shape.of(folder, dtype=torch.float32, seq_len=16).hidden
    assert plan.states == padded * hidden * 4 and plan.kept == 12 * 3 * 4 * hidden * 4
    argv = ["--model", str(folder), "--max-memory", str((plan.streamed + plan.resident) // 2), "--json"]
    probe_argv = ["--data", str(data), "--folds", "2", "--units", "all", "--batch-size", "4", "--profile-samples", "0"]
    assert cli.main(["probe", *argv, *probe_argv, "--out", str(tmp_path / "p")]) == 0
    assert "runs reading one block at a time from disk" in capsys.readouterr().err
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())["meta"]
    assert meta["offload"] == "disk" and meta["memory_plan"]["streamed"] == plan.streamed

    from layerwise.steer import read_pairs

    pairs = read_pairs(data="builtin:sentiment", n=8, seed=0)
    lengths = [len(x) for x in AutoTokenizer.from_pretrained(folder)([t for p in pairs for t in p])["input_ids"]]
    splan = steer_plan(
        folder,
        dtype=torch.float32,
        lengths=lengths,
        batch_size=2,
        eval_windows=2,
        seq_len=16,
        layers="L1,L2",
        sweep_layers=None,
        sweep=0,
    )
    assert splan.states >= 4 * 2 * 16 * hidden * 4 and splan.kept == 16 * 4 * hidden * 4  # 2 layers, the chosen
    argv = ["--model", str(folder), "--max-memory", str((splan.streamed + splan.resident) // 2), "--json"]
    steer_argv = [
        "--data",
        "builtin:sentiment",
        "--n-pairs",
        "8",
        "--layers",
        "L1,L2",
        "--batch-size",
        "2",
        "--eval-samples",
        "2",
        "--seq-len",
        "16",
    ]
    steer_argv += ["--samples", "4", "--new-tokens", "2", "--alpha", "0.5"]
    assert cli.main(["steer", *argv, *steer_argv, "--out", str(tmp_path / "s")]) == 0
    assert "runs reading one block at a time from disk" in capsys.readouterr().err
    meta = json.loads((tmp_path / "s" / "steer.json").read_text())["meta"]
    assert meta["offload"] == "disk" and meta["memory_plan"]["streamed"] == splan.streamed


def test_a_checkpoint_is_hashed_once_for_the_plan_and_the_load(tmp_path):
    """The memory plan and the load both name the checkpoint; its files are read for their hash once while they
    are unchanged, and again when one changes."""
    import os

    from layerwise import io
    from layerwise.loading import checkpoint_folder

    folder = tiny_folder(tmp_path / "m")
    io._sha256.cache_clear()
    first = checkpoint_folder(str(folder))[1]["model_hash"]
    misses = io._sha256.cache_info().misses
    assert checkpoint_folder(str(folder))[1]["model_hash"] == first and io._sha256.cache_info().misses == misses
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight, the size unchanged
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert checkpoint_folder(str(folder))[1]["model_hash"] != first


class _Spies:
    """How many tensors a test's passes spilled, and the files they spilled to."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from layerwise import engine

        self.spilled, self.files = 0, set()
        keep = engine.States.keep

        def spy(store, x, **kw):
            kept = keep(store, x, **kw)
            if isinstance(kept, engine.Spilled):
                self.spilled += 1
                self.files.add(store.path)
            return kept

        mp.setattr(engine.States, "keep", spy)


def test_spilled_hidden_states_give_the_same_numbers_and_leave_no_file(tmp_path, monkeypatch):
    """With ``spill``, every hidden state a pass carries (profile: block inputs, the last outputs, the ablated
    streams, the backward pass's gradients; the quantization measurement; held-out evaluation; the features probe
    and steer read) goes to a file in the folder and is read back when used: the profile, the measurement, a drop
    evaluation and the features are those of the run that keeps them in memory, exactly. Each pass removes its
    file, and the folder it made for it, also when Ctrl-C stops it."""
    from layerwise import drop
    from layerwise.features import collect_ids
    from layerwise.quant.measure import measure
    from layerwise.quant.rtn import QConfig

    lm, w = tiny_lm("llama", layers=3), tiny_windows(8)
    w.n_calib = 5
    lm.model.save_pretrained(tmp_path / "m")
    memory = load(str(tmp_path / "m"), offload="disk")
    spilled = load(str(tmp_path / "m"), offload="disk", spill=tmp_path / "out" / "spill")
    assert spilled.meta()["spill"] == str(tmp_path / "out" / "spill")
    spies = _Spies(monkeypatch)
    kw = dict(batch_size=2, positions=5, ablation_samples=2, progress=False)
    a, b = (profile(m, w, **kw) for m in (memory, spilled))
    _same_metrics(a, b)
    assert a.to_dict()["units"] == b.to_dict()["units"]
    n = spies.spilled
    assert n >= 3 * (3 + 1) + 3 * 2  # each block's input and the last output, the ablated streams, the gradients
    mkw = dict(candidates=(QConfig(2, 16), QConfig(4, 16)), method="gptq", batch_size=2, progress=False)
    assert measure(memory, w, **mkw).groups == measure(spilled, w, **mkw).groups
    plans = [drop.given(lm.anatomy, u) for u in (["L1"], ["L0.attn", "L2.mlp"])]
    dkw = dict(plans=plans, eval_samples=3, batch_size=2, progress=False)
    da, db = (drop.run(m, w, **dkw) for m in (memory, spilled))
    assert _drop_figures(da) == _drop_figures(db)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in [3, 9, 5, 12, 4]]
    fa, fb = (collect_ids(m, ids, units="all", read="mean", batch_size=2) for m in (memory, spilled))
    assert all(torch.equal(fa.values[u], fb.values[u]) for u in fa.units)
    assert spies.spilled > n and len(spies.files) == 4
    assert not any(f.exists() for f in spies.files) and not (tmp_path / "out" / "spill").exists()
    assert (tmp_path / "out").is_dir()  # made by the test's spill folder's parent: kept
    from layerwise import reducers

    def interrupted(_an, layers: list[int]) -> dict:
        if layers == [2]:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(reducers, "zd_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile(spilled, w, **kw)  # Ctrl-C at the third block, the states of two written
    assert len(spies.files) == 5 and not any(f.exists() for f in spies.files)
    assert not (tmp_path / "out" / "spill").exists()
    with pytest.raises(
        LayerwiseError,
        match=r"^`spill` keeps the hidden states of a model run block by block; give `offload` disk or cpu",
    ):
        load(str(tmp_path / "m"), spill=tmp_path)


def _limit_file_size(limit: int):
    """A child's ``preexec_fn``: no file it writes grows past ``limit`` bytes (a write beyond fails with EFBIG, as
    on a full disk; the signal that would kill it is ignored)."""
    import resource
    import signal

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_budget_under_the_kept_states_spills_them_to_the_output_folder(tmp_path, capsys):
    """A ``--max-memory`` budget under the planned peak from disk and over the planned peak spilling the hidden
    states runs the profile with its states in a file in ``--out``: the same profile as keeping them in memory, the
    plan's choice recorded, no file left but the results. A disk that fills while spilling is one line, and the run
    leaves no folder; a disk too small for the plan's states is refused before anything runs."""
    import subprocess
    import sys

    from layerwise.memory_plan import profile_plan
    from layerwise.profile import Profile

    folder = tiny_folder(tmp_path / "m")
    plan = profile_plan(
        folder, dtype=torch.float32, windows=8, seq_len=16, batch_size=2, ablation="exact", ablation_windows=8
    )
    assert plan.live and plan.spilled < plan.streamed
    budget = (plan.spilled + plan.streamed) // 2
    argv = ["profile", "--model", str(folder), "--seq-len", "16", "--samples", "8", "--batch-size", "2", "--json"]
    argv += ["--ablation-samples", "8"]
    for out, memory in (("kept", str(plan.streamed)), ("spilled", str(budget))):
        assert cli.main([*argv, "--max-memory", memory, "--offload", "disk", "--out", str(tmp_path / out)]) == 0
    assert "its hidden states spilled to a file in the output folder" in capsys.readouterr().err
    kept, spilled = (Profile.load(tmp_path / out / "profile.json") for out in ("kept", "spilled"))
    _same_metrics(kept, spilled)
    assert spilled.meta["memory_plan"]["offload"] == "spill" and kept.meta["memory_plan"]["offload"] == "disk"
    assert spilled.meta["spill"] == str(tmp_path / "spilled") and "spill" not in kept.meta
    assert sorted(p.name for p in (tmp_path / "spilled").iterdir()) == sorted(
        p.name for p in (tmp_path / "kept").iterdir()
    )
    main = "import sys; from layerwise.cli import main; sys.exit(main())"
    full = [sys.executable, "-c", main, *argv, "--max-memory", str(budget), "--out", str(tmp_path / "full")]
    run = subprocess.run(full, capture_output=True, text=True, preexec_fn=_limit_file_size(32 * 1024))
    lines = [line for line in run.stderr.splitlines() if line.startswith("layerwise: error")]
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-2000:]
    assert "is full: spilling hidden states there stopped after 0 MiB; free space on it" in lines[0]
    assert "Traceback" not in run.stderr and not (tmp_path / "full").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("shutil.disk_usage", lambda _: type("U", (), {"free": plan.states - 1})())
        assert cli.main([*argv, "--max-memory", str(budget), "--out", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert "the profile spills about" in err and "give --out on a larger disk, or lower --batch-size" in err, err
    assert not (tmp_path / "small").exists()
    assert json.loads((tmp_path / "spilled" / "profile.json").read_text())["meta"]["offload"] == "disk"


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_gguf_file_is_read_from_disk_without_converting_its_weights(arch, tmp_path, monkeypatch):
    """``offload="disk"`` on a GGUF file writes only its config and tokenizer to the cache and dequantizes each
    tensor from the file as its block is read, with transformers' fixes (Gemma's norm offset): every tensor equals
    the conversion's, and the profile equals the in-memory one. Once the whole conversion exists, it is read
    instead."""
    from safetensors.torch import load_file

    from layerwise import loading
    from layerwise.engine import Checkpoint, GGUFCheckpoint

    from .conftest import tiny_model, write_gguf

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    tokens = (
        ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"\u2581w{i}" for i in range(68)]
    )
    path = write_gguf(tiny_model(arch, layers=3), tmp_path / "tiny.gguf", tokens)
    disk = load(str(path), offload="disk")
    (header,) = (loading.cache_root() / "models").iterdir()
    assert header.name.endswith("-header") and not list(header.glob("*.safetensors"))
    assert isinstance(disk.streamed.checkpoint, GGUFCheckpoint)
    resident = load(str(path))  # converted now, its config and tokenizer copied from the header folder
    folder = Path(loading.checkpoint_folder(str(path))[0])
    assert (folder / "tokenizer.json").read_bytes() == (header / "tokenizer.json").read_bytes()
    assert resident.tokenizer("a w3 b").input_ids == disk.tokenizer("a w3 b").input_ids
    converted = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    ckpt = disk.streamed.checkpoint
    assert converted.keys() == ckpt.sources.keys()
    assert all(torch.equal(ckpt.tensor(k), v) for k, v in converted.items())
    for k in (k for k, v in converted.items() if v.shape[0] == 97):  # the embedding (and the head), in slices
        assert torch.equal(torch.cat([ckpt.rows(k, a, min(a + 13, 97)) for a in range(0, 97, 13)]), converted[k])
    w = tiny_windows(4)
    w.n_calib = 4
    kw = dict(batch_size=2, positions=5, progress=False)
    _same_metrics(profile(resident, w, **kw), profile(disk, w, **kw))
    assert isinstance(load(str(path), offload="disk").streamed.checkpoint, Checkpoint)  # the conversion, now there


@pytest.mark.real
def test_the_default_gguf_file_is_read_from_disk_as_it_is_converted(tmp_path, real_cache, monkeypatch):
    """The default model read from disk with no conversion in the cache reads the GGUF file itself: every tensor is
    the conversion's, and the profile is the in-memory one's; so is the profile with the weights read once into
    memory (``offload="cpu"``) and run one block at a time, and the one with the embedding and the head read in
    slices."""
    from safetensors.torch import load_file

    from layerwise import windows
    from layerwise.engine import GGUFCheckpoint
    from layerwise.loading import checkpoint_folder

    folder = Path(checkpoint_folder("default")[0])
    converted = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    lm = load("default")
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    disk = load("default", offload="disk")
    ckpt = disk.streamed.checkpoint
    assert isinstance(ckpt, GGUFCheckpoint) and not list(tmp_path.rglob("*.safetensors"))
    assert converted.keys() == ckpt.sources.keys()
    assert all(torch.equal(ckpt.tensor(k), v) for k, v in converted.items())
    embedding = "model.embed_tokens.weight"
    assert torch.equal(ckpt.rows(embedding, 6000, 9000), converted[embedding][6000:9000])
    w = windows("builtin:pydoc", lm.tokenizer, seq_len=32, samples=2, max_len=lm.anatomy.context_length)
    # without the lens, whose readouts would each dequantize the head again when it is read in slices (the lens
    # from disk is checked on the default model by test_default_model_profiles_the_same_from_disk)
    kw = dict(batch_size=2, ablation="taylor", lens=False, progress=False)
    resident = profile(lm, w, **kw)
    _same_metrics(resident, profile(disk, w, **kw))
    _same_metrics(resident, profile(load("default", offload="cpu"), w, **kw))  # read once, held in memory
    # the embedding and the head read in two slices, as a large vocabulary's are. The gradient through the head,
    # summed over the slices in another order, differs by float32 rounding (3e-7 of its largest entry, measured);
    # the Taylor estimate, a signed sum over tokens, then moves by up to 5e-7 nats (1e-4 of L1.attn's small value)
    disk.streamed.rows = 24576
    _same_metrics(resident, profile(disk, w, **kw), rel=1e-5, abs_=1e-6)


def test_weights_held_in_memory_run_one_block_at_a_time_as_from_disk(tmp_path, monkeypatch):
    """``offload="cpu"`` reads every weight once, then runs the blocks one at a time as from disk without reading
    the checkpoint again: the profile, a quantization measurement and a drop evaluation are the resident model's."""
    from layerwise import drop, engine
    from layerwise.quant.measure import measure
    from layerwise.quant.rtn import QConfig

    lm, w = tiny_lm("llama", layers=3), tiny_windows(8)
    w.n_calib = 5
    lm.model.save_pretrained(tmp_path / "m")
    held = load(str(tmp_path / "m"), offload="cpu")
    assert held.streamed.offload == "cpu" and held.meta()["offload"] == "cpu"
    assert all(p.device.type == "meta" for p in held.model.parameters())
    monkeypatch.setattr(engine.Checkpoint, "tensor", lambda *_: pytest.fail("the checkpoint was read again"))
    kw = dict(batch_size=2, positions=5, ablation_samples=2, progress=False)
    _same_metrics(profile(lm, w, **kw), profile(held, w, **kw))
    mkw = dict(candidates=(QConfig(2, 16), QConfig(4, 16)), method="gptq", batch_size=2, progress=False)
    a, b = measure(lm, w, **mkw), measure(held, w, **mkw)
    for g, ea in a.groups.items():
        for c, va in ea["configs"].items():
            assert va["rel"] == pytest.approx(b.groups[g]["configs"][c]["rel"], rel=1e-5)
    plans = [drop.given(lm.anatomy, u) for u in (["L1"], ["L0.attn", "L2.mlp"])]
    dkw = dict(plans=plans, eval_samples=3, batch_size=2, progress=False)
    for x, y in zip(_drop_figures(drop.run(lm, w, with_speed=False, **dkw)), _drop_figures(drop.run(held, w, **dkw))):
        assert x.pop("key") == y.pop("key") and x == pytest.approx(y, rel=1e-5, abs=1e-9)
    with pytest.raises(LayerwiseError, match="loaded with `offload` cpu .* load it with `offload` none$"):
        held.check_resident("tune")


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen3"])
def test_the_embedding_and_head_read_in_slices_give_the_resident_numbers(arch, tmp_path, monkeypatch):
    """With the embedding and the head read ``rows`` at a time (a large vocabulary's way), neither matrix is ever
    read whole, and the profile (logit lens, exact ablation, the Taylor estimate's gradient through the head),
    held-out quality and steer's margins and greedy continuations are the resident model's."""
    from layerwise import drop, engine
    from layerwise.steer import generate, margins

    folder = tiny_folder(tmp_path / arch, arch, layers=3)
    lm, disk = load(str(folder)), load(str(folder), offload="disk")
    assert disk.streamed.rows is None  # a 97-token vocabulary is read whole by default
    disk.streamed.rows = 13
    whole = [n for n, p in lm.model.named_parameters() if p.shape[0] == 97]
    real = engine.Checkpoint.tensor

    def never_whole(self, name):
        assert name not in whole, name
        return real(self, name)

    monkeypatch.setattr(engine.Checkpoint, "tensor", never_whole)
    w = tiny_windows(8)
    w.n_calib = 5
    kw = dict(batch_size=2, positions=5, ablation_samples=2, progress=False)
    # the head's slices sum the Taylor estimate's gradient in another order: float32 rounding
    _same_metrics(profile(lm, w, **kw), profile(disk, w, **kw), rel=1e-5, abs_=1e-6)
    plans = [drop.given(lm.anatomy, u) for u in (["L1"], ["L0.attn", "L2.mlp"])]
    dkw = dict(plans=plans, eval_samples=3, batch_size=2, progress=False)
    # KL is a mean of differences of float32 log-probabilities (about log 97 each): rounding near 1e-7 nats
    for x, y in zip(_drop_figures(drop.run(lm, w, with_speed=False, **dkw)), _drop_figures(drop.run(disk, w, **dkw))):
        assert x.pop("key") == y.pop("key") and x == pytest.approx(y, rel=1e-5, abs=1e-7)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 6, 4)]
    conts = [([5, 6, 7, 8], [5, 6, 9]), ([11], [12, 13]), ([20, 21], [22, 21])]
    got, want = margins(disk, prompts, conts, batch_size=2), margins(lm, prompts, conts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert generate(disk, prompts, 4) == generate(lm, prompts, 4)
    assert all(p.device.type == "meta" for p in disk.model.parameters())
    assert disk.anatomy.embed.padding_idx == lm.anatomy.embed.padding_idx


def test_a_vocabulary_larger_than_a_block_is_read_in_slices_and_planned_so(tmp_path, monkeypatch):
    """The embedding and the head are read in slices when they are larger than both the largest block and
    ``SLICE_BYTES``; each slice is then a block's size, and the plan counts one slice for them."""
    import transformers as tf

    from layerwise import engine
    from layerwise.memory_plan import Shape

    from . import conftest

    cfg = tf.LlamaConfig(
        vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    monkeypatch.setattr(conftest, "tiny_model", lambda arch, layers: tf.LlamaForCausalLM(cfg).eval())
    folder = tiny_folder(tmp_path / "m")
    block = 4 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32)  # float32 bytes of the largest block
    assert engine.slice_rows(load(str(folder)).model, torch.float32) is None  # 512 KiB < SLICE_BYTES
    monkeypatch.setattr(engine, "SLICE_BYTES", 1)
    disk = load(str(folder), offload="disk")
    assert disk.streamed.rows == block // (32 * 4)
    shape = Shape.of(folder, dtype=torch.float32, seq_len=16)
    stored = shape.files / sum(p.numel() for p in load(str(folder)).model.parameters())
    assert shape.stem == int(disk.streamed.rows * 32 * (4 + stored))


def _prefetching(tmp_path) -> tuple[LoadedModel, LoadedModel]:
    """A tiny 4-block model on disk, loaded with the next block read ahead and without."""
    folder = str(tiny_folder(tmp_path / "m", layers=4))
    on, off = load(folder, offload="disk"), load(folder, offload="disk", prefetch=False)
    assert on.streamed.prefetch and not off.streamed.prefetch
    return on, off


def test_prefetch_on_and_off_give_the_same_numbers_bit_for_bit(tmp_path):
    """Reading the next block ahead changes when a block is read, never what runs: the last hidden states, a drop
    evaluation and the features are bit for bit those read block by block; afterwards no weight is left."""
    from layerwise import drop
    from layerwise.features import collect_ids

    on, off = _prefetching(tmp_path)
    w = tiny_windows(6)
    w.n_calib = 2
    batches = [{"input_ids": w.ids[:3]}, {"input_ids": w.ids[3:]}]
    for a, b in zip(on.streamed.last_hidden(batches), off.streamed.last_hidden(batches), strict=True):
        assert torch.equal(a, b)
    plans = [drop.given(on.anatomy, u) for u in (["L1"], ["L0.attn", "L2.mlp"])]
    kw = dict(plans=plans, eval_samples=4, batch_size=2, progress=False)
    assert _drop_figures(drop.run(on, w, **kw)) == _drop_figures(drop.run(off, w, **kw))
    ids = [w.ids[k, :n].tolist() for k, n in enumerate((3, 9, 5, 12))]
    fa, fb = (collect_ids(m, ids, units="all", read="mean", batch_size=2) for m in (on, off))
    assert all(torch.equal(fa.values[u], fb.values[u]) for u in fa.units)
    assert all(p.device.type == "meta" for m in (on, off) for p in m.model.parameters())


class _Reads:
    """Every tensor the checkpoint gives, in order, with the thread that read it and each loop body's start
    between them; with ``hold``, a read of block ``j`` waits until block ``j - 1``'s body has started (so a read
    made before that body, not during it, times out)."""

    def __init__(self, mp: pytest.MonkeyPatch, s, *, hold: bool) -> None:
        import threading

        from layerwise import engine

        self.events: list[tuple] = []
        self.started = [threading.Event() for _ in s.anatomy.blocks]
        self.done = threading.Condition()
        self.block = {s.keys[n]: i for i, b in enumerate(s.anatomy.blocks) for n in s.names(b)}
        real = engine.Checkpoint.tensor

        def spy(ckpt, key: str):
            j = self.block.get(key, 0)
            if hold and j > 0:
                assert self.started[j - 1].wait(30), f"block {j} read before block {j - 1} ran"
            value = real(ckpt, key)
            with self.done:
                self.events.append(("read", threading.current_thread().name, key))
                self.done.notify_all()
            return value

        mp.setattr(engine.Checkpoint, "tensor", spy)

    def body(self, i: int) -> None:
        self.events.append(("body", i))
        self.started[i].set()

    def read(self, i: int) -> set[str]:
        """The keys of block ``i`` read so far."""
        return {e[2] for e in self.events if e[0] == "read" and self.block.get(e[2]) == i}


def test_the_next_block_is_read_in_a_background_thread_while_a_block_runs(tmp_path, monkeypatch):
    """With prefetch, block ``i + 1``'s tensors are read by the prefetch thread, every one of them while block
    ``i``'s body runs: its reads wait for that body to start, and the body waits for them to end (a read made before
    or after the body would time out); block ``i``'s weights are placed when its body runs. Without it, every read
    is the main thread's, block ``i + 1``'s after block ``i``'s body."""
    on, off = _prefetching(tmp_path)
    s = on.streamed
    n = s.anatomy.n_layers
    spy = _Reads(monkeypatch, s, hold=True)
    for i in s.blocks():
        assert all(p.device.type == "cpu" for p in s.anatomy.blocks[i].parameters())
        spy.body(i)
        want = {s.keys[name] for name in s.names(s.anatomy.blocks[i + 1])} if i + 1 < n else set()
        with spy.done:
            assert spy.done.wait_for(lambda: spy.read(i + 1) == want, timeout=30), i
    reads = [e for e in spy.events if e[0] == "read"]
    assert len(reads) == len(spy.block) and all(e[1].startswith("layerwise-prefetch") for e in reads)
    assert [e[1] for e in spy.events if e[0] == "body"] == list(range(n))

    s = off.streamed
    spy = _Reads(monkeypatch, s, hold=False)
    for i in s.blocks():
        spy.body(i)
    assert all(e[1] == "MainThread" for e in spy.events if e[0] == "read")
    order = [e[1] if e[0] == "body" else ("read", spy.block[e[2]]) for e in spy.events]
    assert order == [x for i in range(n) for x in [*[("read", i)] * len(s.names(s.anatomy.blocks[i])), i]]


def test_leaving_the_loop_early_stops_the_prefetch_and_puts_the_skeleton_back(tmp_path, monkeypatch):
    """Breaking out, raising, Ctrl-C, or a read that fails in the prefetch thread: the loop ends with no prefetch
    thread left, every parameter back on the meta device, and no tensor read (the block read ahead included) still
    held."""
    import threading
    import weakref

    from layerwise import engine

    on, _ = _prefetching(tmp_path)
    s = on.streamed
    real = engine.Checkpoint.tensor
    refs: list[weakref.ref] = []
    bad: set[str] = set()

    def spy(ckpt, key: str) -> torch.Tensor:
        if key in bad:
            raise OSError(f"cannot read {key}")
        value = real(ckpt, key)
        refs.append(weakref.ref(value))
        return value

    monkeypatch.setattr(engine.Checkpoint, "tensor", spy)
    before = set(threading.enumerate())

    def prefetching() -> bool:
        return any(t.name.startswith("layerwise-prefetch") for t in threading.enumerate())

    def left_cleanly() -> bool:
        meta = all(p.device.type == "meta" for p in on.model.parameters())
        return set(threading.enumerate()) == before and meta and all(r() is None for r in refs)

    for i in s.blocks():
        assert prefetching()
        if i == 1:
            break
    assert left_cleanly() and refs
    for error in (RuntimeError, KeyboardInterrupt):
        refs.clear()
        with pytest.raises(error):
            for i in s.blocks():
                if i == 2:
                    raise error
        assert left_cleanly() and refs
    bad.update(s.keys[n] for n in s.names(s.anatomy.blocks[2]))
    seen = []
    with pytest.raises(OSError, match="cannot read"):
        for i in s.blocks():
            seen.append(i)
    assert seen == [0, 1] and left_cleanly()


@pytest.mark.parametrize("prefetch", [True, False])
def test_blocks_run_in_any_order_each_with_its_own_weights(prefetch, tmp_path):
    """A backward pass's order (``reversed(range(stop, L))``), a subset, or none: each block yielded holds its own
    weights, the resident model's, while every other block is left on the meta device."""
    folder = str(tiny_folder(tmp_path / "m", layers=4))
    resident, disk = load(folder), load(folder, offload="disk", prefetch=prefetch)
    s = disk.streamed
    for order in (reversed(range(1, 4)), [2, 0], range(0)):
        want = list(order)
        seen = []
        for i in s.blocks(want):
            seen.append(i)
            for j, block in enumerate(s.anatomy.blocks):
                placed = [p.device.type != "meta" for p in block.parameters()]
                assert all(placed) if j == i else not any(placed)
            mine = dict(s.anatomy.blocks[i].named_parameters())
            theirs = dict(resident.anatomy.blocks[i].named_parameters())
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert seen == want
    assert seen == [] and all(p.device.type == "meta" for p in disk.model.parameters())


def _mxfp4(folder: Path) -> dict:
    """A tiny gpt-oss folder whose experts are stored as gpt-oss's published files store them: MXFP4 blocks (two
    4-bit codes a byte) and a power-of-two scale a block of 32, here random; returns its quantization config."""
    from safetensors.torch import load_file, save_file

    tiny_folder(folder, "gpt_oss", layers=2)
    weights, g = load_file(folder / "model.safetensors"), torch.Generator().manual_seed(0)
    for key in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, n_in, n_out = weights.pop(key).shape
        weights[f"{key}_blocks"] = torch.randint(0, 256, (experts, n_out, n_in // 32, 16), generator=g).byte()
        weights[f"{key}_scales"] = torch.randint(122, 129, (experts, n_out, n_in // 32), generator=g).byte()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    kept = ["model.layers.*.self_attn", "model.layers.*.mlp.router"]
    return {"quant_method": "mxfp4", "modules_to_not_convert": kept}


def _fp8(folder: Path, block: int = 16) -> dict:
    """A tiny Qwen3-MoE folder with every projection (each expert's apart) in float8 with a scale a 16x16 block, as
    DeepSeek-V3's and Qwen3's FP8 files store them; returns its quantization config."""
    from safetensors.torch import load_file, save_file

    tiny_folder(folder, "qwen3_moe", layers=2)
    weights = load_file(folder / "model.safetensors")
    for key in [k for k in weights if k.endswith("proj.weight")]:
        w = weights[key]
        blocks = w.reshape(w.shape[0] // block, block, w.shape[1] // block, block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448
        weights[key] = (blocks / scale[:, None, :, None]).reshape(w.shape).to(torch.float8_e4m3fn)
        weights[f"{key}_scale_inv"] = scale
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return {"quant_method": "fp8", "weight_block_size": [block, block], "activation_scheme": "dynamic"}


def _int4(folder: Path) -> dict:
    """A tiny Qwen3-MoE model quantized by layerwise to 4-bit integers (experts too), exported as compressed-tensors;
    returns its quantization config."""
    from layerwise import quantize as qz

    w = tiny_windows(4)
    w.n_calib = 2
    kw = dict(bits=4, strategy=["uniform"], format="int", method="rtn", symmetric=True, group_size=16)
    qz.run(tiny_lm("qwen3_moe", layers=2), w, export=("hf",), out=folder, eval_samples=2, progress=False, **kw)
    return json.loads((folder / "model" / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8", "compressed-tensors"])
def test_a_quantized_checkpoint_read_from_disk_is_what_transformers_dequantizes(fmt, tmp_path):
    """gpt-oss's MXFP4, FP8 with block scales and compressed-tensors (layerwise's own export) are read from disk
    one tensor at a time, dequantized by transformers' own operations: every weight equals what
    ``from_pretrained`` loads when told to dequantize, the profile is the resident model's, and the skeleton's
    config no longer says its weights are quantized."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoQuantizationConfig

    from layerwise.anatomy import Anatomy

    folder = tmp_path / "m"
    if fmt == "compressed-tensors":
        _int4(tmp_path / "q")
        folder = tmp_path / "q" / "model"
    else:
        qc = (_mxfp4 if fmt == "mxfp4" else _fp8)(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    dequantized = AutoQuantizationConfig.from_dict(qc | {"dequantize": True})
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=dequantized)
    disk = load(str(folder), offload="disk")
    s = disk.streamed
    assert s is not None and not hasattr(disk.model.config, "quantization_config")
    for name, p in loaded.named_parameters():
        assert torch.equal(s.checkpoint.tensor(s.keys[name]), p), name
    embed = s.keys["model.embed_tokens.weight"]
    with pytest.MonkeyPatch.context() as mp:  # a large vocabulary's rows are read alone, never the whole tensor
        mp.setattr(Checkpoint, "tensor", lambda *a: pytest.fail("read whole"))
        assert torch.equal(s.checkpoint.rows(embed, 5, 20), loaded.get_parameter("model.embed_tokens.weight")[5:20])
    # those weights in a plain model (compressed-tensors' loaded model computes otherwise, to 4e-6 in its logits)
    model = AutoModelForCausalLM.from_config(loaded.config).eval()
    model.load_state_dict(loaded.state_dict())
    w, kw = tiny_windows(3), dict(ablation="exact", lens=False, progress=False)
    want = profile(disk, w, **kw)
    _same_metrics(profile(LoadedModel(model, None, Anatomy(model)), w, **kw), want)
    resident = load(str(folder))  # dequantized as it loads too, where compressed-tensors would keep packed codes
    assert not hasattr(resident.model.config, "quantization_config")
    _same_metrics(profile(resident, w, **kw), want)


def test_an_expert_drop_from_an_mxfp4_checkpoint_on_disk_saves_plain_weights_transformers_loads(tmp_path):
    """Dropping experts of a gpt-oss model read from its MXFP4 files writes the experts dequantized in the dtype the
    checkpoint declares (bfloat16, as gpt-oss's does: MXFP4 values are exact in it), and a config without the
    quantization config, which plain transformers loads as the resident model's drop."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from layerwise import drop as dp

    qc = _mxfp4(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"quantization_config": qc, "dtype": "bfloat16"}))
    plan = dp.DropPlan(["L1.mlp.e2", "L0.mlp.e0"], "expert", "given")
    for name, offload in (("resident", "none"), ("streamed", "disk")):
        dp.save_checkpoint(load(str(tmp_path / "m"), offload=offload), plan, tmp_path / name)
    x = tiny_windows(2).ids
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n, dtype=torch.float32) for n in ("resident", "streamed"))
    assert "quantization_config" not in json.loads((tmp_path / "streamed" / "config.json").read_text())
    with safe_open(str(tmp_path / "streamed" / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.1.mlp.experts.down_proj").dtype == torch.bfloat16
        assert fh.get_tensor("model.layers.1.mlp.router.weight").dtype == torch.float32  # stored so
    assert a.config.num_local_experts == b.config.num_local_experts == 3
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(input_ids=x).logits, b.eval()(input_ids=x).logits, rtol=0, atol=0)


def test_a_quantized_checkpoint_transformers_cannot_dequantize_is_one_line(tmp_path):
    tiny_folder(tmp_path, "llama", layers=2)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    why = r"^layerwise dequantizes a quantized .* cannot do for this bitsandbytes.*; save a dequantized copy first$"
    for offload in ("none", "disk"):
        with pytest.raises(LayerwiseError, match=why):
            load(str(tmp_path), offload=offload)
