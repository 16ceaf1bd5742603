"""dcls_timm.layers.dropout: nn.Dropout's semantics (rate, scaling, gradient, seeding) with integer-bit CPU masks,
and the module itself wherever something could tell (FX, hooks, eval)."""
import pytest
import torch
import torch.nn as nn

from dcls_timm.layers.dropout import cpu_dropout, dropout
from dcls_timm.models.flexnet import FlexNetBlock


def test_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.rand(200, 50, 100).add_(0.5).requires_grad_()  # 10^6 elements, none zero
    y = dropout(nn.Dropout(0.2), x)
    kept = y != 0
    rate = kept.double().mean().item()
    assert abs(rate - 0.8) < 5 * (0.8 * 0.2 / x.numel()) ** 0.5  # five standard deviations
    torch.testing.assert_close(y[kept], x[kept] / 0.8, rtol=1e-6, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8, rtol=1e-6, atol=0)


def test_seeded_layout_inplace_and_identity_cases():
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    drop = nn.Dropout(0.5)
    torch.manual_seed(3)
    a = dropout(drop, x)
    torch.manual_seed(3)
    b = dropout(drop, x)
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    assert torch.equal(dropout(nn.Dropout(0.5, inplace=True), x.clone()), a)
    assert torch.equal(dropout(drop.eval(), x), x) and torch.equal(dropout(nn.Dropout(0.), x), x)
    assert torch.equal(dropout(nn.Dropout(1.), x), torch.zeros_like(x))  # p = 1: the module's zeros
    with pytest.raises(ValueError, match='0 <= p < 1'):
        cpu_dropout(x, 1.)


def test_hooks_fx_and_mode_changes_see_the_module():
    drop, x = nn.Dropout(0.5), torch.ones(4, 8)
    calls = []
    handle = drop.register_forward_hook(lambda m, i, o: calls.append(o))
    out = dropout(drop, x)
    handle.remove()
    assert len(calls) == 1 and calls[0] is out
    block = FlexNetBlock(4, 4, lambda i, o: nn.Conv2d(i, o, 3, padding=1), dropout=0.5)
    traced = torch.fx.symbolic_trace(block)  # traced in training mode
    assert 'drop' in {n.target for n in traced.graph.nodes if n.op == 'call_module'}
    y = torch.randn(2, 4, 6, 6)
    block.eval()
    traced.eval()
    with torch.no_grad():  # the graph follows eval(): no dropout
        torch.testing.assert_close(traced(y), block(y), rtol=1e-5, atol=1e-6)
        assert torch.equal(traced(y), traced(y))


def test_backward_hooks_on_the_module_or_global_take_the_module_call():
    # a full backward hook must fire as it does for nn.Dropout: the module is called when anything observes it
    torch.manual_seed(0)
    block = FlexNetBlock(4, 4, lambda i, o: nn.Conv2d(i, o, 3, padding=1)).train()
    fired = []
    handle = block.drop.register_full_backward_hook(lambda *args: fired.append('module'))
    block(torch.randn(2, 4, 6, 6, requires_grad=True)).sum().backward()
    handle.remove()
    block.act1.inplace = block.act2.inplace = False  # a global full backward hook wraps them too (PyTorch: no inplace)
    global_handle = nn.modules.module.register_module_full_backward_hook(
        lambda m, *args: fired.append('global') if m is block.drop else None)
    block(torch.randn(2, 4, 6, 6, requires_grad=True)).sum().backward()
    global_handle.remove()
    assert fired == ['module', 'global']
