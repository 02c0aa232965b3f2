"""Mixture-of-experts models on tiny random configs of every supported architecture: the parts of a sparse MLP by
name, their checkpoints read as transformers loads them, and block and MLP drops that reload in plain
transformers with every block's experts where they were."""

import math

import pytest
import torch

from layerwise.anatomy import Anatomy, first_tensor, parse_part, parse_unit, part_name
from layerwise.drop import DropPlan, save_checkpoint
from layerwise.engine import Checkpoint, ConvertedCheckpoint
from layerwise.errors import LayerwiseError
from layerwise.trace import skip

from .conftest import GGUF_MOE_ARCHS, MOE_ARCHS, moe_gguf, sparse_inputs, tiny_folder, tiny_lm, tiny_windows

#: The blocks with experts in the tiny models of 3 blocks (Qwen3-MoE's first is listed dense, DeepSeek-V3's first k).
SPARSE = {"qwen3_moe": [1, 2], "deepseek_v3": [1, 2]}


def test_part_names_round_trip_and_a_part_is_not_a_sublayer():
    for name, parsed in {
        "L3.mlp.e12": (3, "expert", 12),
        "L0.mlp.shared": (0, "shared", None),
        "L7.router": (7, "router", None),
    }.items():
        assert parse_part(name) == parsed and part_name(*parsed) == name
    assert parse_part("L3.mlp") is None and parse_part("L3.mlp.e") is None
    with pytest.raises(LayerwiseError, match="L3.mlp.e1 is a part of a sparse MLP; this takes blocks and sublayers"):
        parse_unit("L3.mlp.e1")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_anatomy_names_each_sparse_mlp_s_experts_router_and_shared_experts(arch):
    lm = tiny_lm(arch)
    an, cfg = lm.anatomy, lm.model.config
    assert an.moe_layers == SPARSE.get(arch, [0, 1, 2])
    shared = arch in ("qwen2_moe", "deepseek_v3")
    first = an.moe_layers[0]
    assert an.parts()[: 6 + shared] == [
        f"L{first}.router",
        *(f"L{first}.mlp.e{j}" for j in range(4)),
        *([f"L{first}.mlp.shared"] if shared else []),
        f"L{first + 1}.router",
    ]
    assert an.router(first).weight.shape == (4, cfg.hidden_size) and an.top_k == 2
    assert an.check_part(f"L{first}.mlp.e3") == (first, "expert", 3)
    with pytest.raises(LayerwiseError, match=f"L{first} has experts e0..e3"):
        an.check_part(f"L{first}.mlp.e4")
    if not shared:
        with pytest.raises(LayerwiseError, match="has no shared experts"):
            an.check_part(f"L{first}.mlp.shared")
    if first:
        with pytest.raises(LayerwiseError, match=r"L0 has no experts \(blocks with experts: L1, L2\)"):
            an.check_part("L0.mlp.e0")
    # each expert's matrices as (out, in): gate and up stacked, then down
    (gate_up, w_gate_up), (down, w_down) = an.expert_matrices(first, 2)
    width = w_down.shape[1]
    assert gate_up.endswith("experts.gate_up_proj.2") and down.endswith("experts.down_proj.2")
    assert w_gate_up.shape == (2 * width, cfg.hidden_size) and w_down.shape == (cfg.hidden_size, width)
    wide = an.mlp_width(first)
    assert wide == 2 * width + (an.linear_shape(an.shared(first).down_proj)[1] if shared else 0)
    # the router, the shared experts' maps (and Qwen2-MoE's gate for them), each expert's two matrices
    assert len(an.weight_matrices(first, "mlp")) == {"qwen2_moe": 1 + 4, "deepseek_v3": 1 + 3}.get(arch, 1) + 2 * 4


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_zeroing_a_sparse_mlp_s_output_parameters_silences_it(arch):
    lm = tiny_lm(arch)
    an = lm.anatomy
    layer = an.moe_layers[0]
    x = torch.randn(2, 5, lm.model.config.hidden_size)
    mlp = an.branch(layer, "mlp")
    with torch.no_grad():
        assert first_tensor(mlp(x)).abs().max() > 0
        for p in an.out_params(layer, "mlp"):
            p.zero_()
        assert not first_tensor(mlp(x)).any()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_a_hub_format_checkpoint_is_read_as_transformers_loads_it(arch, tmp_path):
    """The experts stored one tensor each (Mixtral's as w1/w2/w3 under block_sparse_moe) are read fused, equal to the
    model's own weights; a dense checkpoint is read as it is."""
    lm = tiny_lm(arch)
    ckpt = Checkpoint.of(tiny_folder(tmp_path / arch, arch, layers=3))
    seen = ConvertedCheckpoint.of(ckpt, lm.model)
    own = dict(lm.model.named_parameters()) | dict(lm.model.named_buffers())  # DeepSeek's routing bias is a buffer
    if lm.model.config.tie_word_embeddings:
        del own["lm_head.weight"]
    assert set(seen.files) <= set(own) and set(own) - set(seen.files) <= {n for n, _ in lm.model.named_buffers()}
    for name in seen.files:
        assert torch.equal(seen.tensor(name), own[name]), name
    if arch != "gpt_oss":  # gpt-oss's checkpoints hold the fused weights themselves
        assert isinstance(seen, ConvertedCheckpoint) and seen.made
    dense = tiny_lm("llama")
    assert ConvertedCheckpoint.of(Checkpoint.of(tiny_folder(tmp_path / "dense")), dense.model).__class__ is Checkpoint


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_a_saved_drop_reloads_with_every_block_s_experts_where_they_were(arch, tmp_path):
    """Dropping the first block (dense in Qwen3-MoE's and DeepSeek-V3's tiny models) and a sparse MLP: the
    checkpoint's config keeps each remaining block dense or sparse, plain transformers reloads it and computes what
    the skipped model computed, with the dropped MLP's experts zeroed."""
    from transformers import AutoModelForCausalLM

    lm = tiny_lm(arch, layers=4)
    x = tiny_windows(2).ids
    plan = DropPlan(["L0", "L2.mlp"], "any", "given")
    with torch.no_grad(), skip(lm.anatomy, plan.units):
        want = lm.model(input_ids=x, use_cache=False).logits
    layout = ("num_hidden_layers", "mlp_only_layers", "decoder_sparse_step", "first_k_dense_replace")
    config = [getattr(lm.model.config, k, None) for k in layout]
    save_checkpoint(lm, plan, tmp_path / "m")
    assert [getattr(lm.model.config, k, None) for k in layout] == config  # put back
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    an = Anatomy(again)
    assert an.moe_layers == [i - 1 for i in lm.anatomy.moe_layers if i]
    assert all(not p.any() for p in an.out_params(1, "mlp"))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", GGUF_MOE_ARCHS)
def test_a_moe_gguf_file_reads_as_its_model_in_memory_from_disk_and_in_llama_cpp(arch, tmp_path, monkeypatch):
    """A Qwen3-MoE, Qwen2-MoE (its shared expert's width and gate), Mixtral (a llama with experts, as llama.cpp
    writes it, q and k rows in its rotary layout) or gpt-oss GGUF file (experts in MXFP4, gate and up split from
    interleaved columns, sinks, biases, YaRN and a sliding window, which transformers' own GGUF reader gets wrong)
    loads as the model it was written from, converted and read from disk alike, and llama.cpp's perplexity of the
    file is layerwise's."""
    import contextlib

    from layerwise.evaluate import next_token_logits, quality, streamed_quality
    from layerwise.loading import load
    from layerwise.quant.gguf import llama_nll

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    model, path = moe_gguf(tmp_path / "moe.gguf", arch=arch, mxfp4=arch == "gpt_oss")
    ids = tiny_windows(3, 16).ids
    resident, disk = load(str(path)), load(str(path), offload="disk")
    assert resident.anatomy.moe_layers == [0, 1] and type(resident.model) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(resident.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    ckpt = disk.streamed.checkpoint
    assert all(torch.equal(ckpt.tensor(n), p) for n, p in model.named_parameters())
    ours = quality(next_token_logits(model), {"gguf": next_token_logits(resident.model)}, ids)["gguf"]
    assert ours["kl"] < 1e-9
    same = streamed_quality(disk, {"same": lambda i: contextlib.nullcontext()}, ids)["same"]
    assert same["ref_ppl"] == pytest.approx(ours["ppl"], rel=1e-5)
    theirs = math.exp(sum(nll := llama_nll(path, ids, threads=2)) / len(nll))
    assert abs(theirs / ours["ppl"] - 1) < 0.02, (theirs, ours["ppl"])


def test_a_moe_gguf_file_whose_metadata_misstates_a_width_is_refused_in_one_line(tmp_path, monkeypatch):
    """A Qwen2-MoE file whose shared expert's width in the metadata is not its tensors' is refused when read,
    converted or from disk, before any weight is written."""
    from layerwise.loading import load

    from .conftest import write_gguf

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    model, _ = moe_gguf(tmp_path / "moe.gguf", arch="qwen2_moe")
    model.config.shared_expert_intermediate_size *= 2
    path = write_gguf(model, tmp_path / "wrong.gguf", [f"t{i}" for i in range(97)], quantized=False)
    for offload in ("none", "disk"):
        with pytest.raises(LayerwiseError, match=r"wrong.gguf holds 6 weights of another size than its metadata gives"):
            load(str(path), offload=offload)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_a_llama_gguf_file_with_experts_but_no_count_per_token_is_refused_in_one_line(tmp_path, monkeypatch):
    import gguf

    from layerwise.loading import load

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_used_count", lambda self, n: None)
    _, path = moe_gguf(tmp_path / "moe.gguf", arch="mixtral")
    with pytest.raises(LayerwiseError, match=r"^this llama GGUF file holds 4 experts a block but no llama.expert_used"):
        load(str(path))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize(
    ("writes", "said"),
    [
        (
            ("add_sliding_window", lambda self, n: None),
            r"^this gpt-oss GGUF file has no gpt-oss.attention.sliding_window",
        ),
        (
            ("add_rope_scaling_type", lambda self, t: self.add_string("gpt-oss.rope.scaling.type", "longrope")),
            r"^this gpt-oss GGUF file scales its rope by 'longrope'; layerwise reads none or yarn$",
        ),
    ],
)
def test_a_gpt_oss_gguf_file_lacking_what_llama_cpp_needs_is_refused_in_one_line(writes, said, tmp_path, monkeypatch):
    """A gpt-oss file without its sliding window, or with a rope scaling transformers' model has no match for, is
    refused in memory and from disk, converting nothing."""
    import gguf

    from layerwise.loading import load

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf.GGUFWriter, *writes)
    _, path = moe_gguf(tmp_path / "oss.gguf", arch="gpt_oss")
    for offload in ("none", "disk"):
        with pytest.raises(LayerwiseError, match=said):
            load(str(path), offload=offload)
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_routing_columns_and_the_layer_summary_by_hand():
    """Three tokens, four experts, two each: expert 3 never chosen, expert 0 always; the third token's last expert
    carries 5% of its chosen weight (skippable), the others' 25% or more."""
    from layerwise.metrics.routing import layer_summary, routing_columns

    weights = torch.tensor([[0.6, 0.4], [0.75, 0.25], [0.95, 0.05]])
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    cols = routing_columns(weights, indices, 4)
    assert cols.shape == (3, 9) and cols[:, :4].sum(-1).tolist() == [2, 2, 2] and cols[:, -1].tolist() == [0, 0, 1]
    experts, layer = layer_summary(cols.mean(0).tolist(), 4)
    assert [e["route_share"] for e in experts] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [e["gate_mean"] for e in experts[:3]] == pytest.approx([2.3 / 3, 0.45 / 2, 0.25]) and experts[3][
        "gate_mean"
    ] is None
    load = [1 / 2, 1 / 3, 1 / 6]
    entropy = -sum(p * math.log(p) for p in load) / math.log(4)
    assert layer == pytest.approx({"route_entropy": entropy, "load_imbalance": 2.0, "route_skip": 1 / 3})


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_profile_s_routing_counts_what_the_routers_choose(arch):
    """Each expert's route_share and gate_mean in the profile equal a count made apart: every sparse MLP's input
    caught in a plain forward and routed again by its router."""
    from layerwise.profile import profile

    lm, w = tiny_lm(arch), tiny_windows(3)
    an = lm.anatomy
    seen = sparse_inputs(lm, w.calibration)
    prof = profile(lm, w, ablation="none", lens=False, batch_size=2, progress=False)
    for i, x in seen.items():
        with torch.no_grad():
            _, weights, idx = an.router(i)(x)
        for j in range(4):
            mine = (idx == j).any(-1)
            got = prof.unit(f"L{i}.mlp.e{j}").metrics
            assert got["route_share"] == pytest.approx(mine.double().mean().item(), abs=1e-12)
            gates = weights[idx == j].double()
            assert got["gate_mean"] == (pytest.approx(gates.mean().item(), rel=1e-5) if gates.numel() else None)
        assert prof.unit(f"L{i}.router").metrics["route_entropy"] is not None
    assert prof.unit("L1.mlp").kind == "mlp" and prof.unit("L1.router").kind == "router"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_each_expert_s_update_is_its_weighted_output_by_hand(arch):
    """rel_update and update_norm per expert against a hand-written SwiGLU expert (down(silu(gate x) * up x) times
    its gate weight) on each sparse MLP's caught input, over the tokens routed to it, and the stream it read."""
    from layerwise.profile import profile

    lm, w = tiny_lm(arch), tiny_windows(3)
    an, hidden = lm.anatomy, lm.model.config.hidden_size
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in an.moe_layers}
    mids: dict[int, list[torch.Tensor]] = {i: [] for i in an.moe_layers}
    handles = [an.branch(i, "mlp").register_forward_pre_hook(lambda m, a, i=i: xs[i].append(a[0])) for i in xs]
    handles += [
        an.blocks[i].post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: mids[i].append(a[0]))
        for i in xs
    ]
    with torch.no_grad():
        lm.model(input_ids=w.calibration, use_cache=False)
    for h in handles:
        h.remove()
    prof = profile(lm, w, ablation="none", lens=False, batch_size=2, progress=False)
    for i in an.moe_layers:
        x, mid = (torch.cat(t).reshape(-1, hidden).double() for t in (xs[i], mids[i]))
        with torch.no_grad():
            _, weights, idx = an.router(i)(x.float())
        for j in range(4):
            (_, gate_up), (_, down) = an.expert_matrices(i, j)
            gate, up = (x @ gate_up.double().T).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ down.double().T
            rows, slot = torch.where(idx == j)
            norms = (out[rows] * weights[rows, slot, None].double()).norm(dim=-1)
            got = prof.unit(f"L{i}.mlp.e{j}")
            if not len(rows):
                assert got.metrics["rel_update"] is None
                continue
            assert got.details["update_norm"] == pytest.approx(norms.mean().item(), rel=1e-5)
            assert got.metrics["rel_update"] == pytest.approx((norms / mid[rows].norm(dim=-1)).mean().item(), rel=1e-5)


def test_a_planted_dead_and_a_planted_dominant_expert_are_found():
    """gpt-oss's router has a bias: -1e4 on expert 1 means it is never routed to, +1e4 on expert 2 that every token
    is; the profile gives them shares 0 and 1, and the layer an uneven load."""
    from layerwise.profile import profile

    lm, w = tiny_lm("gpt_oss"), tiny_windows(3)
    router = lm.anatomy.router(1)
    kw = dict(ablation="none", lens=False, progress=False)
    seen: list[torch.Tensor] = []
    hook = lm.anatomy.branch(1, "mlp").register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        lm.model(input_ids=w.calibration, use_cache=False)
    hook.remove()
    mean = torch.cat(seen).reshape(-1, 32).mean(0)
    with torch.no_grad():  # route by what tells the tokens apart, not by their common part or the random bias
        weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 5
        router.weight.copy_(weight - torch.outer(weight @ mean, mean) / mean.dot(mean))
        router.bias.zero_()
    before = profile(lm, w, **kw)
    assert all(0 < before.unit(f"L1.mlp.e{j}").metrics["route_share"] < 1 for j in range(4))
    with torch.no_grad():
        router.bias[1], router.bias[2] = -1e4, 1e4
    prof = profile(lm, w, **kw)
    shares = [prof.unit(f"L1.mlp.e{j}").metrics["route_share"] for j in range(4)]
    assert shares[1] == 0 and shares[2] == 1 and prof.unit("L1.mlp.e1").metrics["gate_mean"] is None
    imbalance = [p.unit("L1.router").metrics["load_imbalance"] for p in (before, prof)]
    assert imbalance[0] < 2.0 == pytest.approx(imbalance[1])  # the planted expert takes half of every token's picks


def test_the_profile_page_maps_the_routing_of_a_sparse_model_only():
    from layerwise.profile import profile
    from layerwise.report.profile import render

    kw = dict(ablation="none", lens=False, progress=False)
    sparse = profile(tiny_lm("olmoe"), tiny_windows(2), **kw)
    assert "<h2>Routing</h2>" in render(sparse) and sparse.unit("L0.mlp.e0").metrics["route_share"] is not None
    assert "<h2>Routing</h2>" not in render(profile(tiny_lm("llama"), tiny_windows(2), **kw))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routing_rules_reproduce_the_model_s_routers(arch):
    """Each architecture's routing rule, run by layerwise from the router's logits, gives the model's own outputs;
    an expert taken out is never chosen, and the model is put back after."""
    from layerwise.experts import without_experts

    lm, x = tiny_lm(arch), tiny_windows(2).ids
    an, want = lm.anatomy, _logits(lm.model, x)
    with without_experts(an, {i: [] for i in an.moe_layers}):
        torch.testing.assert_close(_logits(lm.model, x), want, rtol=1e-6, atol=1e-6)
    picked: list[torch.Tensor] = []
    hook = an.router(an.moe_layers[-1]).register_forward_hook(lambda m, a, out: picked.append(out[2]))
    _logits(lm.model, x)
    busy = int(picked[0][0, 0])  # an expert the first token chose
    with without_experts(an, {an.moe_layers[-1]: [busy]}):
        assert not torch.allclose(_logits(lm.model, x), want, atol=1e-6)
    hook.remove()
    assert not (picked[1] == busy).any()
    torch.testing.assert_close(_logits(lm.model, x), want, rtol=0, atol=0)
    assert "forward" not in an.router(an.moe_layers[-1]).__dict__


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"])
def test_an_expert_out_of_routing_computes_as_a_model_without_it(arch):
    """A hand-made model with expert 1 deleted from every sparse MLP (router rows and expert weights cut, one
    expert fewer in its config) computes what the model computes with expert 1 out of routing."""
    from layerwise.experts import without_experts

    lm, x = tiny_lm(arch), tiny_windows(2).ids
    an, cfg = lm.anatomy, lm.model.config
    with without_experts(an, dict.fromkeys(an.moe_layers, [1])):
        want = _logits(lm.model, x)
    keep = [0, 2, 3]
    small_cfg = cfg.__class__(**cfg.to_dict())
    setattr(small_cfg, "num_local_experts" if hasattr(cfg, "num_local_experts") else "num_experts", 3)
    small = lm.model.__class__(small_cfg).eval()
    state = lm.model.state_dict()
    for i in an.moe_layers:
        for name, p in [*an.router(i).named_parameters(), *an.experts(i).named_parameters()]:
            owner = an.router(i) if any(q is p for q in an.router(i).parameters()) else an.experts(i)
            path = next(n for n, m in lm.model.named_modules() if m is owner)
            state[f"{path}.{name}"] = p.detach()[keep]
    small.load_state_dict(state)
    torch.testing.assert_close(_logits(small, x), want, rtol=1e-5, atol=1e-5)


def test_taking_out_too_many_or_missing_experts_is_refused_in_one_line():
    from layerwise.experts import without_experts

    an = tiny_lm("mixtral").anatomy
    with pytest.raises(LayerwiseError, match="L1 would keep 1 of its 4 experts, fewer than the 2 each token"):
        with without_experts(an, {0: [1], 1: [0, 1, 2]}):
            pass
    with pytest.raises(LayerwiseError, match="L0 has experts e0..e3"):
        with without_experts(an, {0: [4]}):
            pass
    assert all("forward" not in an.router(i).__dict__ for i in an.moe_layers)


def test_each_part_s_zd_is_the_mean_over_its_own_matrices():
    from layerwise.metrics.weights import z_fraction
    from layerwise.profile import profile

    lm = tiny_lm("qwen2_moe")
    prof = profile(lm, tiny_windows(2), ablation="none", lens=False, progress=False)
    blk = lm.model.model.layers[1].mlp
    mine = {
        "L1.mlp.e2": [blk.experts.gate_up_proj[2], blk.experts.down_proj[2]],
        "L1.router": [blk.gate.weight],
        "L1.mlp.shared": [
            blk.shared_expert.gate_proj.weight,
            blk.shared_expert.up_proj.weight,
            blk.shared_expert.down_proj.weight,
        ],
    }
    for name, ws in mine.items():
        want = sum(float(z_fraction(w)) for w in ws) / len(ws)
        assert prof.unit(name).metrics["zd"] == pytest.approx(want, rel=1e-6), name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_ablation_equals_a_full_forward_without_the_expert(arch, tmp_path):
    """Every expert's ablate_nll and ablate_kl equal a whole forward with it out of routing (batches of 2 and 1:
    the stacked copies tile masks and positions right), from disk as in memory."""
    from layerwise.experts import without_experts
    from layerwise.profile import profile

    from .test_engine import _same_metrics, _streamed

    lm, w = tiny_lm(arch), tiny_windows(3)
    prof = profile(lm, w, batch_size=2, lens=False, expert_ablation=True, progress=False)
    x = w.ids
    with torch.no_grad():
        full = torch.log_softmax(_logits(lm.model, x)[:, :-1], -1)
        nll_full = -full.gather(-1, x[:, 1:, None]).mean()
        for i in lm.anatomy.moe_layers:
            for j in range(4):
                with without_experts(lm.anatomy, {i: [j]}):
                    lp = torch.log_softmax(_logits(lm.model, x)[:, :-1], -1)
                got = prof.unit(f"L{i}.mlp.e{j}").metrics
                assert got["ablate_nll"] == pytest.approx(
                    (-lp.gather(-1, x[:, 1:, None]).mean() - nll_full).item(), abs=1e-5
                )
                assert got["ablate_kl"] == pytest.approx((full.exp() * (full - lp)).sum(-1).mean().item(), abs=1e-5)
    assert "expert" in prof.agreement["by_kind"] and prof.meta["expert_ablation"] is True
    disk = _streamed(lm, tmp_path / arch)
    _same_metrics(prof, profile(disk, w, batch_size=2, lens=False, expert_ablation=True, progress=False))


def test_expert_ablation_needs_experts_and_exact_ablation():
    from layerwise.profile import profile

    with pytest.raises(LayerwiseError, match="`expert_ablation` .*; this model has no experts"):
        profile(tiny_lm("llama"), tiny_windows(2), expert_ablation=True, progress=False)
    with pytest.raises(LayerwiseError, match="`expert_ablation` .*; not with `ablation` taylor"):
        profile(tiny_lm("mixtral"), tiny_windows(2), ablation="taylor", expert_ablation=True, progress=False)


def test_the_agreement_table_gains_the_experts_rows():
    """With expert ablation, which cheap statistic tracks it: rho of route_share, gate_mean, zd, rel_update and
    ablate_kl over the experts, as spearman gives it from their values."""
    from layerwise.metrics.agreement import spearman
    from layerwise.profile import profile

    prof = profile(tiny_lm("olmoe"), tiny_windows(2), lens=False, expert_ablation=True, progress=False)
    row = prof.agreement["by_kind"]["expert"]
    assert set(row) == {"route_share", "gate_mean", "zd", "rel_update", "ablate_kl"}
    experts = [u for u in prof.units if u.kind == "expert"]
    xs, ys = ([u.metrics[m] for u in experts] for m in ("route_share", "ablate_nll"))
    assert row["route_share"] == dict(zip(("rho", "n"), spearman(xs, ys))) and row["route_share"]["n"] == 12


def test_the_profile_plan_counts_one_carried_stream_per_ablated_expert(tmp_path):
    import torch

    from layerwise.memory_plan import Shape, profile_plan

    folder = tiny_folder(tmp_path / "m", "qwen3_moe", layers=3)
    kw = dict(dtype=torch.float32, windows=8, seq_len=16, batch_size=2, ablation="exact", ablation_windows=4)
    shape = Shape.of(folder, dtype=torch.float32, seq_len=16)
    assert shape.experts == 4 * 2  # two sparse blocks of four
    plain, experts = (profile_plan(folder, **kw, expert_ablation=e) for e in (False, True))
    assert experts.states - plain.states == shape.states(8, 4, 16)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_each_expert_s_readout_is_its_share_of_the_mlp_update(arch):
    """Read at each routed expert, the examples' vectors add up to the sparse MLP's update (no shared experts
    here), last token and mean alike; an expert no token of an example chose reads zero for it."""
    from layerwise.features import collect_ids

    lm = tiny_lm(arch)
    an, layer = lm.anatomy, lm.anatomy.moe_layers[-1]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in [3, 9, 5, 12, 4, 7]]
    experts = [f"L{layer}.mlp.e{j}" for j in range(4)]
    for read in ("last", "mean"):
        f = collect_ids(lm, ids, units=[f"L{layer}.mlp", *experts], read=read, batch_size=4)
        total = sum(f.values[u] for u in experts)
        torch.testing.assert_close(total, f.values[f"L{layer}.mlp"], rtol=1e-4, atol=1e-6)
    picked: list[torch.Tensor] = []
    hook = an.router(layer).register_forward_hook(lambda m, a, out: picked.append(out[2]))
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([ids[0]]), use_cache=False)
    hook.remove()
    unused = next(j for j in range(4) if not (picked[0][-1] == j).any())
    last = collect_ids(lm, ids[:1], units=[experts[unused]], read="last").values[experts[unused]]
    assert torch.count_nonzero(last) == 0


def test_probe_reads_every_expert_and_refuses_other_parts_in_one_line(tmp_path):
    from layerwise.features import unit_list
    from layerwise.probe import Examples, probe
    from layerwise.report.probe import render

    lm = tiny_lm("olmoe")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in [3, 9, 5, 12, 4, 7, 6, 8]]
    result = probe(lm, Examples(labels=[0, 1] * 4, ids=ids), units="experts", folds=2, profile_samples=0)
    assert [r["unit"] for r in result.units] == [u for u in lm.anatomy.parts() if ".mlp.e" in u]
    assert {r["kind"] for r in result.units} == {"expert"} and "L2.mlp.e3" in render(result)
    with pytest.raises(LayerwiseError, match="L1.router is not read; read L1.mlp"):
        unit_list(lm.anatomy, ["L1.router"])
    with pytest.raises(LayerwiseError, match="units='experts' needs a model with experts; this llama has none"):
        unit_list(tiny_lm("llama").anatomy, "experts")
