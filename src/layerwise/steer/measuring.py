"""What steering does and costs: log-prob margins of the continuation pairs, greedy generations for the
independent scorer, the prompt sets by role, the automatic strength, and every (layer, alpha) measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from ..errors import LayerwiseError
from ..evaluate import BlockVariant, next_token_logits, paired_difference, quality, streamed_quality
from ..features import collect_ids, tokenize
from ..loading import LoadedModel
from ..metrics import stream as st
from .fitting import Fit
from .pairs import split
from .vector import ALPHA_GRID, SteeringVector


def _pad(seqs: Sequence[Sequence[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        x[j, sl] = torch.tensor(list(s))
        mask[j, sl] = 1
    return x, mask


@torch.no_grad()
def margins(
    lm: LoadedModel, prompts: list[list[int]], conts: list[tuple[list[int], list[int]]], *, batch_size: int = 32
) -> torch.Tensor:
    """Per prompt, the mean over continuation pairs of log p(positive | prompt) - log p(negative | prompt) (summed over
    tokens).

    The tokens a pair shares before its texts differ have the same log-probability in both and cancel, so the prompt and
    that shared part are run once (their KV cache kept) and only the two differing tails are scored from it.
    """
    heads, tails = [], []
    for p in prompts:
        for pos, neg in conts:
            k = next((i for i, (a, b) in enumerate(zip(pos, neg)) if a != b), min(len(pos), len(neg)))
            heads.append(p + pos[:k])
            tails.append((pos[k:], neg[k:]))
    if lm.streamed is not None:
        out = _streamed_margins(lm, heads, tails, batch_size)
    else:
        out = torch.cat(
            [
                _tail_margins(lm, heads[i : i + batch_size], tails[i : i + batch_size])
                for i in range(0, len(heads), batch_size)
            ]
        )
    return out.view(len(prompts), len(conts)).mean(1)


def _streamed_margins(
    lm: LoadedModel, heads: list[list[int]], tails: list[tuple[list[int], list[int]]], batch_size: int
) -> torch.Tensor:
    """:func:`_tail_margins` for a model on disk, with no cache: each head runs with each of its tails (the
    same positions, right-padded), every batch passing each block while its weights are read; then the head reads
    only the tails' positions."""
    s, an = lm.streamed, lm.anatomy
    assert s is not None
    seqs = [(head, tail) for head, pair in zip(heads, tails) for tail in pair]
    chunks = [seqs[i : i + 2 * batch_size] for i in range(0, len(seqs), 2 * batch_size)]
    padded = [_pad([h + t for h, t in chunk], 0, left=False) for chunk in chunks]
    hidden = s.last_hidden([{"input_ids": x, "attention_mask": mask} for x, mask in padded])
    logp = torch.zeros(len(seqs), dtype=torch.float64)
    row = 0
    with s.head(), torch.no_grad():
        for chunk, h in zip(chunks, hidden):
            for j, (head, tail) in enumerate(chunk):
                if tail:
                    where = torch.arange(len(head) - 1, len(head) + len(tail) - 1)
                    z = torch.log_softmax(an.logits(h[j, where]).float(), -1).cpu()
                    logp[row + j] = float(z[torch.arange(len(tail)), torch.tensor(tail)].double().sum())
            row += len(chunk)
    return logp[0::2] - logp[1::2]


def _tail_margins(lm: LoadedModel, heads: list[list[int]], tails: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """log p(positive tail | head) - log p(negative tail | head) per row: heads left-padded with a cache, tails
    right-padded after it."""
    x, mask = _pad(heads, 0, left=True)
    where = (mask.cumsum(1) - 1).clamp(min=0)
    run = lm.model(
        input_ids=x.to(lm.device),
        attention_mask=mask.to(lm.device),
        position_ids=where.to(lm.device),
        use_cache=True,
        logits_to_keep=1,
    )  # only the head's last position is read: the rest would be (batch, seq, vocab) floats
    first = (
        torch.log_softmax(run.logits[:, -1].float(), -1).cpu().repeat_interleave(2, 0)
    )  # predicts each tail's first token
    seqs = [t for pair in tails for t in pair]  # positive, negative, ... matching the repeated cache rows
    logp = torch.zeros(len(seqs), dtype=torch.float64)
    width = max(len(t) for t in seqs)
    if width > 1:
        cache = run.past_key_values
        cache.batch_repeat_interleave(2)
        y, ymask = _pad([t or [0] for t in seqs], 0, left=False)
        ypos = where[:, -1:].repeat_interleave(2, 0) + 1 + torch.arange(y.shape[1])
        full = torch.cat([mask.repeat_interleave(2, 0), ymask], 1)
        rest = torch.log_softmax(
            lm.model(
                input_ids=y.to(lm.device),
                attention_mask=full.to(lm.device),
                position_ids=ypos.to(lm.device),
                past_key_values=cache,
                use_cache=True,
            ).logits.float(),
            -1,
        ).cpu()
    for j, t in enumerate(seqs):
        if t:
            logp[j] = float(first[j, t[0]]) + (
                float(rest[j, torch.arange(len(t) - 1), torch.tensor(t[1:])].sum()) if len(t) > 1 else 0.0
            )
    return logp[0::2] - logp[1::2]


@torch.no_grad()
def generate(lm: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Greedy continuations of a left-padded batch of prompts (decoded new tokens only)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    x, mask = _pad(prompts, pad, left=True)
    if lm.streamed is not None:
        new = lm.streamed.greedy(x, mask, new_tokens, pad=pad)
    else:
        new = lm.model.generate(
            input_ids=x.to(lm.device),
            attention_mask=mask.to(lm.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )[:, x.shape[1] :]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


@dataclass
class Prompts:
    """Token ids of the calibration and report prompts, of the continuation pairs scored after them, and every set's
    texts by role."""

    calibration: list[list[int]]
    report: list[list[int]]
    conts: list[tuple[list[int], list[int]]]
    roles: dict[str, list[str]]  # calibration / development / report texts, saved in steer.json


def prompt_sets(
    lm: LoadedModel,
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    held_pairs: list[int],
    *,
    seed: int,
    report: Sequence[str] | None = None,
    max_continuations: int = 4,
) -> Prompts:
    """Split ``prompts`` (:func:`split`, seed + 1) into calibration and development/report parts (module docstring),
    tokenize the report set (``report`` when given) and the held-out pairs as continuations (a leading space, no
    special tokens)."""
    prompts = list(prompts)
    cal, second = split(len(prompts), seed + 1)
    roles = {
        "calibration": [prompts[i] for i in cal],
        "development": [prompts[i] for i in second] if report is not None else [],
        "report": list(report) if report is not None else [prompts[i] for i in second],
    }
    if not roles["report"] or any(not p.strip() for p in roles["report"]):
        raise LayerwiseError(
            "the report prompts are empty or hold an empty line; give at least one prompt, one per line"
        )
    conts = [
        tuple(lm.tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in pairs[i])
        for i in held_pairs[:max_continuations]
    ]
    return Prompts(tokenize(lm, roles["calibration"])[0], tokenize(lm, roles["report"])[0], conts, roles)


def choose_alpha(
    lm: LoadedModel, vec: SteeringVector, ps: Prompts, *, target: float = 2.0, grid: Sequence[float] = ALPHA_GRID
) -> dict:
    """The smallest multiple on ``grid`` whose mean log-prob margin shift on the calibration prompts reaches ``target``
    nats."""
    base = margins(lm, ps.calibration, ps.conts)
    tried = []
    for a in sorted(grid):
        with vec.apply(lm, a):
            shift = float((margins(lm, ps.calibration, ps.conts) - base).mean())
        tried.append({"alpha": a, "margin_shift": shift})
        if shift >= target:
            return {"alpha": a, "reached": True, "target": target, "tried": tried}
    return {"alpha": max(grid), "reached": False, "target": target, "tried": tried}


def measure(
    lm: LoadedModel,
    f: Fit,
    configs: list[tuple[tuple[str, ...], float]],
    ps: Prompts,
    eval_ids: torch.Tensor,
    *,
    new_tokens: int = 24,
    scorer: Callable[[str], float] | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Effect on the report prompts and cost on neutral windows for every (units, alpha), each ± SE.

    Effects, each the paired difference steered minus unsteered across the
    report prompts: the log-prob margin of the positive over the negative
    continuations; the projection of the last block's readout at the
    prompt's last token onto that block's direction, in units of its
    positive-negative gap (1.0 = as far as from a negative text to a
    positive one); and with ``scorer``, the score of greedy continuations.
    Cost: :func:`layerwise.evaluate.quality` (NLL, KL to the unsteered model).
    """
    from tqdm.auto import tqdm

    last = f"L{lm.anatomy.n_layers - 1}"

    def effects() -> dict:
        proj = collect_ids(lm, ps.report, units=[last], read="last").values[last] @ f.directions[last] / f.gaps[last]
        texts = generate(lm, ps.report, new_tokens) if scorer else []
        return {
            "margin": margins(lm, ps.report, ps.conts).tolist(),
            "proj": proj.tolist(),
            "texts": texts,
            "score": [scorer(t) for t in texts] if scorer else [],
        }

    base = effects()
    vecs = {_key(u, a): (f.vector(u, lm, a, {}), a) for u, a in configs}
    rows = []
    for key, (v, a) in tqdm(vecs.items(), desc="steer", disable=not progress):
        with v.apply(lm, a):
            e = effects()
        row = {"key": key, "units": v.units, "alpha": a}
        for name in ("margin", "proj", "score"):
            if e[name]:
                row[f"{name}_shift"], row[f"{name}_shift_se"] = paired_difference(e[name], base[name])
                row[name], row[f"{name}_se"] = st.mean_se(e[name])
        row["samples"] = e["texts"]
        rows.append(row)
    cost = _cost(lm, vecs, eval_ids, batch_size, progress)
    for row in rows:
        row.update({k: v for k, v in cost[row["key"]].items() if k != "window_delta_nll"})
    base_row = (
        {k: v for k, v in next(iter(cost.values())).items() if k.startswith("ref_") or k.startswith("n_")}
        if cost
        else {}
    )
    for name in ("margin", "proj", "score"):
        if base[name]:
            base_row[name], base_row[f"{name}_se"] = st.mean_se(base[name])
    base_row["samples"] = base["texts"]
    return {"unsteered": base_row, "rows": rows}


def _cost(
    lm: LoadedModel, vecs: dict[str, tuple[SteeringVector, float]], ids: torch.Tensor, batch_size: int, progress: bool
) -> dict[str, dict]:
    """Each steered model's quality on neutral windows against the unsteered one (from disk: block by block, the
    vector's hooks in place while each steered stream runs a block)."""
    desc = "cost on neutral text"
    if lm.streamed is not None:
        steered = {k: _in_every_block(lm, v, a) for k, (v, a) in vecs.items()}
        return streamed_quality(lm, steered, ids, batch_size=batch_size, progress=progress, desc=desc)
    return quality(
        next_token_logits(lm.model),
        {k: next_token_logits(lm.model, partial(v.apply, lm, a)) for k, (v, a) in vecs.items()},
        ids,
        batch_size=batch_size,
        device=lm.device,
        progress=progress,
        desc=desc,
    )


def _in_every_block(lm: LoadedModel, vec: SteeringVector, alpha: float) -> BlockVariant:
    """The vector's hooks in place while the steered stream runs any block (they act at the blocks it steers)."""
    return lambda _i: vec.apply(lm, alpha)


def _key(units: Sequence[str], alpha: float) -> str:
    name = units[0] if len(units) == 1 else f"{units[0]}-{units[-1]}"
    return f"{name}@{alpha:g}"
