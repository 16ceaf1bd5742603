"""The DCLS authors' FastViT, ConvFormer and CAFormer models on timm's classes: exact parameter totals (SPEC 6),
timm's API (features, intermediates, FX, grad checkpointing, classifier reset, re-parameterisation), pretrained
cfgs, and loading files in the authors' layouts (Apple ml-fastvit, sail-sg metaformer); ResNet-50-dcls' version."""
import argparse
import re

import pytest
import timm
import torch
import torch.nn as nn
from timm.utils.model import reparameterize_model

import dcls_timm  # noqa: F401
from dcls_timm.checkpoint import CheckpointMismatchError, load_weights
from dcls_timm.layers import Dcls2d, DclsPositions, dcls_layers, position_owners
from dcls_timm.models import DclsRepConditionalPosEnc, FastVitDcls, MetaFormerDcls, plugin_models
from upstream import randomize_state_
from test_fx_autocast import TIMM_TRACER, _assert_fx_trains_like_eager, _spread_positions_

# SPEC 6: the authors' models, 1000 classes, and the dense timm models they come from
TOTALS = {
    'fastvit_sa24_dcls': (21_523_496, 'fastvit_sa24', 21_554_216),
    'fastvit_sa36_dcls': (31_452_584, 'fastvit_sa36', 31_527_464),
    'convformer_s18_dcls': (26_848_432, 'convformer_s18', 26_774_448),
    'caformer_s18_dcls': (26_350_488, 'caformer_s18', 26_341_656),
}
# tiny versions: 2 blocks per stage (so that positions are shared), 5x5 grid, K=4
TINY = {
    'fastvit_sa24_dcls': dict(layers=(2, 2, 2, 2), embed_dims=(8, 16, 32, 64), dcls_kernel_size=5,
                              dcls_kernel_count=4),
    'convformer_s18_dcls': dict(depths=(2, 2, 2, 2), dims=(8, 16, 24, 32), dcls_kernel_size=5, dcls_kernel_count=4),
    'caformer_s18_dcls': dict(depths=(2, 2, 1, 1), dims=(8, 16, 32, 32), dcls_kernel_size=5, dcls_kernel_count=4),
}
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def tiny(name, seed=None, **kwargs):
    """A tiny model; with a seed every tensor random (positions spread on the grid, BN statistics too), so that
    every weight shows in the logits."""
    model = timm.create_model(name, num_classes=10, **dict(TINY[name], **kwargs))
    if seed is not None:
        randomize_state_(model, seed, 0.2)
    return model


# ---------------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize('name', sorted(TOTALS))
def test_parameter_totals_equal_the_authors_models(name):
    total, dense_name, dense_total = TOTALS[name]
    with torch.device('meta'):
        model = timm.create_model(name)
        dense = timm.create_model(dense_name)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in dense.parameters()) == dense_total
    assert len(list(model.parameters())) == len(dict(model.named_parameters()))  # shared tensors once


def _dcls(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Dcls2d)}


def test_fastvit_structure_as_the_authors():
    with torch.device('meta'):
        model = timm.create_model('fastvit_sa24_dcls')
    assert isinstance(model, FastVitDcls)
    layers = _dcls(model)
    assert len(layers) == 4 + 4 + 12 + 4 + 1
    assert all(re.fullmatch(r'stages\.\d\.blocks\.\d+\.mlp\.conv\.conv|stages\.3\.pos_emb\.pos_enc', n) for n in layers)
    assert all((m.bias is not None) == n.endswith('pos_enc') for n, m in layers.items())  # the CPE keeps its bias
    assert {(m.dilated_kernel_size, m.kernel_count, m.version, m.groups == m.in_channels) for m in layers.values()} \
        == {((17, 17), 34, 'v1', True)}
    owners = position_owners(model)
    assert list(owners) == ['stages.0.blocks.0.mlp.conv.dcls_positions', 'stages.1.blocks.0.mlp.conv.dcls_positions',
                            'stages.2.blocks.0.mlp.conv.dcls_positions', 'stages.3.pos_emb.dcls_positions']
    # stage 4: the CPE (first conv of width 512) owns the positions its ConvFFNs reuse
    assert layers['stages.3.blocks.3.mlp.conv.conv'].positions_owner() is owners['stages.3.pos_emb.dcls_positions']
    assert isinstance(model.stages[3].pos_emb, DclsRepConditionalPosEnc)
    # everything else stays dense (stem, patch embeddings, RepMixers, final conv)
    dense_dw = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (7, 7)]
    assert dense_dw and all('downsample' in n for n in dense_dw)


@pytest.mark.parametrize('name, widths, count', [
    ('convformer_s18_dcls', (128, 256, 640, 1024), 40),
    ('caformer_s18_dcls', (128, 256), 34),
])
def test_metaformer_structure_as_the_authors(name, widths, count):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert isinstance(model, MetaFormerDcls)
    layers = _dcls(model)
    assert all(re.fullmatch(r'stages\.\d\.blocks\.\d+\.token_mixer\.dwconv', n) for n in layers)
    assert {m.out_channels for m in layers.values()} == set(widths)
    assert {(m.dilated_kernel_size, m.kernel_count, m.version, m.bias) for m in layers.values()} \
        == {((17, 17), count, 'v1', None)}
    owners = position_owners(model)
    assert list(owners) == [f'stages.{i}.blocks.0.token_mixer.dcls_positions' for i in range(len(widths))]
    assert [tuple(o.P.shape) for o in owners.values()] == [(2, w, 1, count) for w in widths]


def test_model_arguments():
    model = tiny('convformer_s18_dcls', dcls_shared_positions=False, dcls_version='gauss', dcls_kernel_count=None)
    owners = position_owners(model)
    assert all(not isinstance(o, DclsPositions) and o.SIG is not None for o in owners.values())
    assert len(owners) == 8 and model.dcls_kernel_count > 0  # iso-parameter rule
    with pytest.raises(ValueError, match='reparameterize_model'):
        timm.create_model('fastvit_sa24_dcls', inference_mode=True)
    with pytest.raises(TypeError):
        timm.create_model('convformer_s18_dcls', dcls_kernel_sise=5)


def test_plugin_lists_the_new_models():
    assert set(TOTALS) <= set(plugin_models())


# ---------------------------------------------------------------------------------------------------- timm's API


@pytest.mark.parametrize('name', sorted(TINY))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = tiny(name).train()
    out = model(X)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(o.P.grad.abs().sum() > 0 for o in position_owners(model).values())


@pytest.mark.parametrize('name', sorted(TINY))
def test_features_only_and_intermediates(name):
    model = tiny(name, seed=0).eval()
    final, intermediates = model.forward_intermediates(X)
    assert len(intermediates) == 4
    features = timm.create_model(name, features_only=True, **TINY[name]).eval()
    flat = lambda k: re.sub(r'^(\w+)\.(\d+)\.', r'\1_\2.', k)  # the wrapper's naming of flattened Sequentials
    own = dict(model.state_dict(), **{flat(k): v for k, v in model.state_dict().items()})
    features.load_state_dict({k: own[k] for k in features.state_dict()})
    # the feature wrapper keeps every shared position holder, once
    assert set(position_owners(features)) == {flat(n) for n in position_owners(model)}
    assert len(list(features.parameters())) == len(dict(features.named_parameters()))
    with torch.no_grad():
        outs = features(X)
    assert [o.shape[1] for o in outs] == features.feature_info.channels()
    for a, b in zip(outs, intermediates):
        torch.testing.assert_close(a, b.detach())
    last = timm.create_model(name, features_only=True, out_indices=(1,), **TINY[name])
    assert len(last(X)) == 1


@pytest.mark.parametrize('name', sorted(TINY))
def test_fx_traced_tiny_model_gets_every_gradient_like_eager(name):
    _assert_fx_trains_like_eager(tiny(name), TIMM_TRACER, X[:, :, :32, :32])


@pytest.mark.parametrize('name', sorted(TINY))
def test_grad_checkpointing_same_gradients(name):
    model = tiny(name, seed=1, drop_path_rate=0.).train()

    def grads():
        model.zero_grad(set_to_none=True)
        model(X).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', sorted(TINY))
def test_reset_classifier(name):
    model = tiny(name)
    model.reset_classifier(3)
    assert model(X).shape == (2, 3)
    model.reset_classifier(0)
    assert model(X).shape[1] == model.num_features


@pytest.mark.parametrize('grid', [5, 4])
def test_fastvit_reparameterize_keeps_outputs(grid):
    model = tiny('fastvit_sa24_dcls', seed=2, dcls_kernel_size=grid).eval()
    _spread_positions_(model)
    with torch.no_grad():
        before = model(X)
        fused = reparameterize_model(model)  # a copy, as timm does
        after = fused(X)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    cpe = fused.stages[3].pos_emb
    odd = grid + 1 - grid % 2
    assert not hasattr(cpe, 'pos_enc') and cpe.reparam_conv.weight.shape == (64, 1, odd, odd)
    # the stage's ConvFFN DCLS convs keep their (shared) positions, still trainable and in the state dict
    assert 'stages.3.pos_emb.dcls_positions.P' in fused.state_dict()
    assert len(list(dcls_layers(fused))) == 8 and fused.stages[3].pos_emb.dcls_positions.P.requires_grad
    # the original is untouched; in place on the model itself gives the same
    assert hasattr(model.stages[3].pos_emb, 'pos_enc')
    reparameterize_model(model, inplace=True)
    with torch.no_grad():
        torch.testing.assert_close(model(X), after)


# ---------------------------------------------------------------------------------------------------- pretrained cfgs


@pytest.mark.parametrize('name, size, crop, url_file', [
    ('fastvit_sa24_dcls', 256, 0.9, 'fastvit_sa24_v1_17lim_34el_seed0.pth.tar'),
    ('fastvit_sa36_dcls', 256, 0.95, 'fastvit_sa36_v1_17lim_34el_seed0.pth.tar'),
    ('convformer_s18_dcls', 224, 1.0, 'convformer_s18_v1_17lim_40el_seed0.pth.tar'),
    ('caformer_s18_dcls', 224, 1.0, 'caformer_s18_v1_17lim_34el_seed0.pth.tar'),
])
def test_pretrained_cfgs(name, size, crop, url_file):
    assert timm.list_pretrained(name + '*') == [name + '.dcls_in1k']
    cfg = timm.models.get_pretrained_cfg(name + '.dcls_in1k').to_dict()
    assert cfg['url'] == 'https://zenodo.org/records/8370737/files/' + url_file
    assert cfg['input_size'] == (3, size, size) and cfg['crop_pct'] == crop and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert not cfg.get('hf_hub_id') and cfg['license'] and 'arXiv:2112.03740' in cfg['paper_ids']
    assert cfg['num_classes'] == 1000


# ---------------------------------------------------------------------------------------------------- authors' layouts

FASTVIT_NETWORK = {0: 0, 1: 2, 2: 4, 3: 7}  # stage -> Apple network index (patch embeddings 1, 3, 5; CPE 6)
FASTVIT_RENAMES = [('conv_kxk', 'rbr_conv'), ('conv_scale', 'rbr_scale'), ('identity', 'rbr_skip'),
                   ('large_conv', 'lkb_origin'), ('.mlp.', '.convffn.'), ('se.fc1', 'se.reduce'),
                   ('se.fc2', 'se.expand'), ('final_conv', 'conv_exp')]


def to_apple(key):
    """timm's FastViT key -> Apple ml-fastvit's (timm's fastvit filter in reverse)."""
    key = re.sub(r'^stem\.', 'patch_embed.', key)
    key = re.sub(r'^stages\.(\d+)\.downsample\.proj\.', lambda m: f'network.{2 * int(m[1]) - 1}.proj.', key)
    key = re.sub(r'^stages\.3\.pos_emb\.pos_enc\.', 'network.6.pe.', key)
    key = re.sub(r'^stages\.(\d+)\.blocks\.', lambda m: f'network.{FASTVIT_NETWORK[int(m[1])]}.', key)
    key = re.sub(r'^head\.fc\.', 'head.', key)
    for a, b in FASTVIT_RENAMES:
        key = key.replace(a, b)
    return re.sub(r'layer_scale(_\d)?\.gamma$', r'layer_scale\1', key)


def to_sail(key):
    """timm's MetaFormer key -> sail-sg metaformer's (timm's metaformer filter in reverse)."""
    key = re.sub(r'^stem\.conv\.', 'downsample_layers.0.conv.', key)
    key = re.sub(r'^stem\.norm\.', 'downsample_layers.0.post_norm.', key)
    key = re.sub(r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.', key)
    key = re.sub(r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.', key)
    key = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', key)
    key = re.sub(r'^head\.norm\.', 'norm.', key)
    return re.sub(r'^head\.fc\.', 'head.', key)


def authors_state_dict(model, rename):
    """``model``'s weights as the authors' files hold them: their naming, every DCLS conv with its own copy of its
    (shared or own) positions, flipped along dim 0 (the v1 axis order of dcls <= 0.1.1)."""
    out = {rename(k): v.clone() for k, v in model.state_dict().items() if not k.endswith(('.P', '.SIG'))}
    for name, layer in model.named_modules():
        if isinstance(layer, Dcls2d):
            out[rename(name + '.P')] = layer.P.detach().flip(0).clone()
    return out


def save_published(path, weights, other):
    """A file organised as the published ones: timm CheckpointSaver entries, the EMA weights under state_dict_ema."""
    torch.save({'epoch': 299, 'arch': 'x', 'state_dict': other, 'state_dict_ema': weights, 'optimizer': {},
                'args': argparse.Namespace(model='x', lr=1e-3), 'metric': 80.0}, path)


LAYOUTS = {'fastvit_sa24_dcls': to_apple, 'convformer_s18_dcls': to_sail, 'caformer_s18_dcls': to_sail}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_authors_file_loads_with_identical_logits(name, tmp_path):
    rename = LAYOUTS[name]
    source = tiny(name, seed=3).eval()
    weights = authors_state_dict(source, rename)
    if rename is to_apple:
        assert 'network.0.1.convffn.conv.conv.P' in weights and 'network.6.pe.P' in weights
        assert 'patch_embed.0.rbr_conv.0.conv.weight' in weights and 'network.6.pe.bias' in weights
    else:
        assert 'stages.1.1.token_mixer.dwconv.P' in weights and 'downsample_layers.0.conv.weight' in weights
    path = tmp_path / 'published.pth.tar'
    save_published(path, weights, authors_state_dict(tiny(name, seed=4), rename))
    with torch.no_grad():
        expected = source(X)

    model = tiny(name).eval()
    info = load_weights(model, path, use_ema=True)
    assert info['entry'] == 'state_dict_ema' and info['epoch'] == 299
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)

    # pretrained=True from the file (the published loading path): the EMA weights, the same logits
    pretrained = timm.create_model(name, pretrained=True, num_classes=10, **TINY[name],
                                   pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pretrained(X), expected, rtol=0, atol=0)

    # no classifier (num_classes=0): the pre-logits of the file's model (an MLP head's fc1/norm go with its fc2;
    # timm's sail filter once raised a KeyError on them)
    headless = timm.create_model(name, pretrained=True, num_classes=0, **TINY[name],
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(headless(X), source.forward_head(source.forward_features(X), pre_logits=True),
                                   rtol=0, atol=0)

    # a model with per-layer positions takes the copies as they are
    per_layer = tiny(name, dcls_shared_positions=False).eval()
    load_weights(per_layer, path, use_ema=True)
    with torch.no_grad():
        torch.testing.assert_close(per_layer(X), expected, rtol=0, atol=0)


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_authors_file_with_differing_copies(name, tmp_path):
    rename = LAYOUTS[name]
    source = tiny(name, seed=5, dcls_shared_positions=False).eval()
    weights = authors_state_dict(source, rename)  # every layer its own positions
    path = tmp_path / 'per_layer.pth.tar'
    save_published(path, weights, weights)
    with pytest.raises(CheckpointMismatchError, match='dcls_shared_positions=False'):
        load_weights(tiny(name), path, use_ema=True)
    per_layer = tiny(name, dcls_shared_positions=False).eval()
    load_weights(per_layer, path, use_ema=True)
    with torch.no_grad():
        torch.testing.assert_close(per_layer(X), source(X), rtol=0, atol=0)


@pytest.mark.parametrize('name', sorted(TINY))
def test_own_layout_round_trip(name, tmp_path):
    source = tiny(name, seed=6).eval()
    path = tmp_path / 'own.pth'
    torch.save(source.state_dict(), path)
    model = tiny(name).eval()
    load_weights(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model(X), source(X), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- ResNet-50-dcls


def test_resnet_dcls_default_version_is_the_published_v0():
    kwargs = dict(channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
    assert {m.version for m in dcls_layers(timm.create_model('resnet26_dcls', **kwargs))} == {'v0'}
    assert {m.version for m in dcls_layers(timm.create_model('resnet26_dcls', dcls_version='v1', **kwargs))} == {'v1'}
    with torch.device('meta'):
        assert {m.version for m in dcls_layers(timm.create_model('resnet50_dcls'))} == {'v0'}
