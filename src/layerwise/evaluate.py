"""Held-out checks of a model variant against the original: quality, size and speed.

Every action (dropping, quantizing) is judged the same way, on evaluation
windows that never overlap the calibration windows: perplexity of each model,
the paired difference in NLL and the KL from the original's next-token
distribution, each with its standard error across windows; then parameters,
bytes on disk and tokens per second for prefill and for generation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .errors import LayerwiseError
from .metrics import divergence as dv
from .metrics import lens as lens_m
from .metrics import stream as st
from .trace import readout, run_blocks

if TYPE_CHECKING:
    from .loading import CausalLM, LoadedModel

#: Maps a batch of input ids (batch, seq) to next-token logits (batch * (seq - 1), vocab).
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
Variant = Callable[[], contextlib.AbstractContextManager]
#: A variant of a streamed model, by block: ``variant(i)`` is active while block ``i`` runs the variant's stream.
BlockVariant = Callable[[int], contextlib.AbstractContextManager]
#: The llama.cpp-style statistics :func:`quality` adds for every candidate.
KL_KEYS = dv.KEYS


def next_token_logits(model: torch.nn.Module, variant: Variant | None = None) -> LogitsFn:
    """Logits at every position that has a next token, with ``variant`` active (a context factory)."""

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(x.shape[1] - 1, device=x.device)
        with variant() if variant else contextlib.nullcontext():
            return model(input_ids=x, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)

    return fn


def quality(
    reference: LogitsFn,
    candidates: dict[str, LogitsFn],
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, dict]:
    """Perplexity of the reference and of each candidate, paired NLL difference and KL(reference || candidate).

    The reference runs once per batch for all candidates. Standard errors are
    across windows (each window's mean is one sample), so they say how much
    a figure would move on other text, not token noise. Each candidate also
    keeps its per-window NLL differences (``window_delta_nll``), so that two
    candidates can be compared pairwise (``paired_difference``), and the
    statistics ``llama-perplexity --kl-divergence`` prints (the keys in
    :data:`KL_KEYS`: KL percentiles, same top p, Δp of the true token; see
    :mod:`layerwise.metrics.divergence` for their precision). ``progress`` shows a
    bar over the batches, named ``desc``.
    """
    _check_windows(ids)
    acc = _Quality(list(candidates), ids.shape[1] - 1)
    for batch in tqdm(torch.split(ids, batch_size), desc=desc, unit="batch", disable=not progress):
        x = batch.to(device)
        # A batch's reference and logits live only inside these calls, so the next batch's are never built beside them.
        ref = acc.reference(x, reference(x))
        for name, fn in candidates.items():
            acc.candidate(name, fn(x), ref)
    return acc.summary()


def streamed_quality(
    lm: LoadedModel,
    variants: dict[str, BlockVariant],
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "evaluate",
    reads: dict[str, tuple[Any, list[str]]] | None = None,
) -> dict[str, dict]:
    """:func:`quality` of each variant against the original, for a model whose weights stay on disk.

    Block-major: every batch of windows passes block ``i`` while its weights are read, the original's stream and
    each variant's (``variants[name](i)`` is active while that variant runs block ``i``), then the head is read once
    for every stream's logits. The hidden states of every window are kept for the original and each variant (in CPU
    memory, or in a file in the engine's ``spill`` folder).

    ``reads[name]`` (a checkpoint and keys, see ``Streamed.reading``) gives a variant tensors outside the blocks of
    its own: its stream starts from its own embedding, and where the head is among them its logits are read
    through its own head (read again for each batch, beside the original's).
    """
    assert lm.streamed is not None
    _check_windows(ids)
    s, an, reads = lm.streamed, lm.anatomy, reads or {}
    batches = torch.split(ids, batch_size)
    acc = _Quality(list(variants), ids.shape[1] - 1)
    head_key = s.keys[f"{s.paths[an.head]}.weight"]
    own_head = [name for name in variants if name in reads and head_key in reads[name][1]]
    with s.states() as store:
        starts = [s.calls(b) for b in batches]
        calls = [c for _, c in starts]
        streams = {name: [store.keep(h0) for h0, _ in starts] for name in (None, *variants) if name not in reads}
        del starts
        for own, (checkpoint, keys) in reads.items():
            with s.reading(checkpoint, keys):
                streams[own] = [store.keep(s.calls(b)[0]) for b in batches]
        with torch.no_grad(), tqdm(total=an.n_layers, desc=desc, unit="block", disable=not progress) as bar:
            for i in s.blocks():
                for name, h in streams.items():
                    with variants[name](i) if name is not None else contextlib.nullcontext():
                        h[:] = [
                            store.keep(run_blocks(an, i, store.load(k), call, stop=i + 1), over=k)
                            for k, call in zip(h, calls)
                        ]
                bar.update()
        with s.head(), torch.no_grad():
            for b, x in enumerate(batches):
                ref = acc.reference(x.to(s.device), readout(an, store.load(streams[None][b])))
                for name in variants:
                    with s.reading(*reads[name]) if name in own_head else contextlib.nullcontext():
                        with s.head() if name in own_head else contextlib.nullcontext():
                            acc.candidate(name, readout(an, store.load(streams[name][b])), ref)
    return acc.summary()


def _check_windows(ids: torch.Tensor) -> None:
    if ids.shape[0] == 0:
        raise LayerwiseError(
            "no evaluation windows: the data is used up by calibration; use fewer `samples` or more data"
        )


class _Quality:
    """:func:`quality`'s running sums: one reference and its candidates a batch at a time."""

    def __init__(self, names: list[str], per_window: int) -> None:
        self.per_window = per_window
        self.ref_nll = st.Moments()
        self.acc = {name: (st.Moments(), st.Moments()) for name in names}  # nll, kl
        self.deltas: dict[str, list[float]] = {name: [] for name in names}  # per window
        self.divergence = {name: dv.Divergence() for name in names}

    def _by_window(self, t: torch.Tensor) -> torch.Tensor:
        return st.window_means(t, self.per_window)

    def reference(self, x: torch.Tensor, logits: torch.Tensor) -> lens_m.Reference:
        """The original's logits on the batch ``x``, added; the reference candidates are compared with."""
        ref = lens_m.Reference.from_logits(logits, x[:, 1:].flatten())
        self.ref_nll.add(self._by_window(ref.nll))
        return ref

    def candidate(self, name: str, logits: torch.Tensor, ref: lens_m.Reference) -> None:
        kl, nll = lens_m.compare(logits, ref)
        if not (torch.isfinite(nll).all() and torch.isfinite(kl).all()):
            raise LayerwiseError(f"{name} produced NaN/inf logits; evaluate in `dtype` float32")
        for m, v in zip(self.acc[name], (nll, kl)):
            m.add(self._by_window(v))
        self.deltas[name] += self._by_window(nll - ref.nll).tolist()
        dp = torch.exp(-nll.double()) - torch.exp(-ref.nll.double())
        self.divergence[name].add(kl, lens_m.top1(logits, ref), dp, self.per_window)

    def summary(self) -> dict[str, dict]:
        n = self.ref_nll.n
        base = {"n_windows": n, "n_tokens": n * self.per_window, **_ppl("ref_", self.ref_nll)}
        out = {}
        for name, (nll, kl) in self.acc.items():
            out[name] = {**base, **_ppl("", nll)}
            out[name]["delta_nll"], out[name]["delta_nll_se"] = st.mean_se(self.deltas[name])
            out[name]["kl"], out[name]["kl_se"] = st.mean_se(kl)
            out[name] |= self.divergence[name].summary()
            out[name]["window_delta_nll"] = self.deltas[name]
        return out


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of ``a - b`` over the same windows (two variants' ``window_delta_nll``).

    Both variants' errors share most of their window-to-window variation (a
    hard window is hard for both), so the paired difference is far more
    precise than comparing two means with their own standard errors.
    """
    if len(a) != len(b) or not a:
        raise LayerwiseError("a paired difference needs both variants evaluated on the same windows")
    return st.mean_se([x - y for x, y in zip(a, b)])


def _ppl(prefix: str, nll: st.Moments) -> dict:
    mean, se = st.mean_se(nll)
    return {
        f"{prefix}nll": mean,
        f"{prefix}nll_se": se,
        f"{prefix}ppl": math.exp(mean),
        f"{prefix}ppl_se": math.exp(mean) * se if se is not None else None,
    }  # delta method


def speed(
    model: CausalLM,
    *,
    vocab: int,
    variant: Variant | None = None,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict:
    """Tokens per second for prefill (one prompt, no cache) and for greedy generation with a KV cache.

    The best of ``repeats`` runs after one warm-up (on a shared CPU the
    fastest run is the least disturbed one); the prompt is random token ids,
    since speed does not depend on the text.
    """
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    mask = torch.ones_like(prompt)

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad(), variant() if variant else contextlib.nullcontext():
        t_prefill = timed(lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1))
        t_gen = timed(
            lambda: model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        )
    # generate() also prefills the prompt; count only the decoding steps.
    decode = max(t_gen - t_prefill, 1e-9)
    return {
        "prefill_tok_s": prompt_len / t_prefill,
        "generate_tok_s": new_tokens / decode,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
    }


def param_count(model: torch.nn.Module, zeroed: Iterable[torch.nn.Module] = (), *, in_bytes: bool = False) -> int:
    """Parameters (or their bytes), shared tensors once, minus those of modules that no longer compute."""
    seen = {id(p): p.numel() * (p.element_size() if in_bytes else 1) for p in model.parameters()}
    for m in zeroed:
        for p in m.parameters():
            seen[id(p)] = 0
    return sum(seen.values())


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a saved checkpoint."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
