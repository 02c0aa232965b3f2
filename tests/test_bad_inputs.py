"""Bad and unusual inputs as people have them, every command: exit 2, one line on stderr, no traceback, no file touched.

Every case here failed before its fix (a traceback, a silent misreading, or a deleted file). The model never loads in
these cases (``layerwise.load`` is replaced by a tripwire), except where the model folder itself is the bad input.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

import layerwise
from layerwise import cli
from layerwise.data import read_corpus, read_file
from layerwise.errors import LayerwiseError
from layerwise.io import MANIFEST, atomic_dir, check_out

from .conftest import one_error_line

COMMANDS = ["profile", "drop", "quantize", "tune", "probe", "steer"]
LATIN1 = "Café crème, déjà vu: naïve façades.\n".encode("latin-1") * 20
BINARY = bytes(range(256)) * 64


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A user's folder with files of their own, the cwd of every run; loading a model there is a test failure."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own notes\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "' + "déjà".encode("latin-1") + b'", "label": 1}\n')
    (tmp_path / "latin1.csv").write_bytes(b"text,label\n" + "déjà,1\n".encode("latin-1"))
    (tmp_path / "lib.so").write_bytes(b"\x7fELF" + BINARY)
    (tmp_path / "data.csv").write_bytes(b"\x7fELF" + BINARY)
    (tmp_path / "utf16.txt").write_bytes("plain words\n".encode("utf-16-le") * 50)
    for name, rows in {
        "number.jsonl": ["3"],
        "strmsg.jsonl": [{"messages": ["hi", "there"]}],
        "nocontent.jsonl": [{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}],
    }.items():
        (tmp_path / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "config.json").write_text("{not json")
    (tmp_path / "badmodel" / "model.safetensors").write_bytes(b"")
    for name, doc in {
        "nogroups": {"kind": "quantize", "meta": {}, "plans": {"p": {"units": []}}},
        "nounits": {"kind": "drop", "meta": {}, "plans": {"p": {"order": "bi"}}},
        "alist": [1, 2],
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "plan.json").write_text(json.dumps(doc))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "plan.json").write_text('{"kind": "quantize", "pla')
    (tmp_path / "corrupt" / "eval.json").write_text("{}")

    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(layerwise, "load", tripwire)
    return tmp_path


def _data_flag(cmd: str) -> str:
    return {"steer": "--eval-data"}.get(cmd, "--data")


def _base(cmd: str) -> list[str]:
    """The smallest valid command line of each subcommand (what the bad input is added to)."""
    return [cmd] + (["--data", "builtin:sentiment"] if cmd == "steer" else [])


#: (case id, argv): each a bad input a person has, for every command that takes it.
CASES = (
    [(f"{c}-out-is-file", [*_base(c), "--out", "a_file"]) for c in COMMANDS]
    + [(f"{c}-out-under-file", [*_base(c), "--out", "a_file/sub"]) for c in COMMANDS]
    + [(f"{c}-out-in-proc", [*_base(c), "--out", "/proc/layerwise-out"]) for c in COMMANDS]
    + [
        ("report-out-is-folder", ["report", "corrupt", "--out", "mine"]),
        ("report-out-in-proc", ["report", "corrupt", "--out", "/proc/x.html"]),
    ]
    + [
        (f"{c}-binary-data", [*_base(c), _data_flag(c), "lib.so"])
        for c in ("profile", "drop", "quantize", "tune", "steer")
    ]
    + [(f"{c}-utf16-no-bom", [*_base(c), _data_flag(c), "utf16.txt"]) for c in ("profile", "tune")]
    + [
        (f"{c}-latin1-data", [*_base(c), _data_flag(c), "latin1.txt"])
        for c in ("profile", "drop", "quantize", "tune", "steer")
    ]
    + [
        ("tune-second-data-latin1", ["tune", "--second-data", "latin1.txt"]),
        ("tune-latin1-jsonl", ["tune", "--data", "latin1.jsonl"]),
        ("profile-latin1-jsonl", ["profile", "--data", "latin1.jsonl"]),
        ("probe-latin1-jsonl", ["probe", "--data", "latin1.jsonl"]),
        ("probe-latin1-csv", ["probe", "--data", "latin1.csv"]),
        ("probe-binary-csv", ["probe", "--data", "data.csv"]),
        ("steer-latin1-pos", ["steer", "--pos", "latin1.txt", "--neg", "latin1.txt"]),
        ("steer-latin1-prompts", ["steer", "--data", "builtin:sentiment", "--prompts", "latin1.txt"]),
        ("steer-latin1-pairs", ["steer", "--data", "latin1.jsonl"]),
        ("report-latin1-file", ["report", "latin1.txt"]),
        ("report-binary-file", ["report", "lib.so"]),
        ("tune-jsonl-number", ["tune", "--data", "number.jsonl"]),
        ("tune-jsonl-string-message", ["tune", "--data", "strmsg.jsonl"]),
        ("tune-jsonl-no-content", ["tune", "--data", "nocontent.jsonl"]),
        ("drop-plan-without-units", ["drop", "--plan", "nounits/plan.json"]),
        ("quantize-plan-without-groups", ["quantize", "--plan", "nogroups"]),
        ("drop-plan-is-a-list", ["drop", "--plan", "alist/plan.json"]),
        ("quantize-plan-corrupt", ["quantize", "--plan", "corrupt/plan.json"]),
        ("report-corrupt-plan", ["report", "corrupt"]),
        ("report-plan-is-a-list", ["report", "alist"]),
        ("quantize-bits-nan", ["quantize", "--bits", "nan"]),
        ("quantize-bits-inf", ["quantize", "--bits", "inf"]),
        ("quantize-sweep-nan", ["quantize", "--sweep", "4,nan"]),
        ("tune-lr-nan", ["tune", "--lr", "nan"]),
        ("probe-c-zero", ["probe", "--c", "0"]),
        ("steer-alpha-nan", ["steer", "--data", "builtin:sentiment", "--alpha", "nan"]),
        ("steer-target-inf", ["steer", "--data", "builtin:sentiment", "--target", "inf"]),
        ("tune-temperature-nan", ["tune", "--temperature", "nan"]),
        ("profile-positions-negative", ["profile", "--positions", "-1"]),
        ("drop-sweep-zero", ["drop", "--sweep", "0,2"]),
    ]
    + [(f"{c}-batch-size-0", [*_base(c), "--batch-size", "0"]) for c in COMMANDS]
    + [(f"{c}-seed-word", [*_base(c), "--seed", "one"]) for c in COMMANDS]
    + [(f"{c}-seq-len-1", [*_base(c), "--seq-len", "1"]) for c in ("profile", "drop", "quantize", "tune", "steer")]
    + [(f"{c}-eval-samples-0", [*_base(c), "--eval-samples", "0"]) for c in ("drop", "quantize", "tune", "steer")]
    + [
        ("probe-folds-1", ["probe", "--folds", "1"]),
        ("probe-examples-1", ["probe", "--examples", "1"]),
        ("tune-steps-0", ["tune", "--steps", "0"]),
        ("tune-grad-accum-0", ["tune", "--grad-accum", "0"]),
        ("steer-new-tokens-0", ["steer", "--data", "builtin:sentiment", "--new-tokens", "0"]),
    ]
)


def _options(cmd: str) -> set[str]:
    """Every option string ``layerwise CMD`` has."""
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[cmd]._actions for o in a.option_strings}


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_true_line_and_touches_nothing(home, argv, capsys):
    before = _snapshot(home)
    with pytest.raises(SystemExit) as e:  # argparse's own exit, or main's return code raised below
        raise SystemExit(cli.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and one_error_line(err), err
    other = (
        r"layerwise (" + "|".join([*COMMANDS, "report"]) + r")\b([^);]*)"
    )  # a hint that names another command's options
    for cmd, options in [*re.findall(other, err), (argv[0], re.sub(other, "", err))]:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", options)) - {"--help"}
        assert named <= _options(cmd), f"names options {cmd} does not have: {named - _options(cmd)}"
    assert _snapshot(home) == before
    assert not any(p.name.startswith(".") for p in home.rglob("*")), "a temp file was left behind"


def test_a_model_folder_whose_config_is_not_json(home, monkeypatch, capsys):
    from layerwise.loading import load

    monkeypatch.setattr(layerwise, "load", load)
    assert cli.main(["profile", "--model", "badmodel", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "config.json" in err and not (home / "out").exists(), err


def test_messages_of_the_probe_name_probe_options(home, capsys):
    (home / "three.csv").write_text("text,label\na,1\nb,1\nc,2\n")
    assert cli.main(["probe", "--data", "three.csv", "--examples", "2"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "--examples" in err and "`" not in err, err
    assert (
        cli._flags("`seq_len` 9 exceeds; lower `samples`", "probe")
        == "--profile-seq-len 9 exceeds; lower --profile-samples"
    )


# ---------------------------------------------------------------- section 1: never delete what the tool did not write


def test_atomic_dir_keeps_the_users_files_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "steer") as tmp:
        (tmp / "vector.safetensors").write_text("one")
        (tmp / "control_vector.gguf").write_text("one")
    assert json.loads((out / MANIFEST).read_text()) == {"steer": ["control_vector.gguf", "vector.safetensors"]}
    (out / "mine.txt").write_text("the user's")
    (out / "report.html").write_text("written by another step")
    with atomic_dir(out, "checkpoint") as tmp:
        (tmp / "config.json").write_text("ckpt")
    with atomic_dir(out, "steer") as tmp:
        (tmp / "vector.safetensors").write_text("two")
    assert _snapshot(out) | {MANIFEST: b""} == {
        "mine.txt": b"the user's",
        "report.html": b"written by another step",
        "vector.safetensors": b"two",
        "config.json": b"ckpt",
        MANIFEST: b"",
    }
    with pytest.raises(RuntimeError), atomic_dir(out, "steer") as tmp:  # a failed run changes nothing
        (tmp / "vector.safetensors").write_text("three")
        raise RuntimeError
    assert (out / "vector.safetensors").read_text() == "two" and not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_atomic_dir_never_removes_what_a_forged_manifest_points_outside(tmp_path):
    (tmp_path / "precious").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"steer": ["../precious", "x"]}))
    with atomic_dir(out, "steer") as tmp:
        (tmp / "y").write_text("y")
    assert (tmp_path / "precious").read_text() == "keep"


def test_steer_into_an_existing_folder_keeps_the_users_files(tmp_path, monkeypatch):
    from layerwise.steer import SteeringVector, run

    from .conftest import tiny_windows
    from .test_steer import _char_lm

    out = tmp_path / "s"
    out.mkdir()
    (out / "my_notes.md").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    pairs = [(f"it was good {i}", f"it was bad {i}") for i in range(4)]
    lm = _char_lm()
    for layers in ("L1", "L2"):  # the second run replaces the first run's files and keeps the user's
        run(
            lm,
            pairs,
            ["p a", "p b"],
            tiny_windows(1, 8).ids,
            report_prompts=["r"],
            layers=layers,
            alpha=0.5,
            new_tokens=1,
            out=out,
        )
    assert (out / "my_notes.md").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert SteeringVector.load(out, lm).units == ["L2"]
    before, write = _snapshot(out), SteeringVector.write

    def interrupted(self, folder, extra=None):  # Ctrl-C in the middle of writing leaves the folder as it was
        write(self, folder, extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(SteeringVector, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(
            lm,
            pairs,
            ["p a", "p b"],
            tiny_windows(1, 8).ids,
            report_prompts=["r"],
            layers="L1",
            alpha=0.5,
            new_tokens=1,
            out=out,
        )
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# ---------------------------------------------------------------- section 2: output paths checked first


@pytest.mark.parametrize(
    "path,folder,match",
    [
        ("a_file", True, "is a file; give a folder"),
        ("a_file/x", True, "a_file is a file"),
        ("mine", False, "is a folder; give a file path"),
        ("/proc/nope/x", True, "cannot be written"),
    ],
)
def test_check_out_refuses_what_cannot_be_written(home, path, folder, match):
    with pytest.raises(LayerwiseError, match=match):
        check_out(path, folder=folder)
    assert check_out("new/deeper", folder=True) and not (home / "new").exists()


# ---------------------------------------------------------------- section 3: text as people have it


def test_encodings_are_detected_or_named(tmp_path):
    text = "Grüße, déjà vu — ☃\n"
    for enc, raw in {
        "utf-8": text.encode(),
        "utf-8-sig": text.encode("utf-8-sig"),
        "utf-16": text.encode("utf-16"),
        "utf-32": text.encode("utf-32"),
    }.items():
        (tmp_path / enc).write_bytes(raw)
        assert read_file(tmp_path / enc).text == text, enc
    latin = "Grüße, déjà vu\n"
    (tmp_path / "l1").write_bytes(latin.encode("latin-1"))
    with pytest.raises(LayerwiseError, match=r"not UTF-8 \(byte 0xfc at offset 2\).*`encoding`"):
        read_file(tmp_path / "l1")
    got = read_file(tmp_path / "l1", "latin-1")
    assert got.text == latin and (got.encoding, got.how) == ("latin-1", "given")
    assert read_file(tmp_path / "utf-8", "latin-1").encoding == "utf-8"  # UTF-8 first: a folder may mix the two
    (tmp_path / "u16").write_bytes("plain words\n".encode("utf-16-le"))
    with pytest.raises(LayerwiseError, match="binary, not text.*`encoding` utf-16-le"):
        read_file(tmp_path / "u16")
    assert read_file(tmp_path / "u16", "utf-16-le").text == "plain words\n"
    with pytest.raises(LayerwiseError, match="unknown encoding"):
        read_file(tmp_path / "l1", "klingon")


def test_a_folder_reads_every_text_file_whatever_its_name_and_skips_binaries(tmp_path, caplog):
    for name in ("LICENSE", "README", "notes.rst"):
        (tmp_path / name).write_text(f"{name} text")
    (tmp_path / "blob.so").write_bytes(BINARY)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden")
    with caplog.at_level("WARNING", logger="layerwise"):
        c = read_corpus(str(tmp_path))
    assert c.texts == ["LICENSE text", "README text", "notes.rst text"]
    assert c.read == {"files": 3, "encodings": {"utf-8 (valid UTF-8)": 3}, "skipped_binary": ["blob.so"]}
    assert "skipped 1 binary file in" in caplog.text


def test_the_cli_notes_skipped_files_and_the_result_records_the_reading(home, monkeypatch, capsys):
    from .conftest import tiny_lm

    (home / "docs").mkdir()
    (home / "docs" / "COPYING").write_text("word " * 400)
    (home / "docs" / "x.png").write_bytes(BINARY)
    lm = tiny_lm("llama")

    class Tok:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) % 97 for c in text]}

    lm.tokenizer = Tok()
    monkeypatch.setattr(layerwise, "load", lambda *a, **k: lm)
    assert (
        cli.main(
            [
                "profile",
                "--data",
                "docs",
                "--samples",
                "2",
                "--seq-len",
                "16",
                "--ablation",
                "none",
                "--no-lens",
                "--json",
                "--out",
                "p",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "layerwise: note: skipped 1 binary file in docs: x.png" in err
    assert json.loads((home / "p" / "profile.json").read_text())["meta"]["data"]["read"]["skipped_binary"] == ["x.png"]


def test_pairs_reader_names_the_real_line(tmp_path):
    from layerwise.steer import read_pairs

    (tmp_path / "p.jsonl").write_text('{"positive": "a", "negative": "b"}\n\n\n{"positive": "a"}\n')
    with pytest.raises(LayerwiseError, match=r"line 4 of .*p.jsonl has no \"negative\" field"):
        read_pairs(data=str(tmp_path / "p.jsonl"))
