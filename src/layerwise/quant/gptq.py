"""GPTQ: quantize a matrix column by column, pushing each column's error onto the columns not yet done.

With the layer's inputs X (tokens, in), ``H = 2 X^T X / n + lambda I``
(lambda = ``damp`` times the mean diagonal) measures how much an error in each
input direction costs at the output. Columns are quantized in order, in
blocks of ``block_size``; the rounding error of a column, scaled by the
upper Cholesky factor of ``H^-1``, is subtracted from the later columns.
Group scales are set from the error-corrected weights when the group's first
column is reached, so the codes and scales are a plain group-wise format.
"""

from __future__ import annotations

import torch

from ..errors import LayerwiseError
from .rtn import QConfig, QTensor, group_params, quantize_with


class Hessian:
    """Running ``2 X^T X / n`` of a linear layer's inputs, in float64, fixed size in the number of tokens."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.n += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise LayerwiseError("GPTQ saw no calibration inputs for this layer; give more calibration data")
        return 2 * self.sum / self.n


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, cfg: QConfig, *, block_size: int = 128, damp: float = 0.01) -> QTensor:
    """GPTQ codes for ``w`` (out, in) given the input Hessian (in, in)."""
    out, n = w.shape
    cfg.check(n)
    W = w.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: any value works, fix the weight to 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch._C._LinAlgError:
        raise LayerwiseError("GPTQ's Hessian is not positive definite even after damping; use more calibration tokens or --method rtn") from None
    g = cfg.group_size
    n_groups = (n + g - 1) // g
    scales = torch.zeros(out, n_groups, dtype=torch.float64, device=W.device)
    zeros = None if cfg.symmetric else torch.zeros_like(scales)
    codes = torch.zeros(out, n, dtype=torch.float64, device=W.device)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:  # a group starts: its grid comes from the weights as corrected so far
                k = col // g
                span = torch.cat([Wb[:, j:], W[:, b1:]], dim=1)[:, : min(g, n - col)]
                s, z = group_params(span.float(), QConfig(cfg.bits, span.shape[1], cfg.symmetric, cfg.scale_bits))
                scales[:, k] = s[:, 0].double()
                if zeros is not None:
                    zeros[:, k] = z[:, 0].double()
            k = col // g
            s = scales[:, k]
            z = zeros[:, k] if zeros is not None else None
            q = quantize_with(Wb[:, j], s, z, cfg)
            codes[:, col] = q
            deq = (q - (z if z is not None else 2 ** (cfg.bits - 1))) * s
            e = (Wb[:, j] - deq) / Ub[j, j]
            Wb[:, j:] -= e[:, None] * Ub[j, j:][None, :]
            Err[:, j] = e
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    return QTensor(codes.to(torch.uint8), scales.float(), zeros.to(torch.uint8) if zeros is not None else None, cfg)
