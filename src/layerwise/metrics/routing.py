"""Per-token routing statistics of a sparse MLP, and each layer's summary of their running means.

A router sends each token to ``k`` of ``E`` experts with a gate weight each. Per token, :func:`routing_columns`
gives which experts it went to, the weight it gave each, and whether its smallest chosen weight is a small share of
its chosen weights (a token whose last expert a dynamic skip would leave out); :func:`layer_summary` turns their
means into each expert's share of the tokens and mean gate weight, and the layer's load entropy and imbalance.
"""

from __future__ import annotations

import math

import torch

#: A chosen expert whose weight is under this share of the token's chosen weights counts as skippable
#: (``route_skip``): a fixed rule, not tuned on any data.
SKIP_SHARE = 0.1


def routing_columns(weights: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(tokens, 2E + 1): per expert whether the token went to it (0/1), then the gate weight it gave it (0 if not),
    then whether its smallest chosen weight is under :data:`SKIP_SHARE` of its chosen weights' sum."""
    w = weights.detach().float()
    chosen = torch.zeros(w.shape[0], n_experts, device=w.device).scatter_(1, indices, 1.0)
    gate = torch.zeros_like(chosen).scatter_(1, indices, w)
    skip = w.min(-1).values < SKIP_SHARE * w.sum(-1)
    return torch.cat([chosen, gate, skip[:, None].float()], -1)


def update_columns(norms: torch.Tensor, indices: torch.Tensor, stream: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(tokens, 2E): per expert the norm of what it added to the token's update, gate weight applied (0 where not
    chosen), then that norm over the norm of the stream the MLP read; ``norms`` (tokens, k) by chosen slot."""
    added = torch.zeros(norms.shape[0], n_experts, device=norms.device).scatter_(1, indices, norms.float())
    norm = stream.float().reshape(-1, stream.shape[-1]).norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.cat([added, added / norm], -1)


def expert_updates(means: list[float], share: list[float]) -> list[dict[str, float | None]]:
    """From the running means of :func:`update_columns` and each expert's share of the tokens: its mean
    ``rel_update`` and ``update_norm`` over the tokens routed to it (None if none was)."""
    n = len(share)
    return [
        {"rel_update": r / s if s else None, "update_norm": u / s if s else None}
        for u, r, s in zip(means[:n], means[n:], share, strict=True)
    ]


def layer_summary(means: list[float], n_experts: int) -> tuple[list[dict[str, float | None]], dict[str, float]]:
    """From the running means of :func:`routing_columns`: per expert its ``route_share`` (the share of tokens sent
    to it) and ``gate_mean`` (its mean weight where chosen); for the layer ``route_entropy`` (the entropy of its load,
    over log E: 1 is even), ``load_imbalance`` (the busiest expert's load over the mean load: 1 is even) and
    ``route_skip`` (the share of tokens with a skippable last expert)."""
    share, gate = means[:n_experts], means[n_experts : 2 * n_experts]
    total = sum(share)
    load = [s / total for s in share] if total else [0.0] * n_experts
    experts: list[dict[str, float | None]] = [
        {"route_share": s, "gate_mean": g / s if s else None} for s, g in zip(share, gate, strict=True)
    ]
    entropy = -sum(p * math.log(p) for p in load if p > 0) / math.log(n_experts) if n_experts > 1 else 0.0
    return experts, {"route_entropy": entropy, "load_imbalance": max(load) * n_experts, "route_skip": means[-1]}
