"""Quantizing mixture-of-experts models: each sparse block's experts tensors (every expert's gate, up and down) are
weights of their own, one GGUF type for each of llama.cpp's merged ``*_exps`` tensors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from layerwise.errors import LayerwiseError
from layerwise.quant.measure import matrix, replaced

from .conftest import GGUF_MOE_ARCHS, gguf_tensors, moe_gguf, recipe_reproduces, same_checkpoint, tiny_lm
from .test_quant import _split_windows as _split


def _expert_by_hand(arch: str, experts, x, gate, up, down, j: int) -> torch.Tensor:
    """Expert ``j``'s output for tokens ``x`` from its (out, in) gate, up and down matrices, written out by hand."""
    if arch == "gpt_oss":  # biases, the gate and up biases interleaved; clamped, with a sigmoid gate
        bias = experts.gate_up_proj_bias[j]
        g, u = (x @ gate.T + bias[::2]).clamp(max=experts.limit), (x @ up.T + bias[1::2])
        hidden = (u.clamp(-experts.limit, experts.limit) + 1) * g * torch.sigmoid(g * experts.alpha)
        return hidden @ down.T + experts.down_proj_bias[j]
    return (experts.act_fn(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"])
def test_the_experts_weights_are_each_expert_s_gate_up_and_down(arch):
    """Matrices written through a sparse block's gate, up and down weights are the ones the model's own experts
    forward multiplies by (gpt-oss: (in, out) storage, the gate's and the up map's rows interleaved); the originals
    come back after."""
    lm = tiny_lm(arch)
    an = lm.anatomy
    layer = an.moe_layers[0]
    experts, n = an.experts(layer), an.n_experts(layer)
    (group,) = [ws for g, ws in an.quant_groups(layer) if g == f"L{layer}.mlp.experts"]
    assert [p.rsplit(".", 1)[-1] for p, _ in group] == ["gate", "up", "down"]
    before = {p: w.detach().clone() for p, w in experts.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    new = {w: torch.randn(w.shape, generator=gen) * 0.3 for _, w in group}
    x = torch.randn(5, lm.model.config.hidden_size, generator=gen)
    with torch.no_grad(), replaced(new):
        for j in range(n):
            got = experts(x, torch.full((5, 1), j), torch.ones(5, 1))
            gate, up, down = (new[w].reshape(n, -1, w.shape[1])[j] for _, w in group)
            torch.testing.assert_close(got, _expert_by_hand(arch, experts, x, gate, up, down, j))
    assert all(torch.equal(w, before[p]) for p, w in experts.named_parameters())


def test_groups_follow_what_each_engine_types_together():
    """Fused (integer formats), a layer's experts are one group, as vLLM's fused MoE kernels run them under one
    scheme; llama.cpp types each merged tensor alone, or gate and up as one with ``tie``; shared experts are a plain
    MLP; the router is never quantized. Each weight has llama.cpp's name."""
    an = tiny_lm("qwen2_moe").anatomy
    fused = {g: [p.split(".", 3)[-1] for p, _ in ws] for g, ws in an.quant_groups(1) if ".mlp" in g}
    assert fused == {
        "L1.mlp.experts": ["mlp.experts.gate", "mlp.experts.up", "mlp.experts.down"],
        "L1.mlp.shared.gate_up": ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"],
        "L1.mlp.shared.down": ["mlp.shared_expert.down_proj"],
    }
    tied = [g for g, _ in an.quant_groups(1, fused=("mlp.gate_up",)) if ".mlp" in g]
    assert tied == ["L1.mlp.experts.gate_up", "L1.mlp.experts.down", "L1.mlp.shared.gate_up", "L1.mlp.shared.down_proj"]
    names = [an.gguf_name(p) for _, ws in an.quant_groups(1, fused=False) for p, _ in ws]
    assert names[4:] == [
        f"blk.1.ffn_{k}.weight" for k in ("gate_exps", "up_exps", "down_exps", "gate_shexp", "up_shexp", "down_shexp")
    ]
    with pytest.raises(LayerwiseError, match=r"model\.layers\.1\.mlp\.gate is not a weight layerwise quantizes"):
        an.weight("model.layers.1.mlp.gate")


def test_what_cannot_be_quantized_yet_is_refused_in_one_line(tmp_path):
    """A compressed-tensors export of experts that transformers writes fused (gpt-oss): one line, before anything is
    measured."""
    from layerwise import quantize as qz
    from layerwise.quant import hf

    from .test_quant import _split_windows

    gpt_oss = tiny_lm("gpt_oss")
    with pytest.raises(LayerwiseError, match="transformers writes gpt_oss's experts fused.*give `export` none"):
        hf.check(gpt_oss, ())
    with pytest.raises(LayerwiseError, match="experts fused"):
        qz.run(gpt_oss, _split_windows(), bits=4.5, format="int", export=("hf",), out=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("q_rank", [8, None])
def test_latent_attention_is_quantized_as_vllm_runs_it(tmp_path, q_rank):
    """DeepSeek-V3's latent attention: the query's and the key-value latent's down-projections are one group, as vLLM
    runs them as one (``fused_qkv_a_proj``); the query's up-projection (its one projection where the config has no
    query rank), kv_b_proj and o_proj each a group; every matrix of the attention is in exactly one. The plan
    exported loads in plain transformers with layerwise's perplexity. llama.cpp splits kv_b_proj into two tensors
    it multiplies by other inputs, so its importance matrix is refused in one line."""
    from transformers import DeepseekV3ForCausalLM

    from layerwise import quantize as qz
    from layerwise.anatomy import Anatomy
    from layerwise.loading import LoadedModel
    from layerwise.quant import imatrix

    cfg = tiny_lm("deepseek_v3").model.config
    cfg.q_lora_rank = q_rank
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    lm = LoadedModel(model=model, tokenizer=None, anatomy=Anatomy(model), source={"ref": "tiny", "model_hash": "x"})
    an = lm.anatomy
    q = ["q_a_proj", "kv_a_proj_with_mqa"] if q_rank else ["kv_a_proj_with_mqa"]
    expected = {"qkv_a": q, "q_b" if q_rank else "q": ["q_b_proj" if q_rank else "q_proj"]}
    expected |= {"kv_b": ["kv_b_proj"], "o": ["o_proj"]}
    for layer in range(an.n_layers):
        attn = {g: ws for g, ws in an.quant_groups(layer) if ".attn." in g}
        assert {g.rsplit(".", 1)[1]: [p.rsplit(".", 1)[1] for p, _ in ws] for g, ws in attn.items()} == expected
        linear = {m for m in an.branch(layer, "attn").modules() if isinstance(m, torch.nn.Linear)}
        assert sorted(id(w.module) for ws in attn.values() for _, w in ws) == sorted(map(id, linear))
    rep = qz.run(
        lm, _split(), bits=5, strategy=["uniform"], format="int", symmetric=True, group_size=8,
        export=("hf",), out=tmp_path, eval_samples=3, progress=False,
    )  # fmt: skip
    assert rep.exports["hf"]["transformers_ppl"] == pytest.approx(rep.rows[0]["ppl"], rel=1e-3)
    with pytest.raises(LayerwiseError, match=r"^llama\.cpp splits deepseek_v3's self_attn\.kv_b_proj into attn_k_b"):
        imatrix.tensor_columns(lm)


def test_an_int_plan_of_a_moe_model_quantizes_every_expert_by_rows():
    """Round to nearest over a layer's experts tensor equals each expert's matrix quantized on its own, and the
    measured plan's weights are what the model then computes with."""
    from layerwise.quant.allocate import uniform
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import GroupCandidates, measure
    from layerwise.quant.rtn import QConfig, quantize_rtn

    from .test_quant import SMALL, _split_windows

    lm, w = tiny_lm("olmoe"), _split_windows()
    meas = measure(lm, w, candidates=SMALL, progress=False)
    assert {g for g in meas.groups if ".mlp" in g} == {f"L{i}.mlp.experts" for i in lm.anatomy.moe_layers}
    weights = plan_weights(lm, meas, uniform(meas, "a4g16"), GroupCandidates(SMALL))
    (down,) = [(w_, v) for w_, v in weights.items() if w_.attr == "down_proj" and w_.module is lm.anatomy.experts(1)]
    n = lm.anatomy.n_experts(1)
    per = [quantize_rtn(m, QConfig(4, 16)).dequantize() for m in matrix(down[0]).reshape(n, -1, down[0].shape[1])]
    torch.testing.assert_close(down[1], torch.cat(per))
    assert meas.groups["L1.mlp.experts"]["numel"] == sum(p.numel() for p in lm.anatomy.experts(1).parameters())


@pytest.mark.parametrize("arch", GGUF_MOE_ARCHS)
def test_a_gguf_plan_of_a_moe_model_runs_in_llama_cpp(arch, tmp_path):
    """A Qwen3-MoE, Qwen2-MoE or Mixtral GGUF file: every merged experts tensor (and each of Qwen2-MoE's shared expert's
    matrices) takes one type of the plan, the file holds those bytes (its recipe, run by llama.cpp's quantizer, writes
    the same file), and llama.cpp's perplexity of it is layerwise's of the plan."""
    import layerwise as lw
    from layerwise import quantize as qz

    from .test_quant import _split_windows

    _, path = moe_gguf(tmp_path / "moe.gguf", arch=arch, width=32)
    lm = lw.load(str(path))
    rep = qz.run(lm, _split_windows(6, 4), bits=4.8, out=tmp_path / "q", progress=False)
    (row,) = rep.rows
    stored = rep.exports["gguf"]["stored_types"]
    plan = json.loads((tmp_path / "q" / "plan.json").read_text())
    groups = next(iter(plan["plans"].values()))["groups"]
    kinds = ("gate", "up", "down")
    shared = arch == "qwen2_moe"
    assert {g for g in groups if ".mlp" in g} == {f"L{i}.mlp.experts.{k}" for i in (0, 1) for k in kinds} | {
        f"L{i}.mlp.shared.{k}_proj" for i in (0, 1) for k in kinds if shared
    }
    tensors = gguf_tensors(tmp_path / "q" / "model.gguf")
    for i in (0, 1):
        for k in ("gate", "up", "down"):
            name = f"blk.{i}.ffn_{k}_exps.weight"
            assert tensors[name].tensor_type.name == stored[name] and tensors[name].data.shape[0] == 4
            if shared:
                name = f"blk.{i}.ffn_{k}_shexp.weight"
                assert [tensors[name].tensor_type.name] == groups[f"L{i}.mlp.shared.{k}_proj"]["stored"]
    assert len(set(stored.values())) > 1  # a mixed plan
    assert row["bytes"] == sum(int(t.n_bytes) for t in tensors.values())
    assert abs(rep.exports["gguf"]["llama_cpp_ppl"] / row["ppl"] - 1) < 0.02, (row["ppl"], rep.exports["gguf"])
    assert recipe_reproduces(tmp_path / "q", tmp_path) == 14 + 6 * shared


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_the_q4km_baseline_types_a_moe_model_as_llama_cpp_does(arch, tmp_path):
    """llama.cpp's own Q4_K_M of an 8-expert model (attn_k and attn_v at Q8_0, attn_output at Q5_K, ffn_down_exps
    at Q6_K where it gives more bits; gpt-oss's MXFP4 experts requantized) and layerwise's q4km plan store every
    tensor at the same type."""
    import layerwise as lw
    from layerwise import quantize as qz
    from layerwise.quant.gguf import llama_quantize

    from .test_quant import _split_windows

    _, path = moe_gguf(tmp_path / "moe.gguf", arch=arch, hidden=256, width=256, experts=8, mxfp4=arch == "gpt_oss")
    theirs = gguf_tensors(llama_quantize(path, tmp_path / "q4km.gguf", "Q4_K", pure=False))
    lm = lw.load(str(path))
    rep = qz.run(
        lm, _split_windows(2, 1), strategy=("q4km",), imatrix="none", out=tmp_path / "q", progress=False, eval_samples=1
    )
    ours = rep.exports["gguf"]["stored_types"]
    assert {ours[n] for n in ("blk.0.attn_k.weight", "blk.1.attn_v.weight", "blk.0.attn_output.weight")} == {
        "Q8_0",
        "Q5_K",
    }
    assert ours["blk.1.ffn_down_exps.weight"] == "Q6_K" and ours["blk.0.ffn_down_exps.weight"] == "Q4_K"
    assert ours == {n: theirs[n].tensor_type.name for n in ours}


@pytest.mark.parametrize("arch", GGUF_MOE_ARCHS)
def test_a_moe_gguf_plan_from_disk_is_the_resident_one(arch, tmp_path):
    """quantize with the weights read one block at a time (experts measured and their plan applied while each block
    is read) chooses the resident run's plans, gives their figures, and writes the same file."""
    import layerwise as lw
    from layerwise import quantize as qz

    from .test_quant import _split_windows

    _, path = moe_gguf(tmp_path / "moe.gguf", arch=arch, width=32)
    w = _split_windows(4, 3)
    kw = dict(bits=4.8, strategy=["measured", "uniform"], imatrix="none", batch_size=2, progress=False)
    resident = qz.run(lw.load(str(path)), w, **kw)
    streamed = qz.run(lw.load(str(path), offload="disk", spill=tmp_path / "spill"), w, **kw)
    keys = ("bpw", "bytes", "ppl", "kl")
    for a, b in zip(resident.rows, streamed.rows, strict=True):
        assert a["plan"] == b["plan"]
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5), a["plan"]
    assert [{g: e["config"] for g, e in plans["groups"].items()} for plans in resident.plans.values()] == [
        {g: e["config"] for g, e in plans["groups"].items()} for plans in streamed.plans.values()
    ]


@pytest.mark.parametrize("tie", [False, True])
def test_a_plans_own_token_embedding_is_evaluated_from_disk_as_in_memory(tmp_path, tie):
    """``embedding`` with the weights read from disk: each plan's stream starts from the token embedding its file
    stores, and a head tied to it gives the logits through that embedding too; read whole or in slices of rows,
    the figures are the resident run's (and differ from a plan that keeps the source's embedding)."""
    import layerwise as lw
    from layerwise import quantize as qz

    _, path = moe_gguf(tmp_path / "moe.gguf", width=32, tie=tie)
    w = _split(4, 3)
    kw = dict(bits=4.8, strategy=["uniform"], imatrix="none", batch_size=2, progress=False)
    resident = qz.run(lw.load(str(path)), w, embedding="q4_0", **kw)
    kept = qz.run(lw.load(str(path)), w, **kw)
    keys = ("bpw", "bytes", "ppl", "kl")
    assert resident.rows[0]["kl"] != pytest.approx(kept.rows[0]["kl"], rel=1e-3)
    for rows in (None, 13):
        disk = lw.load(str(path), offload="disk")
        disk.streamed.rows = rows
        (got,) = qz.run(disk, w, embedding="q4_0", **kw).rows
        assert {k: got[k] for k in keys} == pytest.approx({k: resident.rows[0][k] for k in keys}, rel=1e-5), rows
        assert all(p.device.type == "meta" for p in disk.model.parameters())


def test_the_cli_quantizes_a_moe_folder_for_vllm(tmp_path):
    """``--format int`` plans, evaluates and exports a sparse model's experts: the checkpoint keeps each expert's
    matrices as modules, and plain transformers loads it."""
    from transformers import AutoModelForCausalLM

    from layerwise.cli import main

    from .conftest import tiny_folder

    folder = tiny_folder(tmp_path / "olmoe", "olmoe", layers=2)
    args = ["quantize", "--model", str(folder), "--format", "int", "--bits", "4.5", "--seq-len", "16"]
    args += ["--group-size", "16", "--samples", "4", "--eval-samples", "2", "--symmetric"]
    assert main([*args, "--out", str(tmp_path / "q")]) == 0
    groups = json.loads((tmp_path / "q" / "plan.json").read_text())
    assert "L1.mlp.experts" in next(iter(groups["plans"].values()))["groups"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in _checkpoint(tmp_path / "q" / "model")
    AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "model")


def _checkpoint(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _scheme(qc: dict, name: str) -> tuple[str, dict]:
    """The one config group whose targets match module ``name`` (compressed-tensors' own matching)."""
    from compressed_tensors.utils.match import match_name

    (found,) = [(g, e) for g, e in qc["config_groups"].items() if any(match_name(name, t) for t in e["targets"])]
    return found


def _decompressed(folder) -> dict[str, torch.Tensor]:
    """Every packed module of a compressed-tensors checkpoint decompressed under the config group its own name
    matches, as vLLM looks each module's scheme up (transformers uses one for all experts)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors, out = _checkpoint(folder), {}
    for key in tensors:
        if key.endswith(".weight_packed"):
            module = key.removesuffix(".weight_packed")
            scheme = QuantizationScheme.model_validate(_scheme(qc, module)[1])
            local = {k: tensors[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
            out[module] = BaseCompressor.get_value_from_registry(qc["format"]).decompress(local, scheme)["weight"]
    return out


def _plan_weights(lm, rep, folder, size: int) -> dict:
    """The exported plan's weights, made again by layerwise (by weight handle)."""
    from layerwise import quantize as qz
    from layerwise.quant.allocate import fixed
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import Measurement

    plan = next(iter(rep.plans.values()))
    meas = Measurement.load(folder / "measurement.json", {})
    alloc = fixed(meas, {g: e["config"] for g, e in plan["groups"].items()}, "measured")
    return plan_weights(lm, meas, alloc, qz.candidates_for(lm, "int", symmetric=True, sizes=(size,)))


@pytest.mark.parametrize(
    ("arch", "size"), [("qwen3_moe", 16), ("qwen2_moe", 8), ("mixtral", 16), ("olmoe", 16), ("deepseek_v3", 8)]
)
def test_the_hf_export_writes_each_expert_as_the_module_vllm_and_transformers_read(tmp_path, arch, size):
    """A layer's experts become one module per expert's gate, up and down map, under the checkpoint's own names
    (Mixtral's ``block_sparse_moe.experts.N.w1``), all under one config group that also matches the names vLLM's
    fused MoE looks the layer's scheme up by. Plain transformers loads the file with the plan's weights: every
    weight bit for bit but the experts, which its loader decompresses in float16, the scales' type."""
    from transformers import AutoModelForCausalLM

    from layerwise import quantize as qz

    lm = tiny_lm(arch)
    an = lm.anatomy
    rep = qz.run(
        lm, _split(), bits=5, strategy=["uniform"], format="int", symmetric=True, group_size=size,
        export=("hf",), out=tmp_path, eval_samples=3, progress=False,
    )  # fmt: skip
    weights, folder = _plan_weights(lm, rep, tmp_path, size), tmp_path / "model"
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        loaded(input_ids=_split().ids[:1])  # compressed-tensors decompresses on the first forward
    names = {m: n for n, m in lm.model.named_modules()}
    sparse = {an.experts(k) for k in an.moe_layers}
    for w, deq in weights.items():
        theirs = matrix(replace(w, module=loaded.get_submodule(names[w.module])))
        assert torch.equal(theirs, deq.half().float() if w.module in sparse else deq), names[w.module]
    assert rep.exports["hf"]["transformers_ppl"] == pytest.approx(rep.rows[0]["ppl"], rel=1e-3)
    tensors, qc = _checkpoint(folder), json.loads((folder / "config.json").read_text())["quantization_config"]
    assert rep.rows[0]["bytes"] == sum(t.nbytes for t in tensors.values())
    n, block = an.n_experts(an.moe_layers[0]), "block_sparse_moe" if arch == "mixtral" else "mlp"
    leaves = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for k in an.moe_layers:
        prefix = f"model.layers.{k}.{block}.experts"
        assert not [t for t in tensors if t.startswith(f"{prefix}.") and not t[len(prefix) + 1].isdigit()]
        modules = [f"{prefix}.{j}.{leaf}" for j in range(n) for leaf in leaves]
        assert all(f"{m}.weight_{s}" in tensors for m in modules for s in ("packed", "scale", "shape"))
        vllm = [f"{prefix}.0.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj")]
        (group,) = {_scheme(qc, m)[0] for m in modules + vllm}
        config = next(iter(rep.plans.values()))["groups"][f"L{k}.mlp.experts"]["config"]
        assert qc["config_groups"][group]["weights"]["num_bits"] == int(config[1])


def test_experts_a_checkpoint_stores_fused_are_exported_a_module_each_from_memory_as_from_disk(tmp_path):
    """A checkpoint storing a layer's experts fused, as transformers holds them (published files keep a module per
    expert): loaded in memory, which transformers would write back fused, the hf export still writes each expert's
    maps as modules of their own, the same checkpoint as the one written from disk."""
    from safetensors.torch import save_file

    import layerwise as lw
    from layerwise import quantize as qz

    lm, folder = tiny_lm("deepseek_v3"), tmp_path / "fused"
    lm.model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    kw = dict(bits=5, strategy=["uniform"], format="int", symmetric=True, group_size=8, export=("hf",))
    for offload in ("none", "disk"):
        qz.run(lw.load(str(folder), offload=offload), _split(), out=tmp_path / offload, progress=False, **kw)
    same_checkpoint(tmp_path / "none" / "model", tmp_path / "disk" / "model")
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in _checkpoint(tmp_path / "none" / "model")


def test_a_plan_whose_layers_differ_is_written_for_vllm_and_read_from_disk_alike(tmp_path):
    """Each layer's experts under their own scheme: every module, decompressed under the config group its name
    matches (as vLLM reads it), holds the plan's weights; transformers, which reads all experts under one scheme, is
    not run on it, and the report says why. Written block by block from disk, the checkpoint is the same."""
    import layerwise as lw
    from layerwise import quantize as qz

    lm, w = tiny_lm("qwen3_moe"), _split()
    kw = dict(bits=6, format="int", symmetric=True, group_size=16, eval_samples=3, progress=False)
    rep = qz.run(lm, w, export=("hf",), out=tmp_path / "r", **kw)
    plan = next(iter(rep.plans.values()))
    assert len({plan["groups"][f"L{k}.mlp.experts"]["config"] for k in lm.anatomy.moe_layers}) > 1
    assert "decompresses every layer's experts with one scheme" in rep.exports["hf"]["not_measured"]
    got = _decompressed(tmp_path / "r" / "model")
    names = {m: n for n, m in lm.model.named_modules()}
    for wt, deq in _plan_weights(lm, rep, tmp_path / "r", 16).items():
        if wt.module in {lm.anatomy.experts(k) for k in lm.anatomy.moe_layers}:
            path, n = names[wt.module], lm.anatomy.n_experts(1)
            leaf = {"gate_up_proj": ("gate_proj", "up_proj")[wt.rows.start != 0], "down_proj": "down_proj"}[wt.attr]
            theirs = torch.cat([got[f"{path}.{j}.{leaf}"] for j in range(n)])
        else:
            theirs = got[names[wt.module]]
        assert torch.equal(theirs.float(), deq.half().float()), names[wt.module]
    lm.model.save_pretrained(tmp_path / "m")
    disk = lw.load(str(tmp_path / "m"), offload="disk")
    key = next(iter(rep.plans))
    saved = qz.QuantPlan.from_json({**rep.meta, "model_hash": None}, key, plan)
    qz.export_plan(disk, saved, tmp_path / "d", ("hf",), w.evaluation, w)
    same_checkpoint(tmp_path / "r" / "model", tmp_path / "d" / "model")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_gptq_weighs_each_expert_by_its_own_inputs(arch):
    """The Hessian GPTQ quantizes an experts weight under is each expert's own: of the tokens the router sent it
    (gate and up) and of its hidden activation there (down), computed here by hand from what the experts module
    was given; an expert no token reached gets plain rounding."""
    from layerwise.quant.gptq import ExpertHessians
    from layerwise.quant.measure import GroupCandidates, InputHessians
    from layerwise.quant.rtn import QConfig, quantize_rtn

    lm, w = tiny_lm(arch), _split(4, 1)
    an = lm.anatomy
    layer = an.moe_layers[0]
    experts, n = an.experts(layer), an.n_experts(layer)
    (group,) = [ws for g, ws in an.quant_groups(layer) if g == f"L{layer}.mlp.experts"]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = experts.register_forward_pre_hook(lambda _m, args: seen.append((args[0].detach(), args[1].detach())))
    try:
        hess = InputHessians(lm, [group]).gather(torch.split(w.calibration, 2), stop_after=an.blocks[layer])
    finally:
        hook.remove()
    x = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in seen]).double()
    chosen = torch.cat([i.reshape(a.numel() // a.shape[-1], -1) for a, i in seen])
    gate, up, down = ({p.rsplit(".", 1)[1]: wt for p, wt in group}[k] for k in ("gate", "up", "down"))
    for j in range(n):
        xj = x[(chosen == j).any(1)]
        assert len(xj) > 0, j
        hidden = experts.act_fn(xj @ matrix(gate).reshape(n, -1, x.shape[1])[j].double().T) * (
            xj @ matrix(up).reshape(n, -1, x.shape[1])[j].double().T
        )
        for wt, inputs in ((gate, xj), (up, xj), (down, hidden)):
            torch.testing.assert_close(hess.value(wt)[j], 2 * inputs.T @ inputs / len(inputs))
    cands, cfg = GroupCandidates((QConfig(4, 16, True),), "gptq"), QConfig(4, 16, True)
    lone = ExpertHessians(2)
    lone.add(0, torch.randn(7, 32, dtype=torch.float64))
    rows = torch.randn(2 * 8, 32)
    got = cands.codes("", rows, cfg.name, lone.value)
    assert torch.equal(got.codes[8:], quantize_rtn(rows[8:], cfg).codes)
    assert not torch.equal(got.codes[:8], quantize_rtn(rows[:8], cfg).codes)


@pytest.mark.parametrize(("arch", "size"), [("qwen3_moe", 16), ("deepseek_v3", 8)])
def test_a_gptq_plan_of_a_moe_model_from_disk_is_the_resident_one_and_loads(tmp_path, arch, size):
    """GPTQ over a sparse model's experts (and DeepSeek-V3's latent attention), block by block from disk (each
    block's expert Hessians from the quantized stream) as in memory: the same plans and figures, the same
    compressed-tensors checkpoint (DeepSeek's routing correction bias, a buffer, in both), and plain transformers
    loads the plan's weights (the experts in float16, as its loader decompresses them)."""
    from transformers import AutoModelForCausalLM

    import layerwise as lw
    from layerwise import quantize as qz
    from layerwise.quant.allocate import fixed
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import Measurement

    from .conftest import tiny_windows

    lm, w = tiny_lm(arch), tiny_windows(8)
    w.n_calib = 4
    kw = dict(bits=5, strategy=["uniform"], format="int", method="gptq", symmetric=True, group_size=size)
    kw |= dict(eval_samples=4, batch_size=2, progress=False)
    resident = qz.run(lm, w, export=("hf",), out=tmp_path / "r", **kw)
    lm.model.save_pretrained(tmp_path / "m")
    streamed = qz.run(lw.load(str(tmp_path / "m"), offload="disk"), w, export=("hf",), out=tmp_path / "d", **kw)
    keys = ("bpw", "bytes", "ppl", "kl")
    (a,), (b,) = resident.rows, streamed.rows
    assert a["plan"] == b["plan"] and {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-5)
    same_checkpoint(tmp_path / "r" / "model", tmp_path / "d" / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model").eval()
    with torch.no_grad():
        loaded(input_ids=w.ids[:1])  # compressed-tensors decompresses on the first forward
    names = {m: n for n, m in lm.model.named_modules()}
    sparse = {lm.anatomy.experts(k) for k in lm.anatomy.moe_layers}
    plan = next(iter(resident.plans.values()))
    meas = Measurement.load(tmp_path / "r" / "measurement.json", {})
    alloc = fixed(meas, {g: e["config"] for g, e in plan["groups"].items()}, "uniform")
    cands = qz.candidates_for(lm, "int", method="gptq", symmetric=True, sizes=(size,))
    for wt, deq in plan_weights(lm, meas, alloc, cands, w, batch_size=2).items():
        theirs = matrix(replace(wt, module=loaded.get_submodule(names[wt.module])))
        assert torch.equal(theirs, deq.half().float() if wt.module in sparse else deq), names[wt.module]
