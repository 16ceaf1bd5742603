"""scripts/benchmark_authors.py without the authors' code: its report, its options and its mask handling on ours."""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

import dcls_timm  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
import benchmark_authors as ba  # noqa: E402


def test_render_of_the_committed_run(tmp_path):
    saved = ROOT / 'docs' / 'benchmarks' / 'cpu_authors.json'
    results = json.loads(saved.read_text())
    out = tmp_path / 'authors.md'
    ba.main(['--render', str(saved), '--markdown', str(out)])
    text = out.read_text()
    for row in results['speed']:
        assert f"| {row['title']} | {row['batch']} | {row['mode']} | {row['masks']} |" in text
        assert f"**{row['theirs']['median_s'] / row['ours']['median_s']:.2f}**" in text
    assert results['command'] in text


@pytest.mark.parametrize('stored,words', [(16, 'batch 16 (the authors'), (-1, 'at the recipe batch in 1-D'),
                                          (None, 'at the recipe batch in 1-D'), (0, 'the batch of the init rows')])
def test_spread_batch_wording(stored, words):
    assert words in ba._spread_batch_text(stored)


def test_cases_choose_their_spread_batch():
    assert ba.CASES['flexnet7']['spread_batch'] == ba.CASES['ccnn2d']['spread_batch'] == 16
    assert ba.CASES['ccnn1d']['spread_batch'] is None  # the recipe's batch


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit, match='unknown case'):
        ba.main(['--cases', 'ccnn_smnist'])


def test_spread_masks_uncrops_our_kernels():
    torch.manual_seed(0)
    model = timm.create_model('flexnet_3', widths=(4, 4), kernel_size=9).eval()
    x = torch.randn(1, 3, 8, 8)
    ba._prime(model, x)
    before = ba.kernel_sizes(model)
    assert before and all(max(s) < 9 for s in before)  # cropped at init
    assert ba.spread_masks(model, 1.0) == len(before)
    with torch.no_grad():
        model(x)
    assert all(s == [9, 9] for s in ba.kernel_sizes(model))
    assert ba.mask_width_params(model)
