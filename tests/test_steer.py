"""Steering on tiny models: where the vector lands, hooks, KV cache, fitting rules, files and bad input."""

import math

import pytest
import torch

from layerwise.errors import LayerwiseError
from layerwise.features import Features, collect_ids
from layerwise.steer import SteeringVector, export_gguf, fit_features, parse_layers, read_gguf, split
from layerwise.trace import BlockTrace, run_blocks, tap

from .conftest import records_peak, tiny_lm, tiny_windows


def _vector(lm, unit="L1", seed=0, alpha=0.5):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(32, generator=g)
    return SteeringVector(
        {unit: d / d.norm()},
        {unit: 3.0},
        alpha=alpha,
        model={"model_hash": "tiny", "n_layers": lm.anatomy.n_layers, "hidden_size": 32},
    )


def _ids(n=10, seed=3):
    return torch.randint(1, 97, (2, n), generator=torch.Generator().manual_seed(seed))


def test_apply_adds_the_vector_at_the_block_output(arch):
    """Steered logits equal a hand-written forward: block k's output plus alpha * scale * direction, then the later
    blocks."""
    lm = tiny_lm(arch)
    x = _ids()
    vec = _vector(lm, "L1")
    calls, outs = [], []

    def keep(tr: BlockTrace) -> None:
        calls.append((tr.args, tr.kwargs))
        outs.append(tr.h_out)

    with torch.no_grad(), tap(lm.anatomy, keep, mlp_hidden=False):
        plain = lm.model(input_ids=x, use_cache=False).logits
    h = outs[1] + 0.5 * 3.0 * vec.directions["L1"]
    by_hand = lm.anatomy.logits(run_blocks(lm.anatomy, 2, h, calls))
    with torch.no_grad(), vec.apply(lm):
        steered = lm.model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(steered, by_hand, rtol=1e-4, atol=1e-4)
    assert (steered - plain).abs().max() > 1e-2  # the vector does move the logits
    with torch.no_grad(), vec.apply(lm, alpha=0.0):
        torch.testing.assert_close(lm.model(input_ids=x, use_cache=False).logits, plain)


def test_generate_with_kv_cache_steers_prompt_and_new_tokens(arch):
    """Greedy generation with a KV cache equals generation that recomputes every position, both steered."""
    lm = tiny_lm(arch)
    x = _ids(6)
    vec = _vector(lm, "L0", alpha=2.0)
    with torch.no_grad(), vec.apply(lm):
        cached = lm.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        fresh = lm.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=6,
            do_sample=False,
            use_cache=False,
            pad_token_id=0,
        )
    with torch.no_grad():
        plain = lm.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    assert torch.equal(cached, fresh)
    assert not torch.equal(cached, plain)


def test_from_token_leaves_earlier_positions_alone():
    lm = tiny_lm("llama")
    x = _ids(10)
    vec = _vector(lm, "L1")
    with torch.no_grad():
        plain = lm.model(input_ids=x).logits
        with vec.apply(lm, from_token=4):
            late = lm.model(input_ids=x).logits
        with vec.apply(lm):
            every = lm.model(input_ids=x).logits
    torch.testing.assert_close(late[:, :4], plain[:, :4])
    assert (late[:, 4:] - plain[:, 4:]).abs().amax(-1).min() > 1e-3
    assert not torch.allclose(every[:, :4], plain[:, :4])


def test_hooks_removed_even_on_error_and_model_unchanged():
    lm = tiny_lm("qwen2")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with _vector(lm).apply(lm):
            assert any(m._forward_hooks for m in lm.model.modules())
            raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def _features(diffs: torch.Tensor, base: torch.Tensor) -> Features:
    n = diffs.shape[0]
    pos, neg = base + diffs / 2, base - diffs / 2
    return Features(
        units=["L0"], values={"L0": torch.cat([pos, neg])}, read="last", n_tokens=torch.ones(2 * n, dtype=torch.long)
    )


def test_pca_is_not_centred_and_points_to_the_positives():
    """Paired differences that share one shift u (plus noise along v) give u: a centred PCA would return the noise axis
    v."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.eye(32)[0], torch.eye(32)[1]
    diffs = 2.0 * u + torch.randn(40, 1, generator=g) * 0.5 * v
    base = torch.randn(40, 32, generator=g)
    f = fit_features(_features(diffs, base), 40, method="pca")
    assert float(f.directions["L0"] @ u) > 0.99  # sign toward the positives
    centred = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False).Vh[0]
    assert abs(float(centred @ u)) < 0.1
    dm = fit_features(_features(diffs, base), 40, method="diffmean")
    assert float(dm.directions["L0"] @ u) > 0.99
    assert dm.separation["L0"]["pair_acc"] == 1.0 and dm.gaps["L0"] == pytest.approx(
        float(diffs.mean(0).norm()), rel=1e-5
    )
    assert f.scales["L0"] == pytest.approx(
        float(torch.cat([base + diffs / 2, base - diffs / 2]).norm(dim=1).mean()), rel=1e-6
    )


def test_split_is_seeded_disjoint_and_complete():
    a, b = split(9, 0)
    assert (a, b) == split(9, 0) and len(a) == 5 and len(b) == 4
    assert sorted(a + b) == list(range(9)) and split(9, 1) != (a, b)


def test_layer_specs():
    assert parse_layers("auto", 4) is None
    assert parse_layers("L1,L3", 4) == [("L1",), ("L3",)]
    assert parse_layers("L1-L3", 4) == [("L1", "L2", "L3")]
    for bad, msg in (
        ("L4", "does not exist"),
        ("L2-L1", "increasing"),
        ("L1.attn", "block"),
        ("x", "block name"),
        (",", "names no block"),
    ):
        with pytest.raises(LayerwiseError, match=msg):
            parse_layers(bad, 4)


def test_save_load_gguf_and_model_check(tmp_path):
    import gguf

    lm = tiny_lm("llama")
    vec = _vector(lm, "L2")
    vec.meta = {"seed": 0}
    vec.save(tmp_path / "v")
    back = SteeringVector.load(tmp_path / "v", lm)
    assert (
        torch.equal(back.directions["L2"], vec.directions["L2"])
        and back.scales == vec.scales
        and back.meta == {"seed": 0}
    )
    path = export_gguf(back, lm, tmp_path / "cv.gguf", alpha=2.0)
    r = gguf.GGUFReader(str(path))
    assert bytes(r.get_field("general.architecture").parts[-1]).decode() == "controlvector"
    assert bytes(r.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(r.get_field("controlvector.layer_count").parts[-1][0]) == 2
    assert [t.name for t in r.tensors] == ["direction.2"]
    n_embd, data = read_gguf(path, 3)
    assert n_embd == 32 and data[:32].tolist() == [0.0] * 32
    torch.testing.assert_close(torch.from_numpy(data[32:].copy()), 2.0 * 3.0 * vec.directions["L2"])
    with pytest.raises(LayerwiseError, match="L0"):
        export_gguf(_vector(lm, "L0"), lm, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    other = tiny_lm("llama")
    other.source["model_hash"] = "another"
    with pytest.raises(LayerwiseError, match="another model"):
        SteeringVector.load(tmp_path / "v", other)
    with pytest.raises(LayerwiseError, match="3 blocks of width 32, this one has 4"):
        SteeringVector.load(tmp_path / "v", tiny_lm("llama", layers=4))


def test_bad_input_is_one_clear_error(tmp_path):
    from layerwise.steer import read_pairs

    lm = tiny_lm("llama")
    for alpha in (math.nan, math.inf):
        with pytest.raises(LayerwiseError, match="finite"):
            with _vector(lm).apply(lm, alpha=alpha):
                pass
    (tmp_path / "p.txt").write_text("good\nfine\n")
    (tmp_path / "n.txt").write_text("bad\n")
    with pytest.raises(LayerwiseError, match="same count"):
        read_pairs(pos=str(tmp_path / "p.txt"), neg=str(tmp_path / "n.txt"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(LayerwiseError, match="at least 2"):
        read_pairs(pos=str(tmp_path / "e.txt"), neg=str(tmp_path / "e.txt"))
    with pytest.raises(LayerwiseError, match="positive"):
        (tmp_path / "x.jsonl").write_text('{"positive": "a"}\n')
        read_pairs(data=str(tmp_path / "x.jsonl"))
    feats = collect_ids(lm, [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10, 11]])
    feats.values["L1"][0, 0] = float("nan")
    with pytest.raises(LayerwiseError, match="non-finite"):
        fit_features(feats, 2)
    with pytest.raises(LayerwiseError, match="method"):
        fit_features(feats, 2, method="lda")


def test_probe_method_reads_a_saved_probe(tmp_path):
    """--method probe takes each block's weight from a saved `layerwise probe` result, turned toward the positives."""
    probe = pytest.importorskip("layerwise.probe", reason="layerwise probe (issue 15) is merged separately")
    from layerwise.steer.fitting import _probe_directions

    lm = tiny_lm("llama")
    g = torch.Generator().manual_seed(
        5
    )  # the last token tells positive from negative, so every block reads the concept
    pos = [torch.randint(1, 97, (5,), generator=g).tolist() + [7] for _ in range(12)]
    neg = [torch.randint(1, 97, (5,), generator=g).tolist() + [90] for _ in range(12)]
    res = probe.probe(lm, probe.Examples(labels=[1] * 12 + [0] * 12, ids=pos + neg), folds=2)
    assert res.best_unit() is not None
    res.save(tmp_path / "p")
    dirs = _probe_directions(str(tmp_path / "p"), lm, ["L0", "L1", "L2"])
    f = fit_features(collect_ids(lm, pos + neg), 12, method="probe", given={u: -d for u, d in dirs.items()})
    for u, d in dirs.items():
        assert abs(float(f.directions[u] @ d)) == pytest.approx(1.0, abs=1e-5)
        assert f.gaps[u] > 0  # pointed at the positives whatever sign the probe gave


def _char_lm():
    """A tiny llama with a character-level tokenizer (ids < 97), so the whole steer action can run on it."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<s>", "<unk>", *dict.fromkeys(string.ascii_letters + string.digits + " .,:'-")]
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token="<unk>"))
    lm = tiny_lm("llama")
    lm.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")
    return lm


def test_report_prompts_are_fresh_seeded_and_disjoint():
    """The report set follows its documented rule: distinct gazetteer cities drawn by random.Random(seed), templates in
    turn."""
    import random

    from layerwise.corpora.cities import gazetteer
    from layerwise.corpora.sentiment import PROMPTS, REPORT_TEMPLATES, report_prompts

    got = report_prompts(seed=0)
    cities = random.Random(0).sample([c for c, _ in gazetteer()], 40)
    assert got == [REPORT_TEMPLATES[i % len(REPORT_TEMPLATES)].format(c) for i, c in enumerate(cities)]
    assert (
        len(set(got)) == 40 and not set(got) & set(PROMPTS) and report_prompts(seed=0) == got != report_prompts(seed=1)
    )
    with pytest.raises(LayerwiseError, match="ask for 1 to that many"):
        report_prompts(0)


def test_run_reports_on_the_report_prompts_and_sweeps_the_dose_layers(tmp_path):
    """Calibration half chooses alpha, development half is unused, effects are on the report prompts; every layer at
    the chosen alpha, the alphas swept at the chosen layer and sweep_layers only. All of it recorded in steer.json."""
    from layerwise.steer import run

    lm = _char_lm()
    pairs = [(f"it was good {i}", f"it was bad {i}") for i in range(6)]
    prompts = [f"prompt {c}" for c in "abcdef"]
    report = run(
        lm,
        pairs,
        prompts,
        tiny_windows(2, 8).ids,
        report_prompts=["fresh one", "fresh two", "fresh three"],
        layers="L0,L1,L2",
        sweep_alpha=[0.5, 1.0],
        sweep_layers="L1",
        new_tokens=2,
        out=tmp_path / "s",
    )
    sets = report.choice["prompts"]
    cal, dev = split(6, 1)
    assert sets["calibration"] == [prompts[i] for i in cal] and sets["development"] == [prompts[i] for i in dev]
    assert sets["report"] == report.prompts == ["fresh one", "fresh two", "fresh three"]
    a, best = report.choice["alpha"]["alpha"], report.choice["chosen"][0]
    want = {f"L{k}@{a:g}" for k in range(3)} | {f"{u}@{s:g}" for u in {best, "L1"} for s in (0.5, 1.0)}
    assert {r["key"] for r in report.rows} == want and len(report.rows) == len(want)
    doc = SteeringVector.load(tmp_path / "s")
    assert doc.units == [best]
    import json

    saved = json.loads((tmp_path / "s" / "steer.json").read_text())
    assert saved["choice"]["prompts"]["report"] == report.prompts and saved["choice"]["split"]["n_prompts_report"] == 3
    assert records_peak(saved["meta"])
    from layerwise.report.steer import dose_figure, render

    labels = dose_figure(report).axes[0].get_legend_handles_labels()[1]
    swept = sorted({best, "L1"}, key=lambda u: int(u[1:]))
    assert sorted(labels) == sorted(["other layers, one alpha", *swept, "chosen"]), labels
    assert "3 report prompts" in render(
        report
    ) and "3 other prompts calibrated alpha, 3 development prompts were not used" in render(report)
    plain = run(lm, pairs, prompts, tiny_windows(2, 8).ids, layers="L1", alpha=0.5, new_tokens=2)
    assert plain.prompts == [prompts[i] for i in dev] and plain.choice["prompts"]["development"] == []


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_margins_match_scoring_whole_sequences(arch):
    """The shared-prefix shortcut (one cached run per prompt and shared part) equals scoring each full sequence alone,
    steered too."""
    from layerwise.steer import margins

    lm = tiny_lm(arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 6, 4)]
    conts = [([5, 6, 7, 8], [5, 6, 9]), ([11], [12, 13]), ([20, 21], [22, 21])]

    def whole(p: list[int], c: list[int]) -> float:
        lp = torch.log_softmax(lm.model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0].double(), -1)
        return float(sum(lp[len(p) - 1 + i, t] for i, t in enumerate(c)))

    for vec in (None, _vector(lm, "L1")):
        with torch.no_grad(), vec.apply(lm) if vec else torch.no_grad():
            want = torch.tensor(
                [sum(whole(p, a) - whole(p, b) for a, b in conts) / len(conts) for p in prompts], dtype=torch.float64
            )
            got = margins(lm, prompts, conts, batch_size=4)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
