"""Files in and out, and what every result records.

Output is atomic: an interrupted run never leaves a half-written file, and a
folder keeps every file it did not write (:func:`atomic_dir`). Every result
records its :func:`provenance`, and anything made for one model's weights
(a profile, a plan, a steering vector) is refused on another by
:func:`check_same_model`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import LayerwiseError
from .version import __version__

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place.

    The rename is atomic on POSIX and Windows, so readers see either the old
    file or the whole new one; on any error (Ctrl-C included) the temp file is
    removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN is refused: it is not JSON)."""
    return write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


#: Beside the files a folder-writing command put in a folder: which of them it wrote, by owner,
#: so that a later run replaces or removes its own stale files and never anything else.
MANIFEST = ".layerwise-files.json"


@contextmanager
def atomic_dir(path: str | os.PathLike, owner: str) -> Iterator[Path]:
    """Yield a temp folder whose files take their places in ``path`` only if the block succeeds.

    A new ``path`` appears whole (one rename). An existing one keeps every
    file this run did not write: each new file replaces its namesake
    atomically, and files that ``owner`` wrote there on an earlier run and
    this run did not write again are removed, so a reloaded result never
    mixes two runs. The manifest that says what ``owner`` wrote is written
    last. On any error (Ctrl-C included) ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part"))
    try:
        yield tmp
        _publish(tmp, path, owner)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path, owner: str) -> None:
    """Move ``tmp``'s files into ``path`` (see :func:`atomic_dir`)."""
    files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    if not path.exists():
        _write_manifest(tmp, {owner: files})
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, path)
        return
    if not path.is_dir():
        raise LayerwiseError(f"{path} is a file, not a folder; give `out` a folder path")
    written = _read_manifest(path)
    for rel in files:
        target = path / rel
        if target.is_dir():
            raise LayerwiseError(
                f"{target} is a folder, where this run writes a file; move it or give `out` another folder"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, target)
    for rel in set(written.get(owner, [])) - set(files):
        if (path / rel).is_file():
            (path / rel).unlink()
    _write_manifest(path, {**written, owner: files})


def _read_manifest(folder: Path) -> dict[str, list[str]]:
    """What layerwise wrote in ``folder``, by owner; an unreadable manifest counts as none (nothing is removed)."""
    try:
        found = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        k: [f for f in v if isinstance(f, str) and ".." not in Path(f).parts]
        for k, v in found.items()
        if isinstance(v, list)
    }


def _write_manifest(folder: Path, written: dict[str, list[str]]) -> None:
    write_atomic(folder / MANIFEST, json.dumps(written, indent=1, sort_keys=True) + "\n")


def check_out(path: str | os.PathLike, *, folder: bool = True, option: str = "--out") -> Path:
    """Fail in one line, before any work, when ``path`` cannot be created and written.

    ``folder``: ``path`` is a folder the command writes into (else one file).
    The check creates and removes one temp file in the deepest folder that
    exists, so permissions, read-only file systems and pseudo file systems
    (``/proc``) are all found; nothing is left behind.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise LayerwiseError(f"{option} {path} is a file; give a folder path (this command writes several files)")
    if not folder and path.is_dir():
        raise LayerwiseError(f"{option} {path} is a folder; give a file path such as {path / 'report.html'}")
    base = path if folder else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise LayerwiseError(f"{option} {path} cannot be created: {base} is a file; give a path under a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".layerwise-check.")
    except OSError as exc:
        raise LayerwiseError(
            f"{option} {path} cannot be written ({base}: {exc.strerror}); give a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so memory stays small. A file is read once per process while
    its size and modification time stay the same: a command that plans its memory and then loads the model names
    a 7B checkpoint's 14 GB twice."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file's content, or one line saying why it cannot be read (missing, unreadable, not UTF-8, not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerwiseError(f"{path} not found; give {what}") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 (UnicodeDecodeError) or not JSON (JSONDecodeError)
        raise LayerwiseError(
            f"{path} is not {what} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:80]})"
        ) from None


def load_result(cls: type[T], path: str | os.PathLike, name: str, what: str) -> T:
    """A saved result (its folder or its JSON file ``name``) as ``cls``, or one line saying it is not one."""
    path = Path(path)
    path = path / name if path.is_dir() else path
    d = read_json(path, f"a layerwise {what} result")
    kind = d.pop("kind", what) if isinstance(d, dict) else what
    if kind != what:
        raise LayerwiseError(f"{path} is a layerwise {kind} result, not a {what} result; give a {what} result")
    try:
        return cls(**d)
    except TypeError as exc:
        raise LayerwiseError(f"{path} is not a layerwise {what} result ({exc.__class__.__name__})") from None


#: The command line results record: the CLI sets its own (``layerwise ...``, also when called in-process);
#: else ``sys.argv``.
COMMAND: ContextVar[str | None] = ContextVar("layerwise_command", default=None)


def provenance(*, seed: int | None, batch_size: int) -> dict:
    """What every result file records beside the model and the data: package versions, the command line, the seed
    and the batch size (batching changes float rounding, so it is part of what reproduces a number)."""
    return {
        "versions": _versions(),
        "command": COMMAND.get() or shlex.join(sys.argv),
        "seed": seed,
        "batch_size": batch_size,
    }


def _versions() -> dict:
    import torch
    import transformers

    return {
        "layerwise": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_same_model(made_on: str | None, have: str | None, what: str, fix: str) -> None:
    """Refuse ``what`` (made on the weights hashed ``made_on``) on a model hashed ``have``, when both are known:
    a profile's ranking, a plan's choices or a vector's direction mean nothing on other weights.

    ``what`` reads before "another model" (``"the plan was made for"``); ``fix`` says what to do instead.
    """
    if made_on and have and made_on != have:
        raise LayerwiseError(f"{what} another model (hash {made_on[:12]}, this model {have[:12]}); {fix}")


def save_shards(weights: Iterable[tuple[str, torch.Tensor]], out: Path, *, shard_bytes: int) -> set[str]:
    """Write ``(name, tensor)`` pairs, as they come, into safetensors shards of about ``shard_bytes`` (a bigger
    tensor has a shard to itself) inside ``out``, and the index transformers reads (a single shard is
    ``model.safetensors``, with no index); return the names written. Only one shard is held at a time."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    total = held = 0  # bytes written in all, and in the shard being filled

    def flush() -> None:
        save_file(current, str(out / f".shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(current))
        current.clear()

    for name, tensor in weights:
        if current and held + tensor.nbytes > shard_bytes:
            flush()
            held = 0
        current[name] = tensor
        held += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(shards) == 1:
        (out / ".shard-0.safetensors").rename(out / "model.safetensors")
        return set(shards[0])
    index: dict[str, str] = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f".shard-{i}.safetensors").rename(out / final)
        index |= dict.fromkeys(names, final)
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": index})
    return set(index)


def save_model_config(model: Any, out: Path, *, dtype: torch.dtype | None = None) -> None:
    """The config and generation config of a checkpoint written tensor by tensor (:func:`save_shards`), as
    ``save_pretrained`` writes them: the model's class named under ``architectures`` (vLLM picks its
    implementation by it), the model's own config left as it is; ``dtype`` the weights' stored dtype."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
