"""CPU inference fast paths: oneDNN matmuls and convolutions with fused epilogues.

On a 2-core CPU the element-wise steps around a matmul or convolution (bias copies, BatchNorm, GELU/ReLU, layer scale,
residual add) cost as much as the matmul itself at small channel counts. oneDNN's operators with fused epilogues
(``torch.ops.mkldnn._linear_pointwise`` and ``_convolution_pointwise``, which inductor's CPU backend lowers to) do
them inside the matmul or convolution:

- :func:`mlp_residual`: ``shortcut + gamma * fc2(gelu(fc1(x)))`` (ConvNeXt blocks) as two matmuls, the layer scale
  folded into ``fc2``. The GELU matmul equals ``F.gelu(F.linear(...))`` bit for bit; the residual one differs by
  float32 rounding (summation order).
- :func:`fused_conv2d`: ``act(bn(conv(x)) [+ residual])`` (FlexNet blocks; CCNN's 1x1 convs with their GELUs) as
  one convolution, an eval BatchNorm folded into the kernel and bias (float32 rounding).

Folded weights are recomputed per call (a few thousand multiplies), so nothing derived from the parameters is kept.
The operators are private, so they are checked once per process on small examples; if the check fails, callers keep
their module path. :func:`eager_inference` says where a fast path may replace the module calls at all.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, GELU as TimmGELU
from torch.nn.modules import module as _module

from ._autograd import autograd_function_unsupported

__all__ = ['fused_ops_available', 'eager_unhooked', 'eager_inference', 'identity_in_eval', 'use_fused_mlp',
           'mlp_residual', 'fold_batch_norm', 'batch_norm_affine', 'eval_batch_norm', 'fused_activation',
           'conv2d_args', 'use_fused_conv', 'conv_channels_last', 'fused_conv2d']


def _probe() -> bool:
    ops = getattr(torch.ops, 'mkldnn', None)
    if not torch.backends.mkldnn.is_available() or ops is None or not hasattr(ops, '_linear_pointwise') \
            or not hasattr(ops, '_convolution_pointwise'):
        return False
    g = torch.Generator().manual_seed(0)
    randn = partial(torch.randn, generator=g, dtype=torch.float32)  # float32 whatever the default dtype
    x, w1, b1 = randn(5, 8), randn(16, 8), randn(16)
    w2, b2, shortcut = randn(8, 16), randn(8), randn(5, 8)
    img = randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    wc, bc = randn(3, 3, 3, 3), randn(3)
    try:
        with torch.no_grad():
            h = ops._linear_pointwise(x, w1, b1, 'gelu', [], 'none')
            out = ops._linear_pointwise.binary(h, shortcut, w2, b2, 'add')
            ref = shortcut + F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
            conv = ops._convolution_pointwise(img, wc, bc, [1, 1], [1, 1], [1, 1], 1, 'relu', [], '')
            conv_ref = F.relu(F.conv2d(img, wc, bc, padding=1))
            res = ops._convolution_pointwise.binary(img, img, wc, bc, [1, 1], [1, 1], [1, 1], 1, 'add', None,
                                                    'relu', [], '')
            res_ref = F.relu(F.conv2d(img, wc, bc, padding=1) + img)
            gelu = ops._convolution_pointwise(img, wc, bc, [1, 1], [1, 1], [1, 1], 1, 'gelu', [], 'none')
            gelu_ref = F.gelu(F.conv2d(img, wc, bc, padding=1))
    except (RuntimeError, TypeError):
        return False
    return all(bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4)) for a, b in
               ((out, ref), (conv, conv_ref), (res, res_ref), (gelu, gelu_ref)))


_AVAILABLE: Optional[bool] = None


def fused_ops_available() -> bool:
    """oneDNN's fused linear and convolution operators are in this PyTorch build and compute what they should
    (checked once per process on small examples)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


def eager_unhooked(x: torch.Tensor, modules: Sequence[nn.Module]) -> bool:
    """Eager execution without autocast, with no module hook that could see (or miss) ``modules`` (and their
    submodules): the condition for a path that computes what those modules compute, with or without autograd,
    without calling them. False under FX, tracing, compiling, forward-mode AD, torch.func transforms and autocast,
    and while any forward hook, local or global, is set; with autograd on, also while any backward hook is set
    (a skipped module call would skip the hook, and with it whatever it does to the gradients)."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling() \
            or torch.is_autocast_enabled() or torch.is_autocast_enabled('cpu') \
            or autograd_function_unsupported():  # oneDNN's fused ops carry no tangents and have no batching rule
        return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    backward = torch.is_grad_enabled()
    if backward and (_module._global_backward_hooks or _module._global_backward_pre_hooks):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks
                   or (backward and (m._backward_hooks or m._backward_pre_hooks))
                   for mod in modules for m in mod.modules())


def eager_inference(x: torch.Tensor, modules: Sequence[nn.Module]) -> bool:
    """:func:`eager_unhooked` without autograd, with ``modules`` (and their submodules) all in eval mode: the
    condition for an inference fast path. False also under autograd and while any of the modules is in training
    mode (Monte Carlo dropout, drop path)."""
    return not torch.is_grad_enabled() and eager_unhooked(x, modules) \
        and not any(m.training for mod in modules for m in mod.modules())


def _packed(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # oneDNN's fused ops read a bias as packed: a strided or expanded one (a view set by hand, or passed through
    # torch.func.functional_call) was read wrongly, silently
    return None if bias is None else bias.contiguous()


_EVAL_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, DropPath)


def identity_in_eval(*modules: nn.Module) -> bool:
    """Every module is one whose eval forward is the identity (an ``nn.Identity``, PyTorch's dropouts, timm's
    ``DropPath``; exact types, not subclasses): a fast path may skip it in eval. Anything a user put in such a
    slot instead (e.g. a drop path that scales by the survival rate at test time) keeps the module path."""
    return all(type(m) in _EVAL_IDENTITIES for m in modules)


def _cpu_float32(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and x.numel() > 0
            and all(w.dtype == torch.float32 for w in weights)
            and not torch.is_autocast_enabled('cpu') and fused_ops_available())


def _exact_gelu(act: nn.Module) -> bool:
    # timm's GELU (its act_layer='gelu') calls F.gelu in the exact (erf) form, as oneDNN's 'none' algorithm
    return type(act) is TimmGELU or (type(act) is nn.GELU and act.approximate == 'none')


def use_fused_mlp(x: torch.Tensor, fc1: nn.Module, act: nn.Module, fc2: nn.Module) -> bool:
    """The fused MLP applies to float32 CPU eager inference (:func:`eager_inference`, outside autocast) of a Linear,
    exact GELU, Linear MLP: everything else keeps the module path."""
    return (type(fc1) is nn.Linear and type(fc2) is nn.Linear and _exact_gelu(act)
            and eager_inference(x, (fc1, act, fc2)) and _cpu_float32(x, fc1.weight, fc2.weight))


def mlp_residual(x: torch.Tensor, shortcut: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
                 gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """``shortcut + gamma * fc2(gelu(fc1(x)))`` for channels-last ``x`` ``[..., C_in]`` and ``shortcut``
    ``[..., C_out]`` (same leading shape), through two fused oneDNN matmuls. Call only where
    :func:`use_fused_mlp` holds."""
    lead = x.shape[:-1]
    h = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), fc1.weight, _packed(fc1.bias), 'gelu', [],
                                           'none')
    weight, bias = fc2.weight, fc2.bias
    if gamma is not None:
        weight = weight * gamma.unsqueeze(1)
        bias = bias * gamma if bias is not None else None
    out = torch.ops.mkldnn._linear_pointwise.binary(
        h, shortcut.reshape(-1, shortcut.shape[-1]), weight, _packed(bias), 'add')
    return out.view(*lead, out.shape[-1])


def batch_norm_affine(bn: nn.modules.batchnorm._BatchNorm, bias: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``bn(x + bias) == x * scale + shift`` per channel, from the eval BatchNorm's running
    statistics."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if bias is None else (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_batch_norm(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.modules.batchnorm._BatchNorm):
    """Kernel and bias of ``bn(conv(x))`` as one convolution, from the eval BatchNorm's running statistics."""
    scale, shift = batch_norm_affine(bn, bias)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), shift


def eval_batch_norm(bn: nn.Module, dim: int = 2) -> bool:
    """``bn`` is a plain ``BatchNorm{dim}d`` in eval mode with running statistics: an affine map per channel."""
    return (type(bn) is {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}.get(dim) and not bn.training
            and bn.track_running_stats and bn.running_mean is not None)


def fused_activation(act: nn.Module) -> Optional[str]:
    """oneDNN's name for an activation module it can apply inside a convolution (``'relu'``, exact ``'gelu'``)."""
    if type(act) is nn.ReLU:
        return 'relu'
    return 'gelu' if _exact_gelu(act) else None


def conv2d_args(conv: nn.Module) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor], List[int]]]:
    """Weight, bias and padding of a convolution that :func:`fused_conv2d` can run (stride 1, no dilation, no
    groups, zero padding, float32): a plain ``nn.Conv2d``, or a 2-D CKConv/FlexConv whose kernel is convolved
    directly (not through FFTs); None for anything else."""
    from .flexconv import _ContinuousConvNd
    if isinstance(conv, _ContinuousConvNd) and conv.dim == 2 and not conv.depthwise:
        kernel = conv.direct_kernel()
        args = None if kernel is None else (kernel, conv.bias, [s // 2 for s in kernel.shape[2:]])
    elif type(conv) is nn.Conv2d and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 \
            and conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple):
        args = conv.weight, conv.bias, list(conv.padding)
    else:
        return None
    return args if args is not None and args[0].dtype == torch.float32 else None


def use_fused_conv(x: torch.Tensor, act: nn.Module, bn: Optional[nn.Module] = None, residual: bool = False) -> bool:
    """:func:`fused_conv2d` applies to float32 CPU 2-D inputs, a ReLU or exact GELU (a ReLU only with a residual
    add: oneDNN has no GELU after its binary post-op) and, if given, a BatchNorm2d in eval that uses running
    statistics (the caller checks :func:`eager_inference` and the convolution)."""
    name = fused_activation(act)
    return (name is not None and (name == 'relu' or not residual) and x.dim() == 4
            and (bn is None or eval_batch_norm(bn)) and _cpu_float32(x, *([bn.running_var] if bn is not None else [])))


def conv_channels_last(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether the module path's CPU output of ``conv`` on ``x`` is channels-last: always for CKConv/FlexConv
    (they convert), for ``nn.Conv2d`` when the input (or weight) is channels-last and not also contiguous, as for
    ``F.conv2d``."""
    from .flexconv import _ContinuousConvNd
    if isinstance(conv, _ContinuousConvNd):
        return True
    return any(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in (x, conv.weight))


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int],
                 act: nn.Module, bn: Optional[nn.modules.batchnorm._BatchNorm] = None,
                 residual: Optional[torch.Tensor] = None, channels_last: bool = True) -> torch.Tensor:
    """``act(bn(conv2d(x, weight, bias, padding)) [+ residual])`` as one oneDNN convolution (stride 1, groups 1),
    computed and returned channels-last or contiguous (``channels_last``: pass :func:`conv_channels_last`, the
    format the module path would return); ``bn`` (optional) folded into the kernel and bias. Call only where
    :func:`use_fused_conv` holds (with ``residual=True`` for a residual)."""
    if bn is not None:
        weight, bias = fold_batch_norm(weight, bias, bn)
    name = fused_activation(act)
    algorithm = 'none' if name == 'gelu' else ''
    bias = _packed(bias)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(padding), [1, 1], [1, 1], 1, name, [],
                                                       algorithm)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual.contiguous(memory_format=memory_format), weight, bias, list(padding), [1, 1], [1, 1], 1,
        'add', None, name, [], algorithm)
