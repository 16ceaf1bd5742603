"""The fused CPU inference paths (ConvNeXt MLP, FlexNet conv + BN + ReLU): the module path's numbers, taken only where
they apply."""
import copy
import pickle

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcls_timm.models.convnext_dcls as convnext_dcls
import dcls_timm.layers.fused as fused
import dcls_timm.models._classifier_net as classifier_net
from dcls_timm.layers.fused import fused_conv2d, fused_ops_available, mlp_residual, use_fused_conv, use_fused_mlp
from dcls_timm.models.flexnet import FlexNetBlock
from dcls_timm.models.convnext_dcls import ConvNeXtFusedBlock, set_fused_mlp

pytestmark = pytest.mark.skipif(not fused_ops_available(), reason="this PyTorch build has no oneDNN fused operators")

TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=10)


@pytest.mark.parametrize('gamma', [True, False])
@pytest.mark.parametrize('bias', [True, False])
def test_mlp_residual_equals_the_module_path(gamma, bias):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(24, 96, bias=bias).eval(), nn.Linear(96, 24, bias=bias).eval()
    x, shortcut = torch.randn(2, 5, 7, 24), torch.randn(2, 5, 7, 24)
    g = torch.randn(24) if gamma else None
    with torch.inference_mode():
        assert use_fused_mlp(x, fc1, nn.GELU().eval(), fc2)
        out = mlp_residual(x, shortcut, fc1, fc2, g)
        y = fc2(F.gelu(fc1(x)))
        ref = shortcut + (y * g if gamma else y)
        h = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, 24), fc1.weight, fc1.bias, 'gelu', [], 'none')
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(h, F.gelu(fc1(x.reshape(-1, 24))).detach())  # the GELU matmul is bit-exact


def test_where_the_fused_path_applies():
    fc1, fc2, x = nn.Linear(8, 32).eval(), nn.Linear(32, 8).eval(), torch.randn(2, 3, 3, 8)
    with torch.inference_mode():
        assert use_fused_mlp(x, fc1, nn.GELU().eval(), fc2)
        assert use_fused_mlp(x, fc1, timm.layers.get_act_layer('gelu')().eval(), fc2)
        assert not use_fused_mlp(x, fc1, nn.GELU(approximate='tanh').eval(), fc2)  # oneDNN's 'none' is the erf form
        assert not use_fused_mlp(x, fc1, nn.ReLU().eval(), fc2)
        assert not use_fused_mlp(x.double(), copy.deepcopy(fc1).double(), nn.GELU().eval(),
                                 copy.deepcopy(fc2).double())
        assert not use_fused_mlp(x, fc1, nn.GELU(), fc2)  # a module in training mode
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not use_fused_mlp(x, fc1, nn.GELU().eval(), fc2)
    assert not use_fused_mlp(x, fc1, nn.GELU().eval(), fc2)  # autograd on
    with torch.no_grad():
        assert use_fused_mlp(x, fc1, nn.GELU().eval(), fc2)


def _count_calls(monkeypatch, fn, *modules):
    """Replace ``fn`` in each module by a wrapper that counts its calls; returns the one-element counter."""
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return fn(*args, **kwargs)
    for module in modules:
        monkeypatch.setattr(module, fn.__name__, counted)
    return count


@pytest.fixture
def calls(monkeypatch):
    return _count_calls(monkeypatch, mlp_residual, convnext_dcls)


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
    monkeypatch.setattr(fused, '_AVAILABLE', False)
    model = timm.create_model('convnext_tiny_dcls', **TINY).eval()
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert calls[0] == 0
    monkeypatch.setattr(fused, '_AVAILABLE', None)
    assert fused.fused_ops_available()  # probed again: this build's operators work


def test_hooks_on_skipped_modules_keep_timms_forward(calls):
    model = timm.create_model('convnext_tiny_dcls', **TINY).eval()
    seen = []
    handle = model.stages[1].blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert seen == [(1, 4, 4, 64)] and calls[0] == sum(TINY['depths']) - 1  # only the hooked block left the fast path
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert calls[0] == sum(TINY['depths']) - 1  # a global hook: every block took timm's forward


@pytest.fixture
def conv_calls(monkeypatch):
    import dcls_timm.models.flexnet as flexnet
    return _count_calls(monkeypatch, fused_conv2d, flexnet, classifier_net)  # the blocks' and the stem's


def _with_batch_stats(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.)
            nn.init.normal_(m.weight, 1., 0.2)
            nn.init.normal_(m.bias, 0., 0.2)
    return model.eval()


@pytest.mark.parametrize('name', ['flexnet_3', 'flexnet_7_conv3'])
def test_flexnet_inference_equals_the_module_path(name, conv_calls):
    model = _with_batch_stats(timm.create_model(name))
    blocks = [m for m in model.modules() if isinstance(m, FlexNetBlock)]
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        out = model(x)
        assert conv_calls[0] == 1 + 2 * len(blocks)  # the stem, both convolutions of every block
        for block in [model.stem] + blocks:
            block.fast_path = False
        ref = model(x)
    assert conv_calls[0] == 1 + 2 * len(blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.abs().max() > 1e-2


def test_fused_conv2d_equals_the_modules():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(5, 6, 3, padding=1), _with_batch_stats(nn.BatchNorm2d(6))
    x, residual = torch.randn(2, 5, 7, 9), torch.randn(2, 6, 7, 9)
    relu, gelu = nn.ReLU(), nn.GELU()
    with torch.inference_mode():
        assert use_fused_conv(x, relu, bn) and use_fused_conv(x, gelu)
        out = fused_conv2d(x, conv.weight, conv.bias, [1, 1], relu, bn, residual=residual)
        ref = torch.relu(bn(conv(x)) + residual)
        no_bias = fused_conv2d(x, conv.weight, None, [1, 1], relu, bn)
        ref_no_bias = torch.relu(bn(conv(x) - conv.bias.view(1, -1, 1, 1)))
        with_gelu = fused_conv2d(x, conv.weight, conv.bias, [1, 1], gelu)
        ref_gelu = F.gelu(conv(x))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_bias, ref_no_bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_gelu, ref_gelu, rtol=1e-5, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert not use_fused_conv(x, nn.GELU(approximate='tanh'))
        assert not use_fused_conv(x, nn.SiLU(), bn)
        assert not use_fused_conv(x.double(), relu, bn)
        assert not use_fused_conv(x, relu, nn.BatchNorm2d(6, track_running_stats=False).eval())
        assert not use_fused_conv(x, relu, copy.deepcopy(bn).train())


def test_flexnet_keeps_the_module_path_where_the_fused_one_does_not_apply(conv_calls):
    model = _with_batch_stats(timm.create_model('flexnet_3'))
    model.stem.fast_path = False  # counted here: the blocks alone
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x).sum().backward()  # training and autograd
    model.eval()
    model(x)  # autograd on
    block = model.blocks[0]
    block.drop.train()  # Monte Carlo dropout at evaluation
    with torch.no_grad():
        model(x)
    assert conv_calls[0] == 2 * (len(model.blocks) - 1)
    block.drop.eval()
    handle = block.bn1.register_forward_hook(lambda m, i, o: None)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert conv_calls[0] == 4 * (len(model.blocks) - 1)
    for conv in (block.conv1, block.conv2):  # a kernel of FFT size
        conv.mask_sigma.data.fill_(1.)
    with torch.no_grad():
        fft_out = model(x)
    assert conv_calls[0] == 6 * (len(model.blocks) - 1)
    block.fast_path = False
    with torch.no_grad():
        model(x)
    assert conv_calls[0] == 8 * (len(model.blocks) - 1)
    assert torch.isfinite(fft_out).all()


def test_a_drop_path_in_training_mode_keeps_timms_forward(calls):
    model = timm.create_model('convnext_tiny_dcls', drop_path_rate=0.5, **TINY).eval()
    block = model.stages[1].blocks[0]
    block.drop_path.train()  # stochastic depth kept on at evaluation: the fused path would skip it
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert calls[0] == sum(TINY['depths']) - 1


@pytest.mark.parametrize('name', ['flexnet_3', 'flexnet_7_conv3'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_fused_features_keep_the_module_paths_memory_format(name, channels_last):
    # plain Conv2d models keep the input's format (as F.conv2d does), FlexConv ones are channels-last either way
    model = _with_batch_stats(timm.create_model(name, widths=(4, 4), num_classes=3))
    x = torch.randn(2, 3, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused_features = model.forward_features(x)
        for m in model.modules():
            if hasattr(m, 'fast_path'):
                m.fast_path = False
        ref = model.forward_features(x)
    torch.testing.assert_close(fused_features, ref, rtol=1e-5, atol=1e-5)
    assert fused_features.stride() == ref.stride()


def test_residual_with_gelu_keeps_the_module_path(conv_calls):
    # oneDNN runs no GELU after its binary (residual add) post-op: such a block takes its modules
    conv, bn, x = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert use_fused_conv(x, nn.ReLU(), bn, residual=True) and use_fused_conv(x, nn.GELU(), bn)
        assert not use_fused_conv(x, nn.GELU(), bn, residual=True)
    model = _with_batch_stats(timm.create_model('flexnet_7_conv3', widths=(4, 4), num_classes=3))
    for block in model.blocks:
        block.act2 = nn.GELU()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 12, 12))
    assert conv_calls[0] == 1 and torch.isfinite(out).all()  # the stem alone fused
