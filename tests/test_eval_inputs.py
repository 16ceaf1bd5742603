"""validate.py's input size (the pretrained cfg's test size unless --use-train-size, recorded in the results) and
one-line errors for unreadable images in validate.py and train.py (with and without DataLoader workers)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import dcls_timm  # noqa: F401
from dcls_timm.errors import UnreadableImageError
from dcls_timm.evaluation import build_parser, run
from dcls_timm.evaluation import runner as runner_module
from dcls_timm.evaluation.datasets import CheckedImageDataset, read_image
from dcls_timm.evaluation.runner import resolve_eval_data_config
from test_train import _argv as train_argv
from test_train import image_folder  # noqa: F401  (fixture)
from test_validate import ROOT, TINY_KWARGS, WNIDS, _image

# a tiny ConvNeXt-dcls whose pretrained cfg has a train size (32) and a different test size and crop (48, 1.0)
OVERLAY = "pretrained_cfg_overlay={'input_size':(3,32,32),'test_input_size':(3,48,48),'test_crop_pct':1.0}"
MODEL = ['--model', 'convnext_atto_dcls', '--model-kwargs', *TINY_KWARGS, OVERLAY]


def _parse(*extra):
    return build_parser().parse_args([*MODEL, '-b', '4', '--workers', '0', '--device', 'cpu', *extra])


def _model(args):
    return timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)


@pytest.mark.parametrize('extra, size, crop_pct, source', [
    ([], (3, 48, 48), 1.0, 'test'),
    (['--use-train-size'], (3, 32, 32), 0.875, 'train'),
    (['--img-size', '40'], (3, 40, 40), 1.0, 'explicit'),  # as timm: the test crop_pct unless --use-train-size
    (['--img-size', '40', '--use-train-size', '--crop-pct', '0.9'], (3, 40, 40), 0.9, 'explicit'),
    (['--input-size', '3', '36', '36', '--img-size', '40'], (3, 36, 36), 1.0, 'explicit'),
    (['--in-chans', '1', '--mean', '0.5', '--std', '0.25'], (1, 48, 48), 1.0, 'test'),
])
def test_resolved_data_config(extra, size, crop_pct, source):
    args = _parse(*extra)
    config = resolve_eval_data_config(args, _model(args))
    assert config['input_size'] == size and config['crop_pct'] == crop_pct and config['size_source'] == source
    assert config['crop_mode'] == 'center' and config['interpolation'] == 'bicubic'


def test_registered_test_sizes():
    """The repo's models with a test size in their cfg: convnext atto-nano 288 / 0.95, resnet50_dcls 224 (train 160)."""
    for name, test, train in [('convnext_atto_dcls', ((3, 288, 288), 0.95), ((3, 224, 224), 0.875)),
                              ('resnet50_dcls', ((3, 224, 224), 0.95), ((3, 160, 160), 0.95))]:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        model = torch.nn.Module()
        model.pretrained_cfg = cfg  # resolve_eval_data_config reads only the cfg: no need to build the model
        for extra, (size, crop) in [([], test), (['--use-train-size'], train)]:
            config = resolve_eval_data_config(build_parser().parse_args(['--model', name, *extra]), model)
            assert (config['input_size'], config['crop_pct']) == (size, crop), (name, extra)


@pytest.fixture
def tiny_data(tmp_path):
    """An ImageNet-style val folder and an ImageNet-C-style tree (one corruption, one severity) of 24 px images."""
    for i, wnid in enumerate(WNIDS[:2]):
        for j in range(2):
            _image(tmp_path / 'imagenet' / 'val' / wnid / f'{j}.JPEG', 10 * i + j, size=24)
            _image(tmp_path / 'imagenet-c' / 'fog' / '1' / wnid / f'{j}.JPEG', 100 + 10 * i + j, size=24)
    return tmp_path


@pytest.fixture
def seen_shapes(monkeypatch):
    """The input shape each evaluated dataset gives the model."""
    shapes = []
    evaluate = runner_module.evaluate_dataset

    def recording(model, dataset, **kwargs):
        shapes.append(tuple(dataset[0][0].shape))
        return evaluate(model, dataset, **kwargs)
    monkeypatch.setattr(runner_module, 'evaluate_dataset', recording)
    return shapes


@pytest.mark.parametrize('extra, size, crop_pct, source', [
    ([], 48, 1.0, 'test'),
    (['--use-train-size'], 32, 0.875, 'train'),
])
def test_evaluated_at_the_recorded_size(tiny_data, tmp_path, seen_shapes, extra, size, crop_pct, source):
    out = tmp_path / 'r.json'
    results = run(_parse('--data-dir', str(tiny_data), '--suite', 'imagenet,imagenet-c', '--results-file', str(out),
                         *extra))
    assert set(seen_shapes) == {(3, size, size)}  # clean ImageNet, its A/R subsets and ImageNet-C ('resize') alike
    saved = json.loads(out.read_text())
    assert saved['img_size'] == size and saved['crop_pct'] == crop_pct
    assert saved['data_config'] == {
        'input_size': [3, size, size], 'crop_pct': crop_pct, 'crop_mode': 'center', 'interpolation': 'bicubic',
        'mean': list(timm.data.IMAGENET_DEFAULT_MEAN), 'std': list(timm.data.IMAGENET_DEFAULT_STD),
        'size_source': source, 'use_train_size': bool(extra)}
    c = results['suites']['imagenet-c']['preprocessing']
    assert c.startswith('timm eval transform') and f'{size}x{size}' in c and f'crop_pct {crop_pct}' in c

    csv_out = tmp_path / 'r.csv'
    run(_parse('--data-dir', str(tiny_data), '--suite', 'imagenet', '--results-file', str(csv_out),
               '--results-format', 'csv', *extra))
    header, first = [line.split(',') for line in csv_out.read_text().splitlines()[:2]]
    row = dict(zip(header, first))
    assert row['input_size'] == f'3x{size}x{size}' and row['size_source'] == source
    assert row['crop_mode'] == 'center' and row['mean'] == '0.485 0.456 0.406'


def test_cli_use_train_size(tiny_data, tmp_path):
    out = tmp_path / 'r.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'validate.py'), *MODEL, '-b', '4',
                           '--workers', '0', '--device', 'cpu', '--data-dir', str(tiny_data), '--use-train-size',
                           '--results-file', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())['data_config']['input_size'] == [3, 32, 32]
    assert 'input 3x32x32 (train size)' in proc.stdout


def test_reraised_worker_message_keeps_one_line():
    worker = ('Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
              'last):\n  File "x.py", line 1, in f\n    raise UnreadableImageError(f"cannot read image {p} ...")\n'
              'dcls_timm.errors.UnreadableImageError: cannot read image /d/x.JPEG (cannot identify image file)\n')
    assert str(UnreadableImageError(worker)) == 'cannot read image /d/x.JPEG (cannot identify image file)'


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).bytes(200))


def test_read_image_errors(tmp_path):
    _corrupt(tmp_path / 'bad.JPEG')
    with pytest.raises(UnreadableImageError, match=r'^cannot read image .*bad\.JPEG \(cannot identify image file\)$'):
        read_image(str(tmp_path / 'bad.JPEG'))
    _image(tmp_path / 'ok.JPEG', 0, size=32)
    (tmp_path / 'cut.JPEG').write_bytes((tmp_path / 'ok.JPEG').read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match=r'cut\.JPEG \(.*[Tt]runcated'):
        read_image(str(tmp_path / 'cut.JPEG'))
    with pytest.raises(UnreadableImageError, match=r'missing\.JPEG \(No such file or directory\)'):
        read_image(str(tmp_path / 'missing.JPEG'))


def test_dataset_suite_names_the_file(tmp_path):
    """The 'dataset' suite (timm's ImageDataset) stops instead of timm's skip-with-a-warning."""
    for i, name in enumerate(['a', 'b']):
        _image(tmp_path / 'val' / name / '0.JPEG', i, size=24)
    _corrupt(tmp_path / 'val' / 'b' / '1.JPEG')
    args = _parse('--suite', 'dataset', '--dataset', '', '--split', 'val', '--dataset-dir', str(tmp_path),
                  '--num-classes', '2', '--img-size', '32')
    with pytest.raises(UnreadableImageError, match=r'cannot read image .*b/1\.JPEG \(cannot identify image file\)'):
        run(args)


def _one_line_error(proc, prog, path):
    lines = [line for line in proc.stderr.splitlines() if 'error:' in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f'{prog}: error: cannot read image {path} (cannot identify image file)'], proc.stderr[-3000:]


@pytest.mark.parametrize('workers', ['0', '2'])
def test_validate_cli_unreadable_image(tmp_path, workers):
    for i, wnid in enumerate(WNIDS[:2]):
        for j in range(3):
            _image(tmp_path / 'val' / wnid / f'{j}.JPEG', 10 * i + j, size=24)
    bad = tmp_path / 'val' / WNIDS[1] / '1.JPEG'
    _corrupt(bad)
    proc = subprocess.run([sys.executable, str(ROOT / 'validate.py'), *MODEL, '--img-size', '32', '-b', '2',
                           '--workers', workers, '--device', 'cpu', '--imagenet-dir', str(tmp_path / 'val')],
                          capture_output=True, text=True, timeout=300)
    _one_line_error(proc, 'validate.py', bad)


@pytest.mark.parametrize('workers', ['0', '2'])
def test_train_cli_unreadable_image(image_folder, tmp_path, workers):  # noqa: F811
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    (data / 'train' / 'n002' / '5.png').unlink()  # 36 training images, 9 full batches: every one is read
    bad = data / 'train' / 'n002' / '5.JPEG'
    _corrupt(bad)
    argv = train_argv(data, tmp_path / 'out', '--epochs', '1', '--workers', workers)
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *argv], capture_output=True, text=True,
                          timeout=300)
    _one_line_error(proc, 'train.py', bad)


def test_checked_dataset_keeps_timm_behaviour(tmp_path):
    """A readable folder loads the same through the checked dataset as through timm's."""
    for i, name in enumerate(['a', 'b']):
        _image(tmp_path / name / '0.png', i, size=24)
    plain = timm.data.create_dataset('', root=str(tmp_path))
    checked = CheckedImageDataset.wrap(plain)
    assert isinstance(checked, timm.data.ImageDataset) and len(checked) == len(plain) == 2
    for i in range(2):
        (a, ta), (b, tb) = plain[i], checked[i]
        assert ta == tb and np.array_equal(np.asarray(a), np.asarray(b))
