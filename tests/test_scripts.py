"""Scripts run end to end in a tiny configuration (no timing assertions)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_kernels_runs(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / 'benchmark_kernels.py'), '--model', 'convnext_atto_dcls',
         '--repeats', '1', '--json', str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result['layers'] == 12
    assert set(result['rows']) == {'dcls_timm', 'dcls 0.1.1 ConstructKernel2d'}
    assert all(r['median_s'] > 0 and r['saved_mb'] > 0 for r in result['rows'].values())
    assert '| dcls_timm |' in proc.stdout


def test_benchmark_conv_table_runs(tmp_path):
    out = tmp_path / 'conv.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_kernels.py'), '--conv', '--repeats', '1',
                           '--json', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert [r['size'] for r in table['rows']] == [56, 28, 14, 7]
    assert '| sum over the 18 blocks |' in proc.stdout


def test_benchmark_width_table_runs(tmp_path):
    out = tmp_path / 'widths.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_kernels.py'), '--widths', '--repeats', '1',
                           '--json', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r['kernel']: r for r in json.loads(out.read_text())['rows']}
    assert {'13x13', '15x15', '17x13', '13x17'} <= set(rows) and all(r['fast path'] > 0 for r in rows.values())
    assert '| 13x13 |' in proc.stdout


def test_benchmark_pointwise_table_runs(tmp_path):
    out = tmp_path / 'pointwise.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_kernels.py'), '--pointwise', '--repeats',
                           '1', '--json', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r['route']: r for r in json.loads(out.read_text())['rows']}
    assert set(rows) == {'F.conv1d', 'PointwiseConv1d'} and all(r['inference'] > 0 for r in rows.values())
    assert '| PointwiseConv1d |' in proc.stdout


def test_benchmark_ceilings_table_runs(tmp_path):
    out = tmp_path / 'ceilings.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_kernels.py'), '--ceilings', '--repeats',
                           '1', '--scale', '0.02', '--keep-cpu-memory', '--json', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    groups = {r['group'] for r in table['rows']}
    assert groups == {'reference', 'FlexNet 5x5 conv', 'CCNN 1x1 conv, 2-D', 'CCNN 1x1 conv, 1-D',
                      'CCNN 1-D causal conv FFTs'}
    assert all(r['ms'] > 0 and (r['gmac_s'] is None) == (r['group'] == 'CCNN 1-D causal conv FFTs')
               for r in table['rows'])
    assert 'keeps freed memory' in table['machine']['allocator'] and '--ceilings' in table['command']
    assert '| FlexNet 5x5 conv | weight gradient |' in proc.stdout


def _benchmark(tmp_path, *args, timeout=600):
    out, md = tmp_path / 'bench.json', tmp_path / 'bench.md'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--img-size', '32',
                           '--batch-size', '2', '--repeats', '1', '--warmup', '0', '--json', str(out),
                           '--markdown', str(md), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def test_benchmark_runs_end_to_end(tmp_path):
    result, md = _benchmark(tmp_path, '--pairs', 'convnext_atto_dcls:convnext_atto,'
                            'dcls-package:convnext_atto:convnext_atto', '--kernel-model', 'convnext_atto_dcls')
    assert {'cpu', 'torch', 'timm', 'torch_threads', 'date'} <= set(result['machine'])
    rows = {(r['model'], r['mode'], r['positions']) for r in result['speed']}
    assert rows == {(m, mode, pos) for m in ('convnext_atto_dcls', 'dcls-package:convnext_atto')
                    for mode in ('train', 'infer') for pos in ('init', 'spread')}
    for r in result['speed']:
        assert r['run'] == 'eager' and r['baseline'] == 'convnext_atto'
        assert r['model_stats']['n'] == 1 and r['model_stats']['median_s'] > 0
        assert r['ratio'] == r['baseline_stats']['median_s'] / r['model_stats']['median_s']
    assert len(result['memory']) == 4
    assert all(r['model_bytes'] > 0 and r['baseline_bytes'] > 0 for r in result['memory'])
    k = result['kernel_construction']
    assert k['layers'] == 12 and 0 < k['time_ratio'] and 0 < k['memory_ratio'] < 1
    assert '| convnext_atto_dcls | convnext_atto | train | eager | init |' in md
    assert 'dcls 0.1.1 ConstructKernel2d' in md and 'Command: `python scripts/benchmark.py' in md
    macs = {r['pair']: r for r in result['macs']}
    assert set(macs) == {'convnext_atto_dcls:convnext_atto', 'dcls-package:convnext_atto:convnext_atto'}
    for r in macs.values():  # 17x17 instead of 7x7 depthwise kernels: more MACs, so a bound below 1
        assert r['model_gmacs'] > r['baseline_gmacs'] > 0 and r['bound'] == r['baseline_gmacs'] / r['model_gmacs'] < 1
    assert '| convnext_atto_dcls:convnext_atto |' in md and 'compute bound' in md


def test_benchmark_compiled_inference(tmp_path):
    result, md = _benchmark(tmp_path, '--pairs', '', '--compile-pairs', 'convnext_atto_dcls:convnext_atto',
                            '--modes', 'infer', '--positions', 'init', '--no-memory', '--kernel-model', '')
    (row,) = result['speed']
    assert row['run'] == 'compile' and row['ratio'] > 0
    assert '| convnext_atto_dcls | convnext_atto | infer | compile | init |' in md


def test_benchmark_rejects_unknown_models():
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark.py'), '--pairs', 'convnext_tiny_dclz:x'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown model 'convnext_tiny_dclz'" in proc.stderr


def test_benchmark_cpu_memory_runs_both_allocators():
    out = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_cpu_memory.py'), '--model-kwargs',
                          'data_dim=1', 'in_chans=1', 'width=8', 'hidden=8', '--input-size', '1', '32',
                          '--batch-size', '2', '--steps', '1', '--rounds', '1'],
                         capture_output=True, text=True, check=True).stdout
    assert 'median ratio default / kept' in out and out.count('ratio') == 2


def test_benchmark_cpu_memory_transparent_huge_pages(tmp_path):
    # the switch reaches the THP processes only, even when this process's environment already holds it
    path = tmp_path / 'memory.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_cpu_memory.py'), '--mode', 'infer',
                           '--thp', '--model-kwargs', 'data_dim=1', 'in_chans=1', 'width=8', 'hidden=8',
                           '--input-size', '1', '32', '--batch-size', '2', '--steps', '1', '--rounds', '1',
                           '--json', str(path)], capture_output=True, text=True, check=True,
                          env={**os.environ, 'THP_MEM_ALLOC_ENABLE': '1'})
    assert 'default / THP' in proc.stdout
    result = json.loads(path.read_text())
    assert len(result['rounds']) == 1 and result['median_thp_ratio'] > 0
    assert result['thp_setting'] in ('', 'always', 'madvise', 'never')
    for row in result['rounds']:
        assert row['thp_ms'] > 0 and row['thp_faults'] >= 0
        assert row['thp_ratio'] == pytest.approx(row['default_ms'] / row['thp_ms'])


def test_benchmark_cpu_memory_inference_with_page_faults(tmp_path):
    path = tmp_path / 'memory.json'
    subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_cpu_memory.py'), '--mode', 'infer',
                    '--model-kwargs', 'width=8', 'hidden=8', '--input-size', '3', '16', '16', '--batch-size', '2',
                    '--steps', '1', '--rounds', '1', '--json', str(path)], capture_output=True, text=True, check=True)
    result = json.loads(path.read_text())
    assert result['mode'] == 'infer' and result['model_kwargs'] == {'width': 8, 'hidden': 8}
    row, = result['rounds']
    assert row['default_ms'] > 0 and row['kept_ms'] > 0 and row['default_faults'] >= 0 and row['kept_faults'] >= 0
