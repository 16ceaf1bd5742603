"""The CPU fast path for large depthwise kernels: exact values and gradients, dispatch, kernel cropping."""
import pytest
import torch
import torch.nn.functional as F

from dcls_timm.layers import Dcls2d
from dcls_timm.layers.fast_conv import depthwise_conv2d, use_fast_depthwise


def _grads(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b)
    out.backward(g)
    return out.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize('channels, size, k, pad', [(4, 12, 7, 3), (3, 9, 9, 4), (5, 20, 17, 8), (2, 11, 8, 3),
                                                    (3, 6, 11, 5)])
@pytest.mark.parametrize('layout', ['contiguous', 'channels_last'])
def test_values_and_gradients_equal_conv2d(channels, size, k, pad, layout):
    torch.manual_seed(0)
    x = torch.randn(2, channels, size, size + 1)
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(channels, 1, k, k), torch.randn(channels)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, padding=pad, groups=channels), x, w, b,
                 g := torch.randn(2, channels, size + 2 * pad - k + 1, size + 1 + 2 * pad - k + 1))
    fast = _grads(lambda x, w, b: depthwise_conv2d(x, w, b, (pad, pad)), x, w, b, g)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_float64_gradcheck():
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise_conv2d(x, w, b, (3, 3)), (x, w, b))


def test_dispatch():
    x, w = torch.randn(2, 4, 10, 10), torch.randn(4, 1, 9, 9)
    assert use_fast_depthwise(x, w, (1, 1), 4)
    assert not use_fast_depthwise(x, w, (2, 2), 4)  # stride
    assert not use_fast_depthwise(x, torch.randn(8, 1, 9, 9), (1, 1), 4)  # not depthwise
    assert not use_fast_depthwise(x, torch.randn(4, 1, 3, 3), (1, 1), 4)  # small kernel: the native path is fine
    assert not use_fast_depthwise(x.bfloat16(), w.bfloat16(), (1, 1), 4)  # low precision: native path
    with pytest.raises(ValueError, match='padding'):
        depthwise_conv2d(x, w, None, (9, 9))


@pytest.mark.parametrize('size', [3, 5, 12])
def test_dcls_layer_fast_path_and_cropping_are_exact(size):
    torch.manual_seed(0)
    layer = Dcls2d(6, 6, kernel_count=8, dilated_kernel_size=17, padding='same', groups=6, version='v0')
    with torch.no_grad():
        layer.P.uniform_(-8, 8)
    x = torch.randn(2, 6, size, size)

    def run(fast):
        layer.fast_path = fast
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        out = layer(xx) if fast else F.conv2d(xx, layer.construct_kernel(), layer.bias, padding=8, groups=6)
        out.square().sum().backward()
        return out.detach(), xx.grad, layer.weight.grad.clone(), layer.P.grad.clone(), layer.bias.grad.clone()
    for a, r in zip(run(True), run(False)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_uses_the_native_path_within_tolerance():
    layer = Dcls2d(4, 4, kernel_count=6, dilated_kernel_size=11, padding='same', groups=4, version='v1')
    x = torch.randn(2, 4, 16, 16)
    ref = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
