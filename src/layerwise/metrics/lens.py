"""Compare a next-token readout with the full model's, without materializing log-softmax.

Used by the logit lens (read the stream after each block through the final
norm and head) and by exact ablation (read the output of a model with one unit
removed). With ``lse = logsumexp(z)``:
``KL(p || softmax(z)) = sum p log p - (p . z - lse)`` and ``NLL = lse - z[target]``,
so each readout costs one logsumexp, one row dot product and a gather.
:func:`top1` (argmax agreement) is separate, since ablation does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> "Reference":
        z = logits.float()
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        mass = p.sum(-1, dtype=torch.float64)
        # p . log p written as p . z - mass * lse, exactly as compare forms p . log q, so the
        # float32 rounding of the probabilities cancels and identical logits give KL = 0.
        neg_entropy = torch.linalg.vecdot(p, z).double() - mass * torch.logsumexp(z, dim=-1).double()
        return cls(p, mass, neg_entropy, logits.argmax(-1), -logp.gather(-1, targets[:, None]).squeeze(-1), targets)


def compare(logits: torch.Tensor, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(p_ref || p) and the NLL of the true next token.

    The row dot product runs in float32 (one fused pass over the logits); its
    rounding, about 1e-6 of ``|p . z|``, is far below any KL worth ranking.
    The reference's probabilities sum to 1 only up to float32 rounding, so
    ``log q`` is weighted by their actual mass, as in ``neg_entropy``.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    kl = (ref.neg_entropy - (torch.linalg.vecdot(ref.probs, z).double() - ref.mass * lse.double())).float()
    nll = lse - z.gather(-1, ref.targets[:, None]).squeeze(-1)
    return kl, nll


def top1(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """Per token: 1.0 where the readout's argmax is the reference's."""
    return (logits.argmax(-1) == ref.top1).float()
