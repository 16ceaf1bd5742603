"""The CPU fast path for large depthwise kernels: exact values and gradients, dispatch, kernel cropping."""
import pytest
import torch
import torch.nn.functional as F

from dcls_timm.layers import Dcls2d, construct_kernel
from dcls_timm.layers.kernel import position_window
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
        # relative to the tensor's scale: FFT rounding error is spread evenly over the entries
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


# widths 11-13 are widened with zero columns (oneDNN's faster implementation), also with uneven padding
@pytest.mark.parametrize('kernel, pad', [((9, 5), (2, 4)), ((7, 13), (0, 6)), ((15, 4), (7, 1)), ((13, 13), (6, 6)),
                                         ((5, 11), (2, 3)), ((11, 12), (5, 6)), ((17, 12), (8, 0))])
def test_rectangular_kernels_and_uneven_padding(kernel, pad):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 10, 13), torch.randn(3, 1, *kernel), torch.randn(3)
    out_size = [n + 2 * p - k + 1 for n, k, p in zip(x.shape[2:], kernel, pad)]
    g = torch.randn(2, 3, *out_size)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, padding=pad, groups=3), x, w, b, g)
    fast = _grads(lambda x, w, b: depthwise_conv2d(x, w, b, pad), x, w, b, g)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
    with torch.inference_mode():
        torch.testing.assert_close(depthwise_conv2d(x, w, b, pad), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('route', ['dft', 'fft'])
@pytest.mark.parametrize('size, kernel, pad', [((7, 7), (23, 23), (11, 11)),   # kernel wider than twice the map
                                               ((14, 14), (17, 17), (8, 8)),
                                               ((6, 9), (9, 4), (2, 3)),        # uneven padding, even sizes
                                               ((5, 8), (15, 9), (7, 1)),
                                               ((1, 3), (9, 9), (4, 4)),
                                               # padding past half the kernel: outputs outnumber inputs
                                               ((5, 5), (7, 7), (6, 6)),
                                               ((4, 9), (7, 7), (5, 3)),
                                               ((7, 7), (15, 15), (14, 14)),
                                               ((6, 3), (9, 5), (8, 4))])
def test_weight_gradient_routes_equal_conv2d_in_float64(route, size, kernel, pad, monkeypatch):
    """Both weight-gradient routes (DFT matrix products for small maps, FFTs for large ones), forced in turn,
    against autograd through ``F.conv2d`` in float64: taps that reach no input get exactly zero."""
    from dcls_timm.layers import fast_conv
    monkeypatch.setattr(fast_conv, 'DFT_MAX_PIXELS', 10 ** 9 if route == 'dft' else 0)
    torch.manual_seed(0)
    x = torch.randn(3, 4, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, *kernel, dtype=torch.float64)
    out_size = [n + 2 * p - k + 1 for n, k, p in zip(size, kernel, pad)]
    g = torch.randn(3, 4, *out_size, dtype=torch.float64)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, padding=pad, groups=4), x, w, torch.zeros(4, dtype=torch.float64), g)
    fast = _grads(lambda x, w, b: depthwise_conv2d(x, w, b, pad), x, w, torch.zeros(4, dtype=torch.float64), g)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-10, atol=1e-10)
    unreachable = torch.ones(*kernel, dtype=torch.bool)
    for axis, (n, p, m) in enumerate(zip(size, pad, out_size)):
        lags = torch.arange(kernel[axis]) - p  # grad[l] = sum_y g[y] x[y + l], y < m outputs, 0 <= y + l < n
        reach = (lags > -m) & (lags < n)
        unreachable &= ~reach[:, None] if axis == 0 else ~reach[None, :]
    if unreachable.any():
        assert (fast[2][:, 0][:, unreachable] == 0).all()


def test_weight_gradient_routes_agree_in_float32(monkeypatch):
    from dcls_timm.layers import fast_conv
    torch.manual_seed(0)
    x, g = torch.randn(2, 8, 14, 14), torch.randn(2, 8, 14, 14)
    grads = []
    for limit in (10 ** 9, 0):
        monkeypatch.setattr(fast_conv, 'DFT_MAX_PIXELS', limit)
        grads.append(fast_conv._weight_grad(x, g, (17, 17), (8, 8)))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())


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
    assert use_fast_depthwise(x, w, (1, 1), 4, (8, 8)) and not use_fast_depthwise(x, w, (1, 1), 4, (9, 0))
    with pytest.raises(ValueError, match='padding'):
        depthwise_conv2d(x, w, None, (9, 9))


def _positions(kind: str, P: torch.Tensor) -> torch.Tensor:
    if kind == 'spread':  # the whole grid, as after training
        return P.uniform_(-8, 8)
    if kind == 'narrow':  # near the centre and off it, as at init
        return P.uniform_(-1.7, 2.4)
    return P.uniform_(-5, 3).round_()  # integers, some on the window's edge: their gradient needs the next tap


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
@pytest.mark.parametrize('positions', ['spread', 'narrow', 'integer'])
@pytest.mark.parametrize('size', [3, 5, 12])
def test_dcls_layer_fast_path_and_cropping_are_exact(size, positions, version):
    """Kernels cropped to the taps the positions span and the input reaches, and the fast conv, against the
    dense convolution with the whole kernel: values and every gradient."""
    torch.manual_seed(0)
    layer = Dcls2d(6, 6, kernel_count=8, dilated_kernel_size=17, padding='same', groups=6, version=version)
    with torch.no_grad():
        _positions(positions, layer.P)
    x = torch.randn(2, 6, size, size + 1)

    def run(fast):
        layer.fast_path = fast
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        out = layer(xx) if fast else F.conv2d(xx, layer.construct_kernel(), layer.bias, padding=8, groups=6)
        out.square().sum().backward()
        grads = [layer.weight.grad, layer.P.grad, layer.bias.grad] + ([layer.SIG.grad] if version == 'gauss' else [])
        return [out.detach(), xx.grad] + [g.clone() for g in grads]
    for a, r in zip(run(True), run(False)):
        # relative to the tensor's scale: FFT rounding error is spread evenly over the entries
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


@pytest.mark.parametrize('padding, size', [(8, 6), (6, 5), ((8, 2), 7), (9, 6), ((4, 10), 5)])
def test_dcls_layer_with_wide_padding_is_exact(padding, size):
    """Padding past half the grid (outputs larger than the input): the fast path's weight gradient needs the lags
    that only the extra outputs reach; padding of the grid size or more leaves the fast path (F.conv2d takes it)."""
    torch.manual_seed(0)
    layer = Dcls2d(4, 4, kernel_count=9, dilated_kernel_size=9, padding=padding, groups=4).double()
    with torch.no_grad():
        layer.P.uniform_(-4, 4)
    x = torch.randn(2, 4, size, size + 1, dtype=torch.float64)
    pad = (padding, padding) if isinstance(padding, int) else padding

    def run(fast):
        layer.fast_path = fast
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        out = layer(xx) if fast else F.conv2d(xx, layer.construct_kernel(), layer.bias, padding=pad, groups=4)
        out.square().sum().backward()
        return [out.detach(), xx.grad, layer.weight.grad.clone(), layer.P.grad.clone(), layer.bias.grad.clone()]
    for a, r in zip(run(True), run(False)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10 * r.abs().max().item())


def test_kernel_window_is_the_restriction_of_the_whole_kernel():
    torch.manual_seed(0)
    w, P = torch.randn(3, 1, 5), torch.randn(2, 3, 1, 5).clamp(-3, 3)
    full = construct_kernel(w, P, None, (9, 11), 'v0')
    window = position_window(P, (9, 11), 'v0')
    part = construct_kernel(w, P, None, (9, 11), 'v0', window)
    (r0, r1), (c0, c1) = window
    torch.testing.assert_close(part, full[..., r0:r1, c0:c1], rtol=1e-6, atol=1e-7)
    outside = full.clone()
    outside[..., r0:r1, c0:c1] = 0
    assert outside.abs().max() == 0  # nothing is lost outside the window
    with pytest.raises(ValueError, match='SIG'):
        position_window(P, (9, 11), 'gauss')
    with pytest.raises(ValueError, match='window'):
        construct_kernel(w, P, None, (9, 11), 'v0', [(0, 10), (0, 11)])
    assert position_window(torch.full_like(P, float('nan')), (9, 11), 'v0') is None


@pytest.mark.parametrize('sizes', [(23, 23), (21, 17), (23,), (17, 15, 15)])
def test_gaussian_window_is_exact(sizes):
    """Gaussian profiles are zero beyond GAUSS_RADIUS widths (below the floor): the window the positions and widths
    span holds every non-zero tap, so the windowed kernel and its gradients equal the whole kernel's."""
    from dcls_timm.layers.kernel import GAUSS_RADIUS
    torch.manual_seed(0)
    nd = len(sizes)
    w = torch.randn(6, 1, 5, requires_grad=True)
    P = (0.6 * torch.randn(nd, 6, 1, 5)).requires_grad_()
    SIG = (0.23 + 0.2 * torch.rand(nd, 6, 1, 5)).requires_grad_()
    window = position_window(P, sizes, 'gauss', SIG)
    assert any(b - a < n for (a, b), n in zip(window, sizes))  # near the centre: a real crop
    sig = SIG.detach().abs() + 0.27
    for axis, ((a, b), n) in enumerate(zip(window, sizes)):
        assert a <= (P[axis].detach() - GAUSS_RADIUS * sig[axis]).min() + n // 2 + 1
        assert b >= (P[axis].detach() + GAUSS_RADIUS * sig[axis]).max() + n // 2
    full = construct_kernel(w, P, SIG, sizes, 'gauss')
    part = construct_kernel(w, P, SIG, sizes, 'gauss', window)
    index = (Ellipsis,) + tuple(slice(a, b) for a, b in window)
    torch.testing.assert_close(part, full[index], rtol=1e-5, atol=1e-7)
    outside = full.detach().clone()
    outside[index] = 0
    assert outside.abs().max() == 0  # the floor makes everything outside exactly zero
    g = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * g).sum(), (w, P, SIG))
    grads_part = torch.autograd.grad((part * g[index]).sum(), (w, P, SIG))
    for a, b in zip(grads_part, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_kernel_reused_without_grad_until_a_parameter_changes():
    torch.manual_seed(0)
    layer = Dcls2d(4, 4, kernel_count=6, dilated_kernel_size=11, padding='same', groups=4, version='v0')
    x = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        kernel = layer._cropped_kernel(x.shape[2:])[0]
        assert layer._cropped_kernel(x.shape[2:])[0] is kernel
        assert layer._cropped_kernel((5, 5))[0] is not kernel  # another input size crops differently
        layer.weight.mul_(2)
        out = layer(x)
    expected = F.conv2d(x, layer.construct_kernel(), layer.bias, padding=5, groups=4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        layer(x)
    layer.load_state_dict({k: v + 1 for k, v in layer.state_dict().items()})
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, F.conv2d(x, layer.construct_kernel(), layer.bias, padding=5, groups=4),
                               rtol=1e-5, atol=1e-5)
    out = layer(x)  # with grad: built afresh, so gradients reach the parameters
    out.sum().backward()
    assert layer.weight.grad is not None and layer.P.grad.abs().sum() > 0


def test_bf16_autocast_uses_the_native_path_within_tolerance():
    layer = Dcls2d(4, 4, kernel_count=6, dilated_kernel_size=11, padding='same', groups=4, version='v1')
    x = torch.randn(2, 4, 16, 16)
    ref = layer(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_caches_follow_the_positions_and_survive_pickling(tmp_path):
    """Shared positions: one tap geometry for all their layers, rebuilt when the positions change; models with
    filled caches still save, load and copy."""
    import copy

    import timm

    import dcls_timm  # noqa: F401
    model = timm.create_model('convnext_atto_dcls')
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    cache = model.stages[1].positions.construction_cache
    geometry = cache._entry[2]
    model(x)
    assert cache._entry[2] is geometry  # same positions: reused
    with torch.no_grad():
        model.stages[1].positions.P.add_(0.3)
    out = model(x)
    assert cache._entry[2] is not geometry
    for layer in model.stages[1].blocks:
        layer.conv_dw.fast_path = False
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    torch.save(model, tmp_path / 'model.pt')
    loaded = torch.load(tmp_path / 'model.pt', weights_only=False)
    torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy.deepcopy(model)(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['convnext_atto_dcls', 'resnet50_dcls', 'flexnet_7'])
def test_models_built_under_inference_mode_run(name):
    """Parameters made under torch.inference_mode have no version counter: nothing is cached, results are equal."""
    import timm

    import dcls_timm  # noqa: F401
    torch.manual_seed(0)
    reference = timm.create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        model = timm.create_model(name).eval()
        model.load_state_dict(reference.state_dict())
        out = model(x)
        again = model(x)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
