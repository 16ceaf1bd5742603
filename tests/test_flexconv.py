"""Continuous kernels (MAGNet, CKConv, FlexConv, SeparableFlexConv), FFT path, anti-aliasing, cross-resolution,
and the FlexNet / CCNN / ResNet-50-dcls models."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import dcls_timm  # noqa: F401
from dcls_timm.layers import (
    CKConv, FlexConv, MAGNet, SeparableFlexConv, affine_input_conv, anti_aliasing_loss, coordinate_grid, fft_conv,
    set_kernel_resolution,
)
from dcls_timm.layers.dcls import Dcls2d
from dcls_timm.recipe import CompositeRecipe, FlexConvRecipe

PARAMS = {'flexnet_3': 277_090, 'flexnet_5': 454_046, 'flexnet_7': 671_650, 'flexnet_7_conv3': 169_990,
          'ccnn_4_140': 201_042, 'ccnn_6_380': 1_999_366, 'resnet50_dcls': 24_008_744}


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_flexconv_parameter_formula():
    for cin, cout in [(3, 24), (24, 36), (7, 5)]:
        conv = FlexConv(cin, cout, 33)
        assert sum(p.numel() for p in conv.parameters()) == 4068 + 33 * cin * cout + cout


def test_magnet_shapes_and_init():
    torch.manual_seed(0)
    net = MAGNet(2, 12, hidden=32, num_layers=3, mask_init=0.075)
    coords = coordinate_grid([9, 7])
    assert coords.shape == (63, 2) and coords.min() == -1 and coords.max() == 1
    assert net(coords).shape == (63, 12)
    assert net.filter_frequencies().shape == (4,)
    big = MAGNet(2, 4, hidden=4096, num_layers=3)
    for l, f in enumerate(big.filters):  # gamma ~ Gamma(6 / (l + 1), 1): mean 6 / (l + 1)
        assert f.gamma.mean().item() == pytest.approx(6 / (l + 1), rel=0.05)
        assert f.linear.bias.abs().max() <= math.pi
        assert f.mu.abs().max() <= 1.667 * 0.075 + 1e-6
    assert MAGNet(3, 5)(coordinate_grid([3, 3, 3])).shape == (27, 5)


def test_mask_crop_grows_with_sigma_and_sigma_gets_gradients():
    conv = FlexConv(2, 3, 33)
    assert conv.kernel_sizes() == (5, 5) and conv.construct_kernel().shape == (3, 2, 5, 5)
    with torch.no_grad():
        conv.mask_sigma.fill_(0.3)
    assert conv.kernel_sizes() == (21, 21)  # recomputed after the in-place change
    with torch.no_grad():
        conv.mask_sigma.fill_(5.)
    assert conv.kernel_sizes() == (33, 33)  # never beyond the grid
    with torch.no_grad():
        conv.mask_sigma.copy_(torch.tensor([0.075, 0.2]))
    assert conv.kernel_sizes() == (5, 13)
    x = torch.randn(2, 2, 20, 20)
    out = conv(x)
    assert out.shape == (2, 3, 20, 20)
    out.square().mean().backward()
    assert conv.mask_sigma.grad is not None and conv.mask_sigma.grad.abs().sum() > 0
    assert conv.mask_mean.grad is not None


def test_crop_sizes_follow_the_mask_however_it_changes():
    """The crop is read from the mask at every forward: in-place edits, .data edits and fused optimizer steps (which
    bump no version counter) all show at once."""
    model = torch.nn.Sequential(FlexConv(2, 2, 33), FlexConv(2, 2, 17))
    assert model[0].kernel_sizes() == (5, 5)
    with torch.no_grad():
        model[0].mask_sigma.fill_(0.3)
    model[1].mask_sigma.data.fill_(0.3)
    assert model[0].kernel_sizes() == (21, 21) and model[1].kernel_sizes() == (11, 11)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    model(torch.randn(1, 2, 12, 12)).square().mean().backward()
    before = model[0].mask_sigma.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].mask_sigma)
    expected = model[0]._half_widths_from(model[0].mask_sigma.tolist(), model[0].mask_mean.tolist())
    assert model[0].crop_half_widths() == expected


@pytest.mark.parametrize('dim, depthwise', [(1, False), (2, False), (2, True), (3, True)])
def test_fft_path_equals_spatial_path(dim, depthwise):
    torch.manual_seed(0)
    size = {1: 33, 2: 17, 3: 9}[dim]
    spatial = {1: (40,), 2: (20, 18), 3: (8, 9, 7)}[dim]
    convs = [FlexConv(4, 4, size, dim=dim, depthwise=depthwise, fft=mode) for mode in ('never', 'always')]
    convs[1].load_state_dict(convs[0].state_dict())
    for c in convs:
        with torch.no_grad():
            c.mask_sigma.fill_(0.6)
    x = torch.randn(2, 4, *spatial)
    xs = [x.clone().requires_grad_() for _ in convs]
    outs = [c(xx) for c, xx in zip(convs, xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    g = torch.randn_like(outs[0])
    for o in outs:
        o.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
    for (n, p0), p1 in zip(convs[0].named_parameters(), convs[1].parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_fft_conv_matches_conv2d_and_rejects_what_it_cannot_do():
    x, w, b = torch.randn(2, 3, 15, 16), torch.randn(5, 3, 7, 9), torch.randn(5)
    torch.testing.assert_close(fft_conv(x, w, b), F.conv2d(x, w, b, padding=(3, 4)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='odd kernel'):
        fft_conv(x, torch.randn(5, 3, 4, 4))
    with pytest.raises(ValueError, match='depthwise'):
        fft_conv(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3), groups=2)


@pytest.mark.parametrize('dim', [1, 2])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fft_path_takes_an_empty_batch(dim, dtype):
    # MKL's FFTs refuse empty batches: the FFT path hands them to the direct convolution, in the same dtypes
    conv = FlexConv(3, 3, 33, dim=dim, depthwise=True, fft='always', causal=dim == 1)
    x = torch.randn(0, 3, *([20] * dim), dtype=dtype, requires_grad=True)
    out = conv(x)
    assert out.shape == x.shape and out.dtype == dtype == conv(torch.randn(1, 3, *([20] * dim), dtype=dtype)).dtype
    out.sum().backward()
    assert x.grad.shape == x.shape and all(torch.equal(p.grad, torch.zeros_like(p)) for p in conv.parameters()
                                           if p.grad is not None)


def test_anti_aliasing_loss_zero_when_band_limited():
    conv = FlexConv(2, 2, 33)
    with torch.no_grad():
        for f in conv.kernel_net.filters:
            f.linear.weight.fill_(0.5)
            f.gamma.fill_(0.5)
        conv.mask_sigma.fill_(1.0)
    assert anti_aliasing_loss(conv).item() == 0.
    assert anti_aliasing_loss(conv, target='gabor').item() == 0.
    with torch.no_grad():
        conv.kernel_net.filters[1].linear.weight[0, 0] = 60.  # far above Nyquist (8) / 4
    loss = anti_aliasing_loss(conv)
    assert loss.item() > 0
    loss.backward()
    assert conv.kernel_net.filters[1].linear.weight.grad[0, 0] > 0
    with torch.no_grad():
        conv.kernel_net.filters[1].linear.weight.fill_(0.5)
        conv.mask_sigma.fill_(0.01)  # a very narrow mask is high-frequency too
    assert anti_aliasing_loss(conv, target='gabor+mask').item() > 0
    assert anti_aliasing_loss(conv, target='gabor').item() == 0.
    # the default init of FlexNet is not band-limited on a 33 grid: the regulariser has work to do
    assert anti_aliasing_loss(timm.create_model('flexnet_3')).item() > 0


def test_cross_resolution_keeps_outputs_close_for_a_smooth_kernel():
    torch.manual_seed(0)
    conv = FlexConv(1, 1, 17, omega_0=1.0)  # trained on 16 px images with a 17-point grid
    with torch.no_grad():
        for f in conv.kernel_net.filters:  # low frequencies: a smooth kernel
            f.gamma.mul_(0.1)
        conv.mask_sigma.fill_(0.3)

    def field(n):  # the same smooth image sampled at n x n
        t = torch.arange(n) / n
        return (torch.sin(2 * math.pi * t)[:, None] * torch.cos(2 * math.pi * t)[None, :]).view(1, 1, n, n)
    interior = (slice(None), slice(None), slice(4, 12), slice(4, 12))

    def rel_err(high, low):
        return ((high[..., ::2, ::2][interior] - low[interior]).abs().max() / low[interior].abs().max()).item()
    with torch.no_grad():
        low = conv(field(16))
        assert set_kernel_resolution(conv, 33) == 1
        high = conv(field(32))
        assert conv.kernel_sizes() == (21, 21)  # the same mask covers twice the taps
        assert rel_err(high, low) < 0.05
        conv.train_kernel_size = 33  # without the (16/32)^2 scaling the response is ~4x too large
        assert rel_err(conv(field(32)), low) > 2


def test_separable_flexconv_and_ckconv_shapes():
    assert SeparableFlexConv(3, 8, 17)(torch.randn(2, 3, 12, 12)).shape == (2, 8, 12, 12)
    ck = CKConv(2, 3, 9, dim=1)
    assert ck.kernel_sizes() == (9,) and ck(torch.randn(1, 2, 30)).shape == (1, 3, 30)
    with pytest.raises(ValueError, match='odd'):
        FlexConv(2, 2, 32)
    with pytest.raises(ValueError, match='in_channels == out_channels'):
        FlexConv(2, 3, 9, depthwise=True)


NEW_MODELS = ['flexnet_3', 'flexnet_5', 'flexnet_7', 'flexnet_7_conv3', 'ccnn_4_140', 'ccnn_6_380',
              'resnet26_dcls', 'resnet50_dcls', 'resnet101_dcls']


@pytest.mark.parametrize('name', NEW_MODELS)
def test_timm_api(name):
    size = 32 if 'resnet' in name else 16
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=5, in_chans=1)
    x = torch.randn(2, 1, size, size)
    out = model(x)
    assert out.shape == (2, 5)
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    model.eval()
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    torch.manual_seed(1)
    feats = timm.create_model(name, features_only=True, in_chans=1).eval()
    outs = feats(x)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()
    torch.manual_seed(1)
    fx = timm.create_model(name, features_only=True, in_chans=1, feature_cls='fx').eval()
    fx_outs = fx(x)
    for o, f in zip(outs, fx_outs.values() if isinstance(fx_outs, dict) else fx_outs):
        torch.testing.assert_close(f, o)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.pretrained_cfg['num_classes'] in (10, 1000)


def test_resnet50_dcls_structure():
    model = timm.create_model('resnet50_dcls')
    convs = [m for m in model.modules() if isinstance(m, Dcls2d)]
    assert len(convs) == 16 and all(c.kernel_count == 5 and c.dilated_kernel_size == (7, 7) for c in convs)
    assert all(c.bias is None for c in convs)
    pos = [n for n, _ in model.named_parameters() if n.endswith('.P')]
    assert pos == [f'layer{i}.0.positions.P' for i in range(1, 5)]
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer3[0].positions.P.shape == (2, 256, 256, 5)


def test_flexconv_recipe_groups_and_hooks():
    model = timm.create_model('flexnet_3')
    recipe = CompositeRecipe([FlexConvRecipe()])
    groups = recipe.param_groups(model, weight_decay=0.)
    mask = [g for g in groups if g['group_name'] == 'mask']
    assert len(mask) == 1 and mask[0]['lr_scale'] == 0.1 and len(mask[0]['params']) == 2 * 7
    assert set(recipe.aux_losses(model, 0)) == {'antialias_loss'}
    conv = model.stem[0]
    with torch.no_grad():
        conv.mask_sigma.fill_(0.3)
    recipe.after_optimizer_step(model)
    assert conv.crop_half_widths() == (10, 10)


@pytest.mark.parametrize('fft', ['never', 'always'])
def test_float64_input_takes_either_path(fft):
    # float32 parameters, float64 input: kernel and bias follow the input on the direct path as on the FFT one
    torch.manual_seed(0)
    conv = FlexConv(3, 3, 33, dim=1, depthwise=True, causal=True, fft=fft)
    x = torch.randn(2, 3, 60, dtype=torch.float64)
    with torch.no_grad():
        out = conv(x)
        ref = conv(x.float())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)


def _affine_first(x, scale, shift):
    view = [1, -1] + [1] * (x.dim() - 2)
    return x * scale.view(view) + shift.view(view)


@pytest.mark.parametrize('dim', [1, 2, 3])
def test_affine_input_conv_equals_normalising_first(dim):
    # the scale in the kernel, the shift as bias inside and a border correction where taps land on the zero padding:
    # every padding from 0 to past the kernel, maps smaller than the kernel, groups (full, depthwise, 2), float64
    gen = torch.Generator().manual_seed(dim)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    cases = 0
    for trial in range(40):
        cin = (1, 2, 4, 6)[trial % 4]
        groups = 2 if trial % 5 == 3 and cin % 2 == 0 else (1, cin)[trial % 2]
        cout = groups * (trial % 3 + 1)
        ks = [int(torch.randint(1, 8 if dim < 3 else 5, (), generator=gen)) for _ in range(dim)]
        size = [int(torch.randint(1, 12 if dim < 3 else 6, (), generator=gen)) for _ in range(dim)]
        pad = [int(torch.randint(0, k + 2, (), generator=gen)) for k in ks]
        if any(n + 2 * p - k < 0 for n, p, k in zip(size, pad, ks)):
            continue
        x = torch.randn(3, cin, *size, dtype=torch.float64, generator=gen)
        w = torch.randn(cout, cin // groups, *ks, dtype=torch.float64, generator=gen)
        b = torch.randn(cout, dtype=torch.float64, generator=gen) if trial % 2 else None
        scale, shift = torch.randn(2, cin, dtype=torch.float64, generator=gen)
        before = x.clone()
        out = affine_input_conv(x, w, b, pad, groups, (scale, shift))
        torch.testing.assert_close(out, conv(_affine_first(x, scale, shift), w, b, padding=pad, groups=groups),
                                   rtol=1e-12, atol=1e-12)
        assert torch.equal(x, before)
        cases += 1
    assert cases >= 25
    with pytest.raises(ValueError, match='do not match'):
        affine_input_conv(x, w, b, pad[:-1] + [0, 0], groups, (scale, shift))


def test_affine_input_conv_keeps_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 10).contiguous(memory_format=torch.channels_last)
    w, b, scale, shift = torch.randn(8, 1, 5, 5), torch.randn(8), torch.rand(8) + 0.5, torch.randn(8)
    out = affine_input_conv(x, w, b, [2, 2], 8, (scale, shift))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.conv2d(_affine_first(x, scale, shift), w, b, padding=2, groups=8),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('depthwise', [True, False])
@pytest.mark.parametrize('sigma', [None, 1.0])  # as created (direct conv, folded) and spread (FFT, applied first)
def test_flexconv_input_affine_on_every_route(depthwise, sigma, monkeypatch):
    import dcls_timm.layers.flexconv as flexconv
    torch.manual_seed(0)
    conv = FlexConv(4, 4, 25, dim=2, depthwise=depthwise).double()
    if sigma is not None:
        with torch.no_grad():
            conv.mask_sigma.fill_(sigma)
    x = torch.randn(2, 4, 14, 12, dtype=torch.float64)
    scale, shift = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    folded = [0]
    fold = flexconv.affine_input_conv

    def counted(*args):
        folded[0] += 1
        return fold(*args)
    monkeypatch.setattr(flexconv, 'affine_input_conv', counted)
    with torch.no_grad():
        ref = conv(_affine_first(x, scale, shift))
        torch.testing.assert_close(conv(x, input_affine=(scale, shift)), ref, rtol=1e-10, atol=1e-10)
    assert folded[0] == (sigma is None)  # FFT-sized kernels take the affine map first
    xg = x.clone().requires_grad_()
    out = conv(xg, input_affine=(scale, shift))  # autograd: applied first, gradients through it
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert folded[0] == (sigma is None)
    xr = x.clone().requires_grad_()
    conv(_affine_first(xr, scale, shift)).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-10, atol=1e-10)
