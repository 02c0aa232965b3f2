"""What ``layerwise tune`` trains on: text windows or chat conversations (prompt/response or messages, rendered
with the model's chat template), with held-out windows that never overlap the training examples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Corpus, TextFile, Windows, parse_jsonl, read_corpus, read_file, windows
from ..errors import LayerwiseError


@dataclass
class TuneData:
    """Training examples (inputs, labels with -100 where no loss is taken, attention mask) and held-out windows.

    ``eval_ids`` never overlaps the training examples: for text, the windows
    after the training windows; for chat data, the held-out conversations
    rendered with the chat template. ``prompts`` are the held-out chat prompts
    (for the diversity of sampled responses).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    eval_ids: torch.Tensor
    prompts: list[list[dict]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_windows(cls, w: Windows, eval_samples: int = 16) -> TuneData:
        """Text: train on every token of the calibration windows; evaluate on the windows after them."""
        ids = w.calibration
        return cls(
            ids, ids.clone(), torch.ones_like(ids), w.evaluation[:eval_samples], [], {**w.meta(), "kind": "text"}
        )

    def as_windows(self) -> Windows:
        """The training examples as calibration windows (to measure a Profile on what is trained on)."""
        n = int(self.ids.shape[0])
        return Windows(
            ids=self.ids,
            n_calib=n,
            source=str(self.meta.get("source")),
            data_hash=str(self.meta.get("data_hash")),
            n_text_tokens=int(self.mask.sum()),
        )


def _conversations(f: TextFile) -> list[list[dict]] | None:
    """A JSONL file's conversations (``prompt``/``response`` or chat ``messages``), or None for plain ``text`` lines."""
    rows = parse_jsonl(f, want='"text", or "prompt" and "response", or "messages"')
    if not rows or "text" in rows[0][1]:
        return None
    return [_conversation(f.path, n, r) for n, r in rows]


def _conversation(path: str, n: int, r: dict) -> list[dict]:
    """One JSONL line as chat messages, or a one-line error naming the line and what it lacks."""
    if "prompt" in r and "response" in r:
        return [{"role": "user", "content": str(r["prompt"])}, {"role": "assistant", "content": str(r["response"])}]
    msgs = r.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise LayerwiseError(
            f'line {n} of {path} needs "prompt" and "response", or a "messages" list (or "text" on every line)'
        )
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise LayerwiseError(
                f'line {n} of {path}: each message must be an object with "role" and "content" (got '
                f"{json.dumps(m)[:60]})"
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise LayerwiseError(
            f"line {n} of {path}: the messages have no assistant turn, so there is nothing to train on"
        )
    return [{"role": m["role"], "content": str(m["content"])} for m in msgs]


def _render(tokenizer, conv: list[dict], seq_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids of a conversation and its labels: assistant tokens only, everything else -100."""
    ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
    labels = [-100] * len(ids)
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(conv[:i], tokenize=True, add_generation_prompt=True, return_dict=False)
        )
        end = len(tokenizer.apply_chat_template(conv[: i + 1], tokenize=True, return_dict=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:seq_len], labels[:seq_len]
    return (ids, labels) if any(x != -100 for x in labels[1:]) else None


@dataclass(frozen=True)
class Chats:
    """Conversations read from a JSONL file, in file order."""

    source: str
    convs: list[list[dict]]


def read_tuning(ref: str, encoding: str | None = None) -> Corpus | Chats:
    """The tuning data, read and checked without a model: conversations from a chat JSONL file, else a text corpus."""
    path = Path(ref)
    if path.suffix == ".jsonl" and path.is_file():
        f = read_file(path, encoding)
        convs = _conversations(f)
        if convs is not None:
            return Chats(ref, convs)
    return read_corpus(ref, encoding)


def tuning_data(
    ref: str | Corpus | Chats,
    tokenizer,
    *,
    seq_len: int = 256,
    samples: int = 64,
    eval_samples: int = 16,
    max_len: int | None = None,
) -> TuneData:
    """Text trains on every token; JSONL prompt/response or messages trains on response tokens, with the chat template.

    The first ``samples`` windows (or conversations) train; the rest are held out.
    ``ref`` may be what :func:`read_tuning` read before the model loaded.
    """
    src = read_tuning(ref) if isinstance(ref, str) else ref
    ref = src.source
    if isinstance(src, Corpus):
        w = windows(src, tokenizer, seq_len=seq_len, samples=samples, max_len=max_len)
        if w.evaluation.shape[0] == 0:
            raise LayerwiseError(
                f"data {ref} gives {w.ids.shape[0]} windows and training takes them all; lower samples "
                "(--samples) so some are held out"
            )
        return TuneData.from_windows(w, eval_samples)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LayerwiseError(
            f"{ref} holds chat examples, but this model's tokenizer has no chat template; give plain text instead"
        )
    convs = src.convs
    if len(convs) <= samples:
        raise LayerwiseError(
            f"{ref} has {len(convs)} examples; training on {samples} leaves none held out: lower samples "
            f"(--samples) below {len(convs)}"
        )
    rendered = [r for r in (_render(tokenizer, c, seq_len) for c in convs[:samples]) if r is not None]
    if not rendered:
        raise LayerwiseError(
            f"no training example of {ref} keeps a response token within {seq_len} tokens; raise seq_len (--seq-len)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(rendered)
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (x, y) in enumerate(rendered):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    held = convs[samples:]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in held]
    ev = windows(ref, tokenizer, seq_len=seq_len, samples=1, max_len=max_len, texts=texts)
    meta = {
        "source": ref,
        "kind": "chat",
        "data_hash": ev.data_hash,
        "seq_len": seq_len,
        "n_train_examples": n,
        "n_heldout_examples": len(held),
        "n_eval_windows": min(eval_samples, int(ev.ids.shape[0])),
    }
    return TuneData(
        ids, labels, mask, ev.ids[:eval_samples], [c[:-1] for c in held if c[-1]["role"] == "assistant"], meta
    )
