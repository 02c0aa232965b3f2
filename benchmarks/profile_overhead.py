"""Cost of layerwise's profile pass against the baselines, same tokens, one process.

Rows (ratios to a plain forward pass over the same windows):
  plain forward                      model(input_ids) only
  plain forward, no head             model(input_ids, logits_to_keep=1): the blocks alone
  output_hidden_states + bi          what most scripts do: keep every hidden state, then cosines
  layerwise, --no-lens               one-pass stream metrics and zd (goal <= 1.15x)
  layerwise, --ablation none         + logit lens at every block (30 head projections)
  layerwise, --ablation taylor       + one backward pass for the Taylor estimate
Exact ablation (layerwise: cached block inputs, only later blocks re-run)
against the naive approach (one full forward per unit with the unit skipped).

Usage: python benchmarks/profile_overhead.py [--samples 4 --seq-len 256 --device cpu --model default --dtype float32]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

import layerwise as lw
from layerwise.anatomy import KINDS, unit_name
from layerwise.metrics.lens import Reference, compare
from layerwise.trace import skip


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs; on CUDA the queued kernels are waited for before the clock stops."""
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default", help="any model reference layerwise.load takes")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    lm = lw.load(args.model, device=args.device, dtype=args.dtype)
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=args.seq_len, samples=args.samples)
    ids = w.calibration.to(lm.device)
    batches = list(torch.split(ids, args.batch_size))
    an, model = lm.anatomy, lm.model

    @torch.no_grad()
    def plain():
        for x in batches:
            model(input_ids=x, use_cache=False)

    @torch.no_grad()
    def hidden_states_bi():
        for x in batches:
            hs = model(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
            [
                torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().mean().item()
                for i in range(len(hs) - 1)
            ]

    @torch.no_grad()
    def naive_ablation():
        """One full forward per unit; the same KL/NLL kernel as layerwise, so only the caching differs."""
        for x in batches:
            targets = x[:, 1:].flatten()
            keep = torch.arange(x.shape[1] - 1)  # the same head rows layerwise reads
            ref = Reference.from_logits(
                model(input_ids=x, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1), targets
            )
            for i in range(an.n_layers):
                for k in KINDS:
                    with skip(an, [unit_name(i, k)]):
                        logits = model(input_ids=x, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)
                    kl, nll = compare(logits, ref)
                    (nll - ref.nll).mean().item(), kl.mean().item()

    def prof(mode, lens=True):
        return lambda: lw.profile(lm, w, ablation=mode, batch_size=args.batch_size, lens=lens, progress=False)

    @torch.no_grad()
    def no_head():
        for x in batches:
            model(input_ids=x, use_cache=False, logits_to_keep=1)

    plain()  # warm-up
    t_plain = timed(plain, 3)
    t_no_head = timed(no_head, 3)
    t_hs = timed(hidden_states_bi, 3)
    t_stream = timed(prof("none", lens=False), 3)
    t_none = timed(prof("none"))
    t_taylor = timed(prof("taylor"))
    t_exact = timed(prof("exact"))
    t_naive = timed(naive_ablation)
    t_abl = t_exact - t_taylor
    print(
        f"# profile_overhead — {date.today()} — {platform.machine()}, {torch.get_num_threads()} threads, device "
        f"{lm.device}, torch {torch.__version__}"
    )
    print(
        f"model {lm.source['model_id']} ({an.n_layers} blocks, hidden {an.embed.weight.shape[1]}, {args.dtype}), "
        f"{args.samples} windows x {args.seq_len} tokens, batch {args.batch_size}\n"
    )
    print("| pass | seconds | ratio to plain forward |")
    print("|---|---:|---:|")
    for name, t in [
        ("plain forward", t_plain),
        ("plain forward, no head (logits_to_keep=1)", t_no_head),
        ("output_hidden_states + bi", t_hs),
        ("layerwise --ablation none --no-lens (one-pass stream metrics + zd)", t_stream),
        ("layerwise --ablation none (+ logit lens at every block)", t_none),
        ("layerwise --ablation taylor (+ backward)", t_taylor),
    ]:
        print(f"| {name} | {t:.3f} | {t / t_plain:.2f}x |")
    print(f"\none-pass stream metrics against the blocks alone (no head): {t_stream / t_no_head:.2f}x")
    L = an.n_layers
    # Block-equivalents layerwise re-runs: block i and mlp i need blocks i+1.., attn i also block i's MLP (~0.6 block).
    rerun = sum(3 * (L - 1 - i) + 0.6 for i in range(L))
    t_block, t_head = t_no_head / L, t_plain - t_no_head
    floor = (rerun * t_block + 3 * L * t_head) / (3 * L * (L * t_block + t_head))
    print(
        f"\nexact ablation of all {3 * L} units: layerwise {t_abl:.2f} s, naive {t_naive:.2f} s, "
        f"ratio {t_abl / t_naive:.2f}x (goal <= 0.6x)"
    )
    print(
        f"floor for this model if the KL/NLL kernel were free: {floor:.2f}x "
        f"(one block {t_block * 1e3:.0f} ms, the head {t_head * 1e3:.0f} ms per batch)"
    )


if __name__ == "__main__":
    main()
