"""FastDropout: nn.Dropout's semantics (rate, scaling, gradient, seeding) with integer-bit CPU masks."""
import pytest
import torch
import torch.nn as nn

from dcls_timm.layers import FastDropout, cpu_dropout


def test_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.rand(200, 50, 100).add_(0.5).requires_grad_()  # 10^6 elements, none zero
    y = FastDropout(0.2)(x)
    kept = y != 0
    rate = kept.double().mean().item()
    assert abs(rate - 0.8) < 5 * (0.8 * 0.2 / x.numel()) ** 0.5  # five standard deviations
    torch.testing.assert_close(y[kept], x[kept] / 0.8, rtol=1e-6, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8, rtol=1e-6, atol=0)


def test_seeded_layout_inplace_and_identity_cases():
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    drop = FastDropout(0.5)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    c = FastDropout(0.5, inplace=True)(x.clone())
    assert torch.equal(a, c)
    assert torch.equal(drop.eval()(x), x) and torch.equal(FastDropout(0.)(x), x)
    assert torch.equal(FastDropout(1.)(x), torch.zeros_like(x))  # p = 1: F.dropout's zeros
    assert isinstance(drop, nn.Dropout) and not drop.state_dict()
    with pytest.raises(ValueError, match='0 <= p < 1'):
        cpu_dropout(x, 1.)


def test_fx_graphs_draw_the_eager_masks():
    model = nn.Sequential(nn.Linear(8, 8), FastDropout(0.3))
    traced = torch.fx.symbolic_trace(model)
    assert 'fast_dropout' in {getattr(n.target, '__name__', '') for n in traced.graph.nodes}
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    eager = model(x)
    torch.manual_seed(5)
    assert torch.equal(traced(x), eager) and (eager == 0).any()
    scripted = torch.jit.script(model.eval())
    assert torch.equal(scripted(x), model(x))
