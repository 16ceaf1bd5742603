"""Inference fast path for the channels-last MLP and residual of ConvNeXt-style blocks on CPU.

``shortcut + gamma * fc2(gelu(fc1(x)))`` written with ``nn.Linear`` and element-wise ops makes five passes over
the activations besides the two matmuls (bias copy, GELU, bias copy, layer scale, residual add): on a 2-core CPU
they cost as much as the matmuls at ConvNeXt's early stages. oneDNN's linear with fused epilogues (the operator
inductor's CPU backend lowers to) does the bias and GELU inside the first matmul and the bias and residual inside
the second; the layer scale is folded into ``fc2``'s weight and bias (a few thousand multiplies per call, recomputed
so nothing derived from the parameters is kept). The GELU matmul equals ``F.gelu(F.linear(...))`` bit for bit; the
residual one differs by float32 rounding (summation order).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELU as TimmGELU

__all__ = ['fused_mlp_available', 'use_fused_mlp', 'mlp_residual']


def _probe() -> bool:
    ops = getattr(torch.ops, 'mkldnn', None)
    if not torch.backends.mkldnn.is_available() or ops is None or not hasattr(ops, '_linear_pointwise'):
        return False
    # a private operator: check once that it exists with this signature and computes what it should
    g = torch.Generator().manual_seed(0)
    x, w1, b1 = torch.randn(5, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    w2, b2, shortcut = torch.randn(8, 16, generator=g), torch.randn(8, generator=g), torch.randn(5, 8, generator=g)
    try:
        with torch.no_grad():
            h = ops._linear_pointwise(x, w1, b1, 'gelu', [], 'none')
            out = ops._linear_pointwise.binary(h, shortcut, w2, b2, 'add')
            ref = shortcut + F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-4))


_AVAILABLE: Optional[bool] = None


def fused_mlp_available() -> bool:
    """oneDNN's fused linear operators are in this PyTorch build and compute what they should (checked once per
    process on a small example)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def _exact_gelu(act: nn.Module) -> bool:
    # timm's GELU (its act_layer='gelu') calls F.gelu in the exact (erf) form, as oneDNN's 'none' algorithm
    return isinstance(act, TimmGELU) or (isinstance(act, nn.GELU) and act.approximate == 'none')


def use_fused_mlp(x: torch.Tensor, fc1: nn.Module, act: nn.Module, fc2: nn.Module) -> bool:
    """The fused path applies to float32 CPU inference (no autograd, eager, outside autocast) of a Linear, exact
    GELU, Linear MLP: everything else keeps the module path."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() or x.device.type != 'cpu' or x.dtype != torch.float32 or x.numel() == 0:
        return False
    if torch.is_autocast_enabled('cpu') or not fused_mlp_available():
        return False
    return (type(fc1) is nn.Linear and type(fc2) is nn.Linear and _exact_gelu(act)
            and fc1.weight.dtype == torch.float32 and fc2.weight.dtype == torch.float32)


def mlp_residual(x: torch.Tensor, shortcut: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
                 gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """``shortcut + gamma * fc2(gelu(fc1(x)))`` for channels-last ``x`` ``[..., C_in]`` and ``shortcut``
    ``[..., C_out]`` (same leading shape), through two fused oneDNN matmuls. Call only where
    :func:`use_fused_mlp` holds."""
    lead = x.shape[:-1]
    h = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, 'gelu', [], 'none')
    weight, bias = fc2.weight, fc2.bias
    if gamma is not None:
        weight = weight * gamma.unsqueeze(1)
        bias = bias * gamma if bias is not None else None
    out = torch.ops.mkldnn._linear_pointwise.binary(
        h, shortcut.reshape(-1, shortcut.shape[-1]), weight, bias, 'add')
    return out.view(*lead, out.shape[-1])

