"""DCLS layer behaviour: position sharing, padding, dtypes, layouts, compile, FX, errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from dcls_timm.layers import Dcls1d, Dcls2d, Dcls3d, DclsPositions, clamp_positions_, share_positions


class _Stack(nn.Module):
    """Three depthwise DCLS layers sharing positions, like one ConvNeXt-dcls stage."""

    def __init__(self, version: str = 'v0', channels: int = 4):
        super().__init__()
        self.convs = nn.Sequential(*[
            Dcls2d(channels, channels, kernel_count=5, dilated_kernel_size=7, padding='same', groups=channels,
                   version=version)
            for _ in range(3)])
        self.positions = share_positions(list(self.convs))

    def forward(self, x):
        return self.convs(x)


@pytest.mark.parametrize('version', ['v0', 'gauss'])
def test_shared_positions_are_one_parameter(version):
    model = _Stack(version)
    names = [n for n, _ in model.named_parameters()]
    assert names.count('positions.P') == 1
    assert not any(n.startswith('convs.') and n.endswith(('.P', '.SIG')) for n in names)
    assert ('positions.SIG' in names) == (version == 'gauss')
    for conv in model.convs:
        assert conv.P is model.positions.P  # dcls-style attribute access still works
        assert (conv.SIG is model.positions.SIG) if version == 'gauss' else conv.SIG is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sum(p is model.positions.P for g in opt.param_groups for p in g['params']) == 1
    # every layer's kernel moves with the one tensor, and its gradient is the sum over the layers
    model(torch.randn(2, 4, 9, 9)).square().mean().backward()
    assert model.positions.P.grad is not None and model.positions.P.grad.abs().sum() > 0
    kernels = [c.construct_kernel().detach() for c in model.convs]
    with torch.no_grad():
        model.positions.P.add_(0.3)
    assert all(not torch.equal(k, c.construct_kernel()) for k, c in zip(kernels, model.convs))


def test_shared_positions_state_dict_round_trip_and_deepcopy():
    model = _Stack('gauss')
    sd = model.state_dict()
    assert [k for k in sd if k.endswith(('.P', '.SIG'))] == ['positions.P', 'positions.SIG']
    other = _Stack('gauss')
    other.load_state_dict(sd)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(other(x), model(x))
    twin = copy.deepcopy(model)
    assert all(c.P is twin.positions.P for c in twin.convs)
    assert twin.positions.P is not model.positions.P


def test_ema_updates_shared_positions_once():
    model = _Stack('v0')
    ema = ModelEmaV3(model, decay=0.9)
    before = ema.module.positions.P.detach().clone()
    with torch.no_grad():
        model.positions.P.add_(1.0)
    ema.update(model, step=1000)  # past any warm-up
    expected = 0.9 * before + 0.1 * model.positions.P.detach()
    torch.testing.assert_close(ema.module.positions.P, expected)
    assert all(c.P is ema.module.positions.P for c in ema.module.convs)


def test_share_positions_errors():
    a = Dcls2d(4, 4, kernel_count=5, dilated_kernel_size=7, groups=4, version='v0')
    b = Dcls2d(4, 4, kernel_count=5, dilated_kernel_size=9, groups=4, version='v0')
    with pytest.raises(ValueError, match='same dimensionality'):
        share_positions([a, b])
    with pytest.raises(TypeError, match='DCLS layers'):
        share_positions([a, nn.Conv2d(4, 4, 3)])
    with pytest.raises(ValueError, match='at least one'):
        share_positions([])
    share_positions([a])
    with pytest.raises(ValueError, match='already shares'):
        share_positions([a])


def test_clamp_positions_clamps_each_tensor_once():
    model = nn.Sequential(_Stack('v0'), Dcls1d(2, 2, kernel_count=3, dilated_kernel_size=5, version='v1'))
    with torch.no_grad():
        model[0].positions.P.fill_(100.)
        model[1].P.fill_(-100.)
    assert clamp_positions_(model) == 2
    assert model[0].positions.P.max().item() == 3 and model[1].P.min().item() == -2


@pytest.mark.parametrize('size', [4, 5, (3, 6)])
@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect', 'circular'])
def test_same_padding_keeps_size_and_centres_position_zero(size, padding_mode):
    layer = Dcls2d(1, 1, kernel_count=1, dilated_kernel_size=size, padding='same', bias=False,
                   padding_mode=padding_mode, version='v0')
    with torch.no_grad():
        layer.weight.fill_(1.)
        layer.P.zero_()
    x = torch.randn(1, 1, 7, 8)
    torch.testing.assert_close(layer(x), x)  # one element at position 0 is the identity


@pytest.mark.parametrize('padding_mode', ['reflect', 'replicate', 'circular'])
def test_padding_modes_match_explicit_pad(padding_mode):
    layer = Dcls2d(2, 4, kernel_count=3, dilated_kernel_size=5, padding=(2, 1), padding_mode=padding_mode,
                   version='v1')
    x = torch.randn(2, 2, 8, 9)
    expected = F.conv2d(F.pad(x, (1, 1, 2, 2), mode=padding_mode), layer.construct_kernel(), layer.bias)
    torch.testing.assert_close(layer(x), expected)


def test_stride_and_3d_shapes():
    layer = Dcls3d(2, 4, kernel_count=3, dilated_kernel_size=(3, 5, 5), stride=2, padding=(1, 2, 2), version='gauss')
    assert layer(torch.randn(1, 2, 6, 10, 10)).shape == (1, 4, 3, 5, 5)
    conv1d = Dcls1d(3, 6, kernel_count=4, dilated_kernel_size=9, padding='valid', version='v0')
    assert conv1d(torch.randn(2, 3, 20)).shape == (2, 6, 12)


@pytest.mark.parametrize('kwargs, match', [
    (dict(version='max'), "'max' version is not supported"),
    (dict(version='v2'), 'version must be one of'),
    (dict(groups=3), 'divisible by groups'),
    (dict(padding_mode='mirror'), 'padding_mode must be one of'),
    (dict(padding='full'), "padding must be an int"),
    (dict(padding='same', stride=2), "only supported with stride 1"),
    (dict(kernel_count=0), 'kernel_count must be >= 1'),
    (dict(dilated_kernel_size=0), 'dilated_kernel_size must be >= 1'),
])
def test_constructor_errors(kwargs, match):
    args = dict(kernel_count=3, dilated_kernel_size=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Dcls2d(4, 4, **args)


def test_dcls_package_constructor_compatibility():
    # positional order and the dcls-only flag of DCLS.construct.modules.Dcls2d
    layer = Dcls2d(4, 8, 6, 1, 3, 7, 2, True, 'zeros', 'gauss', use_implicit_gemm=False)
    assert [n for n, _ in layer.named_parameters()] == ['weight', 'P', 'SIG', 'bias']
    assert layer.weight.shape == (8, 2, 6) and layer.P.shape == (2, 8, 2, 6) == layer.SIG.shape
    assert torch.all(layer.P.abs() <= 3) and torch.all(layer.SIG == 0.23)


def test_channels_last_and_autocast_bf16():
    layer = Dcls2d(8, 8, kernel_count=6, dilated_kernel_size=9, padding='same', groups=8, version='v0')
    x = torch.randn(2, 8, 12, 12)
    ref = layer(x)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), ref)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert layer.P.grad is not None and torch.isfinite(layer.P.grad).all()


def test_fx_trace_keeps_positions_trainable():
    model = _Stack('gauss')
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == 'get_attr'}
    assert 'positions.P' in targets and 'positions.SIG' in targets  # parameters, not baked constants
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(gm(x), model(x))
    gm(x).sum().backward()
    assert gm.positions.P.grad is not None and gm.positions.P.grad.abs().sum() > 0


def test_torch_compile_matches_eager():
    model = _Stack('v0')
    x = torch.randn(2, 4, 9, 9)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    assert model.positions.P.grad is not None


def test_positions_holder_repr_and_clamp():
    holder = DclsPositions(nn.Parameter(torch.full((2, 3, 1, 4), 9.)), None, (7, 7))
    holder.clamp_parameters()
    assert holder.P.max().item() == 3
    assert 'dilated_kernel_size=(7, 7)' in repr(holder)
