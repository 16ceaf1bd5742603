"""Freed CPU memory kept for reuse (glibc): a tensor allocated again after one was freed faults in no fresh pages;
train.py and validate.py apply it on CPU unless told otherwise."""
import json
import subprocess
import sys
import textwrap

import pytest

from dcls_timm.cpu_memory import TUNABLES, _glibc
from dcls_timm.evaluation.runner import build_parser as validate_parser
from dcls_timm.training import build_parser as train_parser

_PROBE = textwrap.dedent('''
    import json, resource, sys
    import torch
    from dcls_timm.cpu_memory import freed_memory_kept, keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == 'keep' else False
    def faults_of_a_fresh_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2 ** 20).fill_(1.)  # 64 MB, above glibc's largest mmap threshold; freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_a_fresh_tensor()
    print(json.dumps({'kept': kept, 'reported': freed_memory_kept(), 'again': keep_freed_memory() if kept else None,
                      'faults': min(faults_of_a_fresh_tensor() for _ in range(3))}))
''')


def _probe(mode):
    out = subprocess.run([sys.executable, '-c', _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason='glibc only')
def test_freed_memory_is_reused_without_page_faults():
    kept, default = _probe('keep'), _probe('default')
    assert kept['kept'] and kept['reported'] and kept['again']  # idempotent
    assert not default['reported']
    pages = 16 * 2 ** 20 * 4 // 4096
    assert default['faults'] > pages // 2  # glibc's default: every 64 MB tensor comes as fresh mmap pages
    assert kept['faults'] < pages // 20  # kept: the freed block is reused


def test_train_and_validate_keep_cpu_memory_by_default():
    for parser in (train_parser(), validate_parser()):
        assert parser.parse_args([]).keep_cpu_memory is True
        assert parser.parse_args(['--no-keep-cpu-memory']).keep_cpu_memory is False
    assert 'mmap_max=0' in TUNABLES and 'trim_threshold=' in TUNABLES
