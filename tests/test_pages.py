"""The summary each page opens with: what it says, that its commands are real command lines, that it escapes."""

from __future__ import annotations

import shlex
from html import escape

import pytest

from layerwise.cli import _parser
from layerwise.report import summary as sm

from .conftest import tiny_lm, tiny_windows


def _parses(command: str):
    """The CLI's own parser accepts the command line (it exits on an unknown option or a bad value)."""
    words = shlex.split(command)
    assert words[0] == "layerwise"
    return _parser().parse_args(words[1:])


@pytest.fixture(scope="module")
def prof():
    from layerwise.profile import profile

    lm = tiny_lm("llama", layers=5)
    lm.source["ref"] = "tiny <b>model</b>"  # a string from outside, to be escaped and quoted
    return profile(lm, tiny_windows(2), ablation="exact", progress=False)


def test_profile_summary_names_extremes_best_metric_and_valid_commands(prof):
    from layerwise.report.profile import render

    least, most = sm.extremes(prof)
    costs = sorted(u.metrics["ablate_nll"] for u in prof.units)
    assert [c for _, c, _ in least] == costs[:3] and [c for _, c, _ in most] == costs[::-1][:3]
    best = sm.best_metric(prof, "attn")
    rhos = {m: v["rho"] for m, v in prof.agreement["by_kind"]["attn"].items() if v["rho"] is not None}
    assert best == max(rhos.items(), key=lambda mr: abs(mr[1]))
    cmds = [c for _, c in sm.profile_commands(prof, "runs/my profile/profile.json")]
    kind = sm.cheapest_kind(prof)
    first = _parses(cmds[0])
    assert (first.n, first.unit, first.order, first.profile, first.model) == (
        4,
        kind,
        "ablate_nll",
        "runs/my profile/profile.json",
        "tiny <b>model</b>",
    )
    assert _parses(cmds[1]).order.partition(":")[0] == sm.best_metric(prof, kind)[0]
    q = _parses(cmds[-1])
    assert q.sweep == (4.6, 5, 5.5) and q.strategy.split(",")[0] == "measured"
    assert q.strategy.split(",")[1] == "ranked:" + sm.as_order(*sm.best_metric(prof, "block"))
    page = render(prof)
    assert "tiny <b>model</b>" not in page and "tiny &lt;b&gt;model&lt;/b&gt;" in page
    assert page.index('class="summary"') < page.index("<img") and least[0][0] in page[: page.index("<img")]


def test_orders_point_the_way_ablation_agreed():
    assert sm.as_order("bi", 0.8) == "bi"  # bi: larger is more important, as ablation said
    assert sm.as_order("bi", -0.8) == "bi:desc"  # anticorrelated: the highest values matter least
    assert sm.as_order("sub_cos", -0.5) == "sub_cos"
    assert sm.as_order("zd", 0.3) == "zd:asc" and sm.as_order("lens_kl", -0.3) == "lens_kl:desc"
    for order in ("bi:desc", "zd:asc", "sub_cos"):
        assert _parses(f"layerwise drop --order {order}").order == order


def test_profile_without_causal_metric_says_how_to_get_one():
    from layerwise.profile import profile

    p = profile(tiny_lm("llama"), tiny_windows(1), ablation="none", progress=False)
    assert sm.reference(p) is None and "--ablation exact" in sm.profile_summary(p)


def test_best_per_group_keeps_lowest_heldout_delta():
    rows = [
        {"n": 2, "delta_nll": 0.3, "k": "a"},
        {"n": 1, "delta_nll": 0.2, "k": "b"},
        {"n": 2, "delta_nll": 0.1, "k": "c"},
        {"n": 1, "delta_nll": None, "k": "d"},
    ]
    assert [r["k"] for r in sm.best_per(rows, "n")] == ["b", "c"]


def test_drop_page_opens_with_best_plan_and_its_export_command(tmp_path):
    from layerwise.drop import DropReport, run, sweep_plans
    from layerwise.report.drop import write_drop_report

    lm = tiny_lm("llama", layers=4)
    lm.source["ref"] = "tiny <i>"
    w = tiny_windows(5)
    w.n_calib = 2
    plans = sweep_plans(lm, w, sweep=[1, 2], unit=["block"], order=["ablate_nll", "random"], progress=False)
    report = run(lm, w, plans=plans, out=tmp_path / "r", eval_samples=3, with_speed=False, progress=False)
    page = write_drop_report(DropReport.load(tmp_path / "r"), tmp_path / "r" / "report.html").read_text()
    top = page[: page.index("<img")]
    for n in (1, 2):
        best = min((v for v in report.variants if v["n"] == n), key=lambda v: v["delta_nll"])
        assert f"<code>{best['key']}</code>" in top and f"{best['delta_nll']:+.4f}" in top
        cmd = sm.drop_export_command(report, best["key"], str(tmp_path / "r" / "plan.json"))
        args = _parses(cmd)
        assert (args.plan, args.export, args.model) == (
            f"{tmp_path / 'r' / 'plan.json'}#{best['key']}",
            ("hf",),
            "tiny <i>",
        )
        assert f"<code>{escape(cmd)}</code>" in top and "&lt;i&gt;" in escape(cmd)
    assert "tiny <i>" not in page


def test_quant_page_opens_with_best_plan_per_budget(tmp_path):
    from layerwise import quantize as qz
    from layerwise.report.quant import render

    lm, w = tiny_lm("llama"), tiny_windows(6)
    w.n_calib = 3
    report = qz.run(
        lm,
        w,
        sweep=[4.5, 6],
        strategy=["measured", "uniform"],
        format="int",
        group_size=16,
        out=tmp_path,
        eval_samples=3,
        progress=False,
    )
    page = render(report, "r/plan.json")
    top = page[: page.index("<img")]
    assert 'class="summary"' in top
    for b in (4.5, 6):
        best = min((r for r in report.rows if r["target_bpw"] == b), key=lambda r: r["delta_nll"])
        assert best["strategy"] == "measured"  # the only strategy with a budget here; uniform levels are fixed plans
        assert f"<code>{best['plan']}</code>" in top and f"{best['delta_nll']:+.4f}" in top
        why, cmd = sm.quant_export_command(report, best, "r/plan.json")
        args = _parses(cmd)  # integer codes with zero points cannot go to hf: measured again, symmetric
        assert "zero points" in why and (args.symmetric, args.bits, args.strategy, args.export) == (
            True,
            b,
            best["strategy"],
            ("hf",),
        )
        assert escape(cmd) in top
    gguf = dict(report.rows[0], plan="q4km", strategy="q4km", target_bpw=None)
    report.meta["format"], report.plans["q4km"] = "gguf", {"groups": {}}
    assert sm.quant_export_command(report, gguf, "r/plan.json") == (
        "write it",
        "layerwise quantize --model tiny-llama --plan 'r/plan.json#q4km' --export gguf,recipe",
    )


def test_steer_summary_reads_the_chosen_row_and_escapes():
    from layerwise.steer import SteerReport

    rows = [
        {
            "key": "L1@0.5",
            "units": ["L1"],
            "alpha": 0.5,
            "margin_shift": 1.5,
            "margin_shift_se": 0.25,
            "delta_nll": 0.125,
            "delta_nll_se": 0.0625,
            "kl": 0.03125,
        },
        {
            "key": "L2@0.5",
            "units": ["L2"],
            "alpha": 0.5,
            "margin_shift": 3.0,
            "margin_shift_se": 0.5,
            "delta_nll": 0.5,
            "delta_nll_se": 0.25,
            "kl": 0.75,
        },
    ]
    rep = SteerReport(
        meta={},
        vector={},
        choice={"chosen_key": "L1@0.5", "chosen": ["L1"], "alpha": {"alpha": 0.5}, "ranking": []},
        unsteered={},
        rows=rows,
        prompts=[],
        exports={"gguf": {"path": "out/<x>.gguf"}},
    )
    text = sm.steer_summary(rep)
    assert (
        "<code>L1@0.5</code>" in text
        and "margin shift 1.5 ± 0.25" in text
        and "Δnll 0.125 ± 0.0625 nats, KL 0.03125" in text
    )
    assert "out/&lt;x&gt;.gguf" in text and "<x>" not in text
    rep.exports = {}
    assert "vector.safetensors" in sm.steer_summary(rep)


def test_layer_axes_stay_readable_at_many_layers():
    from layerwise.report.page import MAX_TICKS, layer_ticks, subplots

    names = [n for k in range(40) for n in (f"L{k}", f"L{k}.attn", f"L{k}.mlp")]
    fig, ax = subplots(figsize=(8, 2))
    layer_ticks(ax, names)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"L{k}" for k in range(0, 40, 2)] and list(ax.get_xticks()) == list(range(0, 120, 6))
    layer_ticks(ax, [str(k) for k in range(70)], axis="y")
    assert len(ax.get_yticklabels()) <= MAX_TICKS and ax.get_yticklabels()[1].get_text() == "3"
