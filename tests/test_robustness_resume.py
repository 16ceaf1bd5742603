"""validate.py at full-run scale, on tiny data: results saved unit by unit and continued after SIGTERM and SIGKILL
(single process and torchrun) to exactly the numbers of an uninterrupted run; results of another evaluation refused."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import dcls_timm  # noqa: F401
from dcls_timm.errors import ConfigError
from dcls_timm.evaluation import CORRUPTIONS, build_parser, run
from dcls_timm.evaluation.suites import GENERATED_MARKER
from test_validate import ROOT, TINY_KWARGS, WNIDS, _free_port, _image

TIMING = {'seconds', 'images_per_sec', 'finished_at', 'sessions', 'started_at'}
# validate.py with every unit slowed down a little, so that a test can stop it in the middle of ImageNet-C
SLOW_VALIDATE = f'''import runpy, sys, time
import dcls_timm.evaluation.runner as runner
evaluate = runner.evaluate_dataset
def slow(*args, **kwargs):
    time.sleep(0.05)
    return evaluate(*args, **kwargs)
runner.evaluate_dataset = slow
sys.argv[0] = {str(ROOT / 'validate.py')!r}
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def make_robustness_data(root: Path, per_cell: int = 2, size: int = 24, generated: bool = True,
                         others: bool = False) -> Path:
    """ImageNet val (2 classes x 2 images), the 15 mCE corruptions x 5 severities (``per_cell`` images each), and
    with ``others`` tiny ImageNet-A/-R/Sketch/Stylized folders."""
    seed = 1000
    for wnid in WNIDS[:2]:
        for j in range(2):
            _image(root / 'imagenet' / 'val' / wnid / f'{j}.JPEG', seed := seed + 1, size=size + 8)
    for c in CORRUPTIONS:
        for s in range(1, 6):
            for j in range(per_cell):
                _image(root / 'imagenet-c' / c / str(s) / WNIDS[j % 2] / f'{j}.JPEG', seed := seed + 1, size=size)
    if generated:
        (root / 'imagenet-c' / GENERATED_MARKER).write_text(json.dumps({'label': 'ImageNet-C-style'}))
    if others:
        from dcls_timm.evaluation import subset_classes
        a, r = subset_classes('imagenet-a')[0], subset_classes('imagenet-r')[0]
        for name, wnids in [('imagenet-a', a[:2]), ('imagenet-r', r[:2]), ('sketch', WNIDS[3:5]),
                            ('stylized', WNIDS[6:8])]:
            for wnid in wnids:
                _image(root / name / wnid / '0.JPEG', seed := seed + 1, size=size + 8)
    return root


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model('convnext_atto_dcls', depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), dcls_kernel_size=5)
    torch.save(model.state_dict(), path)
    return path


def strip_timing(value):
    """The results without wall-clock fields (times, throughput, the sessions that produced them)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('robust')
    data = make_robustness_data(root / 'data')
    ckpt = tiny_checkpoint(root / 'w.pth')
    (root / 'slow_validate.py').write_text(SLOW_VALIDATE)
    argv = ['--model', 'convnext_atto_dcls', '--model-kwargs', *TINY_KWARGS, '--img-size', '32', '-b', '2',
            '--workers', '0', '--device', 'cpu', '--checkpoint', str(ckpt), '--data-dir', str(data),
            '--suite', 'imagenet,imagenet-c']
    straight = root / 'straight.json'
    run(build_parser().parse_args([*argv, '--results-file', str(straight)]))
    return {'root': root, 'argv': argv, 'straight': json.loads(straight.read_text()), 'ckpt': ckpt}


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))


def _cells(path: Path) -> int:
    try:
        return sum(k.startswith('imagenet-c/') for k in json.loads(path.read_text())['units'])
    except (OSError, ValueError, KeyError):
        return 0


def _descendants(pid: int):
    """The processes started by ``pid``, their children, ... (from /proc); torchrun starts its ranks in new
    sessions, out of reach of a process-group signal."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _freeze_tree(pid: int):
    """SIGSTOP ``pid`` and every process it started, until no new one appears (a stopped process forks no more);
    returns the descendants. Without it a DataLoader worker forked between listing and killing the tree survived
    with the pipes open, and waiting for the killed command's output timed out."""
    frozen = set()
    while True:
        new = [p for p in [pid] + _descendants(pid) if p not in frozen]
        if not new:
            return sorted(frozen - {pid})
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            frozen.add(p)


def _start_and_stop(cmd, results: Path, after_cells: int, sig, tree: bool = False):
    """Start ``cmd``, wait until ``results`` holds ``after_cells`` ImageNet-C cells, send ``sig`` (with ``tree`` to it
    and every process it started, as when a node dies); wait for the end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 240
    while _cells(results) < after_cells:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, 'no progress'
        time.sleep(0.02)
    # DataLoader workers, torchrun's ranks; for SIGKILL (a node dying) the whole tree at once
    pids = (_freeze_tree(proc.pid) if sig == signal.SIGKILL else _descendants(proc.pid)) if tree else []
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _with_workers(argv, n):
    i = argv.index('--workers')
    return [*argv[:i + 1], str(n), *argv[i + 2:]]


def test_sigterm_then_sigkill_then_resume_equals_a_straight_run(setup, tmp_path):
    """As under Slurm: SIGTERM to validate.py and its DataLoader workers, later SIGKILL, then the same command."""
    results = tmp_path / 'r.json'
    argv = [*_with_workers(setup['argv'], 2), '--results-file', str(results)]
    cmd = [sys.executable, str(setup['root'] / 'slow_validate.py'), *argv]

    code, _, err = _start_and_stop(cmd, results, 3, signal.SIGTERM, tree=True)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith('validate.py: interrupted by SIGTERM: dropped the unfinished unit imagenet-c/')
    assert last.endswith('resume with the same command') and str(results) in last
    assert re.search(r'imagenet-c gaussian_noise 1: top-1 error [\d.]+ % \(2 images, [\d.]+ img/s, 0:00:\d\d, '
                     r'74 to go, ETA 0:\d\d:\d\d\)', err), err[-3000:]
    saved = json.loads(results.read_text())
    assert saved['status'] == 'interrupted'
    first = _cells(results)
    assert first >= 3 and f'the {first + 3} of 78 units finished are saved' in last  # + imagenet and its 2 subsets
    for key, unit in saved['units'].items():  # what was saved is final
        assert strip_timing(unit) == strip_timing(setup['straight']['units'][key]), key

    code, _, _ = _start_and_stop(cmd, results, first + 3, signal.SIGKILL, tree=True)
    assert code == -signal.SIGKILL
    killed = json.loads(results.read_text())  # still whole: every save replaces the file atomically
    assert killed['status'] == 'running' and _cells(results) >= first + 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.partial')]

    proc = subprocess.run([sys.executable, str(ROOT / 'validate.py'), *argv], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{3 + _cells_in(killed)} of 78 units already done' in proc.stderr
    final = json.loads(results.read_text())
    assert final['status'] == 'complete' and len(final['sessions']) == 3
    assert [s['status'] for s in final['sessions']] == ['interrupted', 'running', 'complete']
    assert strip_timing(final) == strip_timing(setup['straight'])
    c = final['suites']['imagenet-c']
    assert c['complete'] and 'mce' in c and 'relative_mce' in c and c['label'] == 'ImageNet-C-style (generated)'
    for unit in final['units'].values():
        assert unit['images'] == 0 or unit['images_per_sec'] > 0

    # the same command once more: nothing left to evaluate, the same results
    run(build_parser().parse_args(argv))
    again = json.loads(results.read_text())
    assert strip_timing(again) == strip_timing(setup['straight']) and again['sessions'][-1]['units_evaluated'] == 0


def _cells_in(document) -> int:
    return sum(k.startswith('imagenet-c/') for k in document['units'])


def test_results_of_another_evaluation_are_refused(setup, tmp_path):
    results = tmp_path / 'r.json'
    results.write_text(json.dumps(setup['straight']))
    argv = [*setup['argv'], '--results-file', str(results)]

    def refused(*extra, match):
        with pytest.raises(ConfigError, match=match) as e:
            run(build_parser().parse_args([*argv, *extra]))
        assert '\n' not in str(e.value) and str(e.value).endswith('--overwrite to discard it and start afresh')

    other = tiny_checkpoint(tmp_path / 'other.pth', seed=1)
    i = argv.index('--checkpoint')
    with pytest.raises(ConfigError, match=r'r\.json holds results of another evaluation \(weights_sha256 \w+\.\.\. '
                                          r'-> \w+\.\.\.\): use another --results-file'):
        run(build_parser().parse_args([*argv[:i + 1], str(other), *argv[i + 2:]]))
    refused('--img-size', '40', match=r'data_config\.input_size \[3, 32, 32\] -> \[3, 40, 40\]')
    refused('--interpolation', 'bilinear', match=r'data_config\.interpolation "bicubic" -> "bilinear"')
    refused('--amp', '--amp-dtype', 'bfloat16', match=r'precision "float32" -> "bfloat16"')
    refused('--c-preprocess', 'as-is', match=r'holds imagenet-c results of other data or settings '
                                              r'\(c_preprocess "resize" -> "as-is"\)')
    refused('--model-kwargs', *TINY_KWARGS[:2], 'dcls_kernel_size=3',
            match=r'model_kwargs\.dcls_kernel_size 5 -> 3')
    assert json.loads(results.read_text()) == setup['straight']  # refusing changes nothing

    # --overwrite starts afresh; a file of another program is refused
    fresh = run(build_parser().parse_args([*argv[:i + 1], str(other), *argv[i + 2:], '--suite', 'imagenet',
                                           '--overwrite']))
    saved = json.loads(results.read_text())
    assert saved['weights_sha256'] == fresh['weights_sha256'] != setup['straight']['weights_sha256']
    assert sorted(saved['units']) == ['imagenet', 'imagenet/imagenet-a-classes', 'imagenet/imagenet-r-classes']
    results.write_text(json.dumps({'model': 'x', 'suites': {}}))
    refused(match='holds no resumable validate.py results')


def test_torchrun_killed_and_resumed(setup, tmp_path):
    results = tmp_path / 'dist.json'
    slow = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1']
    args = [*setup['argv'], '--results-file', str(results)]
    code, _, err = _start_and_stop([*slow, f'--master_port={_free_port()}', str(setup['root'] / 'slow_validate.py'),
                                    *args], results, 3, signal.SIGKILL, tree=True)  # torchrun and both ranks
    assert code == -signal.SIGKILL
    done = _cells(results)
    assert 3 <= done < 75
    proc = subprocess.run([*slow, f'--master_port={_free_port()}', str(ROOT / 'validate.py'), *args],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'{done + 3} of 78 units already done' in proc.stderr
    final = json.loads(results.read_text())
    straight = setup['straight']
    assert final['status'] == 'complete' and [s['world_size'] for s in final['sessions']] == [2, 2]
    assert sorted(final['units']) == sorted(straight['units'])
    for key, unit in final['units'].items():  # counts exactly; the loss sums up to the order of the sums
        ref = straight['units'][key]
        assert {k: unit[k] for k in ('images', 'correct1', 'correct5', 'skipped')} == \
               {k: ref[k] for k in ('images', 'correct1', 'correct5', 'skipped')}, key
        assert unit['loss_sum'] == pytest.approx(ref['loss_sum'], rel=1e-6)
    for key in ('mce', 'relative_mce', 'errors', 'unnormalized_mean_error'):
        assert final['suites']['imagenet-c'][key] == straight['suites']['imagenet-c'][key]
    assert final['suites']['imagenet']['top1'] == straight['suites']['imagenet']['top1']


def test_progress_lines_and_non_finite_logits(setup, caplog):
    from dcls_timm.evaluation import WnidImageFolder, evaluate_dataset
    from dcls_timm.evaluation.classes import imagenet_wnid_to_index
    from dcls_timm.evaluation.progress import UnitProgress
    with caplog.at_level(logging.INFO, logger='validate'):
        progress = UnitProgress('imagenet-c fog 3', 100, interactive=False, interval=1e-9)
        for _ in range(4):
            progress.update(20)
        UnitProgress('elsewhere', 100, enabled=False, interval=1e-9).update(50)  # ranks other than 0: silent
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and re.fullmatch(r'imagenet-c fog 3: 80/100 images, [\d.]+ img/s, ETA \d:\d\d:\d\d',
                                            lines[-1])

    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 1000)
            out[0, 0] = float('nan')
            return out
    ds = WnidImageFolder(str(setup['root'] / 'data' / 'imagenet' / 'val'), imagenet_wnid_to_index(),
                         timm.data.create_transform(32, use_prefetcher=True))
    with pytest.raises(ValueError, match='non-finite logits for 1 of 4 images'):
        evaluate_dataset(Broken(), ds, torch.device('cpu'), batch_size=4, workers=0, normalize=((0.5,) * 3, (0.5,) * 3))
