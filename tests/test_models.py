"""Registered models: timm API, exact parameter counts, checkpoints."""
import pytest
import timm
import torch
from timm.utils import ModelEmaV3

import dcls_timm
from dcls_timm.layers import Dcls2d, clamp_positions_
from dcls_timm.models import ConvNeXtDcls, iso_param_kernel_count
from upstream import upstream_state_dict

DCLS_MODELS = [
    'convnext_atto_dcls', 'convnext_femto_dcls', 'convnext_pico_dcls', 'convnext_nano_dcls',
    'convnext_tiny_dcls', 'convnext_small_dcls', 'convnext_base_dcls', 'convnext_tiny_dcls_gauss',
]
BASELINES = ['convnext_tiny_k17', 'convnext_tiny_dil2']
ALL_MODELS = DCLS_MODELS + BASELINES

# SPEC 1.5: (D, K, version, params at 1000 classes); None where the spec gives no total
EXPECTED = {
    'convnext_atto_dcls': (17, 29, 'v0', None),
    'convnext_femto_dcls': (17, 29, 'v0', None),
    'convnext_pico_dcls': (17, 29, 'v0', None),
    'convnext_nano_dcls': (17, 31, 'v0', None),
    'convnext_tiny_dcls': (17, 34, 'v0', 28_587_688),
    'convnext_small_dcls': (17, 40, 'v0', 50_217_064),
    'convnext_base_dcls': (17, 40, 'v0', 88_582_632),
    'convnext_tiny_dcls_gauss': (23, 26, 'gauss', 28_586_536),
}
DENSE = {'convnext_atto': 'convnext_atto_dcls', 'convnext_femto': 'convnext_femto_dcls',
         'convnext_pico': 'convnext_pico_dcls', 'convnext_nano': 'convnext_nano_dcls',
         'convnext_tiny': 'convnext_tiny_dcls', 'convnext_small': 'convnext_small_dcls',
         'convnext_base': 'convnext_base_dcls'}


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_all_models_registered():
    registered = set(timm.list_models('convnext_*'))
    assert set(ALL_MODELS) <= registered
    assert set(timm.list_models(module='convnext_dcls')) >= set(ALL_MODELS)


@pytest.mark.parametrize('name', DCLS_MODELS)
def test_configuration_and_parameter_count(name):
    size, count, version, params = EXPECTED[name]
    model = timm.create_model(name)
    assert (model.dcls_kernel_size[0], model.dcls_kernel_count, model.dcls_version) == (size, count, version)
    convs = [m for m in model.modules() if isinstance(m, Dcls2d)]
    assert len(convs) == sum(len(s.blocks) for s in model.stages)
    assert all(c.dilated_kernel_size == (size, size) and c.kernel_count == count for c in convs)
    # positions shared per stage: one P (and SIG) per stage
    pos = [n for n, _ in model.named_parameters() if n.endswith(('.P', '.SIG'))]
    assert pos == [f'stages.{i}.positions.{t}' for i in range(4) for t in (['P', 'SIG'] if version == 'gauss' else ['P'])]
    if params is not None:
        assert _count(model) == params


@pytest.mark.parametrize('dense, dcls', sorted(DENSE.items()))
def test_iso_parameter_rule(dense, dcls):
    # DCLS parameters at or below the 7x7 weights they replace, and K + 1 would exceed them
    model, ref = timm.create_model(dcls), timm.create_model(dense)
    assert _count(model) <= _count(ref)
    depths = [len(s.blocks) for s in model.stages]
    dims = [s.blocks[0].conv_dw.out_channels for s in model.stages]
    k = model.dcls_kernel_count
    assert k == iso_param_kernel_count(depths, dims)
    extra = sum(d * c for d, c in zip(depths, dims)) + 2 * sum(dims)  # one more element everywhere
    assert _count(model) + extra > _count(ref)


def test_baseline_parameter_counts():
    assert _count(timm.create_model('convnext_tiny_dil2')) == _count(timm.create_model('convnext_tiny'))
    dil = timm.create_model('convnext_tiny_dil2')
    conv = dil.stages[0].blocks[0].conv_dw
    assert conv.dilation == (2, 2) and conv.padding == (6, 6)
    k17 = timm.create_model('convnext_tiny_k17')
    assert k17.stages[0].blocks[0].conv_dw.kernel_size == (17, 17)
    assert _count(k17) == 28_589_128 + (17 * 17 - 49) * 6624


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_backward_every_parameter_gets_gradient(name):
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5)
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    for n, p in model.named_parameters():
        if n.endswith('.P'):
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize('name', ALL_MODELS)
def test_features_intermediates_and_fx(name):
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(1)  # same seed, same weights: feature wrappers rename modules, so no state-dict copy
    model = timm.create_model(name).eval()
    final, inter = model.forward_intermediates(x)
    assert [t.shape[-1] for t in inter] == [16, 8, 4, 2]
    torch.testing.assert_close(final, model.forward_features(x))

    torch.manual_seed(1)
    feat = timm.create_model(name, features_only=True).eval()
    outs = feat(x)
    assert [o.shape[1] for o in outs] == feat.feature_info.channels()
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    for o, i in zip(outs, inter):
        torch.testing.assert_close(o, i)

    torch.manual_seed(1)
    fx = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    fx_outs = fx(x)
    for o, f in zip(outs, fx_outs.values() if isinstance(fx_outs, dict) else fx_outs):
        torch.testing.assert_close(f, o)


def test_timm_model_api():
    model = timm.create_model('convnext_atto_dcls', num_classes=7, in_chans=1, drop_path_rate=0.2)
    assert model.stem[0].in_channels == 1 and model.get_classifier().out_features == 7
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    model.set_grad_checkpointing(False)
    torch.manual_seed(0)
    b = model(x)
    torch.testing.assert_close(a, b)
    model.reset_classifier(3)
    model.eval()
    assert model(x).shape == (2, 3)
    assert ref.shape == (2, 7)
    assert model.pretrained_cfg['input_size'] == (3, 224, 224)

    # layer decay groups (timm's group_matcher): shared positions join their stage, not the head
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=False))
    where = {n: g for g, names in groups.items() for n in names}
    assert where['stages.2.positions.P'] == where['stages.2.downsample.0.weight']
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    where = {n: g for g, names in coarse.items() for n in names}
    assert where['stages.1.positions.P'] == where['stages.1.blocks.0.conv_dw.weight']


def test_unknown_argument_is_a_clear_error():
    with pytest.raises(TypeError, match="did you mean 'dcls_version'"):
        timm.create_model('convnext_tiny_dcls', dcls_verison='v1')
    with pytest.raises(TypeError, match="Unknown model argument"):
        timm.create_model('convnext_tiny_dil2', kernel_count=3)
    with pytest.raises(ValueError, match='output_stride=32'):
        timm.create_model('convnext_atto_dcls', output_stride=16)
    with pytest.raises(ValueError, match='ResNet-dcls needs an odd dcls_kernel_size, got 6'):  # was a forward crash
        timm.create_model('resnet26_dcls', dcls_kernel_size=6)


def test_deprecated_upstream_names():
    with pytest.warns(UserWarning, match='deprecated'):
        model = timm.create_model('convnext_dcls_tiny', num_classes=2)
    assert isinstance(model, ConvNeXtDcls) and model.dcls_kernel_count == 34


def test_pretrained_file_round_trip(tmp_path):
    model = timm.create_model('convnext_atto_dcls', num_classes=4).eval()
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    loaded = timm.create_model('convnext_atto_dcls', num_classes=4, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    # the same weights into a model without shared positions: positions expanded per block
    unshared = timm.create_model('convnext_atto_dcls', num_classes=4, pretrained=True, dcls_shared_positions=False, dcls_kernel_count=29,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=4)).eval()
    assert 'stages.0.blocks.1.conv_dw.P' in unshared.state_dict()
    torch.testing.assert_close(unshared.stages[0].blocks[1].conv_dw.P, model.stages[0].positions.P)


@pytest.mark.parametrize('name', ['convnext_atto_dcls', 'convnext_tiny_dcls_gauss'])
def test_upstream_checkpoint_layout_loads(name, tmp_path):
    model = timm.create_model(name).eval()
    ckpt = upstream_state_dict(model)
    assert 'stages.0.1.dwconv.P' in ckpt['model'] and 'downsample_layers.1.1.weight' in ckpt['model']
    path = tmp_path / 'upstream.pth'
    torch.save(ckpt, path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    # positions that differ between blocks cannot be shared
    ckpt['model']['stages.0.1.dwconv.P'] = ckpt['model']['stages.0.1.dwconv.P'] + 1
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match='dcls_shared_positions=False'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_model_ema_and_clamp_on_a_model():
    model = timm.create_model('convnext_atto_dcls', num_classes=3)
    ema = ModelEmaV3(model, decay=0.5)
    before = ema.module.stages[1].positions.P.detach().clone()
    with torch.no_grad():
        model.stages[1].positions.P.add_(2.0)
    ema.update(model, step=10_000)
    torch.testing.assert_close(ema.module.stages[1].positions.P,
                               0.5 * before + 0.5 * model.stages[1].positions.P.detach())
    with torch.no_grad():
        model.stages[1].positions.P.add_(100.0)
    assert clamp_positions_(model) == 4
    assert model.stages[1].positions.P.max().item() == 8


def test_init_follows_the_paper():
    model = timm.create_model('convnext_tiny_dcls')
    w = model.stages[2].blocks[0].conv_dw.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002  # trunc_normal(std=0.02)
    assert torch.all(model.stages[2].blocks[0].conv_dw.bias == 0)
    P = model.stages[2].positions.P
    assert abs(P.std().item() - 0.5) < 0.03 and P.abs().max().item() <= 8
    assert dcls_timm.__version__


def test_channels_last_model_matches():
    model = timm.create_model('convnext_atto_dcls').eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)  # also turns the 4-D position tensors channels-last
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref)
