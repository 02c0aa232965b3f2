"""Dropping experts: chosen from a Profile, measured with them out of routing, saved as a checkpoint that plain
transformers reloads with the same logits (deleted where the config's one expert count allows, shut off by a -inf
router bias where the router has one, listed for layerwise's loader otherwise)."""

from __future__ import annotations

import json

import pytest
import torch

from layerwise import cli, ggufio, load
from layerwise import drop as dp
from layerwise.errors import LayerwiseError
from layerwise.experts import cut, without_experts

from .conftest import GGUF_ARCH, GGUF_MOE_ARCHS, MOE_ARCHS, moe_gguf, tiny_folder, tiny_lm, tiny_windows


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def _reloaded(folder, x):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, _logits(model, x)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"])
def test_deleting_experts_computes_as_routing_around_them_and_puts_the_model_back(arch):
    lm, x = tiny_lm(arch), tiny_windows(2).ids
    an, before = lm.anatomy, _logits(lm.model, tiny_windows(2).ids)
    removed = {i: [1, 3] if i == an.moe_layers[-1] else [0] for i in an.moe_layers}
    with without_experts(an, removed):
        want = _logits(lm.model, x)
    shapes = [t.shape for i in an.moe_layers for t in an.by_expert(i)]
    with cut(an, removed):
        assert [an.n_experts(i) for i in an.moe_layers][-1] == 2
        torch.testing.assert_close(_logits(lm.model, x), want, rtol=1e-5, atol=1e-6)
    assert [t.shape for i in an.moe_layers for t in an.by_expert(i)] == shapes
    torch.testing.assert_close(_logits(lm.model, x), before, rtol=0, atol=0)


def test_deleting_experts_that_routing_groups_is_refused_in_one_line():
    an = tiny_lm("deepseek_v3").anatomy
    with pytest.raises(LayerwiseError, match=r"routes within 2 equal groups of experts.*without_experts\)$"):
        with cut(an, {1: [0]}):
            pass


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_an_expert_drop_reloads_in_plain_transformers_with_the_logits_layerwise_measured(arch, tmp_path):
    """One expert from every sparse block: deleted, with the config's count lowered (DeepSeek-V3's grouped routing:
    kept, its correction bias -inf), so plain transformers computes what the drop measured."""
    lm, x = tiny_lm(arch), tiny_windows(2).ids
    an = lm.anatomy
    plan = dp.DropPlan([f"L{i}.mlp.e{(i + 1) % 4}" for i in an.moe_layers], "expert", "given")
    with dp.dropped(an, plan.units):
        want = _logits(lm.model, x)
    assert not torch.allclose(want, _logits(lm.model, x), atol=1e-6)
    dp.save_checkpoint(lm, plan, tmp_path / "m")
    model, got = _reloaded(tmp_path / "m", x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    count = getattr(model.config, an.spec.moe.count)
    assert count == (4 if arch == "deepseek_v3" else 3)
    assert "masked_experts" not in model.config.layerwise
    with dp.applied(lm, plan) as small:  # the measured smaller model is the one saved
        torch.testing.assert_close(_logits(small, x), want, rtol=1e-5, atol=1e-6)
        assert dp.param_count(small) == dp.param_count(model)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_a_drop_uneven_across_blocks_deletes_what_it_can_and_says_what_it_keeps(arch, tmp_path):
    """Two experts from the last block, one from the first: one deleted from each, the other shut off by gpt-oss's
    router bias, or, in Mixtral, whose router has none, kept in the file and listed; the export says so."""
    lm, w = tiny_lm(arch, layers=2), tiny_windows(3)
    x, (first, last) = w.ids[:2], lm.anatomy.moe_layers
    plan = dp.DropPlan([f"L{last}.mlp.e3", f"L{first}.mlp.e0", f"L{last}.mlp.e1"], "expert", "given")
    with dp.dropped(lm.anatomy, plan.units):
        want = _logits(lm.model, x)
    exports = dp.export_plan(lm, plan, tmp_path, ("hf",))
    model, got = _reloaded(tmp_path / "model", x)
    assert getattr(model.config, lm.anatomy.spec.moe.count) == 3
    torch.testing.assert_close(_logits(load(str(tmp_path / "model")).model, x), want, rtol=1e-5, atol=1e-6)
    if arch == "gpt_oss":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert "masked_experts" not in model.config.layerwise and "note" not in exports["hf"]
        return
    assert model.config.layerwise["masked_experts"] == {str(last): [1]}  # e1, numbered as saved once e3 is gone
    assert not torch.allclose(got, want, atol=1e-6)
    note = exports["hf"]["note"]
    assert "keeps 1 dropped expert(s)" in note and "--per-layer N" in note and "\n" not in note


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_an_expert_drop_from_disk_writes_what_the_resident_model_writes(arch, tmp_path):
    lm = tiny_lm(arch)
    an = lm.anatomy
    if arch == "deepseek_v3":  # a correction bias that decides: read from the checkpoint, not left at zeros
        with torch.no_grad():
            for i in an.moe_layers:
                an.router_bias(i).copy_(torch.randn(4, generator=torch.Generator().manual_seed(i)))
    lm.model.save_pretrained(tmp_path / "src")
    lm.tokenizer = None
    streamed = load(str(tmp_path / "src"), offload="disk")
    x = tiny_windows(2).ids
    torch.testing.assert_close(_logits(lm.model, x), _logits(load(str(tmp_path / "src")).model, x))
    last = an.moe_layers[-1]
    plan = dp.DropPlan([f"L{last}.mlp.e1", f"L{last}.mlp.e2", f"L{an.moe_layers[0]}.mlp.e3"], "expert", "given")
    for name, source in (("resident", lm), ("streamed", streamed)):
        dp.save_checkpoint(source, plan, tmp_path / name)
    # the resident save writes transformers' per-expert layout, the streamed one the fused tensors: both reload
    a_and_b = ("resident", "streamed")
    (a, _), (b, _) = (_reloaded(tmp_path / n, x) for n in a_and_b)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, t in a.state_dict().items():
        torch.testing.assert_close(t, b.state_dict()[k], rtol=0, atol=0, msg=k)
    resident, streamed_ = (json.loads((tmp_path / n / "config.json").read_text())["layerwise"] for n in a_and_b)
    assert resident | {"source_model_hash": None} == streamed_ | {"source_model_hash": None}


def test_a_streamed_deepseek_model_reads_its_routing_correction_bias_from_disk(tmp_path):
    lm = tiny_lm("deepseek_v3")
    with torch.no_grad():
        for i in lm.anatomy.moe_layers:
            lm.anatomy.router_bias(i).copy_(torch.randn(4, generator=torch.Generator().manual_seed(i)))
    lm.model.save_pretrained(tmp_path / "m")
    streamed, w = load(str(tmp_path / "m"), offload="disk"), tiny_windows(3)
    kw = dict(ablation="none", lens=False, progress=False)
    from layerwise.profile import profile

    want, got = profile(lm, w, **kw), profile(streamed, w, **kw)
    shares = [[p.unit(f"L2.mlp.e{j}").metrics["route_share"] for j in range(4)] for p in (want, got)]
    assert shares[0] == pytest.approx(shares[1], abs=1e-6)


def _ranked_plan(lm, w, **settings):
    return dp.choose(lm, w, unit="expert", order="route_share", progress=False, **settings)


def test_per_layer_and_n_choose_the_least_routed_experts_each_block_can_lose():
    from layerwise.profile import profile

    lm, w = tiny_lm("mixtral"), tiny_windows(4)
    an = lm.anatomy
    prof = profile(lm, w, ablation="none", lens=False, progress=False)
    share = {u.name: u.metrics["route_share"] for u in prof.units if u.kind == "expert"}
    plan = _ranked_plan(lm, w, per_layer=1, prof=prof)
    least = [min((u for u in share if u.startswith(f"L{i}.")), key=share.__getitem__) for i in an.moe_layers]
    assert sorted(plan.units) == sorted(least)
    n = len(an.moe_layers) * 2  # every block can lose 2 of its 4 experts (2 per token): each loses its 2 least routed
    every = _ranked_plan(lm, w, n=n, prof=prof)
    for i in an.moe_layers:
        assert sorted(every.experts[i]) == sorted(sorted(range(4), key=lambda j: share[f"L{i}.mlp.e{j}"])[:2])
    with pytest.raises(LayerwiseError, match="bi does not describe expert units; for `unit` expert order by one of"):
        dp.choose(lm, w, unit="expert", n=1, prof=prof, progress=False)


def test_a_planted_dead_expert_is_found_by_every_metric_and_dropping_it_changes_nothing(tmp_path):
    """gpt-oss: block 1's expert 1 has zero weights and a router bias of -1e4 (never routed, adds nothing); block 2's
    expert 2 a bias of +1e4 (every token's, the other choice's weight then 0). The dead one has share, ablation KL
    and NLL change 0 and no gate weight, the least of its block; the dominant one the most. The dead one's drop has
    zero held-out KL and its saved checkpoint computes the original's logits."""
    from layerwise.profile import profile

    lm, w = tiny_lm("gpt_oss"), tiny_windows(6)
    an, w.n_calib = lm.anatomy, 4
    with torch.no_grad():
        for t in an.by_expert(1)[:4]:  # the experts' weights and biases
            t[1] = 0
        an.router_bias(1)[1], an.router_bias(2)[2] = -1e4, 1e4
    prof = profile(lm, w, expert_ablation=True, lens=False, progress=False)
    dead = prof.unit("L1.mlp.e1").metrics
    assert dead["route_share"] == 0 and dead["gate_mean"] is None and dead["rel_update"] is None
    # the stacked ablation pass sums in another order
    assert dead["ablate_kl"] == pytest.approx(0, abs=1e-7) and dead["ablate_nll"] == pytest.approx(0, abs=1e-7)
    found = (("route_share", 1, "e1", None), ("ablate_kl", 1, "e1", None), ("rel_update", 1, "e1", None))
    for order, block, first, last in found + tuple(
        (m, 2, None, "e2") for m in ("route_share", "gate_mean", "ablate_kl", "rel_update")
    ):
        values = [prof.unit(f"L{block}.mlp.e{j}").metrics[order] or 0.0 for j in range(4)]
        ranked = [u for u in prof.rank(order, "expert") if u.startswith(f"L{block}.")]
        assert first is None or (ranked[0] == f"L{block}.mlp.{first}" and sorted(values)[1] > 0), order
        assert last is None or (ranked[-1] == f"L{block}.mlp.{last}" and sorted(values)[-2] < values[2]), order
    report = dp.run(lm, w, units=("L1.mlp.e1",), with_speed=False, out=tmp_path)
    (variant,) = report.variants
    assert (
        variant["units"] == ["L1.mlp.e1"] and variant["kl"] == 0 and variant["delta_nll"] == pytest.approx(0, abs=1e-7)
    )
    assert variant["params"] == report.original["params"]  # one expert of one block: kept, its router bias -inf
    _, got = _reloaded(tmp_path / "model", w.evaluation)
    torch.testing.assert_close(got, _logits(lm.model, w.evaluation), rtol=1e-5, atol=1e-6)


def test_dropping_experts_is_refused_in_one_line_before_anything_is_written(tmp_path):
    lm, w = tiny_lm("qwen3_moe"), tiny_windows(3)
    an = lm.anatomy
    bad = {
        "L1.mlp.e0,L1.mlp.e1,L1.mlp.e2": "L1 would keep 1 of its 4 experts, fewer than the 2 each token",
        "L1,L2.mlp.e0": "a plan drops experts, or blocks and sublayers, not both",
        "L1.router": "drop removes routed experts",
        "L0.mlp.e0": r"L0 has no experts \(blocks with experts: L1, L2\)",
        "L1.mlp.e7": "L1 has experts e0..e3",
    }
    for units, message in bad.items():
        with pytest.raises(LayerwiseError, match=message):
            dp.save_checkpoint(lm, dp.DropPlan(units.split(","), "expert", "given"), tmp_path / "m")
        assert not (tmp_path / "m").exists()
    with pytest.raises(LayerwiseError, match=r"`per_layer` 3 leaves a block fewer experts .*use `per_layer` 2"):
        _ranked_plan(lm, w, per_layer=3)
    with pytest.raises(LayerwiseError, match=r"`n` 5 is more than the 4 experts this model can lose"):
        _ranked_plan(lm, w, n=5)
    with pytest.raises(LayerwiseError, match="use it with `unit` expert"):
        dp.choose(lm, w, per_layer=1, progress=False)
    with pytest.raises(LayerwiseError, match="`unit` expert needs a model with experts; this llama model has none"):
        dp.choose(tiny_lm("llama"), w, unit="expert", order="route_share", progress=False)
    assert all("forward" not in an.router(i).__dict__ for i in an.moe_layers)


def test_the_cli_drops_experts_per_layer_into_a_smaller_checkpoint(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "src", "olmoe", layers=2)
    argv = ["drop", "--model", str(folder), "--seq-len", "16", "--samples", "2", "--eval-samples", "2"]
    argv += ["--unit", "expert", "--per-layer", "1", "--order", "route_share", "--no-speed", "--json"]
    assert cli.main([*argv, "--out", str(tmp_path / "d")]) == 0
    result = json.loads(capsys.readouterr().out)
    (variant,) = result["variants"]
    assert variant["n"] == 2 and {u.split(".")[0] for u in variant["units"]} == {"L0", "L1"}
    config = json.loads((tmp_path / "d" / "model" / "config.json").read_text())
    assert config["num_experts"] == 3 and config["layerwise"]["dropped"] == variant["units"]
    assert result["exports"]["hf"]["bytes"] < sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _llama_cpp_logits(path, toks):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(toks)
    return torch.tensor(llm.scores[: len(toks)])


@pytest.mark.parametrize("arch", GGUF_MOE_ARCHS)
def test_an_expert_drop_from_a_gguf_file_slices_its_experts_and_runs_in_llama_cpp(arch, tmp_path, monkeypatch):
    """layerwise reads a Qwen3-MoE, Qwen2-MoE, Mixtral or gpt-oss GGUF file as the model it was written from (gate
    and up experts made into one tensor); the drop's GGUF copy has every *_exps tensor and the router (their biases
    too) cut along the expert axis (not Qwen2-MoE's shared expert or its gate) and one expert fewer in its metadata,
    and llama.cpp runs it with the logits layerwise measured for the drop."""
    import gguf

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    model, path = moe_gguf(tmp_path / "moe.gguf", arch=arch)
    lm, toks = load(str(path)), list(range(3, 40))
    x = torch.tensor([toks])
    torch.testing.assert_close(_logits(lm.model, x), _logits(model, x), rtol=0, atol=1e-5)
    assert (_llama_cpp_logits(path, toks) - _logits(model, x)[0]).abs().max() < 0.05  # llama.cpp's own arithmetic
    plan = dp.DropPlan(["L0.mlp.e1", "L1.mlp.e2"], "expert", "given", model_hash=lm.source["model_hash"])
    with dp.dropped(lm.anatomy, plan.units):
        want = _logits(lm.model, x)[0]
    exports = dp.export_plan(lm, plan, tmp_path / "d", ("gguf", "hf"))
    r = gguf.GGUFReader(exports["gguf"]["path"])
    assert int(r.get_field(f"{GGUF_ARCH[arch]}.expert_count").contents()) == 3
    infos, before = ({t.name: t for t in ggufio.header(p)[1]} for p in (exports["gguf"]["path"], path))
    shapes = {n: t.shape for n, t in infos.items()}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (3, 16, 32) and shapes["blk.1.ffn_gate_inp.weight"] == (3, 32)
    assert {n: shapes[n] for n in shapes if "shexp" in n} == {n: t.shape for n, t in before.items() if "shexp" in n}
    assert any("shexp" in n for n in shapes) == (arch == "qwen2_moe")
    if arch == "gpt_oss":  # the experts' and the router's biases are cut too
        assert shapes["blk.1.ffn_up_exps.bias"] == (3, 16) and shapes["blk.1.ffn_gate_inp.bias"] == (3,)
    assert exports["gguf"]["bytes"] < path.stat().st_size
    theirs = _llama_cpp_logits(exports["gguf"]["path"], toks)
    assert (theirs - want).abs().max() < 0.05 < (want - _logits(lm.model, x)[0]).abs().max()
    _, reloaded = _reloaded(tmp_path / "d" / "model", x)
    torch.testing.assert_close(reloaded[0], want, rtol=1e-5, atol=1e-5)
    uneven = dp.DropPlan(["L0.mlp.e1", "L1.mlp.e2", "L1.mlp.e3"], "expert", "given")
    with pytest.raises(LayerwiseError, match=r"one expert count for every block.*\(L0 1\); drop with `per_layer`"):
        dp.export_gguf(path, uneven, tmp_path / "never.gguf")
    with pytest.raises(LayerwiseError, match=r"one expert count for every block"):  # before the checkpoint is written
        dp.export_plan(lm, uneven, tmp_path / "never", ("hf", "gguf"))
    assert not list(tmp_path.glob("never*"))


def test_a_sweep_and_an_iterative_drop_rank_experts_too(tmp_path, capsys):
    """A sweep's expert plans are nested prefixes of the largest, each within its blocks' room; an iterative drop
    re-ranks with the earlier experts out of routing; the CLI prints, on stderr, what a checkpoint could not delete."""
    lm, w = tiny_lm("qwen2_moe"), tiny_windows(6)
    w.n_calib = 4
    sweep = dp.run(lm, w, unit=("expert",), order=("route_share",), sweep=(1, 3, 6), with_speed=False, progress=False)
    plans = [v["units"] for v in sweep.variants]
    assert [len(p) for p in plans] == [1, 3, 6] and plans[2][:3] == plans[1] and plans[1][:1] == plans[0]
    assert all(v["kl"] > 0 for v in sweep.variants)
    again = dp.choose(lm, w, unit="expert", order="route_share", n=2, iterative=True, progress=False)
    assert again.iterative and len(set(again.units)) == 2
    folder = tiny_folder(tmp_path / "src", "mixtral", layers=2)
    argv = ["drop", "--model", str(folder), "--seq-len", "16", "--samples", "2", "--eval-samples", "2", "--no-speed"]
    assert cli.main([*argv, "--units", "L1.mlp.e0,L1.mlp.e1", "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert "layerwise: transformers' config holds one expert count" in err and "keeps 2 dropped expert(s)" in err


def test_a_block_drop_from_a_gpt_oss_gguf_file_names_the_blocks_that_slide(tmp_path, monkeypatch):
    """llama.cpp slides every other gpt-oss block by its index in the file: a copy without block 1 would slide the
    old block 3 in its place. The copy names its blocks' windows (slide, slide, full), and llama.cpp runs it with
    the logits layerwise measured for the drop, as layerwise does reading it back; a drop that keeps no sliding
    block, which llama.cpp's graph asserts against, is refused in one line, writing nothing."""
    import gguf

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    _, path = moe_gguf(tmp_path / "oss.gguf", arch="gpt_oss", layers=4)
    lm, toks = load(str(path)), list(range(3, 40))
    plan = dp.DropPlan(["L1"], "block", "given")
    with dp.dropped(lm.anatomy, plan.units):
        want = _logits(lm.model, torch.tensor([toks]))[0]
    out = dp.export_gguf(path, plan, tmp_path / "d.gguf")
    key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch="gpt-oss")
    assert (_llama_cpp_logits(out, toks) - want).abs().max() < 0.05
    assert ggufio.reader(out).get_field(key).contents() == [True, True, False]
    torch.testing.assert_close(_logits(load(str(out)).model, torch.tensor([toks]))[0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(LayerwiseError, match=r"^llama.cpp runs a gpt-oss GGUF file only with a sliding-window block, "):
        dp.export_gguf(path, dp.DropPlan(["L0", "L2"], "block", "given"), tmp_path / "never.gguf")
    assert not list(tmp_path.glob("*never*"))
