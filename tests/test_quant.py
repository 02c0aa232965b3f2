"""Group-wise RTN and GPTQ against their definitions."""

import pytest
import torch

from layerwise.errors import LayerwiseError
from layerwise.quant import Hessian, QConfig, quantize_gptq, quantize_rtn


def _w(out=24, n=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * 0.05


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (3, 100, False), (2, 32, False), (8, 576, False), (4, 64, True), (3, 100, True)])
def test_rtn_rounds_to_nearest_grid_point(bits, group, sym):
    w = _w()
    q = quantize_rtn(w, QConfig(bits, group, sym))
    deq = q.dequantize()
    n_groups = -(-576 // group)
    assert q.scales.shape == (24, n_groups) and (q.zeros is None) == sym
    assert int(q.codes.max()) <= 2**bits - 1
    step = q.scales.repeat_interleave(group, dim=1)[:, :576]
    # nearest point of a grid that covers the group, up to the fp16 rounding of the scale (2^-11, times the levels)
    assert ((w - deq).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-6).all()
    assert (w - deq).abs().mean() < 0.3 * step.mean()
    # the last, shorter group (576 = 5 * 100 + 76) has its own range
    if group == 100:
        tail = w[:, 500:]
        want = (tail.abs().amax(1) / (2 ** (bits - 1) - 1)) if sym else (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / (2**bits - 1)
        torch.testing.assert_close(q.scales[:, -1], want.half().float())


def test_storage_cost_is_exact():
    cfg = QConfig(4, 64)
    assert cfg.storage_bits(1, 576) == 576 * 4 + 9 * (16 + 4)
    assert cfg.bits_per_weight(576) == pytest.approx(4.3125)
    assert QConfig(3, 100, symmetric=True).storage_bits(2, 576) == 2 * (576 * 3 + 6 * 16)


def test_bad_configs():
    with pytest.raises(LayerwiseError, match="2 to 8"):
        QConfig(9, 64)
    with pytest.raises(LayerwiseError, match="larger than a row"):
        quantize_rtn(_w(n=32), QConfig(4, 64))


def test_gptq_with_identity_hessian_is_rtn():
    w = _w()
    h = torch.eye(576, dtype=torch.float64)
    cfg = QConfig(3, 64)
    assert torch.equal(quantize_gptq(w, h, cfg, damp=0.0).codes, quantize_rtn(w, cfg).codes)


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(sym):
    g = torch.Generator().manual_seed(1)
    n = 576
    basis = torch.randn(32, n, generator=g)
    x = torch.randn(4096, 32, generator=g) @ basis + 0.1 * torch.randn(4096, n, generator=g)
    acc = Hessian(n)
    for part in x.split(1000):
        acc.add(part)
    torch.testing.assert_close(acc.value, 2 * x.double().T @ x.double() / 4096)
    w = _w(out=32)
    cfg = QConfig(3, 64, sym)

    def out_err(deq):
        return ((x @ (w - deq).T) ** 2).sum() / ((x @ w.T) ** 2).sum()

    e_rtn = out_err(quantize_rtn(w, cfg).dequantize())
    e_gptq = out_err(quantize_gptq(w, acc.value, cfg).dequantize())
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
