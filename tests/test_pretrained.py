"""Every published DCLS checkpoint through timm's ``pretrained=True`` (SPEC 6), without the network.

For each published file a small model of the same family (tiny dims, the file's D/K/version) is written exactly as
the file is organised (weights key ``model`` or ``state_dict_ema``, positions repeated per block, upstream axis
order, extra entries such as ``args`` (an ``argparse.Namespace``), ``epoch``, ``optimizer``), then loaded through
``timm.create_model(name, pretrained=True, ...)`` from the file, from the url (timm's download mocked: no hub access),
and from a local folder written by timm's ``save_for_hf``; the logits must equal those of the same weights set
directly. Mismatches stop with one line.
"""
import argparse
import json
import pickle

import pytest
import timm
import torch
from timm.models import adapt_input_conv, save_for_hf

import dcls_timm  # noqa: F401
from dcls_timm.checkpoint import CheckpointError, CheckpointMismatchError, load_weights, read_checkpoint
from dcls_timm.models import _pretrained
from dcls_timm.models._pretrained import published_weights
from upstream import upstream_state_dict

# SPEC 6: the published files, their weights key and the D / K / version they were trained with
SPEC = {
    'convnext_tiny_dcls': ('https://zenodo.org/record/7112021/files/convnext_dcls_tiny_1k_224_ema.pth', 'model',
                           dict(dcls_kernel_size=17, dcls_kernel_count=34, dcls_version='v0'), 82.5),
    'convnext_small_dcls': ('https://zenodo.org/record/7112021/files/convnext_dcls_small_1k_224_ema.pth', 'model',
                            dict(dcls_kernel_size=17, dcls_kernel_count=40, dcls_version='v0'), 83.7),
    'convnext_base_dcls': ('https://zenodo.org/record/7112021/files/convnext_dcls_base_1k_224_ema.pth', 'model',
                           dict(dcls_kernel_size=17, dcls_kernel_count=40, dcls_version='v0'), 84.1),
    'convnext_tiny_dcls_gauss': ('https://zenodo.org/record/8029747/files/convnext_dcls_gauss_tiny_1k_224_ema.pth',
                                 'model', dict(dcls_kernel_size=23, dcls_kernel_count=26, dcls_version='gauss'), None),
    'resnet50_dcls': ('https://zenodo.org/records/8373830/files/resnet_dcls_kernel_5_model_best.pth.tar',
                      'state_dict_ema', dict(dcls_kernel_size=7, dcls_kernel_count=5, dcls_version='v0'), None),
}
TAG = 'dcls_in1k'
# tiny sizes of each family (2+ blocks per stage, so that positions repeat per block); 1000 classes as published
SIZE = {
    'convnext': dict(depths=(2, 2, 2, 2), dims=(8, 16, 24, 32)),
    'resnet': dict(channels=(8, 16, 32, 64), stem_width=8),  # resnet50's (3, 4, 6, 3) blocks
}
# the file layouts: ConvNeXt files share positions (identical copies); the ResNet-50 file may hold them per block
CASES = ['convnext_tiny_dcls', 'convnext_small_dcls', 'convnext_base_dcls', 'convnext_tiny_dcls_gauss',
         'resnet50_dcls:per_block', 'resnet50_dcls:shared']
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def size(name):
    return SIZE['resnet' if name.startswith('resnet') else 'convnext']


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Downloads fail loudly: a test that means to use the url route mocks it itself."""
    def refuse(*args, **kwargs):
        raise AssertionError(f'hub download attempted: {args}')
    monkeypatch.setattr(_pretrained, 'download_cached_file', refuse)
    monkeypatch.setattr(_pretrained, '_download_from_hf', refuse)


def randomize(model, seed=0):
    """Every float tensor random (positions on their grid, positive running variances), so that each shows in the
    logits (layer scale starts at 1e-6, BN at identity otherwise)."""
    g = torch.Generator().manual_seed(seed)
    convs = {n: m for n, m in model.named_modules() if hasattr(m, 'dilated_kernel_size')}
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if k.endswith('.P'):
                half = next(iter(convs.values())).dilated_kernel_size[0] // 2
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * half)
            elif k.endswith('.SIG'):
                t.copy_(torch.rand(t.shape, generator=g) * 2)
            elif k.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model.eval()


def reference(name, shared=True, seed=0):
    """The tiny model of ``name`` with the published file's D/K/version and random weights."""
    kwargs = dict(size(name), **SPEC[name][2])
    if not shared:
        kwargs['dcls_shared_positions'] = False
    return randomize(timm.create_model(name, **kwargs), seed)


def extras(checkpoint):
    """What the authors' training scripts store next to the weights (a CheckpointSaver/ConvNeXt main.py file)."""
    checkpoint.update({
        'epoch': 299,
        'args': argparse.Namespace(model='dcls', lr=4e-3, input_size=224, drop_path=0.1),
        'optimizer': {'state': {0: {'step': torch.tensor(5.), 'exp_avg': torch.zeros(3)}},
                      'param_groups': [{'lr': 4e-3, 'weight_decay': 0.05, 'params': [0]}]},
    })
    return checkpoint


def published_file(case, tmp_path):
    """``(path, reference model)``: the reference's weights written as the published file of ``case`` is organised."""
    name, _, variant = case.partition(':')
    if name.startswith('convnext'):
        ref = reference(name)
        checkpoint = upstream_state_dict(ref)  # {'model': Facebook ConvNeXt keys, P (and SIG) in every block}
        sd = checkpoint['model']
        assert 'stages.1.1.dwconv.P' in sd and 'downsample_layers.0.0.weight' in sd and 'head.weight' in sd
        assert not any('positions' in k for k in sd)
        if name == 'convnext_tiny_dcls':
            # another weights entry the default order would prefer: the published key must decide
            checkpoint['model_ema'] = {k: torch.zeros_like(v) for k, v in sd.items()}
        checkpoint = extras(checkpoint)
    else:
        shared = variant == 'shared'
        ref = reference(name, shared=shared)
        sd = dict(ref.state_dict())
        if shared:  # upstream state_dict() repeats the stage's P under every block (identical copies)
            for stage in range(1, 5):
                p = sd.pop(f'layer{stage}.0.positions.P')
                for block in range(len(getattr(ref, f'layer{stage}'))):
                    sd[f'layer{stage}.{block}.conv2.P'] = p.clone()
        assert sd['layer3.5.conv2.P'].shape == (2, 32, 32, 5) and 'layer1.0.conv2.bias' not in sd
        checkpoint = extras({
            'arch': 'resnet_dcls', 'version': 2, 'metric': 0.0, 'amp_scaler': {'scale': 65536.0},
            'state_dict': {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()},  # not the EMA
            'state_dict_ema': sd,
        })
    path = tmp_path / SPEC[name][0].rsplit('/', 1)[1]
    torch.save(checkpoint, path)
    return str(path), ref


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


def same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- the zoo -------------------------------------------------------------------------------------------------------

def test_tags_are_listed_with_the_published_cfgs():
    tags = timm.list_pretrained('*dcls*')
    assert {f'{name}.{TAG}' for name in SPEC} <= set(tags)
    for name, (url, key, model_args, top1) in SPEC.items():
        assert timm.models.get_pretrained_cfg(name).tag == TAG  # the default tag of the model
        cfg = timm.models.get_pretrained_cfg(f'{name}.{TAG}').to_dict()
        assert cfg['url'] == url and not cfg.get('hf_hub_id')
        assert cfg['origin_url'] == url.split('/files/')[0]
        assert cfg['paper_ids'] == 'arXiv:2112.03740' and cfg['paper_name'] and cfg['license']
        assert cfg['interpolation'] == 'bicubic' and cfg['num_classes'] == 1000
        assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
        if name.startswith('convnext'):
            assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875 and cfg['first_conv'] == 'stem.0'
            assert 'test_input_size' not in cfg
        else:  # ResNet Strikes Back A3: train 160, test 224, crop 0.95
            assert cfg['input_size'] == (3, 160, 160) and cfg['test_input_size'] == (3, 224, 224)
            assert cfg['crop_pct'] == 0.95 and cfg.get('test_crop_pct', 0.95) == 0.95 and cfg['first_conv'] == 'conv1'
        published = published_weights(cfg)
        assert published.weights_key == key and published.model_args == model_args and published.top1 == top1
        assert (f'ImageNet-1k top-1 {top1} (paper)' in cfg['notes']) == (top1 is not None)
    # every published DCLS tag (those added by other modules too) carries the same metadata
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        for field in ('url', 'license', 'paper_ids', 'origin_url', 'input_size', 'crop_pct', 'interpolation',
                      'mean', 'std', 'first_conv', 'classifier'):
            assert cfg.get(field), (tag, field)
        assert published_weights(cfg) is not None, tag


def test_models_without_weights_say_so():
    assert 'convnext_atto_dcls' not in {t.split('.')[0] for t in timm.list_pretrained('*dcls*')}
    with pytest.raises(CheckpointError, match='No pretrained weights exist for convnext_atto_dcls'):
        timm.create_model('convnext_atto_dcls', pretrained=True)


# -- the published layouts, from a file and from the url -------------------------------------------------------------

@pytest.mark.parametrize('case', CASES)
def test_published_file_loads_with_pretrained_true(case, tmp_path, monkeypatch):
    name = case.split(':')[0]
    path, ref = published_file(case, tmp_path)
    expected = logits(ref)

    # the file (e.g. downloaded by hand); D/K/version default to the published file's
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **size(name))
    same(logits(model), expected)
    assert (model.dcls_kernel_size if name.startswith('resnet') else model.dcls_kernel_size[0],
            model.dcls_kernel_count, model.dcls_version) == tuple(SPEC[name][2].values())
    assert model.dcls_shared_positions == (case != 'resnet50_dcls:per_block')  # per-block P: built unshared
    assert model.pretrained_cfg['tag'] == TAG and model.pretrained_cfg['file'] == path

    # the url: timm's download (mocked) into the hub cache, then the same reading
    calls = []

    def download(url, check_hash=False, progress=False, cache_dir=None):
        calls.append((url, cache_dir))
        return path
    monkeypatch.setattr(_pretrained, 'download_cached_file', download)
    model = timm.create_model(name, pretrained=True, cache_dir=str(tmp_path / 'cache'),
                              **size(name), **SPEC[name][2])
    assert calls == [(SPEC[name][0], str(tmp_path / 'cache'))]
    same(logits(model), expected)


def test_weights_key_and_extras_are_honoured(tmp_path):
    # the ConvNeXt file's decoy 'model_ema' entry (zeros) and the ResNet file's non-EMA 'state_dict' are not loaded
    path, ref = published_file('convnext_tiny_dcls', tmp_path)
    assert set(read_checkpoint(path)) == {'model', 'model_ema', 'epoch', 'args', 'optimizer'}
    with pytest.raises(pickle.UnpicklingError, match='argparse.Namespace'):  # what a url load by torch.hub refuses
        torch.load(path, weights_only=True)
    model = timm.create_model('convnext_tiny_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              **size('convnext_tiny_dcls'))
    same(logits(model), logits(ref))
    path, ref = published_file('resnet50_dcls:shared', tmp_path)
    model = timm.create_model('resnet50_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              **size('resnet50_dcls'))
    same(logits(model), logits(ref))


def test_target_adaptation_as_timm(tmp_path):
    """in_chans: first conv adapted by timm's adapt_input_conv; num_classes: fresh classifier; features_only."""
    for case, stem in [('convnext_tiny_dcls_gauss', 'stem.0.weight'), ('resnet50_dcls:per_block', 'conv1.weight')]:
        name = case.split(':')[0]
        path, ref = published_file(case, tmp_path)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), in_chans=1,
                                  num_classes=5, **size(name)).eval()
        own, theirs = model.state_dict(), ref.state_dict()
        torch.testing.assert_close(own[stem], adapt_input_conv(1, theirs[stem]), rtol=0, atol=0)
        classifier = model.pretrained_cfg['classifier'] + '.weight'
        assert own[classifier].shape[0] == 5
        for k, v in own.items():
            if k not in (stem, classifier, classifier[:-len('weight')] + 'bias'):
                assert torch.equal(v, theirs[k]), k
        features = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                     features_only=True, **size(name)).eval()
        with torch.no_grad():
            same(features(X)[-1], ref.forward_features(X))


def test_a_file_with_the_classes_asked_for_keeps_its_classifier(tmp_path):
    """timm would re-initialise the classifier whenever num_classes differs from the cfg's 1000; a file fine-tuned
    to the classes asked for keeps its own."""
    ref = randomize(timm.create_model('convnext_tiny_dcls', num_classes=7, **size('convnext_tiny_dcls'),
                                      **SPEC['convnext_tiny_dcls'][2]))
    path = tmp_path / 'finetuned.pth.tar'
    torch.save(extras({'state_dict': ref.state_dict()}), path)
    model = timm.create_model('convnext_tiny_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=7, **size('convnext_tiny_dcls'))
    same(logits(model), logits(ref))


# -- a local folder in the Hugging Face hub layout (timm's save_for_hf) ------------------------------------------------

@pytest.mark.parametrize('case', CASES)
def test_local_hf_folder_loads(case, tmp_path):
    name = case.split(':')[0]
    path, ref = published_file(case, tmp_path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **size(name))
    expected = logits(ref)
    folder = tmp_path / 'hf'
    safe = {'convnext_base_dcls': False, 'resnet50_dcls': 'both'}.get(name, True)
    save_for_hf(model, str(folder), safe_serialization=safe)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name and config['pretrained_cfg']['tag'] == TAG
    # the arguments the published file decided are recorded for reconstruction
    assert all(config['model_args'].get(k, v) == v for k, v in SPEC[name][2].items())
    if case == 'resnet50_dcls:per_block':
        assert config['model_args']['dcls_shared_positions'] is False
    else:
        assert 'dcls_shared_positions' not in config['model_args']

    # timm's spelling: the folder as the model name; architecture and model arguments come from config.json
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert type(loaded) is type(ref) and loaded.dcls_shared_positions == model.dcls_shared_positions
    assert (loaded.dcls_kernel_count, loaded.dcls_version) == (model.dcls_kernel_count, model.dcls_version)
    same(logits(loaded), expected)
    # the folder through a registered name's pretrained cfg
    for overlay in (dict(file=str(folder)), dict(source='local-dir', file=str(folder)),
                    dict(hf_hub_id=f'local-dir:{folder}')):
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **size(name),
                                   **SPEC[name][2])
        same(logits(loaded), expected)
    # validate.py --checkpoint / train.py --initial-checkpoint read the folder with the same loader
    target = timm.create_model(name, **size(name), **SPEC[name][2],
                               dcls_shared_positions=model.dcls_shared_positions)
    load_weights(target, str(folder))
    same(logits(target), expected)


def test_validate_and_train_loader_read_the_published_files(tmp_path):
    """validate.py --checkpoint (use_ema False/True) and --initial-checkpoint (None) take the same files."""
    path, ref = published_file('convnext_small_dcls', tmp_path)
    for use_ema in (False, None):
        model = timm.create_model('convnext_small_dcls', **size('convnext_small_dcls'),
                                  **SPEC['convnext_small_dcls'][2])
        info = load_weights(model, path, use_ema=use_ema)
        assert info['entry'] == 'model' and info['epoch'] == 299
        same(logits(model), logits(ref))
    path, ref = published_file('resnet50_dcls:per_block', tmp_path)
    model = timm.create_model('resnet50_dcls', dcls_shared_positions=False, **size('resnet50_dcls'),
                              **SPEC['resnet50_dcls'][2])
    assert load_weights(model, path, use_ema=True)['entry'] == 'state_dict_ema'
    same(logits(model), logits(ref))


# -- mismatches: one line ------------------------------------------------------------------------------------------

def test_mismatches_are_one_clear_line(tmp_path):
    path, _ = published_file('convnext_tiny_dcls', tmp_path)
    kwargs = size('convnext_tiny_dcls')
    with pytest.raises(CheckpointMismatchError) as e:
        timm.create_model('convnext_tiny_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          dcls_kernel_count=33, **kwargs)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'{path} does not fit ConvNeXtDcls: shape mismatches: ')
    assert 'stages.0.blocks.0.conv_dw.weight (8, 1, 34) vs (8, 1, 33)' in msg

    with pytest.raises(CheckpointMismatchError) as e:
        timm.create_model('convnext_tiny_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          dims=(8, 16, 24, 40), depths=(2, 2, 2, 2))
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(f'{path} does not fit ConvNeXtDcls: shape mismatches: ')
    assert 'stages.3.blocks.0.mlp.fc1.weight (128, 32) vs (160, 40)' in msg

    # ConvNeXt files come from code sharing positions: copies that disagree are a wrong file, named with the fix
    checkpoint = read_checkpoint(path)
    checkpoint['model']['stages.2.1.dwconv.P'] = checkpoint['model']['stages.2.1.dwconv.P'] + 0.5
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointMismatchError) as e:
        timm.create_model('convnext_tiny_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    msg = str(e.value)
    assert '\n' not in msg and 'stage 2 P: block(s) 1 differ from block 0 by up to 0.5' in msg
    assert 'dcls_shared_positions=False and dcls_kernel_count=34' in msg
    model = timm.create_model('convnext_tiny_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              dcls_shared_positions=False, **kwargs)  # what the message says
    assert not model.dcls_shared_positions

    # ResNet: a per-block file into a model explicitly kept shared
    path, _ = published_file('resnet50_dcls:per_block', tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r'^[^\n]*layer1 P: block\(s\) 1, 2 differ[^\n]*'
                                                      r'dcls_shared_positions=False[^\n]*$'):
        timm.create_model('resnet50_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          dcls_shared_positions=True, **size('resnet50_dcls'))

    # unreadable files and empty folders
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(open(path, 'rb').read()[:1000])
    with pytest.raises(CheckpointError, match=r'truncated\.pth is not a readable checkpoint \(truncated'):
        timm.create_model('resnet50_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CheckpointError, match='is a folder without a weights file'):
        timm.create_model('resnet50_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'empty')))
    (tmp_path / 'empty' / 'model.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(CheckpointError, match=r'model\.safetensors is not a readable checkpoint \(safetensors'):
        read_checkpoint(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='Checkpoint not found'):
        timm.create_model('resnet50_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'no')))


@pytest.mark.parametrize('name, small, deeper', [
    ('ccnn_4_140', dict(depth=2, width=8, hidden=8), dict(depth=3)),
    ('ccnn_4_140', dict(depth=2, width=8, hidden=8, data_dim=1, in_chans=1), dict(depth=3)),
    ('flexnet_3', dict(), dict(widths=(24, 24, 24, 24))),
])
def test_continuous_models_load_strictly_whatever_num_classes(name, small, deeper, tmp_path):
    # timm's loader goes non-strict when num_classes changes: a deeper model once kept random blocks, no error
    path = tmp_path / 'weights.pth'
    source = timm.create_model(name, **small)
    torch.save(source.state_dict(), path)
    overlay = dict(file=str(path))
    for num_classes in (10, 5):
        with pytest.raises(CheckpointMismatchError, match='missing keys: blocks'):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                              **{**small, **deeper})
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=5, **small)
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith('head.')}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    assert model.eval()(torch.randn(1, *((1, 16) if small.get('data_dim') == 1 else (3, 16, 16)))).shape == (1, 5)


def test_a_bare_name_builds_its_default_tag():
    # omega_0 is in no state dict: `ckcnn_2_30` (default tag smnist) once had 30.5, so the smnist file loaded into it
    # without error and gave other logits (SPEC 8.2: 31.09...)
    model = timm.create_model('ckcnn_2_30')
    assert model.pretrained_cfg['tag'] == 'smnist'
    assert {m.omega_0 for m in model.modules() if hasattr(m, 'omega_0')} == {31.09195739463897}
    # not the tag's training recipe: configs naming the bare model (sCIFAR10: dropout_in 0) train with their own
    assert model.drop_in.p == 0 and {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.}
    tagged = timm.create_model('ckcnn_2_30.smnist')
    assert tagged.drop_in.p == 0.1 and max(m.p for m in tagged.modules() if isinstance(m, torch.nn.Dropout)) == 0.1
    assert {m.omega_0 for m in timm.create_model('ckcnn_2_100').modules() if hasattr(m, 'omega_0')} == {30.5}
    pmnist = timm.create_model('ckcnn_2_30.pmnist')
    assert {m.omega_0 for m in pmnist.modules() if hasattr(m, 'omega_0')} == {43.45667389601194}
    given = timm.create_model('ckcnn_2_30', omega_0=20.)
    assert {m.omega_0 for m in given.modules() if hasattr(m, 'omega_0')} == {20.}
