"""Element-wise dropout whose CPU training masks come from integer random bits.

PyTorch's CPU dropout draws its mask with ``bernoulli_``, several times slower than drawing random integers (in a
profiled FlexNet-7 training step, ``docs/benchmarks/cpu_authors.md``: 112 ms of ``bernoulli_`` in the authors' code,
32 ms of ``random_`` here). Here the mask compares 31-bit integers with ``round(p * 2^31)``. The mask keeps an element with probability ``1 - p`` (to
``2^-31``) and scales the kept ones by ``1 / (1 - p)``, as ``nn.Dropout`` does, from the same default generator (so
``torch.manual_seed`` makes runs repeatable, FX-traced models included); the draws differ from ``nn.Dropout``'s.
GPUs, scripting, tracing, compile and evaluation keep ``F.dropout``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ['FastDropout', 'cpu_dropout', 'fast_dropout']

_RANGE = 2 ** 31  # int32 random_() draws uniformly from [0, 2^31)


def cpu_dropout(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """Training-mode dropout of ``x`` with a mask drawn as 31-bit integers (any device; fast on CPU)."""
    if not 0. <= p < 1.:
        raise ValueError(f'cpu_dropout needs 0 <= p < 1, got {p}.')
    keep = torch.empty_like(x, dtype=torch.int32).random_() >= round(p * _RANGE)
    if inplace:
        return x.mul_(keep).mul_(1. / (1. - p))
    return (x * keep).mul_(1. / (1. - p))


def fast_dropout(x: torch.Tensor, p: float, training: bool, inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` with :func:`cpu_dropout` masks for CPU training. A leaf of every FX graph (``torch.fx.wrap``),
    so FX-traced models draw the same masks as eager ones."""
    if training and 0. < p < 1. and x.device.type == 'cpu' and x.is_floating_point() \
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        return cpu_dropout(x, p, inplace)
    return F.dropout(x, p, training, inplace)


torch.fx.wrap('fast_dropout')
register_notrace_function(fast_dropout)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) whose CPU training masks come from :func:`cpu_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.dropout(x, self.p, self.training, self.inplace)
        return fast_dropout(x, self.p, self.training, self.inplace)
