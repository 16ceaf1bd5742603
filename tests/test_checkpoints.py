"""The one checkpoint loader (dcls_timm.checkpoint) behind train.py --initial-checkpoint, --resume and validate.py:
every layout through every path gives the same logits, and every bad file stops with one line."""
import argparse
import os
import pickle
import subprocess
import sys

import pytest
import timm
import torch

import dcls_timm  # noqa: F401
from dcls_timm.checkpoint import (
    POSITION_ATOL, SETTINGS_KEY, CheckpointError, CheckpointMismatchError, layer_settings, load_weights, pick_weights,
    read_checkpoint,
)
from dcls_timm.evaluation import build_parser as validate_parser
from dcls_timm.evaluation import load_weights as validate_load_weights
from dcls_timm.evaluation import run as validate
from dcls_timm.training import parse_args, run
from dcls_timm.training.checkpoint import AtomicCheckpointSaver, load_training_checkpoint
from dcls_timm.training.trainer import build_model
from test_train import ROOT, _argv, image_folder  # noqa: F401  (image_folder: the module-scoped fixture)
from upstream import randomize_state_, upstream_state_dict

# atto depths (2, 2, 6, 2): 2+ blocks per stage; K given, so that shared and per-block models have the same shapes
CONVNEXT_KWARGS = dict(dims=(8, 16, 24, 32), dcls_kernel_size=5, dcls_kernel_count=16)
CONVNEXT_ARGV = ['--model', 'convnext_atto_dcls', '--num-classes', '10', '--model-kwargs', 'dims=(8,16,24,32)',
                 'dcls_kernel_size=5', 'dcls_kernel_count=16']
RESNET_KWARGS = dict(channels=(8, 16, 32, 64), stem_width=8)  # resnet26: 2 blocks per stage
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def convnext(shared=True, seed=None):
    return _model('convnext_atto_dcls', seed, dcls_shared_positions=shared, **CONVNEXT_KWARGS)


def resnet(shared=True, seed=None):
    return _model('resnet26_dcls', seed, dcls_shared_positions=shared, **RESNET_KWARGS)


def _model(name, seed, **kwargs):
    """A tiny model in eval mode; with a seed, every tensor random (no zero-init residuals, layer scale 1e-6...),
    so that every weight and every position shows in the logits."""
    model = timm.create_model(name, **{'num_classes': 10, **kwargs}).eval()
    if seed is not None:
        randomize_state_(model, seed, 0.3)
    return model


def logits(model):
    with torch.no_grad():
        return model(X)


def per_block_resnet(model):
    """ResNet-50-dcls' upstream layout: ``layerN.b.conv2.P`` in every block (a stage's shared P repeated)."""
    sd = {}
    for k, v in model.state_dict().items():
        if '.positions.' in k:
            layer = k.split('.')[0]
            for b in range(len(getattr(model, layer))):
                sd[f'{layer}.{b}.conv2.{k.rsplit(".", 1)[1]}'] = v.clone()
        else:
            sd[k] = v
    return sd


def facebook_unshared(model):
    """The upstream ConvNeXt-dcls layout of a model without sharing: each block its own ``dwconv.P``."""
    own = model.state_dict()
    shared = convnext()  # the same weights with block 0's positions per stage, for upstream_state_dict's renaming
    shared.load_state_dict({**{k: v for k, v in own.items() if not k.endswith('conv_dw.P')},
                            **{f'stages.{i}.positions.P': own[f'stages.{i}.blocks.0.conv_dw.P'] for i in range(4)}})
    sd = upstream_state_dict(shared)
    for k in sd['model']:
        parts = k.split('.')
        if parts[0] == 'stages' and parts[3:] == ['dwconv', 'P']:
            sd['model'][k] = own[f'stages.{parts[1]}.blocks.{parts[2]}.conv_dw.P']
    return sd


def upstream_extras(weights):
    """What the upstream training scripts store next to the weights, an argparse.Namespace included."""
    return dict(weights, epoch=299, optimizer={'state': {}, 'param_groups': [{'lr': 4e-6, 'params': [0, 1]}]},
                scaler={'scale': 65536.0}, args=argparse.Namespace(model='convnext_dcls_tiny', lr=4e-3, drop_path=0.1,
                                                                    input_size=224, dcls_sync=False, data_set='IMNET'))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Every layout on disk, and the model each must reproduce."""
    root = tmp_path_factory.mktemp('ckpt')
    src, ema = convnext(seed=1), convnext(seed=2)
    unshared = convnext(shared=False, seed=3)
    res, res_unshared = resnet(seed=4), resnet(shared=False, seed=5)
    train = {'epoch': 3, 'version': 2, 'arch': 'convnext_atto_dcls', 'state_dict': src.state_dict(),
             'optimizer': {'state': {}, 'param_groups': []}, 'args': {'opt': 'adamw'}}
    layouts = {
        'train_ema': ({**train, 'state_dict_ema': ema.state_dict()}, src, ema),
        'train_no_ema': (train, src, src),
        # timm's CheckpointSaver, DDP-wrapped: an argparse.Namespace and module. prefixes
        'timm_saver': ({'epoch': 3, 'arch': 'x', 'args': argparse.Namespace(opt='adamw', lr=0.1),
                        'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()},
                        'state_dict_ema': ema.state_dict()}, src, ema),
        'plain': (src.state_dict(), src, src),
        'facebook': (upstream_extras(upstream_state_dict(src)), src, src),
        'facebook_unshared': (upstream_extras(facebook_unshared(unshared)), unshared, unshared),
        'resnet_upstream': ({'state_dict': per_block_resnet(res), 'state_dict_ema': per_block_resnet(res),
                             'epoch': 99, 'args': argparse.Namespace(model='resnet50', dcls_sync=True)}, res, res),
        'resnet_upstream_per_block': ({'state_dict': res_unshared.state_dict(),
                                       'state_dict_ema': res_unshared.state_dict(), 'epoch': 99,
                                       'args': argparse.Namespace(model='resnet50', dcls_sync=False)},
                                      res_unshared, res_unshared),
    }
    out = {}
    for name, (content, ref, ref_ema) in layouts.items():
        torch.save(content, root / f'{name}.pth')
        out[name] = (str(root / f'{name}.pth'), logits(ref), logits(ref_ema))
    return out


# which model each file loads into, and whether it is shared / per block
TARGETS = {
    'train_ema': ('convnext', True), 'train_no_ema': ('convnext', True), 'timm_saver': ('convnext', True),
    'plain': ('convnext', True), 'facebook': ('convnext', True), 'facebook_unshared': ('convnext', False),
    'resnet_upstream': ('resnet', True), 'resnet_upstream_per_block': ('resnet', False),
}


def _fresh(name):
    arch, shared = TARGETS[name]
    return (convnext if arch == 'convnext' else resnet)(shared=shared)


@pytest.mark.parametrize('name', sorted(TARGETS))
def test_every_layout_loads_through_the_api_and_validate(files, name):
    assert validate_load_weights is load_weights  # validate.py's --checkpoint
    path, ref, ref_ema = files[name]
    fresh = _fresh(name)
    assert not torch.allclose(logits(fresh), ref)  # the comparison below can tell the weights apart
    info = load_weights(fresh, path)
    torch.testing.assert_close(logits(fresh), ref, rtol=0, atol=0)
    assert info['ema'] is False and info['path'] == path
    has_ema = name in ('train_ema', 'timm_saver', 'resnet_upstream', 'resnet_upstream_per_block')
    if has_ema:  # validate.py --use-ema
        model = _fresh(name)
        assert load_weights(model, path, use_ema=True)['ema'] is True
        torch.testing.assert_close(logits(model), ref_ema, rtol=0, atol=0)
    else:
        with pytest.raises(CheckpointMismatchError, match='has no EMA weights'):
            load_weights(_fresh(name), path, use_ema=True)


@pytest.mark.parametrize('name', ['train_ema', 'train_no_ema', 'plain', 'facebook', 'facebook_unshared',
                                  'resnet_upstream', 'resnet_upstream_per_block'])
def test_initial_checkpoint_loads_every_layout(files, name):
    """train.py --initial-checkpoint: the EMA weights when the file has them (as timm's checkpoint_path did)."""
    path, ref, ref_ema = files[name]
    arch, shared = TARGETS[name]
    argv = CONVNEXT_ARGV if arch == 'convnext' else [
        '--model', 'resnet26_dcls', '--num-classes', '10', '--model-kwargs', 'channels=(8,16,32,64)', 'stem_width=8']
    if not shared:
        argv = argv + ['dcls_shared_positions=False']
    model = build_model(parse_args(argv + ['--initial-checkpoint', path])).eval()
    torch.testing.assert_close(logits(model), ref_ema, rtol=0, atol=0)


def test_shared_positions_from_the_other_layout(files, tmp_path):
    """Our per-stage positions copy into every block of a model without sharing, and back when they agree."""
    path, ref, _ = files['plain']
    model = convnext(shared=False)
    load_weights(model, path)
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)
    torch.save(model.state_dict(), tmp_path / 'per_block_equal.pth')
    back = convnext()
    load_weights(back, str(tmp_path / 'per_block_equal.pth'))
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)


def _perturbed(files, tmp_path, name, keys, delta):
    """A copy of a layout file with ``delta`` added to the (entry, key) tensors."""
    checkpoint = read_checkpoint(files[name][0])
    for entry, key in keys:
        checkpoint[entry][key] = checkpoint[entry][key] + delta
    path = tmp_path / f'{name}_{delta:g}.pth'
    torch.save(checkpoint, path)
    return str(path)


def test_different_per_block_positions_need_an_unshared_model(files, tmp_path):
    # ConvNeXt: blocks 3 and 5 of stage 2 moved
    bad = _perturbed(files, tmp_path, 'facebook', [('model', 'stages.2.3.dwconv.P'), ('model', 'stages.2.5.dwconv.P')],
                     0.5)
    for load in [lambda: load_weights(convnext(), bad),
                 lambda: build_model(parse_args(CONVNEXT_ARGV + ['--initial-checkpoint', bad]))]:
        with pytest.raises(CheckpointMismatchError) as e:
            load()
        msg = str(e.value)
        assert '\n' not in msg and msg.startswith(f'{bad} does not fit ConvNeXtDcls: ')
        assert 'stage 2 P: block(s) 3, 5 differ from block 0 by up to 0.5' in msg
        assert msg.endswith('create it with dcls_shared_positions=False and dcls_kernel_count=16 (--model-kwargs '
                            'dcls_shared_positions=False dcls_kernel_count=16) to load one per block')
    model = convnext(shared=False)  # what the message says to do
    load_weights(model, bad)
    sd = model.state_dict()
    assert torch.equal(sd['stages.2.blocks.3.conv_dw.P'], sd['stages.2.blocks.0.conv_dw.P'] + 0.5)
    # ResNet (upstream ResNet-50-dcls may hold a different P per block): the EMA weights, layer 3
    bad = _perturbed(files, tmp_path, 'resnet_upstream', [('state_dict_ema', 'layer3.1.conv2.P')], -0.25)
    with pytest.raises(CheckpointMismatchError, match=r'layer3 P: block\(s\) 1 differ from block 0 by up to 0.25.*'
                                                      r'dcls_shared_positions=False'):
        load_weights(resnet(), bad, use_ema=True)
    load_weights(resnet(), bad)  # its non-EMA weights still agree
    path, ref, _ = files['resnet_upstream_per_block']
    with pytest.raises(CheckpointMismatchError, match='layer1 P: block'):
        load_weights(resnet(), path)


def test_position_copies_agree_within_the_tolerance(files, tmp_path):
    near = _perturbed(files, tmp_path, 'facebook', [('model', 'stages.1.1.dwconv.P')], POSITION_ATOL / 4)
    model = convnext()
    load_weights(model, near)
    torch.testing.assert_close(logits(model), files['facebook'][1], rtol=0, atol=0)  # block 0's copy is loaded
    far = _perturbed(files, tmp_path, 'facebook', [('model', 'stages.1.1.dwconv.P')], POSITION_ATOL * 4)
    with pytest.raises(CheckpointMismatchError, match='stage 1 P'):
        load_weights(convnext(), far)


def test_validate_run_gives_the_same_results_for_every_layout(files, image_folder):  # noqa: F811
    results = {}
    for name in ['train_no_ema', 'plain', 'facebook']:
        args = validate_parser().parse_args(CONVNEXT_ARGV + [
            '--device', 'cpu', '--workers', '0', '--img-size', '32', '--checkpoint', files[name][0], '--suite',
            'dataset', '--dataset', '', '--split', 'val', '--dataset-dir', str(image_folder)])
        suite = validate(args)['suites']['dataset']
        results[name] = {k: v for k, v in suite.items() if k not in ('images_per_sec', 'seconds')}  # timing
    assert results['train_no_ema']['images'] == 12
    assert results['plain'] == results['train_no_ema'] == results['facebook']


def _bad_files(root, files):
    real = open(files['train_ema'][0], 'rb').read()
    (root / 'truncated.pth').write_bytes(real[:len(real) // 2])
    (root / 'random.pth').write_bytes(os.urandom(4096))
    (root / 'text.pth').write_text('epoch: 3\nstate_dict: none\n')
    (root / 'empty.pth').write_bytes(b'')
    with open(root / 'list.pkl', 'wb') as f:
        pickle.dump([1, 2, 3], f)
    torch.save([torch.zeros(1)], root / 'list.pth')
    torch.save(convnext(), root / 'module.pth')  # a whole pickled model: needs unsafe unpickling
    return {
        'truncated.pth': 'truncated or corrupt', 'random.pth': 'not a torch checkpoint',
        'text.pth': 'not a torch checkpoint', 'empty.pth': 'empty or truncated file',
        'list.pkl': 'not a torch checkpoint', 'list.pth': 'it holds a list, not a dict of weights',
        'module.pth': 'it pickles dcls_timm.models.convnext_dcls.ConvNeXtDcls, which weights-only loading refuses',
    }


def test_unreadable_files_give_one_line_in_every_path(files, tmp_path):
    bad = _bad_files(tmp_path, files)
    for name, reason in bad.items():
        path = str(tmp_path / name)
        for load in [lambda: load_weights(convnext(), path),
                     lambda: build_model(parse_args(CONVNEXT_ARGV + ['--initial-checkpoint', path])),
                     lambda: load_training_checkpoint(path)]:
            with pytest.raises(CheckpointError) as e:
                load()
            msg = str(e.value)
            assert msg.startswith(f'{path} is not a readable checkpoint (') and reason in msg, msg
            assert '\n' not in msg and len(msg) < 300 + len(path), msg
    missing = str(tmp_path / 'missing.pth')
    for load in [lambda: load_weights(convnext(), missing), lambda: load_training_checkpoint(missing)]:
        with pytest.raises(FileNotFoundError, match=f'^Checkpoint not found: {missing}$'):
            load()


def test_mismatches_and_non_training_checkpoints(files, tmp_path):
    with pytest.raises(CheckpointMismatchError, match=r'shape mismatches: head.fc.bias \(10,\) vs \(3,\), '
                                                      r'head.fc.weight \(10, 32\) vs \(3, 32\); only the classifier '
                                                      r'differs: create the model with num_classes=10'):
        load_weights(timm.create_model('convnext_atto_dcls', num_classes=3, **CONVNEXT_KWARGS), files['plain'][0])
    with pytest.raises(CheckpointMismatchError, match='missing keys: .*unexpected keys: '):
        load_weights(resnet(), files['plain'][0])
    torch.save({'epoch': 1, 'notes': 'x'}, tmp_path / 'no_weights.pth')
    with pytest.raises(CheckpointMismatchError, match=r'holds no weights: .*\(entries: epoch, notes\)'):
        load_weights(convnext(), str(tmp_path / 'no_weights.pth'))
    for name in ['plain', 'facebook']:  # weights, but no training state to resume
        with pytest.raises(CheckpointError, match='is not a training checkpoint .* use --initial-checkpoint'):
            load_training_checkpoint(files[name][0])


def test_resume_reads_timm_saver_files_with_namespace_args(files):
    checkpoint = load_training_checkpoint(files['timm_saver'][0])
    assert isinstance(checkpoint['args'], argparse.Namespace) and checkpoint['args'].opt == 'adamw'
    entry, sd = pick_weights(checkpoint, files['timm_saver'][0])
    assert entry == 'state_dict' and not any(k.startswith('module.') for k in sd)
    assert read_checkpoint(files['facebook'][0])['args'].model == 'convnext_dcls_tiny'


def test_resume_loads_through_the_same_checks(image_folder, tmp_path):  # noqa: F811
    """A train.py checkpoint of a 10-class model resumed into a 3-class run: one clear error, before training."""
    model = timm.create_model('convnext_atto_dcls', depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), dcls_kernel_size=5,
                              num_classes=10)
    torch.save({'epoch': 0, 'state_dict': model.state_dict(), 'optimizer': {}, 'args': {'opt': 'adamw'}},
               tmp_path / 'ten.pth')
    with pytest.raises(CheckpointMismatchError, match='only the classifier differs.*num_classes=10'):
        run(parse_args(_argv(image_folder, tmp_path, '--resume', str(tmp_path / 'ten.pth'))))


def test_layer_settings_outside_the_state_dict_are_recorded_and_checked(image_folder, tmp_path):  # noqa: F811
    # a D=5 run's weights fit a D=7 (or v1) model's shapes exactly and gave other outputs without any error: train.py
    # checkpoints record the settings, and every loading path checks them
    run(parse_args(_argv(image_folder, tmp_path, '--epochs', '1', '--warmup-epochs', '0', '--no-tensorboard')))
    last = str(tmp_path / 'run' / 'last.pth.tar')
    recorded = read_checkpoint(last)[SETTINGS_KEY]
    assert recorded['stages.0.blocks.0.conv_dw'] == {'dilated_kernel_size': [5, 5], 'version': 'v0'}
    tiny = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=3)
    for other in (dict(dcls_kernel_size=7), dict(dcls_kernel_size=5, dcls_version='v1')):
        model = timm.create_model('convnext_atto_dcls', **tiny, **other)
        with pytest.raises(CheckpointMismatchError, match=r'trained with other layer settings.*stages\.0\.blocks\.0'
                                                          r'\.conv_dw\.(dilated_kernel_size \[5, 5\] vs \[7, 7\]|'
                                                          r"version v0 vs v1).*--model-kwargs .*dcls_kernel_size=5"):
            load_weights(model, last)
        with pytest.raises(CheckpointMismatchError, match='trained with other layer settings'):
            timm.create_model('convnext_atto_dcls', pretrained=True, pretrained_cfg_overlay=dict(file=last),
                              **tiny, **other)
    with pytest.raises(CheckpointMismatchError, match='trained with other layer settings'):
        run(parse_args(_argv(image_folder, tmp_path / 'resumed', '--resume', last, '--model-kwargs',
                             'depths=(1,1,1,1)', 'dims=(8,16,16,16)', 'dcls_kernel_size=7')))
    model = timm.create_model('convnext_atto_dcls', dcls_kernel_size=5, **tiny)
    load_weights(model, last)  # as trained: loads
    assert layer_settings(model) == recorded
    # every family records what its state dict does not show
    assert {'omega_0': 31.09195739463897} in layer_settings(timm.create_model('ckcnn_2_30')).values()
    ccnn = layer_settings(timm.create_model('ccnn_4_140', depth=1, width=8, hidden=8))
    assert ccnn['stem.0.depthwise'] == {'train_kernel_size': 33, 'kernel_size': 33, 'causal': False}


def test_train_starts_from_an_upstream_layout_file(image_folder, tmp_path):  # noqa: F811
    """train.py with an upstream-layout --initial-checkpoint, learning rate 0: the run's weights are the file's."""
    src = _model('convnext_atto_dcls', 7, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), dcls_kernel_size=5,
                 num_classes=3)
    torch.save(upstream_extras(upstream_state_dict(src)), tmp_path / 'fb.pth')
    result = run(parse_args(_argv(image_folder, tmp_path, '--initial-checkpoint', str(tmp_path / 'fb.pth'),
                                  '--epochs', '1', '--warmup-epochs', '0', '--lr', '0', '--model-ema-decay', '0',
                                  '--mixup', '0')))
    last = read_checkpoint(os.path.join(result['output_dir'], 'last.pth.tar'))
    for key in ['state_dict', 'state_dict_ema']:
        model = timm.create_model('convnext_atto_dcls', depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                  dcls_kernel_size=5, num_classes=3).eval()
        model.load_state_dict(last[key])
        torch.testing.assert_close(logits(model), logits(src))


def test_scripts_print_one_line(files, image_folder, tmp_path):  # noqa: F811
    bad = _bad_files(tmp_path, files)
    trunc = str(tmp_path / 'truncated.pth')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cases = [
        ([str(ROOT / 'validate.py'), '--model', 'convnext_atto_dcls', '--model-kwargs', 'dims=(8,16,24,32)',
          'dcls_kernel_size=5', '--num-classes', '10', '--data-dir', str(tmp_path), '--checkpoint', trunc],
         f'validate.py: error: {trunc} is not a readable checkpoint ({bad["truncated.pth"]}'),
        ([str(ROOT / 'train.py'), *_argv(image_folder, tmp_path, '--initial-checkpoint', trunc)],
         f'train.py: error: {trunc} is not a readable checkpoint ({bad["truncated.pth"]}'),
        ([str(ROOT / 'train.py'), *_argv(image_folder, tmp_path, '--resume', files['facebook'][0])],
         f'train.py: error: {files["facebook"][0]} is not a training checkpoint'),
    ]
    for cmd, expected in cases:
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr and expected in proc.stderr, proc.stderr[-2000:]
        assert len([line for line in proc.stderr.splitlines() if 'error:' in line]) == 1


def test_saver_files_load_in_every_path(image_folder, tmp_path):  # noqa: F811
    """A file written by train.py's own saver loads as --initial-checkpoint and in validate.py."""
    model, ema = convnext(seed=11), convnext(seed=12)
    saver = AtomicCheckpointSaver(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  args=argparse.Namespace(model='convnext_atto_dcls', opt='sgd'), model_ema=ema,
                                  checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0)
    path = str(tmp_path / 'last.pth.tar')
    assert load_training_checkpoint(path)['epoch'] == 0
    fresh = convnext()
    load_weights(fresh, path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    initial = build_model(parse_args(CONVNEXT_ARGV + ['--initial-checkpoint', path])).eval()
    torch.testing.assert_close(logits(initial), logits(ema), rtol=0, atol=0)
