"""What the layers' custom autograd Functions share: when they must step aside, and their higher-order backward.

The Functions (DCLS kernel construction, the large-kernel depthwise conv, the causal FFT conv) write their first-order
backward by hand. A backward under ``create_graph`` (gradient penalties, Hessian-vector products) instead
differentiates the same computation written in plain ops; ``torch.func`` transforms and forward-mode AD, for which
the Functions define no vmap rule and no jvp, take the plain ops from the start.
"""
from typing import Callable, Sequence, Tuple

import torch
import torch.autograd.forward_ad as forward_ad

__all__ = ['functorch_transforms_active', 'autograd_function_unsupported', 'differentiable_grads']


def functorch_transforms_active() -> bool:
    """Inside torch.func transforms (grad, vmap, jacrev, ...): values may be batched, so no host reads of them."""
    return torch._C._are_functorch_transforms_active()


def autograd_function_unsupported() -> bool:
    """torch.func transforms or forward-mode AD are active: the plain ops must serve."""
    return functorch_transforms_active() or getattr(forward_ad, '_current_level', -1) >= 0


def differentiable_grads(ctx, grad: torch.Tensor, inputs: Sequence[torch.Tensor],
                         build: Callable[[], torch.Tensor]) -> Tuple:
    """Gradients of ``build()`` (the Function's output from plain ops on its saved ``inputs``) for the inputs
    ``ctx`` needs, themselves differentiable; None for the others."""
    needs = ctx.needs_input_grad[:len(inputs)]
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.autocast(grad.device.type, enabled=False):  # in the inputs' precision, as the Function's forward
        out = build()
    got = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype), create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs)
