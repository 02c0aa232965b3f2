"""Windowing rule and one-line errors for bad input."""

import json

import pytest

from layerwise import cli
from layerwise.data import windows
from layerwise.errors import LayerwiseError
from layerwise.loading import load


class CharTok:
    """A tokenizer stand-in: one id per character, optional default BOS."""

    def __init__(self, bos: bool):
        self.bos_token_id = 1 if bos else None
        self.bos = bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) % 50 + 2 for c in text]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


@pytest.mark.parametrize("bos", [False, True])
def test_window_rule(tmp_path, bos):
    (tmp_path / "a.txt").write_text("abcdefghij" * 3)
    (tmp_path / "b.md").write_text("XYZ")
    w = windows(str(tmp_path), CharTok(bos), seq_len=8, samples=2)
    text = "abcdefghij" * 3 + "\n\n" + "XYZ"
    body = 7 if bos else 8
    ids = [ord(c) % 50 + 2 for c in text]
    n = len(ids) // body
    assert w.ids.shape == (n, 8)
    flat = w.ids[:, 1:] if bos else w.ids
    assert flat.flatten().tolist() == ids[: n * body]
    if bos:
        assert (w.ids[:, 0] == 1).all()
    assert w.calibration.shape[0] == 2 and w.evaluation.shape[0] == n - 2


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "world"}) + "\n")
    assert windows(str(p), CharTok(False), seq_len=4, samples=1).n_text_tokens == len("hello\n\nworld")


@pytest.mark.parametrize(
    "content,kwargs,match",
    [
        ("", {}, "empty"),
        ("abc", {}, "shorter than one window"),
        ("a" * 40, {"samples": 9}, "lower `samples`"),
        ("a" * 40, {"max_len": 4}, "exceeds the model's context"),
    ],
)
def test_bad_data(tmp_path, content, kwargs, match):
    p = tmp_path / "t.txt"
    p.write_text(content)
    with pytest.raises(LayerwiseError, match=match):
        windows(str(p), CharTok(False), seq_len=8, **{"samples": 1, **kwargs})


def test_builtin_pydoc_is_read():
    w = windows("builtin:pydoc", CharTok(False), seq_len=512, samples=4)
    assert w.ids.shape[0] > 100


@pytest.mark.parametrize(
    "ref,match",
    [("missing/dir/model.gguf", "not found"), ("./no/such/dir", "not found"), ("org/name-that-is-offline", "hub")],
)
def test_bad_model_refs(ref, match):
    with pytest.raises(LayerwiseError, match=match):
        load(ref)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LayerwiseError, match="not a readable GGUF"):
        load(str(p))


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LayerwiseError, match="pickle"):
        load(str(tmp_path))


def test_unknown_architecture_in_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(LayerwiseError, match="unsupported architecture 'mamba'.*llama"):
        load(str(tmp_path))


def test_cli_error_is_one_line(capsys, tmp_path):
    rc = cli.main(["profile", "--model", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("layerwise: error:") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_report_escapes_strings(tmp_path):
    from layerwise.profile import Profile, Unit
    from layerwise.report import render

    evil = "<script>alert(1)</script>"
    prof = Profile(
        meta={"model_id": evil, "data": {"source": evil}},
        units=[Unit(f"L{i}", i, "block", {"bi": float(i), "ablate_nll": float(i)}) for i in range(3)],
        agreement={"reference": "ablate_nll", "by_kind": {"block": {"bi": {"rho": 1.0, "n": 3}}}},
    )
    page = render(prof)
    assert evil not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # title, model id, data source
