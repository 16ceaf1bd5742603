"""Element-wise dropout whose CPU training masks come from integer random bits.

PyTorch's CPU dropout draws its mask with ``bernoulli_``, several times slower than drawing random integers (in a
profiled FlexNet-7 training step, ``docs/benchmarks/cpu_authors.md``: 107 ms of ``bernoulli_`` in the authors' code,
32 ms of ``random_`` here). Here the mask compares 31-bit integers with ``round(p * 2^31)``: it keeps an element with
probability ``1 - p`` (to ``2^-31``) and scales the kept ones by ``1 / (1 - p)``, as ``nn.Dropout`` does, from the
same default generator (``torch.manual_seed`` makes runs repeatable); the draws differ from ``nn.Dropout``'s.

Models keep a plain ``nn.Dropout`` module and call :func:`dropout` on it: FX graphs, TorchScript and hooks see that
module as usual (an FX graph calls the module, so it follows ``train()``/``eval()`` and draws ``nn.Dropout``'s masks).
"""
import torch
import torch.nn as nn
from torch.nn.modules import module as _module

__all__ = ['cpu_dropout', 'dropout']

_RANGE = 2 ** 31  # int32 random_() draws uniformly from [0, 2^31)


def cpu_dropout(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """Training-mode dropout of ``x`` with a mask drawn as 31-bit integers (any device; fast on CPU)."""
    if not 0. <= p < 1.:
        raise ValueError(f'cpu_dropout needs 0 <= p < 1, got {p}.')
    keep = torch.empty_like(x, dtype=torch.int32).random_() >= round(p * _RANGE)
    if inplace:
        return x.mul_(keep).mul_(1. / (1. - p))
    return (x * keep).mul_(1. / (1. - p))


def _observed(module: nn.Module) -> bool:
    """Hooks on the module or global module hooks, forward or backward: a module call would run them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an ``nn.Dropout``, its mask from :func:`cpu_dropout` in eager CPU training where nothing
    could observe the module call (no hooks on it, no global module hooks); anything else calls the module (FX
    tracing, jit tracing, compile, GPUs, evaluation, other module types, forward or backward hooks)."""
    if type(module) is nn.Dropout and module.training and 0. < module.p < 1. and not isinstance(x, torch.fx.Proxy) \
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and x.device.type == 'cpu' \
            and x.is_floating_point() and not _observed(module):
        return cpu_dropout(x, module.p, module.inplace)
    return module(x)
