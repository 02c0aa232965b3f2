"""Quantizers (group-wise RTN, GPTQ) with exact storage costs; measurement, allocation and exports build on them."""

from .gptq import Hessian, quantize_gptq
from .rtn import QConfig, QTensor, quantize_rtn

__all__ = ["Hessian", "QConfig", "QTensor", "quantize_gptq", "quantize_rtn"]
