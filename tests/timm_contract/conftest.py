"""Runs timm's own ``tests/test_models.py`` (fetched by ``scripts/fetch_timm_tests.py``) on the plugin's models.

The smallest model of every family (and the dense ConvNeXt baselines' class) runs the whole file except TorchScript
(the continuous-kernel layers are not scriptable) and pretrained-weight downloads; every other registered model, and
every pretrained tag, runs timm's config and API contract test (``test_model_default_cfgs``, on the meta device:
feature and head shapes, dtype change after a forward, factory device, frozen parameters through resets). Their
forward and backward passes run the same modules as the smallest model's, at a cost (minutes at timm's sizes on a
2-core CPU) that would not fit CI. timm's own models and its model-specific tests are deselected.
"""
import os

import pytest

import dcls_timm  # noqa: F401  (registers the models before timm's test module lists them)
from dcls_timm.models import plugin_models

HERE = os.path.dirname(os.path.abspath(__file__))
# the smallest model of each family (one file of dcls_timm/models each)
FULL = ('convnext_atto_dcls', 'convnext_tiny_dil2', 'resnet26_dcls', 'fastvit_sa24_dcls', 'caformer_s18_dcls',
        'flexnet_3', 'ccnn_4_140')
# 1-D sequence models (CKCNN): timm's image tests assume NCHW feature maps and a 2-D pool_size (they check
# forward_features against cfg['pool_size']), and they push 224 px images through, i.e. 50,176-step sequences with
# kernels as long (minutes on a CPU). Their timm API is tested in tests/test_sequences.py instead.
SKIPPED_MODELS = ('ckcnn_2_30', 'ckcnn_2_100')
FAST_TESTS = ('test_model_default_cfgs',)
SKIPPED_TESTS = ('torchscript', 'pretrained', 'test_model_inference')
MARKERS = ('base', 'cfg', 'cfg_nonstd', 'forward', 'backward', 'torchscript', 'features', 'fxforward', 'fxbackward',
           'timeout')


def pytest_configure(config):
    for marker in MARKERS:  # timm's markers (declared in its pyproject, not here)
        config.addinivalue_line('markers', f'{marker}: timm test marker')


def _selected(item: pytest.Item, ours) -> bool:
    callspec = getattr(item, 'callspec', None)
    name = callspec.params.get('model_name') if callspec is not None else None
    name = name.split('.')[0] if isinstance(name, str) else name  # pretrained tags: 'convnext_tiny_dcls.dcls_in1k'
    if name not in ours or name in SKIPPED_MODELS or any(s in item.name for s in SKIPPED_TESTS):
        return False
    return name in FULL or item.originalname in FAST_TESTS


def pytest_collection_modifyitems(config, items):
    ours = set(plugin_models())
    kept, dropped = [], []
    for item in items:
        inside = str(item.path).startswith(HERE + os.sep)
        (kept if not inside or _selected(item, ours) else dropped).append(item)
    if dropped:
        items[:] = kept
        config.hook.pytest_deselected(items=dropped)
