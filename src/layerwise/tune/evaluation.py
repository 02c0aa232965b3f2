"""What a tuned model gained and forgot: held-out NLL and KL to the start on the tuning data and on a second
corpus, for the tuned model and its restored variant, and the diversity of sampled chat responses."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..evaluate import Variant, next_token_logits, quality

if TYPE_CHECKING:
    from .loop import Tunable
from .data import TuneData
from .loop import TuneRun
from .snapshot import Snapshot, block_params


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of whitespace tokens, pooled over responses (diversity)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def diversity(
    model: Tunable,
    tokenizer,
    prompts: list[list[dict]],
    *,
    variant=None,
    new_tokens: int = 48,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "diversity",
) -> dict:
    """Distinct-1/2 of responses sampled (temperature 1, top-p 0.95, seeded) to held-out chat prompts (a bar over them:
    ``progress``)."""
    texts = []
    with torch.no_grad(), variant() if variant else contextlib.nullcontext():
        for i, conv in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=not progress)):
            x = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            torch.manual_seed(seed + i)
            y = model.generate(
                input_ids=x["input_ids"].to(device),
                attention_mask=x["attention_mask"].to(device),
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
            texts.append(tokenizer.decode(y[0, x["input_ids"].shape[1] :], skip_special_tokens=True))
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "n_prompts": len(texts),
        "samples": texts[:4],
    }


_KEEP = (
    "ref_ppl",
    "ref_ppl_se",
    "ppl",
    "ppl_se",
    "ref_nll",
    "nll",
    "delta_nll",
    "delta_nll_se",
    "kl",
    "kl_se",
    "n_windows",
    "window_delta_nll",
)


def evaluate(
    run: TuneRun,
    snap: Snapshot,
    data: TuneData,
    second: torch.Tensor | None,
    *,
    restored: Sequence[int] = (),
    tokenizer=None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    diversity_prompts: int = 8,
    progress: bool = False,
) -> dict:
    """The tuned model (and its restored variant) against the base model on both domains, same code as drop/quantize.

    The base model is the tuned one with every tunable tensor swapped back to
    its value before training, so no second copy is kept. ``progress`` shows a
    bar for each pass over the held-out windows and each round of sampling.
    """
    model, snap = run.model, run.start or snap
    base = next_token_logits(model, snap.swapped)
    variants: dict[str, Variant | None] = {"tuned": None}
    if restored:
        params = [p for i in restored for p in block_params(model, i)]
        variants["restored"] = lambda: snap.swapped(params)
    cands = {name: next_token_logits(model, v) for name, v in variants.items()}
    out: dict = {"restored_blocks": list(restored)}
    domains = {"train": data.eval_ids, "second": second}
    for dom, ids in domains.items():
        if ids is None or ids.shape[0] == 0:
            continue
        q = quality(
            base,
            cands,
            ids,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc=f"evaluate {run.key} on {dom}",
        )
        out[dom] = {name: {k: r[k] for k in _KEEP} for name, r in q.items()}
    if data.prompts and tokenizer is not None:
        prompts = data.prompts[:diversity_prompts]
        out["diversity"] = {
            name: diversity(
                model, tokenizer, prompts, variant=v, device=device, progress=progress, desc=f"diversity {name}"
            )
            for name, v in {"base": snap.swapped, **variants}.items()
        }
    return out
