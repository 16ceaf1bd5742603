"""PointwiseConv1d: nn.Conv1d(C_in, C_out, 1) through batched matmuls on CPU, same numbers and state."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcls_timm.layers import PointwiseConv1d, pointwise_conv


@pytest.mark.parametrize('bias', [True, False])
def test_equals_conv1d_values_and_gradients(bias):
    torch.manual_seed(0)
    layer = PointwiseConv1d(6, 5, bias=bias)
    x = torch.randn(3, 6, 40, requires_grad=True)
    out = layer(x)
    ref = F.conv1d(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    strided = torch.randn(3, 6, 80)[..., ::2]  # a non-contiguous input, as a sliced FFT output
    torch.testing.assert_close(layer(strided), F.conv1d(strided, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_state_dict_fx_scripting_and_autocast_match_conv1d():
    layer, conv = PointwiseConv1d(4, 7), nn.Conv1d(4, 7, 1)
    assert layer.state_dict().keys() == conv.state_dict().keys()
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 9)
    traced = torch.fx.symbolic_trace(nn.Sequential(layer))
    torch.testing.assert_close(traced(x), conv(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.jit.script(layer)(x), conv(x), rtol=1e-5, atol=1e-6)  # conv1d when scripted
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low, low_ref = layer(x), conv(x)
    assert low.dtype == low_ref.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), low_ref.float(), rtol=2e-2, atol=2e-2)
    assert isinstance(pointwise_conv(1, 4, 7), PointwiseConv1d) and type(pointwise_conv(2, 4, 7)) is nn.Conv2d
    with pytest.raises(ValueError, match='dim must be 1, 2 or 3'):
        pointwise_conv(4, 4, 7)
