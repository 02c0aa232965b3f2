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
    neg_entropy: torch.Tensor  # sum p log p, (tokens,)
    top1: torch.Tensor  # (tokens,)
    nll: torch.Tensor  # (tokens,)
    targets: torch.Tensor  # (tokens,)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> "Reference":
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        return cls(p, (p * logp).sum(-1, dtype=torch.float64), logits.argmax(-1), -logp.gather(-1, targets[:, None]).squeeze(-1), targets)


def compare(logits: torch.Tensor, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KL(p_ref || p) and the NLL of the true next token.

    The row dot product runs in float32 (one fused pass over the logits); its
    rounding, about 1e-6 of ``|p . z|``, is far below any KL worth ranking.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    kl = (ref.neg_entropy - (torch.linalg.vecdot(ref.probs, z).double() - lse.double())).float()
    nll = lse - z.gather(-1, ref.targets[:, None]).squeeze(-1)
    return kl, nll


def top1(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """Per token: 1.0 where the readout's argmax is the reference's."""
    return (logits.argmax(-1) == ref.top1).float()
