"""The one result contract: every kind loads with one call, names its kind when saved, and renders through the
registry; results saved before files named their kind (tests/data/results_v0) still load and render."""

import json
import shutil
from pathlib import Path

import pytest

from layerwise import results
from layerwise.cli import main
from layerwise.errors import LayerwiseError

OLD = Path(__file__).parent / "data" / "results_v0"
KINDS = ("profile", "drop", "quantize", "tune", "probe", "steer")


@pytest.mark.parametrize("kind", KINDS)
def test_an_old_result_loads_and_renders_by_its_files(kind, tmp_path, capsys):
    folder = shutil.copytree(OLD / kind, tmp_path / kind)
    doc = json.loads((folder / results.REGISTRY[kind].file).read_text())
    assert "kind" not in doc  # written before results named their kind
    assert results.kind_of(folder) == kind
    loaded = results.load(folder)
    assert type(loaded).__name__ == results.REGISTRY[kind].result.split(":")[1]
    assert main(["report", str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert f"<title>layerwise {kind}:" in page
    results.print_tables(kind, loaded)
    assert capsys.readouterr().out.count("┃") > 0  # at least one table with a header row


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "steer"])
def test_a_result_saved_now_names_its_kind(kind, tmp_path):
    old = results.load(OLD / kind)
    old.save(tmp_path / "new")
    doc = json.loads((tmp_path / "new" / results.REGISTRY[kind].file).read_text())
    assert doc["kind"] == kind and old.to_dict()["kind"] == kind
    assert (
        results.kind_of(tmp_path / "new") == kind
        and results.kind_of(tmp_path / "new" / results.REGISTRY[kind].file) == kind
    )
    again = results.load(tmp_path / "new")
    assert again.to_dict() == old.to_dict()
    page = results.render(tmp_path / "new", tmp_path / "page.html")
    assert f"<title>layerwise {kind}:" in page.read_text()


def test_a_result_names_a_kind_it_is_not_loaded_as(tmp_path):
    folder = shutil.copytree(OLD / "tune", tmp_path / "t")
    doc = json.loads((folder / "tune.json").read_text())
    (folder / "tune.json").write_text(json.dumps({**doc, "kind": "steer"}))
    from layerwise.tune import TuneReport

    with pytest.raises(LayerwiseError, match="is a layerwise steer result, not a tune result"):
        TuneReport.load(folder)
    (folder / "tune.json").write_text(json.dumps({**doc, "kind": "future"}))
    with pytest.raises(LayerwiseError, match="'future' result, which this layerwise does not know"):
        results.kind_of(folder)


def test_a_folder_without_a_result_says_so(tmp_path):
    with pytest.raises(LayerwiseError, match="holds no layerwise result"):
        results.load(tmp_path)
    from layerwise import steer

    with pytest.raises(LayerwiseError, match="holds a tune result; give a folder `layerwise probe` saved"):
        steer.probe_result(str(OLD / "tune"))
