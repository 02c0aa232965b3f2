"""Activation steering at a measured layer, with its effect and its cost measured, exported to llama.cpp.

One concern a module: :mod:`.pairs` (what is read), :mod:`.fitting` (directions and the layer), :mod:`.vector`
(the vector and its hook), :mod:`.measuring` (effect and cost), :mod:`.export` (llama.cpp control vectors) and
:mod:`.command` (a whole ``layerwise steer`` run).

Where: a steering vector for unit ``L{k}`` is added to block k's *output* (the
residual stream block k+1 reads), the place llama.cpp adds a control vector's
``direction.k``; :mod:`layerwise.features` reads activations at the same place.

What (``method``): ``diffmean``, the mean positive readout minus the mean
negative one (CAA); ``pca``, the first principal direction of the paired
differences ``pos_i - neg_i`` taken about zero (not centred, so the shared
shift that *is* the concept is kept), its sign turned toward the positives;
``probe``, the weight of a saved ``layerwise probe`` result
(``ProbeResult.load(dir).direction(unit)``), its sign turned toward the
positives of the calibration pairs. Every direction is stored with unit norm.

How strong: ``alpha`` is a multiple of the layer's mean residual norm (the
mean L2 norm of the training readouts there), so ``alpha=0.5`` adds a vector
half as long as the stream it joins, on any model. ``alpha="auto"`` takes the
smallest multiple on :data:`ALPHA_GRID` whose mean change in log-probability
of the positive over the negative continuations reaches ``target`` nats on the
calibration prompts.

Which layer (``layers="auto"``): the positive/negative pairs are split by
:func:`split` into a calibration half, on which each block's direction is fit,
and a held-out half, on which the direction's separation is measured (Cohen's
d of the projections, and the share of pairs whose positive projects above its
negative); the best-separating block is chosen. The saved vector is then refit
on all pairs.

Which prompts do what: ``prompts`` are split by :func:`split` (seed + 1); the
first part is the *calibration* set that chooses ``alpha``. Effects are
reported on ``report_prompts`` when they are given, and the second part of
``prompts`` is then *development* text that this run does not use (the
built-in demo: its 16 ``PROMPTS`` shaped the defaults, so its effects are
reported on fresh prompts, :func:`layerwise.corpora.sentiment.report_prompts`);
without ``report_prompts`` the second part is the report set. ``steer.json``
records every set under ``choice.prompts``. The defaults (``target`` 2 nats,
:data:`ALPHA_GRID`, :data:`DEFAULT_ALPHA`) were fixed before the built-in
report prompts existed and have not been changed after seeing results on them.
Cost is measured on ``builtin:pydoc`` evaluation windows.
"""

from .command import SteerReport, run
from .export import export_gguf, read_gguf
from .fitting import METHODS, Fit, fit, fit_features, probe_result, rank_variants, train
from .measuring import Prompts, choose_alpha, generate, margins, measure, prompt_sets
from .pairs import read_pairs, read_prompts, split
from .vector import ALPHA_GRID, DEFAULT_ALPHA, SteeringVector, check_alpha, parse_layers, run_meta

__all__ = [
    "ALPHA_GRID",
    "DEFAULT_ALPHA",
    "METHODS",
    "Fit",
    "Prompts",
    "SteerReport",
    "SteeringVector",
    "check_alpha",
    "choose_alpha",
    "export_gguf",
    "fit",
    "fit_features",
    "generate",
    "margins",
    "measure",
    "parse_layers",
    "probe_result",
    "prompt_sets",
    "rank_variants",
    "read_gguf",
    "read_pairs",
    "read_prompts",
    "run",
    "run_meta",
    "split",
    "train",
]
