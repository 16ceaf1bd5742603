"""The fused CPU inference MLP of the ConvNeXt blocks: same numbers as timm's block, taken only where it applies."""
import copy
import pickle

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcls_timm.models.convnext_dcls as convnext_dcls
from dcls_timm.layers.fused_mlp import fused_mlp_available, mlp_residual, use_fused_mlp
from dcls_timm.models.convnext_dcls import ConvNeXtFusedBlock, set_fused_mlp

pytestmark = pytest.mark.skipif(not fused_mlp_available(), reason="this PyTorch build has no oneDNN fused linear")

TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=10)


@pytest.mark.parametrize('gamma', [True, False])
@pytest.mark.parametrize('bias', [True, False])
def test_mlp_residual_equals_the_module_path(gamma, bias):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(24, 96, bias=bias), nn.Linear(96, 24, bias=bias)
    x, shortcut = torch.randn(2, 5, 7, 24), torch.randn(2, 5, 7, 24)
    g = torch.randn(24) if gamma else None
    with torch.inference_mode():
        assert use_fused_mlp(x, fc1, nn.GELU(), fc2)
        out = mlp_residual(x, shortcut, fc1, fc2, g)
        y = fc2(F.gelu(fc1(x)))
        ref = shortcut + (y * g if gamma else y)
        h = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, 24), fc1.weight, fc1.bias, 'gelu', [], 'none')
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(h, F.gelu(fc1(x.reshape(-1, 24))).detach())  # the GELU matmul is bit-exact


def test_where_the_fused_path_applies():
    fc1, fc2, x = nn.Linear(8, 32), nn.Linear(32, 8), torch.randn(2, 3, 3, 8)
    with torch.inference_mode():
        assert use_fused_mlp(x, fc1, nn.GELU(), fc2)
        assert use_fused_mlp(x, fc1, timm.layers.get_act_layer('gelu')(), fc2)
        assert not use_fused_mlp(x, fc1, nn.GELU(approximate='tanh'), fc2)  # oneDNN's 'none' is the erf form
        assert not use_fused_mlp(x, fc1, nn.ReLU(), fc2)
        assert not use_fused_mlp(x.double(), copy.deepcopy(fc1).double(), nn.GELU(), copy.deepcopy(fc2).double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not use_fused_mlp(x, fc1, nn.GELU(), fc2)
    assert not use_fused_mlp(x, fc1, nn.GELU(), fc2)  # autograd on
    with torch.no_grad():
        assert use_fused_mlp(x, fc1, nn.GELU(), fc2)


@pytest.fixture
def calls(monkeypatch):
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return mlp_residual(*args, **kwargs)
    monkeypatch.setattr(convnext_dcls, 'mlp_residual', counted)
    return count


@pytest.mark.parametrize('name', ['convnext_tiny_dcls', 'convnext_tiny_dcls_gauss', 'convnext_tiny_k17'])
def test_model_inference_equals_timm_block_forward(name, calls):
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY).eval()
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtFusedBlock)]
    assert len(blocks) == sum(TINY['depths'])
    for block in blocks:  # non-trivial layer scale, so the folding into fc2 is exercised
        nn.init.normal_(block.gamma, 0.5, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fused = model(x)
        assert calls[0] == len(blocks)
        assert set_fused_mlp(model, False) == len(blocks)
        plain = model(x)
        assert calls[0] == len(blocks)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # training-mode and autograd forwards are timm's, whatever the switch
    set_fused_mlp(model, True)
    model.train()
    model(x).sum().backward()
    model.eval()
    model(x)
    assert calls[0] == len(blocks)


def test_features_and_intermediates_take_the_fused_path(calls):
    model = timm.create_model('convnext_tiny_dcls', **TINY).eval()
    features = timm.create_model('convnext_tiny_dcls', features_only=True, **TINY).eval()
    features.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('head')}, strict=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        maps = features(x)
    assert calls[0] == 2 * sum(TINY['depths'])
    assert [tuple(m.shape) for m in maps] == [tuple(i.shape) for i in inter]


def test_block_is_timms_block_for_state_and_serialisation():
    model = timm.create_model('convnext_tiny_dcls', **TINY)
    dense = timm.create_model('convnext_tiny', **TINY)
    names = {k for k in model.state_dict() if '.conv_dw.' not in k and '.positions.' not in k}
    assert names == {k for k in dense.state_dict() if '.conv_dw.' not in k}
    block = model.stages[1].blocks[0]
    assert isinstance(block, timm.models.convnext.ConvNeXtBlock)
    copied = pickle.loads(pickle.dumps(model))
    assert isinstance(copied.stages[1].blocks[0], ConvNeXtFusedBlock)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(copied.eval()(x), copy.deepcopy(model).eval()(x), rtol=0, atol=0)


def test_conv_mlp_models_keep_timms_forward(calls):
    model = timm.create_model('convnext_atto_dcls', num_classes=10).eval()  # conv_mlp=True: NCHW 1x1 convs
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert calls[0] == 0


def test_empty_batch_keeps_timms_forward():
    model = timm.create_model('convnext_tiny_dcls', **TINY).eval()
    with torch.inference_mode():
        assert model(torch.randn(0, 3, 32, 32)).shape == (0, 10)


def test_a_failed_operator_probe_keeps_timms_forward(calls, monkeypatch):
    import dcls_timm.layers.fused_mlp as fused_mlp
    monkeypatch.setattr(fused_mlp, '_AVAILABLE', False)
    model = timm.create_model('convnext_tiny_dcls', **TINY).eval()
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert calls[0] == 0
    monkeypatch.setattr(fused_mlp, '_AVAILABLE', None)
    assert fused_mlp.fused_mlp_available()  # probed again: this build's operator works
