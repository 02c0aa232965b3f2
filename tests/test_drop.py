"""Dropping blocks and sublayers: exactness, saved checkpoints, orders and bad input, on tiny models."""

import contextlib

import pytest
import torch

from layerwise.drop import DropPlan, applied, choose, contiguous_scores, save_checkpoint, without_blocks
from layerwise.errors import LayerwiseError
from layerwise.loading import load
from layerwise.profile import profile
from layerwise.trace import skip

from .conftest import records_peak, tiny_lm, tiny_windows
from .test_trace import _manual_llama


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("units", [["L1"], ["L0", "L2.attn"], ["L1.mlp", "L2"], ["L0.attn", "L2.mlp"]])
def test_applied_plan_equals_hand_written_forward(units):
    lm = tiny_lm("llama")
    x = tiny_windows(2).ids
    with applied(lm, DropPlan(units, "any", "given")) as small:
        got = _logits(small, x)
        assert len(small.model.layers) == 3 - sum("." not in u for u in units)
    want = _manual_llama(lm.model, x, set(units))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(lm.model.model.layers) == 3 and lm.model.config.num_hidden_layers == 3  # restored


def _greedy_no_cache(model, x, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
    return x


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2", "gpt2"])
def test_saved_block_drop_reloads_in_plain_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_lm(arch, layers=4)
    x = tiny_windows(2).ids
    plan = DropPlan(["L1", "L2.attn"], "any", "given")
    with skip(lm.anatomy, plan.units):
        want = _logits(lm.model, x)
    save_checkpoint(lm, plan, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.config.num_hidden_layers == 3 and again.config.layerwise["dropped_sublayers"] == ["L1.attn"]
    if arch == "gemma3_text":
        assert again.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    # plain transformers computes the zeroed attention; the outputs are the same
    torch.testing.assert_close(_logits(again, x), want, atol=1e-5, rtol=1e-5)
    idx = [getattr(m, "layer_idx") for m in again.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1, 2]
    prompt = x[:1, :6]
    with torch.no_grad():
        cached = again.generate(input_ids=prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, _greedy_no_cache(again, prompt, 5))


def test_layerwise_load_skips_saved_sublayers(tmp_path):
    lm = tiny_lm("llama")
    x = tiny_windows(1).ids
    plan = DropPlan(["L0.mlp", "L2.attn"], "any", "given")
    with skip(lm.anatomy, plan.units):
        want = _logits(lm.model, x)
        prompt = x[:, :6]
        with torch.no_grad():
            skipped_gen = lm.model.generate(
                input_ids=prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
            )
    save_checkpoint(lm, plan, tmp_path / "m")
    again = load(str(tmp_path / "m"), device="cpu")
    assert again.source["skipped_sublayers"] == ["L0.mlp", "L2.attn"]
    assert "forward" in again.anatomy.branch(2, "attn").__dict__  # skipped, not computed
    torch.testing.assert_close(_logits(again.model, x), want, atol=1e-5, rtol=1e-5)
    # generation with a KV cache through skipped layers matches the no-cache loop
    assert torch.equal(skipped_gen, _greedy_no_cache(again.model, prompt, 5))


def test_without_blocks_restores_everything():
    lm = tiny_lm("gemma3_text", layers=4)
    before = (lm.model.config.layer_types[:], [lm.model.model.layers[i].self_attn.layer_idx for i in range(4)])
    with without_blocks(lm, [0, 2]) as small:
        assert small.config.layer_types == [before[0][1], before[0][3]]
        assert [b.self_attn.layer_idx for b in small.model.layers] == [0, 1]
    assert (lm.model.config.layer_types, [lm.model.model.layers[i].self_attn.layer_idx for i in range(4)]) == before


def test_orders():
    lm = tiny_lm("llama", layers=4)
    w = tiny_windows(3)
    prof = profile(lm, w, ablation="exact", progress=False)
    by_bi = choose(lm, w, n=2, unit="block", order="bi", prof=prof, progress=False)
    bi = {u.name: u.metrics["bi"] for u in prof.units if u.kind == "block"}
    assert by_bi.units == sorted(bi, key=bi.get)[:2]
    joint = prof.ranked("sub_cos", "any")
    assert {u for u, _ in joint} == {f"L{i}.{k}" for i in range(4) for k in ("attn", "mlp")}
    assert [v for _, v in joint] == sorted((v for _, v in joint), reverse=True)  # most redundant (highest cos) first
    r1 = choose(lm, w, n=3, unit="mlp", order="random", seed=7)
    assert r1.units == choose(lm, w, n=3, unit="mlp", order="random", seed=7).units and len(set(r1.units)) == 3
    # contiguous: the run whose input and output streams are most alike, against output_hidden_states
    with torch.no_grad():
        hs = lm.model(input_ids=w.calibration, output_hidden_states=True, use_cache=False).hidden_states
    scores = contiguous_scores(lm, w, 2)
    for i, s in enumerate(scores[:-1]):  # the last entry of hidden_states is after the final norm
        ref = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 2].double(), dim=-1).mean().item()
        assert s == pytest.approx(ref, abs=1e-5)
    run = choose(lm, w, n=2, unit="block", order="contiguous")
    start = max(range(len(scores)), key=scores.__getitem__)
    assert run.units == [f"L{start}", f"L{start + 1}"]


def test_iterative_remeasures_with_drops_applied():
    lm = tiny_lm("llama", layers=4)
    w = tiny_windows(2)
    plan = choose(lm, w, n=3, unit="any", order="ablate_nll", iterative=True, progress=False)
    assert len(set(plan.units)) == 3 and plan.iterative
    first = choose(lm, w, n=1, unit="any", order="ablate_nll", progress=False)
    assert plan.units[0] == first.units[0]
    # the second pick is the least important unit once the first is gone
    with skip(lm.anatomy, plan.units[:1]):
        again = profile(lm, w, ablation="exact", lens=False, progress=False)
    assert plan.units[1] == again.rank("ablate_nll", "any", exclude={plan.units[0]})[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=3, unit="block", order="bi"), "leaves no model"),
        (dict(n=7, unit="attn", order="random"), "more than the 3 attn"),
        (dict(n=0, unit="attn", order="random"), "at least 1"),
        (dict(n=1, unit="attn", order="bi"), "does not describe attn"),
        (dict(n=1, unit="mlp", order="contiguous"), "`unit` block"),
        (dict(n=1, unit="block", order="random", iterative=True), "does not apply"),
        (dict(n=1, unit="blocks", order="bi"), "unknown `unit`"),
        (dict(n=1, unit="block", order="nonsense"), "unknown `order`"),
        (dict(n=1, unit="block", order="zd"), "zd has no importance direction; write zd:asc"),
        (dict(n=1, unit="attn", order="attn_entropy"), "no importance direction"),
        (dict(n=1, unit="block", order="bi:up"), "unknown direction"),
    ],
)
def test_bad_choices(kwargs, match):
    lm = tiny_lm("llama")
    with pytest.raises(LayerwiseError, match=match):
        choose(lm, tiny_windows(1), progress=False, **kwargs)


def test_profile_from_another_model_is_refused():
    lm = tiny_lm("llama")
    prof = profile(lm, tiny_windows(1), ablation="none", progress=False)
    prof.meta["model_hash"] = "0" * 64
    with pytest.raises(LayerwiseError, match="another model"):
        choose(lm, tiny_windows(1), n=1, unit="block", order="bi", prof=prof)


def test_given_units_out_of_range():
    lm = tiny_lm("llama")
    with pytest.raises(LayerwiseError, match="out of range"):
        with applied(lm, DropPlan(["L9"], "any", "given")):
            pass


def test_run_measures_every_plan_and_writes_results(tmp_path):
    import json

    from layerwise import __version__
    from layerwise.drop import DropReport, run, sweep_plans
    from layerwise.report.drop import write_drop_report

    lm = tiny_lm("llama", layers=4)
    w = tiny_windows(6)
    w.n_calib = 2  # windows 2..5 are held out
    plans = sweep_plans(lm, w, sweep=[1, 2], unit=["attn", "block"], order=["ablate_nll", "random"], progress=False)
    assert [len(p.units) for p in plans] == [1, 2] * 4
    assert plans[1].units[:1] == plans[0].units  # nested rankings
    report = run(lm, w, plans=plans, out=tmp_path / "r", eval_samples=3, with_speed=True, seed=5, progress=False)
    # saving writes JSON only; the page is the report module's
    assert len(report.variants) == 8 and sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "eval.json",
        "plan.json",
    ]
    meta = json.loads((tmp_path / "r" / "eval.json").read_text())["meta"]
    assert (meta["seed"], meta["batch_size"], meta["versions"]["layerwise"]) == (5, 4, __version__) and meta["command"]
    assert records_peak(meta)
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["meta"] == meta
    write_drop_report(DropReport.load(tmp_path / "r"), tmp_path / "r" / "report.html")
    again = DropReport.load(tmp_path / "r")
    assert again.variants[3]["units"] == plans[3].units
    # perplexity and KL of one plan, computed independently on the same held-out windows
    v = report.variants[3]
    x = w.evaluation[:3]
    with torch.no_grad():
        full = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1], -1)
        with skip(lm.anatomy, v["units"]):
            part = torch.log_softmax(lm.model(input_ids=x, use_cache=False).logits[:, :-1], -1)
    nll = -part.gather(-1, x[:, 1:, None]).squeeze(-1).mean(1)
    assert v["ppl"] == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-4)
    assert v["kl"] == pytest.approx((full.exp() * (full - part)).sum(-1).mean().item(), abs=1e-5)
    assert report.original["ppl"] == pytest.approx(torch.exp(-full.gather(-1, x[:, 1:, None]).mean()).item(), rel=1e-4)
    assert v["params"] < report.original["params"] and v["prefill_tok_s"] > 0 and v["generate_tok_s"] > 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<img" in html and "block/random/2" in html


def test_run_exports_and_refuses_bad_exports(tmp_path):
    from layerwise.drop import run

    lm = tiny_lm("llama")
    w = tiny_windows(3)
    w.n_calib = 1
    plan = DropPlan(["L1"], "block", "given")
    report = run(
        lm, w, plans=[plan], out=tmp_path / "r", export=("hf",), eval_samples=2, with_speed=False, progress=False
    )
    assert report.exports["hf"]["bytes"] > 0 and (tmp_path / "r" / "model" / "config.json").exists()
    with pytest.raises(LayerwiseError, match="convert_hf_to_gguf"):
        run(lm, w, plans=[plan], out=tmp_path / "g", export=("gguf",), eval_samples=2, with_speed=False, progress=False)
    with pytest.raises(LayerwiseError, match="unknown `export`"):
        run(lm, w, plans=[plan], export=("onnx",), with_speed=False, progress=False)
    with pytest.raises(LayerwiseError, match="one plan, not a sweep"):
        run(lm, w, plans=[plan, plan], export=("hf",), with_speed=False, progress=False)
    assert not (tmp_path / "g").exists()


def test_quality_pairs_two_variants_window_by_window():
    """Each variant's per-window NLL differences average to its delta_nll, and the paired difference of two variants
    equals the one computed by hand from plain forwards (mean and standard error over windows)."""
    import math

    import torch.nn.functional as F

    from layerwise.evaluate import next_token_logits, paired_difference, quality

    lm, ids = tiny_lm("llama"), tiny_windows(6).ids
    units = {"a": ["L0"], "b": ["L1.attn", "L2.mlp"]}
    runs = {k: next_token_logits(lm.model, lambda u=u: skip(lm.anatomy, u)) for k, u in units.items()}
    q = quality(next_token_logits(lm.model), runs, ids, batch_size=4)

    def window_nll(variant):
        with variant:
            logits = _logits(lm.model, ids)[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2).double(), ids[:, 1:], reduction="none").mean(dim=1)

    ref = window_nll(contextlib.nullcontext())
    by_hand = {k: window_nll(skip(lm.anatomy, u)) - ref for k, u in units.items()}
    for k in units:
        assert q[k]["window_delta_nll"] == pytest.approx(by_hand[k].tolist(), abs=1e-6)  # float32 logits
        assert q[k]["delta_nll"] == pytest.approx(sum(q[k]["window_delta_nll"]) / 6, abs=1e-12)
    d = torch.tensor(q["a"]["window_delta_nll"]) - torch.tensor(q["b"]["window_delta_nll"])
    assert d.abs().min() > 1e-4  # the variants differ well beyond float32 noise
    mean, se = paired_difference(q["a"]["window_delta_nll"], q["b"]["window_delta_nll"])
    assert mean == pytest.approx(float(d.mean()), abs=1e-9) and se == pytest.approx(
        float(d.std()) / math.sqrt(6), rel=1e-6
    )
    with pytest.raises(LayerwiseError, match="same windows"):
        paired_difference(q["a"]["window_delta_nll"], q["b"]["window_delta_nll"][:-1])


def test_a_block_drop_from_a_gemma3_gguf_file_names_the_blocks_that_slide(tmp_path, monkeypatch):
    """llama.cpp slides five of every six Gemma 3 blocks by their index in the file; a copy without block 1 names
    its blocks' windows as the source slid them (the full block 5 stays full as the copy's block 4), and layerwise
    reads the copy back as the dropped model. A copy with no sliding block, which llama.cpp's graph asserts against,
    is refused in one line."""
    import string

    import gguf
    import transformers as tf

    from layerwise import ggufio
    from layerwise.drop import export_gguf

    from .conftest import write_gguf

    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    cfg = tf.Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4,
    )  # fmt: skip
    torch.manual_seed(0)
    path = write_gguf(
        tf.Gemma3ForCausalLM(cfg).eval(), tmp_path / "g.gguf", ["<unk>", "<s>", "</s>", *string.printable[:94]]
    )
    lm, x = load(str(path)), tiny_windows(2).ids
    assert lm.model.config.layer_types[4:] == ["sliding_attention", "full_attention", "sliding_attention"]
    plan = DropPlan(["L1"], "block", "given")
    with skip(lm.anatomy, plan.units):
        want = _logits(lm.model, x)
    out = export_gguf(path, plan, tmp_path / "d.gguf")
    key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch="gemma3")
    assert ggufio.reader(out).get_field(key).contents() == [True] * 4 + [False, True]
    again = load(str(out))
    assert again.model.config.layer_types[4] == "full_attention"
    torch.testing.assert_close(_logits(again.model, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(LayerwiseError, match=r"^llama.cpp runs a gemma3 GGUF file only with a sliding-window block"):
        export_gguf(path, DropPlan(["L0", "L1", "L2", "L3", "L4", "L6"], "block", "given"), tmp_path / "never.gguf")
    assert not list(tmp_path.glob("*never*"))
