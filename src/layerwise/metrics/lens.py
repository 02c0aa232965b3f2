"""Compare a next-token readout with the full model's, without materializing log-softmax.

Used by the logit lens (read the stream after each block through the final
norm and head) and by exact ablation (read the output of a model with one unit
removed). With ``lse = logsumexp(z)``:
``KL(p || softmax(z)) = sum p log p - (p . z - lse)`` and ``NLL = lse - z[target]``,
so each readout costs one logsumexp, one row dot product and a gather.
:func:`top1` (argmax agreement) is separate, since ablation does not need it.
Both run over slices of rows (:func:`row_slices`): every quantity is per
row, and a float32 temporary of a whole batch's logits is a gigabyte with a
262k-token vocabulary. :func:`nll_grad`, the loss gradient the Taylor
estimate and quantization's measurement backpropagate, reads the head the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Logits one slice of rows may hold, in elements (128 MiB of float32).
SLICE_ELEMENTS = 2**25


def row_slices(rows: int, vocab: int) -> list[slice]:
    """Consecutive slices of ``rows`` rows of ``vocab`` logits, each within :data:`SLICE_ELEMENTS`."""
    step = max(1, SLICE_ELEMENTS // vocab)
    return [slice(i, i + step) for i in range(0, rows, step)]


def nll_grad(
    readout: Callable[[torch.Tensor], torch.Tensor], vocab: int, h: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The gradient of the summed next-token NLL with respect to the stream ``h`` (batch, seq, hidden) that ``readout``
    (final norm, head) turns into ``vocab`` logits; ``targets`` are the next tokens of positions 0..seq-2, flattened.

    The head and its gradient run on slices of positions: each position's loss depends on its own stream alone, so
    the slices' gradients together are the gradient of the sum, and only one slice's logits exist at a time. Each
    slice reads the whole head matrix twice, so smaller slices cost time: with 128 MiB slices a 262k-entry head took
    1.3x the time of one whole batch.
    """
    flat = h[:, :-1].detach().flatten(0, 1)
    parts = []
    with torch.enable_grad():
        for s in row_slices(flat.shape[0], vocab):
            z = flat[s].detach().requires_grad_()
            logp = torch.log_softmax(readout(z).float(), dim=-1)
            loss = -logp.gather(-1, targets[s, None].to(logp.device)).sum()
            parts.append(torch.autograd.grad(loss, z)[0])
    grad = torch.zeros_like(h)
    grad[:, :-1] = torch.cat(parts).view(h.shape[0], -1, h.shape[2])
    return grad


@dataclass
class Reference:
    """The full model's next-token distribution for a batch of flattened positions."""

    probs: torch.Tensor  # (tokens, vocab)
    mass: torch.Tensor  # sum p as rounded in float32 (1 +- 1e-5), float64, (tokens,)
    neg_entropy: torch.Tensor  # sum p log p in the same form as compare's cross term, float64, (tokens,)
    top1: torch.Tensor  # (tokens,)
    nll: torch.Tensor  # (tokens,)
    targets: torch.Tensor  # (tokens,)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> Reference:
        probs = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        mass, neg_entropy, nll = [], [], []
        for s in row_slices(*logits.shape):
            z = logits[s].float()
            logp = torch.log_softmax(z, dim=-1)
            p = torch.exp(logp, out=probs[s])
            mass.append(p.sum(-1, dtype=torch.float64))
            # p . log p written as p . z - mass * lse, exactly as compare forms p . log q, so the
            # float32 rounding of the probabilities cancels and identical logits give KL = 0.
            neg_entropy.append(torch.linalg.vecdot(p, z).double() - mass[-1] * torch.logsumexp(z, dim=-1).double())
            nll.append(-logp.gather(-1, targets[s, None]).squeeze(-1))
        return cls(probs, torch.cat(mass), torch.cat(neg_entropy), logits.argmax(-1), torch.cat(nll), targets)


def compare(logits: torch.Tensor, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(p_ref || p) and the NLL of the true next token.

    The row dot product runs in float32 (one fused pass over the logits); its
    rounding, about 1e-6 of ``|p . z|``, is far below any KL worth ranking.
    The reference's probabilities sum to 1 only up to float32 rounding, so
    ``log q`` is weighted by their actual mass, as in ``neg_entropy``.
    """
    kl, nll = [], []
    for s in row_slices(*logits.shape):
        z = logits[s].float()
        lse = torch.logsumexp(z, dim=-1)
        kl.append(
            (ref.neg_entropy[s] - (torch.linalg.vecdot(ref.probs[s], z).double() - ref.mass[s] * lse.double())).float()
        )
        nll.append(lse - z.gather(-1, ref.targets[s, None]).squeeze(-1))
    return torch.cat(kl), torch.cat(nll)


def top1(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """Per token: 1.0 where the readout's argmax is the reference's."""
    return (logits.argmax(-1) == ref.top1).float()
