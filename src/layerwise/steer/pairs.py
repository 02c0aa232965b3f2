"""What steering reads: contrastive pairs (JSONL or two line files) and prompts, checked, and the seeded split
of a set into a calibration part and a held-out part."""

from __future__ import annotations

import torch

from ..data import read_jsonl, read_lines
from ..errors import LayerwiseError


def read_pairs(
    *,
    data: str | None = None,
    pos: str | None = None,
    neg: str | None = None,
    n: int = 64,
    seed: int = 0,
    encoding: str | None = None,
) -> list[tuple[str, str]]:
    """Positive/negative pairs from ``builtin:sentiment``, a JSONL of ``{"positive", "negative"}``, or two line-paired
    text files.

    Files are decoded by :func:`layerwise.data.read_file`'s rule; blank lines are skipped, and messages name real line
    numbers.
    """
    if data and (pos or neg):
        raise LayerwiseError("give either data (builtin:sentiment or pairs.jsonl) or pos and neg text files, not both")
    if data == "builtin:sentiment":
        from ..corpora import sentiment

        return sentiment.pairs(n, seed)
    if data:
        rows = read_jsonl(data, encoding, fields=("positive", "negative"))
        return _checked([(str(r["positive"]), str(r["negative"])) for _, r in rows], data)
    if not (pos and neg):
        raise LayerwiseError(
            "steering needs contrastive texts: data=builtin:sentiment, data=pairs.jsonl, or both pos and neg files"
        )
    p, q = read_lines(pos, encoding), read_lines(neg, encoding)
    if len(p) != len(q):
        raise LayerwiseError(
            f"{pos} has {len(p)} texts but {neg} has {len(q)}; line i of each must form a pair, so give them the "
            "same count"
        )
    return _checked([(a, b) for (_, a), (_, b) in zip(p, q)], f"{pos} and {neg}")


def read_prompts(path: str, encoding: str | None = None) -> list[str]:
    """Prompts, one per non-blank line."""
    return [line for _, line in read_lines(path, encoding)]


def _checked(pairs: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    if len(pairs) < 2:
        raise LayerwiseError(f"{where} gives {len(pairs)} pairs; steering needs at least 2 (one to fit, one held out)")
    if any(not p.strip() or not q.strip() for p, q in pairs):
        raise LayerwiseError(f"{where} has an empty text in a pair; every pair needs a positive and a negative text")
    return pairs


def split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """The documented split: indices permuted by ``torch.randperm(n)`` under ``manual_seed(seed)``; the first ceil(n/2)
    calibrate, the rest are held out."""
    if n < 2:
        raise LayerwiseError(f"{n} items cannot be split into calibration and held-out parts; give at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = (n + 1) // 2
    return sorted(order[:cut]), sorted(order[cut:])
