"""Scripts run end to end in a tiny configuration (no timing assertions)."""
import json
import subprocess
import sys
from pathlib import Path

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
    assert set(result['rows']) == {'ours (separable)', 'dcls 0.1.1 ConstructKernel2d'}
    assert all(r['median_s'] > 0 and r['saved_mb'] > 0 for r in result['rows'].values())
    assert '| ours (separable) |' in proc.stdout


def test_benchmark_conv_table_runs(tmp_path):
    out = tmp_path / 'conv.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'benchmark_kernels.py'), '--conv', '--repeats', '1',
                           '--json', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert [r['size'] for r in table['rows']] == [56, 28, 14, 7]
    assert '| sum over the 18 blocks |' in proc.stdout
