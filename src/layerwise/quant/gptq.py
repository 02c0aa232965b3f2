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


class ExpertHessians:
    """Running Hessians of the inputs of every expert's matrix in one experts tensor: each expert's own, of the
    tokens routed to it (gate and up) or of its hidden activation (down)."""

    def __init__(self, n_experts: int) -> None:
        self.parts: list[Hessian | None] = [None] * n_experts  # made at an expert's first token
        self._value: torch.Tensor | None = None

    def add(self, expert: int, x: torch.Tensor) -> None:
        if self._value is not None:
            raise RuntimeError("inputs added after the Hessians were read")
        part = self.parts[expert]
        if part is None:
            part = self.parts[expert] = Hessian(x.shape[-1], device=x.device)
        part.add(x)

    @property
    def value(self) -> torch.Tensor:
        """(experts, in, in), read once the inputs are all in: the running sums are folded into it and freed, so
        one copy is held (the gate's and the up map's weights read the same). An expert no calibration token
        reached gets the identity: with no evidence of which inputs matter, GPTQ then moves no rounding error and
        gives plain rounding."""
        if self._value is None:
            seen = next((p for p in self.parts if p is not None), None)
            if seen is None:
                raise LayerwiseError(
                    "GPTQ saw no calibration tokens routed to these experts; give more calibration data"
                )
            eye = torch.eye(seen.sum.shape[0], dtype=torch.float64, device=seen.sum.device)
            value = torch.empty(len(self.parts), *eye.shape, dtype=torch.float64, device=eye.device)
            for j, part in enumerate(self.parts):
                value[j] = part.value if part is not None else eye
                self.parts[j] = None
            self._value = value
        return self._value


def inverse_factor(hessian: torch.Tensor, *, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the damped ``H^-1``, and the inputs that are always zero.

    It depends on the layer's inputs only, so every config of a tensor (and
    every tensor reading the same inputs) shares one: for a wide layer the
    three factorizations cost more than the quantization itself.
    """
    n = hessian.shape[0]
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: any value works, fix the weight to 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead
    except torch.linalg.LinAlgError:
        raise LayerwiseError(
            "GPTQ's Hessian is not positive definite even after damping; use more calibration tokens or `method` rtn"
        ) from None


def quantize_gptq(
    w: torch.Tensor, hessian: torch.Tensor, cfg: QConfig, *, block_size: int = 128, damp: float = 0.01
) -> QTensor:
    """GPTQ codes for ``w`` (out, in) given the input Hessian (in, in)."""
    return quantize_gptq_many(w, inverse_factor(hessian, damp=damp), [cfg], block_size=block_size)[0]


def quantize_gptq_many(
    w: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor], cfgs: list[QConfig], *, block_size: int = 128
) -> list[QTensor]:
    """GPTQ codes for ``w`` under each of several configs that share a group size and symmetry.

    ``factor`` is :func:`inverse_factor` of the layer's input Hessian. GPTQ
    treats every row on its own given it, so the configs' copies of ``w`` are
    stacked along the rows, each row with its own bit width, and quantized in
    one column sweep for all of them instead of one per config. The result for
    each config is exactly what it would be alone.
    """
    out, n = w.shape
    first = cfgs[0]
    if any(
        (c.group_size, c.symmetric, c.scale_bits) != (first.group_size, first.symmetric, first.scale_bits) for c in cfgs
    ):
        raise ValueError("quantize_gptq_many takes configs that differ in bits only")
    first.check(n)
    U, dead = factor
    W = w.detach().double().repeat(len(cfgs), 1)
    W[:, dead] = 0.0
    bits = torch.tensor([c.bits for c in cfgs], dtype=torch.float64, device=W.device).repeat_interleave(out)
    half = 2 ** (bits - 1)
    g = first.group_size
    n_groups = (n + g - 1) // g
    scales = torch.zeros(W.shape[0], n_groups, dtype=torch.float64, device=W.device)
    zeros = None if first.symmetric else torch.zeros_like(scales)
    codes = torch.zeros_like(W)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            col = b0 + j
            k = col // g
            if col % g == 0:  # a group starts: its grid comes from the weights as corrected so far
                end = min(col + g, n)
                span = Wb[:, j : end - b0] if end <= b1 else torch.cat([Wb[:, j:], W[:, b1:end]], dim=1)
                s, z = group_params(
                    span.float(), QConfig(first.bits, span.shape[1], first.symmetric, first.scale_bits), bits
                )
                scales[:, k] = s[:, 0].double()
                if zeros is not None and z is not None:
                    zeros[:, k] = z[:, 0].double()
            s = scales[:, k]
            z = zeros[:, k] if zeros is not None else None
            q = quantize_with(Wb[:, j], s, z, first, bits)
            codes[:, col] = q
            e = (Wb[:, j] - (q - (z if z is not None else half)) * s) / Ub[j, j]
            Wb[:, j:].addr_(e, Ub[j, j:], alpha=-1)  # in place: no (rows, block) temporary per column
            Err[:, j] = e
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    rows = [slice(i * out, (i + 1) * out) for i in range(len(cfgs))]
    return [
        QTensor(codes[r].to(torch.uint8), scales[r].float(), zeros[r].to(torch.uint8) if zeros is not None else None, c)
        for r, c in zip(rows, cfgs)
    ]
