"""Kernel construction: parity with the dcls package, gradcheck, placement on any kernel shape."""
import logging

import pytest
import torch

from dcls_timm.layers import Dcls1d, Dcls2d, Dcls3d, construct_kernel

DCLS = pytest.importorskip('DCLS.construct.modules')
logging.getLogger().setLevel(logging.ERROR)  # the dcls package logs a warning per layer on CPU

OURS = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}
THEIRS = {1: DCLS.Dcls1d, 2: DCLS.Dcls2d, 3: DCLS.Dcls3d}


def _axis_order(ndim: int, version: str):
    """Index along dim 0 that maps a dcls-package P onto ours (SPEC 1.3)."""
    if ndim == 1:
        return [0]
    if version == 'v0':
        return [0, 1] if ndim == 2 else [0, 2, 1]
    return list(reversed(range(ndim)))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
@pytest.mark.parametrize('ndim', [1, 2, 3])
def test_parity_with_dcls_package(ndim, version):
    size = {1: 9, 2: 7, 3: 5}[ndim]
    spatial = {1: (20,), 2: (11, 11), 3: (7, 7, 7)}[ndim]
    kwargs = dict(kernel_count=5, stride=1, padding=size // 2, dilated_kernel_size=size, groups=2, bias=True,
                  version=version)
    theirs = THEIRS[ndim](4, 6, **kwargs)
    ours = OURS[ndim](4, 6, **kwargs)
    order = _axis_order(ndim, version)
    with torch.no_grad():
        theirs.P.normal_(0, size / 4)
        theirs.P[..., 0] = size // 2  # clamped elements sit exactly on the border
        theirs.P[..., 1] = -(size // 2)
        theirs.clamp_parameters()
        if version == 'gauss':
            theirs.SIG.uniform_(-0.5, 1.0)
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
        ours.P.copy_(theirs.P[order])
        if version == 'gauss':
            ours.SIG.copy_(theirs.SIG[order])

    x = torch.randn(2, 4, *spatial)
    x_t, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_t, out_o = theirs(x_t), ours(x_o)
    assert out_o.shape == out_t.shape
    assert _rel_err(out_o, out_t) <= 1e-5
    grad = torch.randn_like(out_t)
    out_t.backward(grad)
    out_o.backward(grad)
    assert _rel_err(x_o.grad, x_t.grad) <= 1e-5
    assert _rel_err(ours.weight.grad, theirs.weight.grad) <= 1e-5
    assert _rel_err(ours.bias.grad, theirs.bias.grad) <= 1e-5
    assert theirs.P.grad.abs().max() > 0
    assert _rel_err(ours.P.grad, theirs.P.grad[order]) <= 1e-5
    if version == 'gauss':
        assert _rel_err(ours.SIG.grad, theirs.SIG.grad[order]) <= 1e-5


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
@pytest.mark.parametrize('ndim', [1, 2, 3])
def test_gradcheck(ndim, version):
    sizes = {1: (5,), 2: (4, 5), 3: (3, 4, 3)}[ndim]
    weight = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    P = (torch.rand(ndim, 2, 3, 3, dtype=torch.float64) - 0.5).mul(2.2).requires_grad_()
    SIG = torch.full_like(P, 0.3).add_(torch.rand_like(P) * 0.2).requires_grad_() if version == 'gauss' else None
    inputs = (weight, P) if SIG is None else (weight, P, SIG)

    def fn(w, p, s=None):
        return construct_kernel(w, p, s, sizes, version)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize('version', ['v0', 'v1'])
def test_windowed_construction_gradcheck_and_gradients_equal_the_whole_kernel(version):
    """The 2-D scatter construction on the window the positions span: gradcheck, and with some positions exactly on
    taps (the highest on the window's edge, where v0's gradient needs the tap beyond), the same gradients as the
    whole kernel."""
    from dcls_timm.layers.kernel import position_window
    weight = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    P = (torch.rand(2, 3, 2, 4, dtype=torch.float64) - 0.5).mul(4.4).requires_grad_()

    def fn(w, p, window):
        return construct_kernel(w, p, None, (9, 7), version, window)
    window = position_window(P, (9, 7), version)
    assert window != [(0, 9), (0, 7)]
    assert torch.autograd.gradcheck(lambda w, p: fn(w, p, window), (weight, P))

    with torch.no_grad():
        P[:, 0, 0, :2] = P[:, 0, 0, :2].round()
        P[:, 1, 1, 0] = P.max().ceil()
    window = position_window(P, (9, 7), version)
    (r0, r1), (c0, c1) = window
    g = torch.randn(3, 2, 9, 7, dtype=torch.float64)
    part = torch.autograd.grad((fn(weight, P, window) * g[..., r0:r1, c0:c1]).sum(), (weight, P))
    full = torch.autograd.grad((fn(weight, P, None) * g).sum(), (weight, P))
    for a, b in zip(part, full):
        torch.testing.assert_close(a, b)
    assert part[1].abs().sum() > 0


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
@pytest.mark.parametrize('sizes, position', [
    ((5, 8), (1, -3)), ((6, 9), (-2, 4)), ((4, 4), (1, -2)), ((3, 6, 5), (1, -2, 2)), ((11,), (-4,)),
])
def test_single_element_placement(version, sizes, position):
    ndim = len(sizes)
    w = 1.7
    weight = torch.full((1, 1, 1), w)
    P = torch.tensor(position, dtype=torch.float32).view(ndim, 1, 1, 1)
    SIG = torch.full_like(P, 0.23) if version == 'gauss' else None
    kernel = construct_kernel(weight, P, SIG, sizes, version)[0, 0]
    assert kernel.shape == sizes
    target = tuple(s // 2 + p for s, p in zip(sizes, position))
    assert kernel[target] == kernel.max()
    flat_argmax = torch.unravel_index(kernel.argmax(), sizes)
    assert tuple(int(i) for i in flat_argmax) == target
    if version == 'gauss':
        assert kernel.sum().item() == pytest.approx(w, rel=1e-5)
    else:  # integer position: exactly one tap
        assert kernel[target].item() == pytest.approx(w, rel=1e-6)
        assert (kernel != 0).sum() == 1


def test_fractional_position_splits_mass_along_the_right_axis():
    # rows 0.25 off the centre: v0 gives 0.75 / 0.25 on two rows of the centre column, never on columns
    weight = torch.ones(1, 1, 1)
    P = torch.tensor([0.25, 0.0]).view(2, 1, 1, 1)
    kernel = construct_kernel(weight, P, None, (5, 7), 'v0')[0, 0]
    assert kernel[2, 3].item() == pytest.approx(0.75)
    assert kernel[3, 3].item() == pytest.approx(0.25)
    assert kernel.sum().item() == pytest.approx(1.0)


def test_v0_loses_mass_outside_the_grid_v1_renormalises():
    weight = torch.ones(1, 1, 1)
    P = torch.tensor([2.5]).view(1, 1, 1, 1)  # halfway between the last tap and outside
    v0 = construct_kernel(weight, P, None, (5,), 'v0')[0, 0]
    v1 = construct_kernel(weight, P, None, (5,), 'v1')[0, 0]
    assert v0.sum().item() == pytest.approx(0.5)
    assert v1.sum().item() == pytest.approx(1.0, rel=1e-6)
    assert v1[-1].item() == pytest.approx(1.0, rel=1e-6)


def test_layer_construct_kernel_matches_conv():
    layer = Dcls2d(3, 6, kernel_count=4, dilated_kernel_size=(5, 6), padding='same', groups=3, version='v1')
    x = torch.randn(2, 3, 9, 10)
    kernel = layer.construct_kernel()
    assert kernel.shape == (6, 1, 5, 6)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (3, 2, 2, 2)), kernel, layer.bias, groups=3)
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape[-2:] == x.shape[-2:]


@pytest.mark.parametrize('size', [4, 5, 16, 17])
def test_clamp_keeps_elements_on_the_grid(size):
    layer = Dcls1d(2, 2, kernel_count=8, dilated_kernel_size=size, version='v0')
    with torch.no_grad():
        layer.P.uniform_(-3 * size, 3 * size)
    layer.clamp_parameters()
    assert layer.P.min().item() == -(size // 2)
    assert layer.P.max().item() == (size - 1) - size // 2  # == size // 2 for odd sizes, as the dcls package
    kernel = layer.construct_kernel()
    torch.testing.assert_close(kernel.sum(-1), layer.weight.sum(-1))  # no mass lost at the border


def test_gauss_kernels_hold_no_denormal_floats():
    """Narrow Gaussians on a wide grid have tails below float32's normal range; those would make every convolution
    with the kernel many times slower on CPU, so they are zero."""
    layer = Dcls2d(8, 8, kernel_count=4, dilated_kernel_size=23, padding='same', groups=8, version='gauss')
    kernel = layer.construct_kernel().detach()
    tiny = torch.finfo(kernel.dtype).tiny
    assert ((kernel != 0) & (kernel.abs() < tiny)).sum() == 0
    assert (kernel == 0).any() and kernel.abs().max() > 0


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_gauss_kernel_is_linear_in_the_weights_at_any_scale(dtype):
    """The tail floor is relative to each filter's peak: an absolute one zeroed taps of small-weight filters (whole
    filters below |w| ~ 1e-11), while the backward kept the uncut kernel's gradient."""
    torch.manual_seed(0)
    weight = torch.randn(4, 2, 5, dtype=dtype)
    P, SIG = torch.randn(2, 4, 2, 5, dtype=dtype), torch.rand(2, 4, 2, 5, dtype=dtype)
    reference = construct_kernel(weight, P, SIG, (7, 7), 'gauss')
    for scale in (1e-6, 1e-9, 1e-11):
        scaled = construct_kernel(weight * scale, P, SIG, (7, 7), 'gauss')
        torch.testing.assert_close(scaled, reference * scale)
        assert torch.equal(scaled == 0, reference == 0)
