"""The one result contract: every saved result names its ``kind``, loads with one call, and renders through one
registry.

Each command writes one JSON file that starts ``{"kind": ..., "meta": {...}, ...}`` (the metadata holds the
provenance: model hash, versions, command line, seed, peak memory). :data:`REGISTRY` maps a kind to that file, the
class that loads it, the page that renders it and the tables the command prints; :func:`load` reads any result
folder (or its JSON file), :func:`render` writes its page and :func:`print_tables` prints its tables. Results
written before files named their kind (layerwise 0.1.0) are still recognised, by their file names
(:func:`kind_of`). The registry names classes and pages as ``module:attribute`` and imports them only when asked,
so that this module sits below every action and the report.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LayerwiseError
from .io import read_json


@dataclass(frozen=True)
class ResultKind:
    """Where one kind of result lives and what shows it."""

    #: The JSON file in a result folder that holds it (and its ``kind``).
    file: str
    #: ``module:Class`` whose ``load(folder)`` reads it.
    result: str
    #: ``module:function`` writing its page: ``function(result, out)``, plus the result folder when the page's
    #: suggested commands name its files (``names_folder``).
    page: str
    names_folder: bool = False


REGISTRY: dict[str, ResultKind] = {
    "profile": ResultKind("profile.json", "layerwise.profile:Profile", "layerwise.report.profile:write_report", True),
    "drop": ResultKind("eval.json", "layerwise.drop:DropReport", "layerwise.report.drop:write_drop_report", True),
    "quantize": ResultKind(
        "eval.json", "layerwise.quantize:QuantReport", "layerwise.report.quant:write_quant_report", True
    ),
    "tune": ResultKind("tune.json", "layerwise.tune:TuneReport", "layerwise.report.tune:write_tune_report"),
    "probe": ResultKind("probe.json", "layerwise.probe:ProbeResult", "layerwise.report.probe:write_probe_report"),
    "steer": ResultKind("steer.json", "layerwise.steer:SteerReport", "layerwise.report.steer:write_steer_report"),
}

#: The order in which a folder's JSON files are asked for their kind: an action's result before a profile kept
#: beside it.
_FILES = ("steer.json", "tune.json", "probe.json", "eval.json", "profile.json")


def _attribute(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LayerwiseError(
            f"{path} does not exist; give a result folder or its JSON file (profile.json, eval.json, ...)"
        )
    return path if path.is_dir() else path.parent


def _named_kind(path: Path) -> str | None:
    """The ``kind`` a result file names, or None for a file from before results named theirs."""
    doc = read_json(path, "a layerwise result")
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind is not None and kind not in REGISTRY:
        raise LayerwiseError(f"{path} is a {kind!r} result, which this layerwise does not know; upgrade layerwise")
    return kind


def kind_of(path: str | Path) -> str:
    """The kind of the result at ``path`` (a folder, or the JSON file of one): the kind its file names, else, for a
    result written before files named it, the kind its file names tell."""
    path, folder = Path(path), _folder(path)
    files = [path] if path.is_file() else [folder / name for name in _FILES if (folder / name).is_file()]
    for f in files:
        kind = _named_kind(f)
        if kind is not None:
            return kind
    return _legacy_kind(folder, path.is_file())


def _legacy_kind(folder: Path, given_file: bool) -> str:
    """A layerwise 0.1.0 result's kind, from the files its command wrote (a JSON file given by name and otherwise
    unrecognised is taken for a profile, as 0.1.0 did)."""
    for name, kind in (("steer.json", "steer"), ("tune.json", "tune"), ("probe.json", "probe")):
        if (folder / name).exists():
            return kind
    plan = read_json(folder / "plan.json", "a layerwise plan file") if (folder / "plan.json").exists() else {}
    if not isinstance(plan, dict):
        raise LayerwiseError(
            f"{folder / 'plan.json'} is not a layerwise plan file (a JSON {type(plan).__name__}); give a folder a "
            "run wrote"
        )
    if plan and plan.get("kind", "quantize") == "quantize":
        return "quantize"
    if (folder / "eval.json").exists() and not (folder / "profile.json").exists():
        return "drop"
    if given_file or (folder / "profile.json").exists():
        return "profile"
    raise LayerwiseError(
        f"{folder} holds no layerwise result (none of {', '.join(_FILES)}); give a folder a layerwise command wrote"
    )


def load(path: str | Path, kind: str | None = None) -> Any:
    """The result at ``path`` (a folder, or the JSON file of one), as its kind's typed object (``kind``: already
    known from :func:`kind_of`, so its file is not read twice)."""
    return _attribute(REGISTRY[kind or kind_of(path)].result).load(Path(path))


def render(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the page of the result at ``path`` to ``out`` (default: ``report.html`` in the result's folder)."""
    kind, folder = kind_of(path), _folder(path)
    entry = REGISTRY[kind]
    result = load(path, kind)
    out = Path(out) if out else folder / "report.html"
    page = _attribute(entry.page)
    return page(result, out, folder) if entry.names_folder else page(result, out)


def print_tables(kind: str, result: Any) -> None:
    """Print the tables a ``kind`` result ends its command with (:mod:`layerwise.report.tables`)."""
    from rich.console import Console

    from .report.tables import tables

    console = Console()
    for t in tables(kind, result):
        console.print(t)
