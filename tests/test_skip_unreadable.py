"""--skip-unreadable: validate.py leaves unreadable images out (counted, listed, shown) instead of stopping; train.py
uses the next image in their place, with a warning naming each file and the running count."""
import json
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import dcls_timm  # noqa: F401
from dcls_timm.errors import UnreadableImageError
from dcls_timm.evaluation import build_parser, run
from dcls_timm.evaluation.datasets import checked_dataset
from dcls_timm.evaluation.report import format_table
from test_eval_inputs import _corrupt
from test_robustness_resume import make_robustness_data, tiny_checkpoint
from test_train import _argv as train_argv
from test_train import image_folder  # noqa: F401  (fixture)
from test_validate import ROOT, TINY_KWARGS, WNIDS, _image


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A clean tree, and the same tree plus one corrupt image in ImageNet val and one truncated in ImageNet-C fog/2."""
    root = tmp_path_factory.mktemp('skip')
    clean = make_robustness_data(root / 'clean', per_cell=2)
    bad = root / 'bad'
    shutil.copytree(clean, bad)
    _corrupt(bad / 'imagenet' / 'val' / WNIDS[1] / '1b.JPEG')  # sorts between 1.JPEG and the next class
    cut = bad / 'imagenet-c' / 'fog' / '2' / WNIDS[0] / '0b.JPEG'
    _image(root / 'whole.JPEG', 7, size=24)
    cut.write_bytes((root / 'whole.JPEG').read_bytes()[:300])
    for tree in ('clean', 'bad'):  # the same with ImageNet-C's fog only (DataLoader workers start for every cell)
        shutil.copytree(root / tree / 'imagenet', root / f'{tree}-fog' / 'imagenet')
        shutil.copytree(root / tree / 'imagenet-c' / 'fog', root / f'{tree}-fog' / 'imagenet-c' / 'fog')
    return {'clean': clean, 'bad': bad, 'files': [str(bad / 'imagenet' / 'val' / WNIDS[1] / '1b.JPEG'), str(cut)],
            'ckpt': tiny_checkpoint(root / 'w.pth'), 'root': root}


def _args(data, root, out, *extra):
    return build_parser().parse_args([
        '--model', 'convnext_atto_dcls', '--model-kwargs', *TINY_KWARGS, '--img-size', '32', '-b', '2', '--device',
        'cpu', '--checkpoint', str(data['ckpt']), '--data-dir', str(root), '--suite', 'imagenet,imagenet-c',
        '--results-file', str(out), *extra])


def test_default_stops_naming_the_file(data, tmp_path):
    with pytest.raises(UnreadableImageError, match=r'^cannot read image .*/fog/2/.*/0b\.JPEG \(.*[Tt]runcated'):
        run(_args(data, data['bad'], tmp_path / 'r.json', '--workers', '0', '--suite', 'imagenet-c'))


@pytest.mark.parametrize('workers, fog_only', [('0', False), ('2', True)])
def test_skipped_images_are_counted_listed_and_left_out(data, tmp_path, workers, fog_only):
    clean_root, bad_root = (data['root'] / 'clean-fog', data['root'] / 'bad-fog') if fog_only else \
        (data['clean'], data['bad'])
    clean = run(_args(data, clean_root, tmp_path / 'clean.json', '--workers', '0'))
    results = run(_args(data, bad_root, tmp_path / 'bad.json', '--workers', workers, '--skip-unreadable'))
    saved = json.loads((tmp_path / 'bad.json').read_text())
    val, cell = saved['units']['imagenet'], saved['units']['imagenet-c/fog/2']
    files = [f.replace(str(data['bad']), str(bad_root)) for f in data['files']]
    assert (val['skipped'], val['skipped_files']) == (1, [files[0]])
    assert (cell['skipped'], cell['skipped_files']) == (1, [files[1]])
    assert saved['suites']['imagenet']['skipped'] == 1 and saved['suites']['imagenet']['skipped_files'] == [files[0]]
    c = saved['suites']['imagenet-c']
    assert c['skipped'] == 1 and c['skipped_cells'] == {'fog/2': 1} and c['images'] == (10 if fog_only else 150)
    # the denominators are the readable images: the same counts as the tree without the bad files
    for key, unit in saved['units'].items():
        ref = json.loads((tmp_path / 'clean.json').read_text())['units'][key]
        assert (unit['images'], unit['correct1'], unit['correct5']) == \
               (ref['images'], ref['correct1'], ref['correct5']), key
        assert unit['loss_sum'] == pytest.approx(ref['loss_sum'], rel=1e-5)
    assert results['suites']['imagenet']['top1'] == clean['suites']['imagenet']['top1']
    if not fog_only:
        assert c['mce'] == pytest.approx(clean['suites']['imagenet-c']['mce'])
    table = format_table(results)
    assert 'skipped' in table.splitlines()[2] and '* cells with unreadable images skipped: fog/2 (1)' in table
    assert '2 unreadable image(s) skipped (--skip-unreadable)' in table


def test_train_dataset_replaces_unreadable_images_visibly(tmp_path, caplog):
    for i, name in enumerate(['a', 'b']):
        for j in range(3):
            _image(tmp_path / name / f'{j}.png', 3 * i + j, size=24)
    _corrupt(tmp_path / 'a' / '1.png')
    _corrupt(tmp_path / 'b' / '0.png')
    plain = timm.data.create_dataset('', root=str(tmp_path))
    with pytest.raises(UnreadableImageError, match=r'a/1\.png'):
        checked_dataset(plain)[1]
    ds = checked_dataset(timm.data.create_dataset('', root=str(tmp_path)), skip_unreadable=True)
    ds.transform = timm.data.create_transform(24)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert sum(len(t) for _, t in loader) == 6  # every index gives an image
    assert ds.skipped_count == 2  # counted over both workers
    with caplog.at_level('WARNING'):
        img, target = ds[1]
    assert target == 0 and ds.skipped_count == 3
    assert [r.getMessage() for r in caplog.records] == [
        f'cannot read image {tmp_path / "a" / "1.png"} (cannot identify image file): skipped (--skip-unreadable), '
        f'the next image is used in its place (3 unreadable images skipped so far)']


def test_train_cli_skip_unreadable(image_folder, tmp_path):  # noqa: F811
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    bad = data / 'train' / 'n002' / '5.png'
    bad.unlink()
    _corrupt(bad)
    argv = train_argv(data, tmp_path / 'out', '--epochs', '1', '--skip-unreadable')
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'cannot read image {bad} (cannot identify image file): skipped (--skip-unreadable)' in proc.stderr
    assert '(1 unreadable image skipped so far)' in proc.stderr
