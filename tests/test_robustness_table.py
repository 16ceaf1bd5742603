"""scripts/robustness_table.py: the paper-style table (markdown, CSV) and the per-corruption plot of several
validate.py results files, keeping the ImageNet-C-style label of generated data."""
import csv
import json
import subprocess
import sys

import pytest

from dcls_timm.evaluation import CORRUPTIONS, build_parser, run
from test_robustness_resume import make_robustness_data, tiny_checkpoint
from test_validate import ROOT, TINY_KWARGS

GENERATED = 'ImageNet-C-style (generated)'


@pytest.fixture(scope='module')
def results_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('table')
    data = make_robustness_data(root / 'data', per_cell=1, others=True)
    common = ['--img-size', '32', '-b', '4', '--workers', '0', '--device', 'cpu', '--data-dir', str(data)]
    files = []
    for name, seed in [('a', 0), ('b', 1)]:
        out = root / f'{name}.json'
        run(build_parser().parse_args([
            '--model', 'convnext_atto_dcls', '--model-kwargs', *TINY_KWARGS, '--checkpoint',
            str(tiny_checkpoint(root / f'{name}.pth', seed)), *common, '--results-file', str(out),
            '--suite', 'imagenet,imagenet-c,imagenet-a,imagenet-r,sketch,stylized']))
        files.append(out)
    out = root / 'c.json'  # another model, without ImageNet-C, and left unfinished
    run(build_parser().parse_args(['--model', 'resnet26_dcls', *common, '--results-file', str(out),
                                   '--suite', 'imagenet,imagenet-a']))
    doc = json.loads(out.read_text())
    doc['status'] = 'interrupted'
    out.write_text(json.dumps(doc))
    files.append(out)
    return files


def test_table_rows_and_plot(results_files, tmp_path):
    out = tmp_path / 'tables'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'robustness_table.py'), *map(str, results_files),
                           '--out', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [json.loads(f.read_text()) for f in results_files]
    with open(out / 'robustness_table.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['model'] for r in rows] == ['convnext_atto_dcls (a)', 'convnext_atto_dcls (b)', 'resnet26_dcls']
    for r, res in zip(rows, loaded):
        s = res['suites']
        assert float(r['imagenet_top1']) == pytest.approx(s['imagenet']['top1'])
        assert float(r['imagenet_a_top1']) == pytest.approx(s['imagenet-a']['top1'])
        assert float(r['params_m']) == pytest.approx(res['param_count'] / 1e6, abs=0.01)
        assert r['img_size'] == '32' and r['file'].endswith('.json')
    for r, res in zip(rows[:2], loaded[:2]):
        s = res['suites']
        assert float(r['mce']) == pytest.approx(s['imagenet-c']['mce'])
        assert float(r['relative_mce']) == pytest.approx(s['imagenet-c']['relative_mce'])
        for col, suite in [('imagenet_r_top1', 'imagenet-r'), ('sketch_top1', 'sketch'),
                           ('stylized_top1', 'stylized')]:
            assert float(r[col]) == pytest.approx(s[suite]['top1'])
        assert r['imagenet_c_data'] == GENERATED and r['notes'] == ''
    assert rows[2]['mce'] == rows[2]['sketch_top1'] == rows[2]['imagenet_c_data'] == ''
    assert rows[2]['notes'] == 'interrupted run'

    md = (out / 'robustness_table.md').read_text()
    assert f'ImageNet-C numbers: {GENERATED}.' in md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith('| Model'))
    assert header.split(' | ')[1:5] == ['Params (M)', 'Size', 'ImageNet top-1', 'mCE ↓']
    table = [line for line in lines if line.startswith('| convnext') or line.startswith('| resnet')][:3]
    assert [line.split(' | ')[0] for line in table] == ['| convnext_atto_dcls (a)', '| convnext_atto_dcls (b)',
                                                        '| resnet26_dcls']
    assert f"{loaded[0]['suites']['imagenet-c']['mce']:.2f}" in table[0] and GENERATED in table[0]
    assert f'Top-1 error (%) per corruption, mean over severities ({GENERATED})' in md

    with open(out / 'imagenet_c_per_corruption.csv') as f:
        per = list(csv.reader(f))
    assert per[0] == ['model', 'imagenet_c_data', *CORRUPTIONS] and len(per) == 3
    mean_error = loaded[0]['suites']['imagenet-c']['mean_error']
    assert [float(v) for v in per[1][2:]] == pytest.approx([100 * mean_error[c] for c in CORRUPTIONS], abs=1e-3)
    png = (out / 'imagenet_c_errors.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10000


def test_names_and_errors(results_files, tmp_path):
    script = [sys.executable, str(ROOT / 'scripts' / 'robustness_table.py')]
    proc = subprocess.run([*script, *map(str, results_files[:2]), '--out', str(tmp_path), '--names', 'DCLS',
                           'baseline'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / 'robustness_table.md').read_text().splitlines()
    assert [line.split(' | ')[0] for line in md if line.startswith('| DCLS') or line.startswith('| baseline')] == \
        ['| DCLS', '| baseline']
    assert '| Corruption | DCLS | baseline |' in md
    bad = tmp_path / 'bad.json'
    bad.write_text('{"rows": []}')
    proc = subprocess.run([*script, str(bad), '--out', str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and 'is not a validate.py JSON results file' in proc.stderr
