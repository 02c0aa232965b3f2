"""Logit lens: read the residual stream after each block through the final norm and head."""

from __future__ import annotations

import torch


def compare(logp_layer: torch.Tensor, logp_final: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: KL(p_final || p_layer), top-1 agreement, NLL of the true next token.

    Inputs are log-probabilities ``(tokens, vocab)`` and target ids ``(tokens,)``.
    """
    kl = (logp_final.exp() * (logp_final - logp_layer)).sum(dim=-1)
    top1 = (logp_layer.argmax(dim=-1) == logp_final.argmax(dim=-1)).float()
    nll = -logp_layer.gather(-1, targets[:, None]).squeeze(-1)
    return kl, top1, nll
