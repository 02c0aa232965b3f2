"""One frozen config per action (issue 22, section 2): checked when made, built by the CLI from its flags, recorded in
every result, and run again by ``layerwise ACTION --config RESULT``; on tiny models."""

import inspect
import json
from dataclasses import FrozenInstanceError, fields

import pytest

from layerwise import cli
from layerwise.configs import (
    CONFIGS,
    DropConfig,
    ProbeConfig,
    QuantizeConfig,
    SteerConfig,
    TuneConfig,
    read_config,
)
from layerwise.errors import LayerwiseError

from .conftest import one_error_line, tiny_lm, tiny_windows


@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (DropConfig, {"n": 0}, r"^`n` must be at least 1 \(got 0\)$"),
        (DropConfig, {"n": "4"}, r"^`n` takes int or None \(got '4'\)$"),
        (DropConfig, {"sweep": [1, 2.5]}, r"^`sweep` takes a list of int or None"),
        (
            DropConfig,
            {"n": 2, "sweep": [1, 2]},
            r"^give one of `n`, `per_layer`, `sweep`, `units` and `plan`, not n and sweep$",
        ),
        (DropConfig, {"speed": False}, r"^DropConfig has no setting speed; its settings: inputs, n, per_layer, sweep"),
        (QuantizeConfig, {"bits": -1.0}, r"`budgets` must be positive"),
        (QuantizeConfig, {"format": "onnx"}, r"^`format` takes 'gguf' or 'int' \(got 'onnx'\)"),
        (QuantizeConfig, {"bits": float("nan")}, r"^`bits` takes float or None"),
        (QuantizeConfig, {"size": "big"}, r"^`size` takes a size such as 4GiB"),
        (QuantizeConfig, {"size": "90MB", "bits": 4.5}, r"^give one of `bits`, `sweep`, `size` and `plan`"),
        (QuantizeConfig, {"size": "90MB", "format": "int"}, r"^`size` targets a GGUF file's size"),
        (QuantizeConfig, {"bits": 4.5, "tie": "gate,up", "format": "int"}, r"always give q/k/v and gate/up one"),
        (TuneConfig, {"lr": 0.0}, r"^`lr` must be positive"),
        (TuneConfig, {"steps": 0}, r"^`steps` must be at least 1"),
        (TuneConfig, {"train_embeddings": 1}, r"^`train_embeddings` takes bool"),
        (ProbeConfig, {"folds": 1}, r"^`folds` must be at least 2"),
        (ProbeConfig, {"c": -1.0}, r"must be positive"),
        (SteerConfig, {"alpha": "strong"}, r"^`alpha` takes float or 'auto'"),
        (SteerConfig, {"sweep_alpha": ["a"]}, r"^`sweep_alpha` takes a list of float"),
    ],
)
def test_a_config_checks_its_values_in_one_line(cls, kw, match):
    with pytest.raises(LayerwiseError, match=match):
        cls.of(**kw)


def test_a_config_is_frozen_and_reads_lists_and_comma_text_as_tuples():
    cfg = DropConfig.of(sweep=[1, 2], unit="attn, mlp")
    assert cfg.sweep == (1, 2) and cfg.unit == ("attn", "mlp") and cfg.order == ("bi",)
    with pytest.raises(FrozenInstanceError):
        cfg.n = 3
    assert DropConfig.of(**cfg.to_dict()) == cfg and DropConfig.of(cfg, n=None, sweep=None, units="L1").units == ("L1",)
    with pytest.raises(LayerwiseError, match="give a DropConfig, not a TuneConfig"):
        DropConfig.of(TuneConfig())


def test_the_cli_has_a_flag_of_the_same_name_for_every_config_field():
    """The CLI builds each config from its flags by name, and --config sets them back by name: every field (except
    the inputs and the probe's memory cap, a Python setting) is a flag's destination."""
    parser = cli._parser()
    for name, cls in CONFIGS.items():
        dests = {a.dest for a in parser.commands[name]._actions}
        missing = {f.name for f in fields(cls)} - dests - {"inputs", "max_bytes"}
        assert not missing, (name, missing)
        assert "config" in dests


@pytest.mark.parametrize(
    "entry",
    [
        "drop:run",
        "drop:choose",
        "drop:sweep_plans",
        "quantize:run",
        "tune:run",
        "tune:train",
        "probe:probe",
        "steer:run",
    ],
)
def test_no_entry_point_takes_a_long_keyword_list(entry):
    """Settings travel in the config (or as its field names through ``**settings``); what is left is the model, the
    data, the config and a few objects (a profile, an output folder, progress)."""
    import importlib

    module, name = entry.split(":")
    params = inspect.signature(getattr(importlib.import_module(f"layerwise.{module}"), name)).parameters
    named = [p for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(named) <= 10 and "config" in params, (entry, list(params))


def _eval(folder) -> dict:
    return json.loads((folder / "eval.json").read_text())


def test_drop_records_its_config_and_config_runs_it_again(tiny_cli, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    args = ["--n", "2", "--order", "random", "--seed", "3", "--no-speed", "--eval-samples", "2", "--export", "none"]
    assert cli.main(["drop", *args, "--out", str(first)]) == 0
    recorded = _eval(first)["meta"]["config"]
    assert recorded["n"] == 2 and recorded["order"] == ["random"] and recorded["with_speed"] is False
    assert recorded["inputs"]["model"] == "default" and recorded["inputs"]["seq_len"] == 256
    assert read_config(first, "drop") == DropConfig.of(**recorded)
    assert cli.main(["drop", "--config", str(first), "--out", str(again)]) == 0
    assert _eval(again)["meta"]["config"] == recorded
    assert _eval(again)["variants"][0]["units"] == _eval(first)["variants"][0]["units"]
    # a flag given beside --config wins; one of a group of alternatives replaces the recorded one
    assert cli.main(["drop", "--config", str(first / "eval.json"), "--n", "1", "--out", str(tmp_path / "n1")]) == 0
    assert _eval(tmp_path / "n1")["meta"]["config"]["n"] == 1
    assert cli.main(["drop", "--config", str(first), "--sweep", "1,2", "--out", str(tmp_path / "sw")]) == 0
    got = _eval(tmp_path / "sw")["meta"]["config"]
    assert (got["n"], got["sweep"], got["seed"]) == (None, [1, 2], 3)
    capsys.readouterr()


def test_config_refuses_another_kind_an_old_result_and_a_bad_file_in_one_line(tiny_cli, tmp_path, capsys):
    assert (
        cli.main(["quantize", "--bits", "4.8", "--format", "int", "--group-size", "16", "--out", str(tmp_path / "q")])
        == 0
    )
    assert _eval(tmp_path / "q")["meta"]["config"]["bits"] == 4.8
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kind": "drop", "meta": {}, "original": {}, "variants": [], "exports": {}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n": 0}))
    cases = [
        (["drop", "--config", str(tmp_path / "q")], "is a layerwise quantize result; give a drop result or config"),
        (["drop", "--config", str(old)], "records no config (written by an older layerwise); give the options as"),
        (["drop", "--config", str(bad)], "--config: " + f"{bad}: --n must be at least 1 (got 0)"),
        (["drop", "--config", str(tmp_path / "none.json")], "none.json not found"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        rc = cli.main([*argv, "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert rc == 2 and one_error_line(err) and message in err, err
    assert not (tmp_path / "never").exists()


def test_every_action_records_the_config_it_ran_with(tmp_path):
    """The config in each result is the one the run used, and makes the same config back."""
    from layerwise import quantize, steer, tune
    from layerwise.data import Windows
    from layerwise.probe import Examples, probe

    from .test_probe import _ids, _labels
    from .test_steer import _char_lm

    lm, w = tiny_lm("llama", layers=3), tiny_windows(5)
    w.n_calib = 2
    q = quantize.run(lm, w, bits=4.8, format="int", group_size=16, eval_samples=2, progress=False)
    assert QuantizeConfig.of(**q.meta["config"]) == QuantizeConfig.of(
        bits=4.8, format="int", group_size=16, eval_samples=2
    )
    data = tune.TuneData.from_windows(Windows(tiny_windows(6, 12).ids, 4, "random", "x", 72), eval_samples=2)
    t = tune.run(lm, data, select="full", steps=1, lr=1e-2, batch_size=2, progress=False)
    assert TuneConfig.of(**t.meta["config"]) == TuneConfig.of(select="full", steps=1, lr=1e-2, batch_size=2)
    ids = _ids(20)
    p = probe(lm, Examples(labels=_labels(ids, 2), ids=ids), folds=3, units="L1,L2")
    assert p.meta["config"]["units"] == ["L1", "L2"] and p.meta["units"] == ["L1", "L2"]
    assert ProbeConfig.of(**p.meta["config"]) == ProbeConfig.of(folds=3, units=("L1", "L2"))
    pairs = [(f"it was good {i}", f"it was bad {i}") for i in range(4)]
    s = steer.run(_char_lm(), pairs, ["p a", "p b"], tiny_windows(3, 8).ids, layers="L1", alpha=0.5, new_tokens=1)
    assert SteerConfig.of(**s.meta["config"]) == SteerConfig.of(layers="L1", alpha=0.5, new_tokens=1)
    assert s.meta["config"]["inputs"] is None  # the caller loaded the model and the data itself


def test_every_command_line_in_the_readme_parses():
    """The README's command lines name options that exist, with values they take (its --config lines included)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    lines = [
        part.split(" #")[0].strip()
        for b in blocks
        for ln in b.replace("\\\n", " ").splitlines()
        for part in ln.split(";")
    ]
    synopsis = re.compile(r"\||\[--|SUBCOMMAND|\.\.\.")  # usage lines: a|b, [--flag], ...
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("layerwise ") and not synopsis.search(ln)]
    parser = cli._parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except LayerwiseError as exc:
            raise AssertionError(f"layerwise {shlex.join(argv)}: {exc}") from None
        except SystemExit as exc:  # --version
            assert exc.code == 0
    assert len(commands) > 20 and any("--config" in a for a in commands)
