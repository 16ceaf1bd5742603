"""validate.py: ImageNet-C bookkeeping, class masks, label mapping, every suite end to end, distributed exactness,
checkpoint formats, and the ImageNet-C-style generator."""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dcls_timm  # noqa: F401
from dcls_timm.errors import ConfigError
from dcls_timm.evaluation import (
    ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, CORRUPTIONS, EXTRA_CORRUPTIONS, CheckpointMismatchError, WnidImageFolder,
    build_parser, corruption_summary, imagenet_wnids, load_weights, run, subset_classes,
)
from dcls_timm.evaluation.classes import imagenet_wnid_to_index
from dcls_timm.evaluation.report import csv_rows, format_table
from upstream import upstream_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY_KWARGS = ['depths=(1,1,1,1)', 'dims=(8,16,16,16)', 'dcls_kernel_size=5']
A_WNIDS, A_IDX = subset_classes('imagenet-a')
R_WNIDS, R_IDX = subset_classes('imagenet-r')
WNIDS = imagenet_wnids()


def test_alexnet_errors_give_mce_100():
    errors = {c: {s: ALEXNET_ERRORS[c] for s in range(1, 6)} for c in CORRUPTIONS}
    summary = corruption_summary(errors, clean_error=ALEXNET_CLEAN_ERROR)
    assert summary['complete'] and summary['mce'] == pytest.approx(100)
    assert summary['relative_mce'] == pytest.approx(100)
    assert all(v == pytest.approx(100) for v in summary['ce'].values())


def test_mce_bookkeeping_by_hand():
    errors = {c: {s: 0.1 * s for s in range(1, 6)} for c in CORRUPTIONS}  # mean 0.3 everywhere
    errors['speckle_noise'] = {1: 0.5}
    summary = corruption_summary(errors, clean_error=0.2)
    expected = np.mean([100 * 0.3 / ALEXNET_ERRORS[c] for c in CORRUPTIONS])
    assert summary['mce'] == pytest.approx(expected)
    rel = np.mean([100 * (0.3 - 0.2) / (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR) for c in CORRUPTIONS])
    assert summary['relative_mce'] == pytest.approx(rel)
    assert summary['unnormalized_mean_error'] == pytest.approx(0.3)
    assert summary['group_mean_error'] == pytest.approx({'noise': 0.3, 'blur': 0.3, 'weather': 0.3, 'digital': 0.3})
    assert summary['extra_mean_error'] == {'speckle_noise': 0.5} and 'speckle_noise' not in summary['ce']
    del errors['fog'][5]
    partial = corruption_summary(errors)
    assert not partial['complete'] and 'mce' not in partial and 'fog' not in partial['ce']
    assert sorted(partial['group_mean_error']) == ['blur', 'digital', 'noise']  # weather lacks fog's severity 5


def _c_results(errors):
    entry = {'errors': errors, 'label': 'ImageNet-C', 'preprocessing': '', 'images': 1, **corruption_summary(errors)}
    return {'model': 'm', 'param_count': 1, 'img_size': 224, 'crop_pct': 0.875, 'interpolation': 'bicubic',
            'checkpoint': '', 'ema': False, 'suites': {'imagenet-c': entry}}


def test_imagenet_c_accuracy_leaves_the_extra_corruptions_apart():
    # the 15 mCE corruptions at 20 % error, the 4 extras at 90 %: the ImageNet-C row is the 15's, the extras get a
    # row of their own (they once were averaged in: 34.7 % error, no error raised)
    errors = {c: {s: 0.2 for s in range(1, 6)} for c in CORRUPTIONS}
    errors.update({c: {s: 0.9 for s in range(1, 6)} for c in EXTRA_CORRUPTIONS})
    main, extra = csv_rows(_c_results(errors))
    assert (main['suite'], main['top1_err'], main['top1']) == ('imagenet-c', 20.0, 80.0)
    assert main['mce'] == round(100 * np.mean([0.2 / ALEXNET_ERRORS[c] for c in CORRUPTIONS]), 3)
    assert (extra['suite'], extra['top1_err'], extra['mce']) == ('imagenet-c:extra', 90.0, '')
    assert 'imagenet-c:extra' in format_table(_c_results(errors))
    # a partial run: each evaluated cell of the 15 weighs alike; no extras, no extra row
    partial = {'fog': {1: 0.1, 2: 0.3}, 'snow': {5: 0.5}}
    row, = csv_rows(_c_results(partial))
    assert row['top1_err'] == 30.0 and row['mce'] == ''
    # only extras evaluated: no ImageNet-C accuracy, theirs in their row
    main, extra = csv_rows(_c_results({'saturate': {1: 0.4}}))
    assert 'top1' not in main and extra['top1_err'] == 40.0


def test_subset_masks():
    for wnids, idx in [(A_WNIDS, A_IDX), (R_WNIDS, R_IDX)]:
        assert len(wnids) == len(idx) == 200
        assert list(idx) == sorted(set(idx))
        assert [WNIDS[i] for i in idx] == list(wnids)
    assert A_IDX != R_IDX


def _image(path: Path, seed: int, size: int = 40):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_label_mapping_never_shifts(tmp_path):
    # classes 0 and 2 present, 1 missing, plus a folder that is not a class
    for wnid, n in [(WNIDS[0], 2), (WNIDS[2], 3), ('not_a_wnid', 1)]:
        for i in range(n):
            _image(tmp_path / wnid / f'{i}.png', i)
    ds = WnidImageFolder(str(tmp_path), imagenet_wnid_to_index())
    assert sorted({t for _, t in ds.samples}) == [0, 2]
    assert [t for _, t in ds.samples] == [0, 0, 2, 2, 2]
    assert ds.ignored_folders == ['not_a_wnid']
    assert ds.describe()['classes'] == 2 and ds.describe()['images'] == 5
    with pytest.raises(FileNotFoundError, match='No images of known classes'):
        WnidImageFolder(str(tmp_path / 'not_a_wnid'), imagenet_wnid_to_index())


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """Tiny trees for every suite; ImageNet-C-style made by the generator (all 19 corruptions, 5 severities)."""
    root = tmp_path_factory.mktemp('data')
    val_classes = [WNIDS[0], A_WNIDS[0], R_WNIDS[1], A_WNIDS[3]]
    seed = 0
    for wnid in val_classes:
        for i in range(2):
            _image(root / 'imagenet' / 'val' / wnid / f'{i}.JPEG', seed := seed + 1)
    _image(root / 'imagenet' / 'val' / WNIDS[5] / 'x.JPEG', 99)  # 9 images: uneven across 2 ranks
    for name, wnids in [('imagenet-a', A_WNIDS[:2]), ('imagenet-r', R_WNIDS[:3]), ('sketch', WNIDS[10:12]),
                        ('stylized', WNIDS[20:22])]:
        for wnid in wnids:
            _image(root / name / wnid / '0.png', seed := seed + 1)
    src = root / 'c_source'
    for wnid in WNIDS[:2]:
        _image(src / wnid / '0.JPEG', seed := seed + 1, size=48)
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'make_imagenet_c.py'), '--src', str(src), '--out',
                           str(root / 'imagenet-c'), '--resize', '36', '--crop', '32', '--workers', '2',
                           '--no-progress'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'wrote 190 files' in proc.stdout
    return root


def _args(data_root, out, *extra):
    return build_parser().parse_args([
        '--model', 'convnext_atto_dcls', '--model-kwargs', *TINY_KWARGS, '--data-dir', str(data_root),
        '--img-size', '32', '-b', '4', '--workers', '0', '--device', 'cpu', '--results-file', str(out), *extra])


def test_every_suite_end_to_end(data_root, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / 'results.json'
    results = run(_args(data_root, out, '--suite', 'imagenet-c,imagenet,imagenet-a,imagenet-r,sketch,stylized'))
    suites = results['suites']
    assert list(suites) == ['imagenet', 'imagenet-c', 'imagenet-a', 'imagenet-r', 'sketch', 'stylized']
    assert suites['imagenet']['images'] == 9 and suites['imagenet']['classes'] == 5
    val = [WNIDS[0], A_WNIDS[0], R_WNIDS[1], A_WNIDS[3]]  # 2 images each (+ one class outside A and R)
    for name, wnids in [('imagenet-a', A_WNIDS), ('imagenet-r', R_WNIDS)]:
        expected = 2 * sum(w in wnids for w in val)
        assert expected >= 2 and suites['imagenet'][f'{name}-classes']['images'] == expected
    assert suites['imagenet-a']['classes'] == 2 and suites['imagenet-r']['images'] == 3
    assert suites['sketch']['images'] == 2 and suites['stylized']['classes'] == 2
    c = suites['imagenet-c']
    assert c['label'] == 'ImageNet-C-style (generated)' and c['complete'] and c['images'] == 190
    assert 'mce' in c and 'relative_mce' in c and len(c['extra_mean_error']) == 4
    assert c['preprocessing'].startswith('timm eval transform')
    saved = json.loads(out.read_text())
    assert saved['suites']['imagenet']['top1'] == suites['imagenet']['top1']
    for key in ['model', 'param_count', 'img_size', 'crop_pct', 'interpolation', 'checkpoint']:
        assert key in saved
    png = tmp_path / 'results_imagenet_c.png'
    assert png.is_file() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    csv_out = tmp_path / 'results.csv'
    run(_args(data_root, csv_out, '--suite', 'imagenet,imagenet-a', '--results-format', 'csv'))
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith('model,suite,top1,top1_err,top5,top5_err')
    assert [line.split(',')[1] for line in lines[1:]] == [
        'imagenet', 'imagenet:imagenet-a-classes', 'imagenet:imagenet-r-classes', 'imagenet-a']


def test_as_is_preprocessing_and_errors(data_root, tmp_path):
    results = run(_args(data_root, tmp_path / 'r.json', '--suite', 'imagenet-c', '--c-preprocess', 'as-is'))
    assert results['suites']['imagenet-c']['preprocessing'] == 'as stored (no resize or crop)'
    assert 'relative_mce' not in results['suites']['imagenet-c']  # no clean error without the imagenet suite
    with pytest.raises(ConfigError, match='Unknown suite'):
        run(_args(data_root, tmp_path / 'r.json', '--suite', 'imagenet-x'))
    # a class map replaces the ImageNet order (sketch folders -> indices 0 and 1 here)
    cmap = tmp_path / 'map.txt'
    cmap.write_text('\n'.join(WNIDS[10:12]) + '\n')
    mapped = run(_args(data_root, tmp_path / 'm.json', '--suite', 'sketch', '--class-map', str(cmap),
                       '--num-classes', '2'))
    assert mapped['suites']['sketch']['images'] == 2 and mapped['suites']['sketch']['classes'] == 2
    with pytest.raises(ConfigError, match='standard ImageNet-1k order'):
        run(_args(data_root, tmp_path / 'r.json', '--suite', 'imagenet-a', '--class-map', str(cmap)))
    with pytest.raises(ConfigError, match='sketch: Dataset folder not found'):
        run(_args(data_root, tmp_path / 'r.json', '--suite', 'sketch', '--sketch-dir', str(tmp_path / 'none')))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_distributed_equals_single_process(data_root, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('convnext_atto_dcls', depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), dcls_kernel_size=5)
    ckpt = tmp_path / 'w.pth'
    torch.save(model.state_dict(), ckpt)
    single = run(_args(data_root, tmp_path / 'single.json', '--suite', 'imagenet,imagenet-a',
                       '--checkpoint', str(ckpt)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1',
           f'--master_port={_free_port()}', str(ROOT / 'validate.py'), '--model', 'convnext_atto_dcls',
           '--model-kwargs', *TINY_KWARGS, '--data-dir', str(data_root), '--img-size', '32', '-b', '2',
           '--workers', '0', '--device', 'cpu', '--suite', 'imagenet,imagenet-a', '--checkpoint', str(ckpt),
           '--results-file', str(tmp_path / 'dist.json')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads((tmp_path / 'dist.json').read_text())
    for suite in ['imagenet', 'imagenet-a']:
        for key in ['top1', 'top5', 'images']:
            assert dist['suites'][suite][key] == single['suites'][suite][key]
        assert dist['suites'][suite]['loss'] == pytest.approx(single['suites'][suite]['loss'], rel=1e-6)


def test_checkpoint_formats(tmp_path):
    def tiny():
        return timm.create_model('convnext_atto_dcls', depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                 dcls_kernel_size=5).eval()
    x = torch.randn(1, 3, 32, 32)
    src, ema = tiny(), tiny()
    # a train.py checkpoint: model and EMA weights
    torch.save({'epoch': 3, 'state_dict': src.state_dict(), 'state_dict_ema': ema.state_dict()}, tmp_path / 't.pth')
    for use_ema, ref in [(False, src), (True, ema)]:
        model = tiny()
        info = load_weights(model, str(tmp_path / 't.pth'), use_ema=use_ema)
        assert info['epoch'] == 3
        torch.testing.assert_close(model(x), ref(x))
    # a plain state dict, and the upstream (Facebook ConvNeXt-dcls) layout
    torch.save(src.state_dict(), tmp_path / 'plain.pth')
    torch.save(upstream_state_dict(src), tmp_path / 'upstream.pth')
    for name in ['plain.pth', 'upstream.pth']:
        model = tiny()
        load_weights(model, str(tmp_path / name))
        torch.testing.assert_close(model(x), src(x))
    with pytest.raises(CheckpointMismatchError, match='no EMA weights'):
        load_weights(tiny(), str(tmp_path / 'plain.pth'), use_ema=True)
    sd = src.state_dict()
    sd['extra.weight'] = torch.zeros(1)
    del sd['head.fc.bias']
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointMismatchError, match='missing keys: head.fc.bias; unexpected keys: extra.weight'):
        load_weights(tiny(), str(tmp_path / 'bad.pth'))
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        load_weights(timm.create_model('convnext_atto_dcls', depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                       dcls_kernel_size=5, num_classes=10), str(tmp_path / 'plain.pth'))


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob('*.JPEG')):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic_and_resumable(tmp_path):
    src = tmp_path / 'src'
    for i, wnid in enumerate(WNIDS[:2]):
        _image(src / wnid / f'{i}.png', i, size=50)
    script = [sys.executable, str(ROOT / 'scripts' / 'make_imagenet_c.py'), '--src', str(src), '--resize', '40',
              '--crop', '32', '--corruptions', 'glass_blur', 'fog', 'frost', 'spatter', 'impulse_noise',
              '--severities', '1', '5', '--no-progress']
    one = subprocess.run(script + ['--out', str(tmp_path / 'a'), '--workers', '1'], capture_output=True, text=True)
    two = subprocess.run(script + ['--out', str(tmp_path / 'b'), '--workers', '2'], capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert 'wrote 20 files' in one.stdout
    # same bytes whatever the workers (impulse_noise once drew from scikit-image's unseeded generator)
    assert _tree_hash(tmp_path / 'a') == _tree_hash(tmp_path / 'b')
    img = Image.open(next((tmp_path / 'a' / 'fog' / '5').rglob('*.JPEG')))
    assert img.size == (32, 32) and img.format == 'JPEG'
    marker = json.loads((tmp_path / 'a' / 'GENERATED_BY_DCLS_TIMM.json').read_text())
    assert marker['label'] == 'ImageNet-C-style'
    (next((tmp_path / 'a' / 'frost' / '1').rglob('*.JPEG'))).unlink()  # as if interrupted
    again = subprocess.run(script + ['--out', str(tmp_path / 'a')], capture_output=True, text=True)
    assert 'wrote 1 files, skipped 19' in again.stdout
    assert _tree_hash(tmp_path / 'a') == _tree_hash(tmp_path / 'b')
    bad = subprocess.run(script[:-1] + ['--out', str(tmp_path / 'c'), '--corruptions', 'rain'],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and 'unknown corruption' in bad.stderr
    _image(src / WNIDS[0] / '0.JPEG', 7, size=50)  # 0.png's twin: both would be written as 0.JPEG
    twins = subprocess.run(script + ['--out', str(tmp_path / 'd')], capture_output=True, text=True)
    assert twins.returncode == 2 and '0.JPEG, 0.png share a name but for the extension' in twins.stderr


def test_generator_geometry_is_torchvisions(tmp_path):
    # the official set: Resize(256) then CenterCrop(224); rounding both ways once moved or rescaled most sizes
    import importlib.util
    from torchvision import transforms
    spec = importlib.util.spec_from_file_location('make_imagenet_c', ROOT / 'scripts' / 'make_imagenet_c.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop(224)])
    rng = np.random.default_rng(0)
    for size in [(500, 334), (500, 332), (353, 500), (500, 375), (257, 300)]:
        path = tmp_path / f'{size[0]}x{size[1]}.png'
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        ours = np.asarray(module._prepare(str(path), 256, 224))
        theirs = np.asarray(reference(Image.open(path).convert('RGB')))
        assert ours.shape == (224, 224, 3) and np.array_equal(ours, theirs), size


def test_cli_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'validate.py'), '--model', 'convnext_atto_dcls', '--checkpoint',
                           str(tmp_path / 'missing.pth'), '--data-dir', str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'validate.py: error: Checkpoint not found' in proc.stderr
