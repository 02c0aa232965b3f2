"""Probes on tiny models: a planted feature is found at its layer, controls sit at chance, folds split by example, bad
input."""

import json
import re
from contextlib import contextmanager
from html import escape

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from layerwise.cli import main
from layerwise.errors import LayerwiseError
from layerwise.probe import Examples, ProbeResult, best_unit, fit, probe, read_examples, split

from .conftest import one_error_line, records_peak, tiny_lm


def _ids(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (8,), generator=g).tolist() for _ in range(n)]


@contextmanager
def planted(lm, block: int, n_classes: int, scale: float = 30.0):
    """Add one of ``n_classes`` fixed vectors to block ``block``'s output, chosen by (sum of token ids) mod n_classes.

    That label is no linear function of any token (a sum's residue), so blocks before ``block`` cannot read it.
    """
    vecs = torch.randn(n_classes, lm.anatomy.embed.weight.shape[1], generator=torch.Generator().manual_seed(7)) * scale
    seen: dict[str, torch.Tensor] = {}

    def pre(_m, _args, kwargs):
        seen["label"] = kwargs["input_ids"].sum(1) % n_classes

    def post(_m, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + vecs[seen["label"]][:, None, :]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [
        lm.model.register_forward_pre_hook(pre, with_kwargs=True),
        lm.anatomy.blocks[block].register_forward_hook(post),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _labels(ids, n_classes):
    return [int(sum(s) % n_classes) for s in ids]


@pytest.mark.parametrize("block,n_classes", [(1, 2), (2, 2), (2, 3)])
def test_planted_feature_is_found_at_its_layer(block, n_classes):
    """Accuracy jumps exactly at the planted block's output L{block}; L{block-1} (one off) stays at chance."""
    lm = tiny_lm("llama", layers=4)
    ids = _ids(240)
    ex = Examples(labels=_labels(ids, n_classes), ids=ids)
    with planted(lm, block, n_classes):
        res = probe(lm, ex, folds=4, seed=0)
    acc = {r["unit"]: r["accuracy"] for r in res.units}
    assert res.best_unit() == f"L{block}"
    assert acc[f"L{block}"] > 0.95
    chance = 1 / n_classes
    for k in range(block):
        assert abs(acc[f"L{k}"] - chance) < 0.15, (k, acc)
    for r in res.units:  # the control never learns anything, planted or not
        assert abs(r["control"] - chance) < 0.15, r
    assert res.classes == list(range(n_classes))
    d = res.direction(f"L{block}", cls=1)
    assert d.dtype == torch.float32 and d.shape == (32,)


def test_shuffled_labels_give_chance():
    """Labels unrelated to the input: probe, difference of means and control all sit at chance."""
    lm = tiny_lm("qwen2", layers=2)
    ids = _ids(200, seed=3)
    labels = np.random.default_rng(5).permutation([0] * 100 + [1] * 100).tolist()
    res = probe(lm, Examples(labels=labels, ids=ids), folds=5, seed=1)
    for r in res.units:
        for key in ("accuracy", "diffmean_accuracy", "control"):
            assert abs(r[key] - 0.5) < 0.12, (key, r)
        assert abs(r["auc"] - 0.5) < 0.12


def test_folds_split_examples_never_tokens():
    """Every example is tested in exactly one fold, classes stratified; mean reads keep one row per example."""
    y = np.array([0] * 13 + [1] * 17 + [2] * 9)
    fold = split(y, 3, seed=4)
    assert sorted(set(fold.tolist())) == [0, 1, 2]
    for k in range(3):
        counts = np.bincount(y[fold == k], minlength=3)
        assert (np.abs(counts - np.bincount(y) / 3) <= 1).all()
    lm = tiny_lm("llama", layers=2)
    ids = [s[: 3 + i % 5] for i, s in enumerate(_ids(30))]
    res = probe(lm, Examples(labels=[i % 2 for i in range(30)], ids=ids), read="mean", folds=3)
    assert len(res.folds) == 30 and sorted(np.bincount(res.folds).tolist()) == [10, 10, 10]
    assert all(len(r["accuracy_folds"]) == 3 for r in res.units)


def test_fit_direction_is_in_the_stream_basis():
    """The fitted weight (standardization folded back) scores raw stream vectors exactly as the sklearn pipeline
    does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g) * torch.tensor([1.0, 50.0, 0.1, 3.0, 1.0, 7.0]) + 4.0
    labels = ["no" if v < 0 else "yes" for v in ((x[:, 1] - 4) / 50 + (x[:, 2] - 4) / 0.1).tolist()]
    p = fit(x, labels)
    logits = x @ p.direction() + p.bias[0]
    assert ((logits > 0) == torch.tensor([v == "yes" for v in labels])).float().mean() > 0.95
    torch.testing.assert_close(p.direction("no"), -p.direction("yes"))
    with pytest.raises(LayerwiseError, match="not one of"):
        p.direction("maybe")


def _rows(selectivity: list[float], se: float = 0.02) -> list[dict]:
    """Unit rows whose accuracy is chance (0.5) plus their selectivity, as when the control sits at chance."""
    return [
        {"unit": f"L{k}", "layer": k, "kind": "block", "selectivity": v, "selectivity_se": se, "accuracy": 0.5 + v}
        for k, v in enumerate(selectivity)
    ]


def test_best_unit_rule_prefers_shallower_within_one_se():
    rows = _rows([0.0, 0.3, 0.39, 0.40, 0.2])
    assert best_unit(rows, 1000, 0.5)["unit"] == "L2"
    rows[2]["selectivity"] = 0.37
    assert best_unit(rows, 1000, 0.5)["unit"] == "L3"


def test_best_unit_must_clear_both_margins():
    """Only units whose selectivity clears zero by two SE and whose accuracy beats chance by the binomial margin
    (Bonferroni over the units) compete; when none does, no unit is named and why says so."""
    from math import sqrt
    from statistics import NormalDist

    rows = _rows([0.0, 0.3, 0.39, 0.6, 0.2])
    rows[3]["selectivity_se"] = 0.35  # the highest, but within noise (0.6 - 2 x 0.35 < 0): the rule runs on L1, L2, L4
    best = best_unit(rows, 1000, 0.5)
    assert best["unit"] == "L2" and best["highest"] == "L3" and "the highest is L2's 0.390 ± 0.020" in best["why"]
    assert best["accuracy_threshold"] == pytest.approx(0.5 + NormalDist().inv_cdf(1 - 0.05 / 5) * sqrt(0.25 / 1000))
    noise = _rows(
        [0.052, -0.01, 0.06, 0.0, 0.03], se=0.035
    )  # the case: the best is 0.052 ± 0.035, within noise
    best = best_unit(noise, 200, 0.5)
    assert best["unit"] is None and best["highest"] == "L2"
    assert best["why"].startswith(
        "no unit clears both margins (selectivity more than 2 SE above zero, accuracy above 0.582: chance 0.500"
    )
    assert "the highest selectivity is L2's 0.060 ± 0.035, the highest accuracy L2's 0.560" in best["why"]
    noise[1] |= {
        "selectivity": 0.09,
        "selectivity_se": 0.03,
        "accuracy": 0.53,
    }  # clears 2 SE only because its control fell below chance
    assert best_unit(noise, 200, 0.5)["unit"] is None
    noise[1]["accuracy"] = 0.6
    assert best_unit(noise, 200, 0.5)["unit"] == "L1"


def _no_signal(n: int = 60) -> Examples:
    """Random token ids and seeded random labels: nothing in the input predicts the label."""
    labels = np.random.default_rng(11).permutation([0, 1] * (n // 2)).tolist()
    return Examples(labels=labels, ids=_ids(n, seed=4))


def test_no_signal_names_no_unit_and_says_so(tmp_path, capsys):
    """Labels with no signal: best is null with the reason, in probe.json, on the page, in the CLI summary; old files
    still load."""
    from layerwise.cli import _probe_summary
    from layerwise.report.probe import render

    lm = tiny_lm("llama", layers=3)
    res = probe(lm, _no_signal(), folds=5, seed=0)
    assert res.best_unit() is None and res.best["why"].startswith(
        "no unit clears both margins (selectivity more than 2 SE above zero"
    )
    res.save(tmp_path)
    saved = json.loads((tmp_path / "probe.json").read_text())["best"]
    assert saved["unit"] is None and saved["why"] == res.best["why"]
    back = ProbeResult.load(tmp_path)
    assert back.best_unit() is None
    page = render(back)
    top = page[: page.index("<img")]
    assert "No best unit: no unit is shown to read the concept linearly" in top and "Best unit:" not in page
    assert f"Highest selectivity at <code>{res.best['highest']}</code>" in top and "refuses this probe" in top
    _probe_summary(back)
    out = capsys.readouterr().out
    assert "no unit is shown to read the concept" in out and res.best["why"] in out
    old = {
        **back.best,
        "unit": res.best["highest"],
        "rule": "the shallowest unit whose selectivity is within one SE of the highest",
    }
    (tmp_path / "probe.json").write_text(json.dumps({**back.to_dict(), "best": old}))  # a file from before the margin
    assert ProbeResult.load(tmp_path).best_unit() == res.best["highest"]
    assert f"Best unit: <code>{res.best['highest']}</code>" in render(ProbeResult.load(tmp_path))


def test_steer_refuses_a_probe_that_names_no_unit(tmp_path, capsys):
    """steer --method probe on such a probe: one line naming the fix, exit 2, before any model loads; the API refuses it
    too."""
    from layerwise.steer import fit

    lm = tiny_lm("llama", layers=3)
    probe(lm, _no_signal(), folds=5, seed=0).save(tmp_path / "p")
    pos, neg, prompts = (
        _write(tmp_path / f"{n}.txt", "\n".join(f"{n} {i}" for i in range(6))) for n in ("pos", "neg", "prompts")
    )
    args = [
        "steer",
        "--method",
        "probe",
        "--probe",
        str(tmp_path / "p"),
        "--pos",
        pos,
        "--neg",
        neg,
        "--prompts",
        prompts,
        "--model",
        str(tmp_path / "no-model"),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "shows no unit that reads the concept: no unit clears both margins" in err
    assert "use --method diffmean, or probe again with more examples" in err and not (tmp_path / "s").exists()
    with pytest.raises(LayerwiseError, match="use `method` diffmean"):
        fit(lm, [("good", "bad")] * 4, method="probe", probe=str(tmp_path / "p"))


def test_save_load_and_report_escape(tmp_path):
    lm = tiny_lm("llama", layers=2)
    ids = _ids(40)
    res = probe(
        lm,
        Examples(labels=["<b>x</b>" if i % 2 else "a&b" for i in range(40)], ids=ids, source="<script>"),
        units="all",
        folds=2,
    )
    res.save(tmp_path)
    back = ProbeResult.load(tmp_path)
    assert back.to_dict() == json.loads(json.dumps(res.to_dict())) and records_peak(back.meta)
    tensors = load_file(tmp_path / "directions.safetensors")
    assert {"L0.probe", "L0.diffmean", "L1.attn.probe", "L1.mlp.diffmean"} <= set(tensors)
    torch.testing.assert_close(back.direction("L1.mlp", "diffmean"), res.direction("L1.mlp", "diffmean"))
    assert not (tmp_path / "report.html").exists()  # results are data; the report module renders the page
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    top = page[: page.index("<img")]  # the summary opens the page
    assert 'class="summary"' in top and escape(res.best["why"]) in top
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "again.html")]) == 0
    assert "layerwise probe" in (tmp_path / "again.html").read_text()


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    lm = tiny_lm("llama", layers=2)
    ids = _ids(10)
    with pytest.raises(LayerwiseError, match="at least two classes"):
        probe(lm, Examples(labels=[1] * 10, ids=ids))
    with pytest.raises(LayerwiseError, match="fewer than folds=5"):
        probe(lm, Examples(labels=[i % 2 for i in range(8)], ids=ids[:8]), folds=5)
    with pytest.raises(LayerwiseError, match="one label per example"):
        Examples(labels=[0, 1, 0], ids=ids)
    with pytest.raises(LayerwiseError, match="empty text"):
        Examples(labels=[0, 1], texts=["fine", "  "])
    with pytest.raises(LayerwiseError, match="mix"):
        Examples(labels=[0, "1"], ids=ids[:2])
    cases = {
        "at least two classes": _write(
            tmp_path / "one.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": "a"}) for i in range(9))
        ),
        "fewer than folds=5": _write(
            tmp_path / "few.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(6))
        ),
        'line 2 of .* has no "label" field': _write(
            tmp_path / "nolabel.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'
        ),
        "example 1 .* has an empty text": _write(tmp_path / "empty.csv", "text,label\nhello,1\n,0\n"),
        "no text column": _write(tmp_path / "cols.csv", "sentence,label\nhello,1\n"),
        "line 1 of .* is not JSON": _write(tmp_path / "bad.jsonl", "{nope\n"),
        "must end in .jsonl": _write(tmp_path / "x.txt", "hi"),
    }
    for i, (what, path) in enumerate(cases.items()):
        out = tmp_path / f"out-{i}"
        # the data is read and checked before the model loads, so no model (and no network) is needed to fail
        assert main(["probe", "--model", str(tmp_path / "no-model"), "--data", path, "--out", str(out)]) == 2, what
        err = capsys.readouterr().err
        assert one_error_line(err) and re.search(what, err), (what, err)
        assert not out.exists(), what


def test_read_examples_jsonl_csv_and_subset(tmp_path):
    j = _write(
        tmp_path / "d.jsonl",
        "\n".join(json.dumps({"text": f"text {i}", "label": bool(i % 2)}) for i in range(20)) + "\n\n",
    )
    ex = read_examples(j)
    assert len(ex) == 20 and ex.labels[:2] == [False, True]
    c = _write(
        tmp_path / "d.csv", "text,label\n" + "".join(f'"a, {i}",{"pos" if i % 3 else "neg"}\n' for i in range(30))
    )
    ex = read_examples(c, n=12, seed=1)
    assert len(ex) == 12 and ex.texts[0].startswith("a, ") and sorted(set(ex.labels)) == ["neg", "pos"]
    assert ex.labels.count("neg") == 4


def test_builtin_cities_rule():
    """Seeded, balanced, deduplicated; false statements name another country; countries equally often true and false."""
    from collections import Counter

    from layerwise.corpora import cities

    pairs = dict(cities.gazetteer())
    texts, labels = cities.examples(seed=0)
    assert len(texts) == len(set(texts)) == len(pairs) // 2 * 2 and sum(labels) == len(labels) // 2
    assert (texts, labels) == cities.examples(seed=0) and texts != cities.examples(seed=1)[0]
    country_of = {v: v for v in pairs.values()} | {f"the {v}": v for v in pairs.values()}
    named, own = Counter(), Counter()  # in false statements: the countries named, and the cities' own countries
    for text, label in zip(texts, labels):
        city, country = re.fullmatch(r"The city of (.+) is in (.+)\.", text).groups()
        assert (pairs[city] == country_of[country]) == label, text
        if not label:
            named[country_of[country]] += 1
            own[pairs[city]] += 1
    assert named == own  # a derangement of the false half's own countries: no country alone predicts the label
    small, small_labels = cities.examples(n=51, seed=2)
    assert len(small) == 50 and sum(small_labels) == 25


def test_subset_too_small_is_one_error(tmp_path):
    path = _write(tmp_path / "three.jsonl", "\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(12)))
    with pytest.raises(LayerwiseError, match="stratified subset of 2 examples.*larger `examples`"):
        read_examples(path, n=2)
