"""Per-token statistics of the residual stream, reduced into float64 running sums.

Each function maps tensors of shape ``(tokens, hidden)`` to per-token values;
:class:`Moments` and :class:`MaxAbs` keep fixed-size running state on the
tensors' own device and never copy to the host until a result is read, so a
profile pass does not stall the device once per metric per block, and memory
does not grow with the number of calibration tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Columns of :func:`geometry`, in order.
GEOMETRY = ("bi", "attn_cos", "mlp_cos", "block_rel", "attn_rel", "mlp_rel", "norm_in", "norm_mid")


class Moments:
    """Running count, sum and sum of squares in float64, per column.

    ``add`` takes values of shape ``(n,)`` or ``(n, k)`` and reduces over the
    first axis; results have shape ``()`` or ``(k,)``.
    """

    STATE = ("_sum", "_squares")

    def __init__(self) -> None:
        self.n = 0
        self._sum: torch.Tensor | None = None
        self._squares: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double()
        s, q = v.sum(dim=0), (v * v).sum(dim=0)
        if self._sum is None or self._squares is None:
            self._sum, self._squares = s, q
        else:
            self._sum += s
            self._squares += q
        self.n += v.shape[0]

    @property
    def total(self) -> torch.Tensor:
        return self._sum.cpu() if self._sum is not None else torch.tensor(float("nan"), dtype=torch.float64)

    def row(self, j: int) -> Moments:
        """Row ``j`` of a state reduced from values of shape ``(n, rows, ...)`` (several blocks at once)."""
        out = Moments()
        out.n = self.n
        if self._sum is not None and self._squares is not None:
            out._sum, out._squares = self._sum[j], self._squares[j]
        return out

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n if self.n else self.total * float("nan")

    @property
    def std(self) -> torch.Tensor:
        if self.n < 2 or self._squares is None:
            return torch.zeros_like(self.total)
        var = (self._squares.cpu() - self.total**2 / self.n) / (self.n - 1)
        return var.clamp_min(0.0).sqrt()


def window_means(t: torch.Tensor, per_window: int) -> torch.Tensor:
    """Per-token values of whole windows (``per_window`` tokens each) reduced to each window's mean, in float64."""
    return t.reshape(-1, per_window).double().mean(dim=1)


def mean_se(m: Moments | Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (None with a single sample), of streamed moments or of a few values in hand
    (per-window differences, per-fold accuracies): the one place a standard error is computed."""
    if not isinstance(m, Moments):
        values, m = m, Moments()
        m.add(torch.as_tensor(values, dtype=torch.float64))
    return float(m.mean), (float(m.std) / m.n**0.5 if m.n > 1 else None)


class MaxAbs:
    """Largest |x| per channel; read out as the overall maximum and its channel."""

    STATE = ("_per_channel",)

    def __init__(self) -> None:
        self._per_channel: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach(), dim=0)
        cur = torch.maximum(hi, -lo).float()
        self._per_channel = cur if self._per_channel is None else torch.maximum(self._per_channel, cur)

    def row(self, j: int) -> MaxAbs:
        """Row ``j`` of a state taken from values of shape ``(n, rows, channels)`` (several blocks at once)."""
        out = MaxAbs()
        out._per_channel = self._per_channel[j] if self._per_channel is not None else None
        return out

    @property
    def value(self) -> float:
        return float(self._per_channel.max()) if self._per_channel is not None else float("nan")

    @property
    def channel(self) -> int:
        return int(self._per_channel.argmax()) if self._per_channel is not None else -1


def to_host(stats: list[Moments | MaxAbs]) -> None:
    """Move the running state of many accumulators to the host in one copy.

    Reading results tensor by tensor would stall an accelerator once per
    read (hundreds of times per profile); one concatenated copy stalls it once.
    """
    held = [
        (s, name, t)
        for s in stats
        for name in s.STATE
        if (t := getattr(s, name)) is not None and t.device.type != "cpu"
    ]
    if not held:
        return
    dev = held[0][2].device
    flat = torch.cat([t.reshape(-1).to(dev, torch.float64) for _, _, t in held]).cpu()
    for (s, name, t), part in zip(held, flat.split([t.numel() for _, _, t in held])):
        setattr(s, name, part.view(t.shape).to(t.dtype))


def host_floats(values: list[torch.Tensor]) -> list[float]:
    """0-dim tensors, on any devices, as Python floats through one copy."""
    if not values:
        return []
    dev = values[0].device
    return torch.stack([v.to(dev, torch.float64) for v in values]).cpu().tolist()


def geometry(h: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-token geometry of one block, columns named by :data:`GEOMETRY`.

    With ``h' = h + a`` and ``h'' = h' + m``: ``1 - cos(h, h'')`` (Block
    Influence), ``cos(h, h')``, ``cos(h', h'')``, ``||a + m|| / ||h||``,
    ``||a|| / ||h||``, ``||m|| / ||h'||``, ``||h||`` and ``||h'||``. All of it
    follows from the six dot products among ``h``, ``a`` and ``m``, so the
    three (tokens, hidden) tensors are each read a few times and no sum
    tensor is materialized.
    """
    h, a, m = h.float(), a.float(), m.float()
    hh, aa, mm = (torch.linalg.vecdot(x, x) for x in (h, a, m))
    ha, hm, am = torch.linalg.vecdot(h, a), torch.linalg.vecdot(h, m), torch.linalg.vecdot(a, m)
    mid2 = hh + 2 * ha + aa  # ||h'||^2
    out2 = mid2 + 2 * (hm + am) + mm  # ||h''||^2
    upd2 = aa + 2 * am + mm  # ||a + m||^2
    tiny = 1e-24

    def cos(dot: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
        return dot / (n1.clamp_min(tiny) * n2.clamp_min(tiny)).sqrt()

    def ratio(n1: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
        return (n1.clamp_min(0) / n2.clamp_min(tiny)).sqrt()

    return torch.stack(
        (
            1.0 - cos(hh + ha + hm, hh, out2),
            cos(hh + ha, hh, mid2),
            cos(mid2 + hm + am, mid2, out2),
            ratio(upd2, hh),
            ratio(aa, hh),
            ratio(mm, mid2),
            hh.sqrt(),
            mid2.clamp_min(0).sqrt(),
        ),
        dim=-1,
    )


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of each token's channel values (0 for a Gaussian)."""
    x = x.float()
    c2 = (x - x.mean(dim=-1, keepdim=True)).square_()
    var = c2.mean(dim=-1)
    return torch.linalg.vecdot(c2, c2) / x.shape[-1] / var.clamp_min(1e-30) ** 2 - 3.0


def lazy_fraction(hidden: torch.Tensor) -> torch.Tensor:
    """Fraction of MLP hidden units with |x| <= 0.01 * rms(x), per token."""
    h = hidden.float()
    rms = torch.linalg.vector_norm(h, dim=-1, keepdim=True) / h.shape[-1] ** 0.5
    return (h.abs() <= 0.01 * rms).sum(dim=-1) / h.shape[-1]


def attention_rows(probs: torch.Tensor) -> torch.Tensor:
    """Per query row, per head: entropy, mean query-key distance and first-token (sink) mass.

    ``probs`` are attention probabilities of shape (batch, heads, queries,
    keys), the queries being the last positions of the keys. Returns
    (batch * (queries - 1), 3 * heads): the heads' entropies (nats), then their
    distances ``sum_k p_k (t - k)`` in tokens, then their mass on key 0. The
    first query is left out: it can only attend to itself.
    """
    p = probs.detach().float()[:, :, 1:]
    b, n_heads, q, k = p.shape
    t = torch.arange(k - q, k, device=p.device, dtype=p.dtype)  # absolute position of each query
    entropy = torch.special.entr(p).sum(-1)
    distance = t - p @ torch.arange(k, device=p.device, dtype=p.dtype)
    sink = p[..., 0]
    return torch.cat((entropy, distance, sink), dim=1).permute(0, 2, 1).reshape(b * q, 3 * n_heads)
