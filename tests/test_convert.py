"""DCLS for any model (dcls_timm.convert_to_dcls): timm and torchvision models, the iso-parameter rule, position
sharing, selection rules, errors, the DCLS recipe on converted models, and one train.py epoch of one."""
import csv
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.utils import ModelEmaV3

import dcls_timm
from dcls_timm import ConversionError, convert_to_dcls
from dcls_timm.convert import share_layer_positions
from dcls_timm.checkpoint import CheckpointMismatchError
from dcls_timm.layers import Dcls1d, Dcls2d, Dcls3d, DclsPositions, dcls_layers, position_owners
from dcls_timm.recipe import DclsRecipe, repulsive_loss
from dcls_timm.training import parse_args, run
from dcls_timm.training import trainer as main_module
from test_train import _argv, image_folder  # noqa: F401  (image_folder: the module-scoped fixture)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _dw(model):
    """name -> (weight count, C_out * C_in/g, channels, kernel size) of the depthwise convs of a model."""
    return {n: (m.weight.numel(), m.out_channels * m.in_channels // m.groups, m.out_channels, m.kernel_size)
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and max(m.kernel_size) > 1}


def _check_iso_rule(model, grid, **kwargs):
    """Convert with the iso-parameter rule and check K and the parameter totals against the rule's definition."""
    dw = _dw(model)
    before = _params(model)
    summary = convert_to_dcls(model, grid, **kwargs)
    assert summary.layers == list(dw) and summary.kernel_count_rule == 'iso-parameter'
    dense = sum(w for w, _, _, _ in dw.values())
    # shared per width: one [2, C, 1, K] tensor per (width, grid), counted once
    widths = {(c, grid(k) if callable(grid) else grid) for _, _, c, k in dw.values()}
    per_element = sum(e for _, e, _, _ in dw.values()) + sum(2 * c for c, _ in widths)
    k = summary.kernel_count
    assert k * per_element <= dense < (k + 1) * per_element
    assert summary.num_position_tensors == len(widths) == len(position_owners(model))
    assert summary.params_before == before
    assert summary.params_after == _params(model) == before - dense + k * per_element
    assert summary.param_change == -(dense - k * per_element) and summary.dense_weights == dense
    return summary


def _all_grads(model, out):
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(o.P.grad.abs().sum() > 0 for o in position_owners(model).values())


# ---------------------------------------------------------------------------------------------------- any model


def test_timm_mobilenetv3_depthwise_iso_parameter():
    model = timm.create_model('mobilenetv3_small_050', num_classes=10)
    summary = _check_iso_rule(model, lambda k: (2 * k[0] + 1, 2 * k[1] + 1))  # 3x3 -> 7x7, 5x5 -> 11x11
    assert 'replaced' in str(summary) and f'K={summary.kernel_count}' in str(summary)
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, Dcls2d))
    assert {m.dilated_kernel_size for m in layers.values()} == {(7, 7), (11, 11)}
    assert all(m.version == 'v1' and m.groups == m.in_channels for m in layers.values())
    model.train()
    _all_grads(model, model(X))


def test_torchvision_mobilenet_v2(tmp_path):
    reference = torchvision.models.mobilenet_v2(num_classes=10)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    summary = _check_iso_rule(model, 7)
    assert summary.num_replaced == 17
    # holders never inside a container (Sequential would call them, ModuleList/Dict iterate them)
    modules = dict(model.named_modules())
    for holder in summary.position_holders:
        if isinstance(modules[holder], DclsPositions):
            parent = modules[holder.rsplit('.', 1)[0]]
            assert not isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    # width 96 once (the layer owns its positions); width 144 twice: features.3 owns them for features.4 too
    assert summary.position_holders['features.2.conv.1.0'] == ['features.2.conv.1.0']
    assert summary.position_holders['features.3.dcls_positions'] == ['features.3.conv.1.0', 'features.4.conv.1.0']
    # strided depthwise convs: padding D // 2 keeps the feature sizes of the 3x3 they replace
    x = torch.randn(2, 3, 40, 40)
    a, b = x, x
    for dense, dcls in zip(reference.features, model.features):
        a, b = dense(a), dcls(b)
        assert a.shape == b.shape
    model.train()
    _all_grads(model, model(x))
    # each shared tensor once in named_parameters and the state dict, and it survives a save/load
    names = dict(model.named_parameters())
    assert len(names) == len(list(model.parameters()))
    keys = [k for k in model.state_dict() if k.endswith('.P')]
    assert len(keys) == len(set(map(id, (o.P for o in position_owners(model).values())))) == len(position_owners(model))
    torch.save(model.state_dict(), tmp_path / 'm.pth')
    other = torchvision.models.mobilenet_v2(num_classes=10)
    convert_to_dcls(other, 7)
    other.load_state_dict(torch.load(tmp_path / 'm.pth', weights_only=True))
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_timm_resnet18_all_3x3_convs_with_strides():
    reference = timm.create_model('resnet18', num_classes=10)
    model = timm.create_model('resnet18', num_classes=10, zero_init_last=False)  # gradients reach every conv2
    summary = convert_to_dcls(model, 5, 2, layers='all', kernel_sizes=[3], version='v0')
    assert summary.num_replaced == 16 and summary.kernel_count_rule == 'given'
    assert isinstance(model.conv1, nn.Conv2d)  # the 7x7 stem is not a 3x3
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv1.padding == (2, 2)
    assert model.layer1[0].conv1.padding == 'same'
    assert all(m.bias is None for m in dcls_layers(model))
    # shapes [2, C_out, C_in, K]: 64/128/256/512 square, and the 3 widening convs (layerN.0.conv1) alone
    assert summary.num_position_tensors == 7
    assert summary.position_holders['layer2.0.conv1'] == ['layer2.0.conv1']
    fr, fm = reference.forward_intermediates(X, intermediates_only=True), model.forward_intermediates(
        X, intermediates_only=True)
    assert [t.shape for t in fr] == [t.shape for t in fm]
    _all_grads(model, model(X))


@pytest.mark.parametrize('size', [4, 6])
def test_strided_convs_keep_their_output_size(size):
    # ConvNeXt's 2x2 stride-2 downsampling convs (padding 0) on odd maps: padding p + (D - k) / 2 keeps every size
    kw = dict(num_classes=4, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    ref, model = timm.create_model('convnext_atto', **kw).eval(), timm.create_model('convnext_atto', **kw).eval()
    convert_to_dcls(model, size, 4, layers='all', kernel_sizes=[2])
    x = torch.randn(1, 3, 60, 60)
    with torch.no_grad():
        assert [f.shape for f in model.forward_intermediates(x, intermediates_only=True)] == \
            [f.shape for f in ref.forward_intermediates(x, intermediates_only=True)]
    for stage in (1, 2, 3):
        assert model.get_submodule(f'stages.{stage}.downsample.1').padding == ((size - 2) // 2,) * 2
    net = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    convert_to_dcls(net, size + 1, 3, layers='all')  # odd grid for an odd kernel: D // 2, as before
    assert net[0].padding == ((size + 1) // 2,) * 2 and net(torch.randn(1, 4, 15, 15)).shape[-1] == 8


def test_dcls_recipe_groups_clamping_repulsion_and_ema():
    model = timm.create_model('mobilenetv3_small_050', num_classes=10)
    convert_to_dcls(model, 9)
    owners = position_owners(model)
    positions = {id(o.P) for o in owners.values()}
    recipe = DclsRecipe()
    groups = recipe.param_groups(model, weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g['params']]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))  # every parameter once
    position_groups = [g for g in groups if g['group_name'] == 'positions']
    assert len(position_groups) == 1 and position_groups[0]['lr_scale'] == 5. == recipe.position_lr_scale
    assert position_groups[0]['weight_decay'] == 0.
    assert {id(p) for p in position_groups[0]['params']} == positions
    # clamping after a step, once per distinct tensor
    with torch.no_grad():
        for o in owners.values():
            o.P.fill_(100.)
    recipe.after_optimizer_step(model)
    assert all(o.P.max() == 4 for o in owners.values())
    assert repulsive_loss(model).ndim == 0
    # EMA: one copy of each shared tensor, still shared by the copy's layers
    ema = ModelEmaV3(model, decay=0.9)
    assert list(ema.module.state_dict()) == list(model.state_dict())
    ema.update(model)
    copies = {id(m.positions_owner()) for m in dcls_layers(ema.module)}
    assert copies == {id(o) for o in position_owners(ema.module).values()}
    assert not copies & {id(o) for o in owners.values()}


# ---------------------------------------------------------------------------------------------------- rules


class Net(nn.Module):
    """A user's own model: depthwise convs in a Sequential (no holder there), plain convs, a shared conv."""

    def __init__(self, bias=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=bias), nn.GELU(),
                                  nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=bias), nn.Conv2d(8, 16, 1),
                                  nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16, bias=bias))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_own_model_holders_init_and_bias():
    torch.manual_seed(0)
    model = Net()
    dense_bias = model.body[0].bias.detach().clone()
    summary = convert_to_dcls(model, 15, 20)
    assert summary.layers == ['body.0', 'body.2', 'body.4']
    assert summary.position_holders == {'dcls_positions': ['body.0', 'body.2'], 'body.4': ['body.4']}
    assert isinstance(model.dcls_positions, DclsPositions)
    assert model.body[0].bias.abs().sum() == 0 and model.body[4].bias.abs().sum() == 0  # authors' init: bias 0
    weights = torch.cat([m.weight.flatten() for m in dcls_layers(model)])
    assert 0.015 < weights.std() < 0.025 and weights.mean().abs() < 0.005
    assert all(o.P.abs().max() <= 7 for o in position_owners(model).values())
    assert model(X).shape == (2, 4)
    kept = Net()
    kept_bias = kept.body[0].bias.detach().clone()
    convert_to_dcls(kept, 15, 20, keep_bias=True)
    assert torch.equal(kept.body[0].bias, kept_bias) and not torch.equal(kept_bias, dense_bias)
    without = Net(bias=False)
    convert_to_dcls(without, 15, 20)
    assert all(m.bias is None for m in dcls_layers(without))


def test_sequential_root_holds_positions_in_the_first_layer():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    summary = convert_to_dcls(model, 7)
    assert list(summary.position_holders) == ['0.dcls_positions']
    assert model(torch.randn(1, 8, 10, 10)).shape == (1, 8, 10, 10)
    assert [k for k in model.state_dict() if k.endswith('.P')] == ['0.dcls_positions.P']


def test_selection_rules_and_sharing_options():
    model = timm.create_model('resnet18', num_classes=10)
    summary = convert_to_dcls(model, 5, 2, layers='all', include=['layer[34].*'], exclude=re.compile(r'conv2$'))
    assert summary.layers == ['layer3.0.conv1', 'layer3.1.conv1', 'layer4.0.conv1', 'layer4.1.conv1']
    model = timm.create_model('resnet18', num_classes=10)
    summary = convert_to_dcls(model, 5, 2, layers=lambda name, conv: conv.stride == (2, 2) and conv.groups == 1,
                              kernel_sizes=[(3, 3)])
    assert summary.layers == ['layer2.0.conv1', 'layer3.0.conv1', 'layer4.0.conv1']
    # per layer: every layer owns its positions, and the iso-parameter rule gives a smaller K
    shared = Net()
    per_layer = Net()
    k_shared = convert_to_dcls(shared, 15).kernel_count
    summary = convert_to_dcls(per_layer, 15, position_sharing='layer')
    assert summary.kernel_count < k_shared and summary.num_position_tensors == 3
    assert all(isinstance(o, Dcls2d) for o in position_owners(per_layer).values())
    # a custom key: one tensor per ResNet stage and shape
    model = timm.create_model('resnet18', num_classes=10)
    summary = convert_to_dcls(model, 5, 2, layers='all', kernel_sizes=[3],
                              position_sharing=lambda n, c: (n.split('.')[0], c.in_channels, c.out_channels))
    assert summary.num_position_tensors == 7
    with pytest.raises(ConversionError, match='differ in shape'):
        convert_to_dcls(timm.create_model('resnet18'), 5, 2, layers='all', kernel_sizes=[3],
                        position_sharing=lambda n, c: n.split('.')[0])
    # gauss shares SIG with P
    model = Net()
    convert_to_dcls(model, 9, version='gauss')
    assert [k for k in model.state_dict() if k.startswith('dcls_positions')] == ['dcls_positions.P',
                                                                                 'dcls_positions.SIG']


def test_1d_3d_padding_modes_and_a_conv_registered_twice():
    model = nn.Module()
    model.a = nn.Conv1d(4, 4, 5, padding=2, groups=4)
    model.b = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    model.c = nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode='reflect')
    model.d = model.c  # the same conv under two names
    summary = convert_to_dcls(model, 7, 3)
    assert isinstance(model.a, Dcls1d) and isinstance(model.b, Dcls3d) and isinstance(model.c, Dcls2d)
    assert model.d is model.c and summary.layers == ['a', 'b', 'c']
    assert model.a(torch.randn(2, 4, 9)).shape == (2, 4, 9)
    assert model.b(torch.randn(2, 4, 5, 6, 7)).shape == (2, 4, 5, 6, 7)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (3, 3, 3, 3), mode='reflect'), model.c.construct_kernel(), model.c.bias,
                            groups=4)
        torch.testing.assert_close(model.c(x), expected)


@pytest.mark.parametrize('make, kwargs, match', [
    (lambda: timm.create_model('resnet18'), {}, r'no convolution of ResNet matches .*layers=depthwise.*conv1 '),
    (lambda: Net(), dict(include='nothing*'), 'no convolution of Net matches'),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)), {}, r'0 has dilation \(2, 2\)'),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), {}, 'does not keep the size'),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding='valid', groups=4)), {}, "padding='valid'"),
    (lambda: nn.Sequential(nn.Conv3d(4, 4, (1, 1, 3), padding=(0, 0, 1), groups=4)), {},
     'iso-parameter rule gives K = 0'),
    # a strided conv keeps its output size only with a grid of its kernel's parity (it once grew by one pixel)
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 2, stride=2, groups=4)), {},
     r'0 \(kernel \(2, 2\), stride \(2, 2\), padding \(0, 0\)\) cannot keep its output size with a grid of \(5, 5\)'),
    (lambda: nn.Conv2d(4, 4, 3, groups=4), {}, 'the model itself is a convolution'),
    (lambda: Net(), dict(version='max'), 'version must be one of'),
    (lambda: Net(), dict(layers='pointwise'), "layers must be 'depthwise', 'all'"),
    (lambda: Net(), dict(position_sharing='stage'), "position_sharing must be 'width', 'layer'"),
    (lambda: Net(), dict(kernel_count=0), 'kernel_count must be a positive int'),
])
def test_clear_errors(make, kwargs, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=match):
        convert_to_dcls(model, 5, **kwargs)
    assert list(model.state_dict()) == list(before)  # nothing changed
    assert isinstance(ConversionError('x'), dcls_timm.errors.ConfigError)


def test_share_layer_positions_collapses_agreeing_copies():
    model = Net()
    convert_to_dcls(model, 9, 4)
    state = model.state_dict()
    P = state.pop('dcls_positions.P')
    per_layer = dict(state, **{'body.0.P': P, 'body.2.P': P.clone()})
    assert torch.equal(share_layer_positions(per_layer, model)['dcls_positions.P'], P)
    with pytest.raises(CheckpointMismatchError, match='body.2 differ from body.0 by up to 1'):
        share_layer_positions(dict(per_layer, **{'body.2.P': P + 1}), model, 'build it per layer')


# ---------------------------------------------------------------------------------------------------- train.py


def test_train_py_epoch_on_a_converted_timm_model(image_folder, tmp_path, monkeypatch):
    """train.py on a model converted by a user (create_model patched to convert): the DCLS recipe applies."""
    create = timm.create_model
    conversions = []

    def create_and_convert(name, **kwargs):
        model = create(name, **kwargs)
        conversions.append(convert_to_dcls(model, 7))
        return model
    monkeypatch.setattr(main_module.timm, 'create_model', create_and_convert)
    result = run(parse_args(_argv(image_folder, tmp_path, '--model', 'mobilenetv3_small_050', '--model-kwargs',
                                  '--epochs', '1', '--warmup-epochs', '0', '--repulsive-after-epoch', '-1')))
    assert result['epochs'] == 1 and conversions
    with open(tmp_path / 'run' / 'summary.csv') as f:
        row = next(csv.DictReader(f))
    assert float(row['train_lr_positions']) == pytest.approx(5 * float(row['train_lr_decay']))
    assert float(row['train_rep_loss']) > 0
    checkpoint = torch.load(tmp_path / 'run' / 'last.pth.tar', weights_only=True)
    keys = [k for k in checkpoint['state_dict_ema'] if k.endswith('.P')]
    assert len(keys) == conversions[0].num_position_tensors  # each shared tensor once, in the EMA too
    P = {k: v for k, v in checkpoint['state_dict'].items() if k.endswith('.P')}
    assert all(v.abs().max() <= 3 for v in P.values())  # clamped onto the 7x7 grid
