"""The command line and the less-trodden paths a new user hits, on tiny models: each check failed before its fix."""

import json
import subprocess
import sys

import pytest

from layerwise import __version__, cli
from layerwise.errors import LayerwiseError

from .conftest import one_error_line, records_peak, tiny_lm, tiny_windows


def test_drop_n_zero_is_refused_not_replaced_by_four(tiny_cli, tmp_path, capsys):
    rc = cli.main(["drop", "--n", "0", "--no-speed", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and one_error_line(err) and "--n must be at least 1 (got 0)" in err, err
    assert not (tmp_path / "out").exists()


def test_library_errors_name_api_arguments_and_the_cli_names_flags(tiny_cli, tmp_path, capsys):
    from layerwise import drop as dp

    lm, w = tiny_cli
    with pytest.raises(LayerwiseError, match=r"^`n` must be at least 1"):
        dp.choose(lm, w, n=0)
    rc = cli.main(["drop", "--n", "1", "--unit", "mlp", "--order", "contiguous", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "--order contiguous removes a run of whole blocks; use it with --unit block" in err
        and "`" not in err
    )
    assert (
        cli._flags("raise `budgets`; `family` int, `group_size` 64, `windows`")
        == "raise --bits or --sweep; --format int, --group-size 64, --data, --seq-len and --samples"
    )


@pytest.mark.parametrize(
    "order,kw",
    [("lens_kl:desc", {"lens": True}), ("lens_top1:asc", {"lens": True}), ("taylor_nll", {"ablation": "taylor"})],
)
def test_automatic_profile_measures_what_the_order_needs(order, kw):
    from layerwise.drop import choose
    from layerwise.profile import profile

    lm, w = tiny_lm("llama", layers=4), tiny_windows(2)
    plan = choose(lm, w, n=2, unit="block", order=order, progress=False)
    prof = profile(lm, w, **{"ablation": "none", "lens": False, **kw}, progress=False)
    assert plan.units == prof.rank(order, "block")[:2]


def test_attention_orders_are_measured_and_the_cli_loads_eager_attention(monkeypatch, tmp_path):
    from layerwise.drop import choose
    from layerwise.profile import profile

    lm, w = tiny_lm("llama", layers=4), tiny_windows(2)
    lm.model.config._attn_implementation = "eager"
    plan = choose(lm, w, n=2, unit="attn", order="attn_entropy:asc", progress=False)
    prof = profile(lm, w, ablation="none", lens=False, attention=True, progress=False)
    assert plan.units == prof.rank("attn_entropy:asc", "attn")[:2]
    assert prof.rank("attn_entropy:desc", "attn") == prof.rank("attn_entropy:asc", "attn")[::-1]
    asked = []
    monkeypatch.setattr(
        cli, "_load", lambda args, attn_implementation=None, **_: asked.append(attn_implementation) or (lm, w)
    )
    monkeypatch.setattr(cli, "_memory_plan", lambda args, make: ("none", None))
    w.n_calib = 1
    assert (
        cli.main(
            [
                "drop",
                "--n",
                "1",
                "--unit",
                "attn",
                "--order",
                "attn_sink:desc",
                "--no-speed",
                "--export",
                "none",
                "--eval-samples",
                "1",
                "--json",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert asked == ["eager"]


def test_version_and_each_help_shows_defaults_and_only_its_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"layerwise {__version__}"
    own = {
        "profile": "layerwise profile --attention",
        "drop": "layerwise drop --n 6",
        "quantize": "layerwise quantize --bits 5",
        "imatrix": "layerwise imatrix --samples 64",
        "report": "layerwise report runs/profile",
    }
    for cmd, example in own.items():
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert example in out, cmd
        assert not any(other in out for c, other in own.items() if c != cmd), cmd
        if cmd != "report":
            assert "(default: 256)" in out and "(default: builtin:pydoc)" in out, cmd
    with pytest.raises(SystemExit):
        cli.main(["drop", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: bi)" in out and "(default: None)" not in out and "(default: False)" not in out


def test_interrupt_message_is_true_about_kept_files(monkeypatch, capsys, tmp_path):
    def interrupted(args):
        if args.cmd == "quantize" and args.bits == 4:
            (tmp_path / "q").mkdir()
            (tmp_path / "q" / "measurement.json").write_text("{}")
        raise KeyboardInterrupt

    for name in ("_quantize", "_profile"):
        monkeypatch.setattr(cli, name, interrupted)
    assert cli.main(["quantize", "--bits", "4", "--out", str(tmp_path / "q")]) == 130
    err = capsys.readouterr().err
    assert "no partial output" not in err and "measurement.json is kept" in err
    for cmd in (["quantize", "--bits", "5"], ["profile"]):  # runs that wrote no measurement do not claim one
        assert cli.main([*cmd, "--out", str(tmp_path / "other")]) == 130
        err = capsys.readouterr().err
        assert "every file written is whole" in err and "measurement.json" not in err


def test_summary_prints_unmeasured_values_as_dashes(capsys):
    from layerwise.profile import Profile, Unit
    from layerwise.results import print_tables

    units = [
        Unit(f"L{i}", i, "block", {"ablate_nll": float(i), "bi": 0.5, "rel_update": v})
        for i, v in enumerate([None, float("nan"), float("inf"), 0.25])
    ]
    print_tables("profile", Profile(meta={}, units=units, agreement={"reference": "ablate_nll", "by_kind": {}}))
    out = capsys.readouterr().out
    assert "0.25" in out and out.count("–") >= 3 and "nan" not in out and "inf" not in out


def test_importing_the_report_keeps_the_users_matplotlib_backend(tmp_path):
    code = (
        "import matplotlib; matplotlib.use('svg'); import layerwise.report, layerwise.report.drop, "
        "layerwise.report.quant, layerwise.report.tune, layerwise.report.probe, layerwise.report.steer, "
        "layerwise.report.summary; import sys; sys.modules.get('matplotlib.pyplot') and sys.exit(3); "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"


def test_gguf_name_refuses_paths_without_a_tensor_name():
    an = tiny_lm("llama").anatomy
    assert an.gguf_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q.weight"
    for path in ("lm_head", "model.layers", "model.layers.x.self_attn.q_proj", "model.layers.1", "model.embed_tokens"):
        with pytest.raises(LayerwiseError, match="is not a weight layerwise quantizes in this llama model"):
            an.gguf_name(path)


def test_measurement_hooks_are_removed_when_registering_fails(monkeypatch):
    from layerwise.quant.measure import GroupCandidates, measure
    from layerwise.quant.rtn import QConfig

    lm, w = tiny_lm("llama"), tiny_windows(2)
    real = lm.anatomy.update_module

    def update_module(layer, kind):
        if kind == "mlp":
            raise LayerwiseError("no mlp here")
        return real(layer, kind)

    monkeypatch.setattr(lm.anatomy, "update_module", update_module)
    with pytest.raises(LayerwiseError, match="no mlp here"):
        measure(lm, w, candidates=GroupCandidates((QConfig(4, 16),), "gptq"), progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in lm.model.modules())


def test_profile_records_its_seed_and_how_it_was_run():
    from layerwise.profile import profile

    prof = profile(tiny_lm("llama"), tiny_windows(2), ablation="none", lens=False, batch_size=1, seed=7, progress=False)
    m = prof.meta
    assert (
        (m["seed"], m["batch_size"], m["versions"]["layerwise"]) == (7, 1, __version__)
        and m["command"]
        and records_peak(m)
    )
    json.dumps(m)


def test_quantize_save_writes_json_only(tmp_path):
    from layerwise import quantize as qz
    from layerwise.report.quant import write_quant_report

    lm, w = tiny_lm("llama"), tiny_windows(5)
    w.n_calib = 2
    rep = qz.run(
        lm,
        w,
        bits=4.5,
        strategy=["uniform"],
        format="int",
        group_size=16,
        export=(),
        out=tmp_path,
        eval_samples=2,
        progress=False,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "measurement.json", "plan.json"]
    page = write_quant_report(qz.QuantReport.load(tmp_path), tmp_path / "report.html")
    assert f"<td>{rep.rows[0]['plan']}</td>" in page.read_text()


def test_rank_direction_is_explicit_for_metrics_without_one():
    from layerwise.profile import Profile, Unit

    prof = Profile(
        meta={}, units=[Unit(f"L{i}", i, "block", {"zd": v, "bi": v}) for i, v in enumerate([0.3, 0.1, 0.2])]
    )
    assert prof.rank("zd:asc", "block") == ["L1", "L2", "L0"] and prof.rank("zd:desc", "block") == ["L0", "L2", "L1"]
    assert prof.rank("bi", "block") == prof.rank("bi:asc", "block")  # bi: larger is more important
    with pytest.raises(LayerwiseError, match="zd has no importance direction"):
        prof.rank("zd", "block")


def test_a_profile_without_the_orders_metric_says_how_to_get_it():
    from layerwise.profile import Profile, Unit

    prof = Profile(meta={}, units=[Unit(f"L{i}", i, "block", {"lens_kl": None, "ablate_nll": None}) for i in range(2)])
    with pytest.raises(LayerwiseError, match=r"re-profile with lens=True \(layerwise profile without --no-lens\)"):
        prof.rank("lens_kl:asc", "block")
    with pytest.raises(LayerwiseError, match=r"ablation='exact' \(layerwise profile --ablation exact\)"):
        prof.rank("ablate_nll", "block")
