"""CCNN inference paths (2-D: 1x1 convs with their GELUs fused, BatchNorm folded into the direct depthwise convs;
1-D: BatchNorm applied while padding, the rest in place; the final BatchNorm after the average pool): the module
path's numbers to float32 rounding, taken only where nothing can tell."""
import pytest
import timm
import torch

import dcls_timm.layers.flexconv as flexconv
import dcls_timm.models._classifier_net as classifier_net
import dcls_timm.models.ccnn as ccnn
from dcls_timm.layers import continuous_convs


@pytest.fixture
def taken(monkeypatch):
    """Counts the blocks that take the in-place path."""
    count = [0]
    decide = ccnn.CCNNBlock._inplace_inference

    def counted(self, x):
        result = decide(self, x)
        count[0] += result
        return result
    monkeypatch.setattr(ccnn.CCNNBlock, '_inplace_inference', counted)
    return count


def _plain(model, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(ccnn.CCNNBlock, '_inplace_inference', lambda self, x: False)
        m.setattr(classifier_net.StemBlocksClassifier, '_pooled_norm_head', lambda self, x: None)
        return model(x)


def _counter(monkeypatch, module, name):
    count = [0]
    original = getattr(module, name)

    def counted(*args, **kw):
        count[0] += 1
        return original(*args, **kw)
    monkeypatch.setattr(module, name, counted)
    return count


def _randomize_batch_norms(model):
    # non-trivial eval BatchNorms: the fast paths fold them into a kernel, the padding or the pooled features
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize('kwargs, shape, spread', [(dict(), (2, 3, 16, 16), False),
                                                    (dict(), (2, 3, 16, 16), True),
                                                    (dict(data_dim=1, in_chans=1), (2, 1, 64), False),
                                                    (dict(data_dim=1, in_chans=1), (2, 1, 160), True)])
def test_equal_to_the_module_path_and_input_untouched(kwargs, shape, spread, taken, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=12, **kwargs)
    model(torch.randn(*shape))  # the one-time kernel-network rescale, and batch-norm statistics
    model.eval()
    _randomize_batch_norms(model)
    if spread:  # kernels over the whole input (160 taps, 33x33): the FFT route, not the direct convolution
        for m in continuous_convs(model):
            with torch.no_grad():
                m.mask_sigma.fill_(1.)
        assert all(m._use_fft(m.kernel_sizes(shape[-1]), autograd=False) for m in continuous_convs(model))
    x = torch.randn(*shape)
    before = x.clone()
    fused = _counter(monkeypatch, ccnn, 'fused_conv2d')
    monkeypatch.setattr(classifier_net, 'fused_conv2d', ccnn.fused_conv2d)  # the stem's, counted too
    folded = _counter(monkeypatch, flexconv, 'affine_input_conv')
    pooled = _counter(monkeypatch, classifier_net, 'batch_norm_affine')
    with torch.inference_mode():
        fast = model(x)
        assert taken[0] == len(model.blocks)
        # 2-D: the stem's pointwise conv (BatchNorm folded in) and both 1x1 convs of each block
        assert fused[0] == (0 if kwargs.get('data_dim') == 1 else 1 + 2 * len(model.blocks))
        # 2-D direct depthwise convs take their block's BatchNorm into the kernel and bias
        assert folded[0] == (0 if kwargs.get('data_dim') == 1 or spread else len(model.blocks))
        assert pooled[0] == 1  # the final BatchNorm after the average pool
        plain = _plain(model, x, monkeypatch)
    assert torch.equal(x, before)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs, shape', [(dict(), (2, 3, 16, 16)), (dict(global_pool='fast'), (2, 3, 16, 16)),
                                           (dict(data_dim=1, in_chans=1), (2, 1, 64)),
                                           (dict(data_dim=1, in_chans=1, global_pool='last'), (2, 1, 64))])
def test_final_batch_norm_after_pooling(kwargs, shape):
    # a per-channel affine map commutes with average (and last-step) pooling: the logits of normalising first
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=12, **kwargs).eval()
    _randomize_batch_norms(model)
    x = torch.randn(*shape)
    with torch.inference_mode():
        features = model.blocks(model.stem(model._input(x)))
        logits = model._pooled_norm_head(features)
        assert logits is not None
        torch.testing.assert_close(logits, model.forward_head(model.norm(features)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)), rtol=1e-5, atol=1e-5)


def test_final_batch_norm_stays_where_it_cannot_move():
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=12, global_pool='max').eval()  # max does not commute
    _randomize_batch_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        features = model.blocks(model.stem(x))
        assert model._pooled_norm_head(features) is None
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)), rtol=0, atol=0)
    model.reset_classifier(10, 'avg')
    seen = []
    handle = model.norm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        assert model._pooled_norm_head(features) is None  # a hook on the norm sees the normalised features
        model(x)
    handle.remove()
    assert seen == [(2, 12, 16, 16)]
    assert model._pooled_norm_head(features) is None  # autograd
    model.norm.train()
    with torch.inference_mode():
        assert model._pooled_norm_head(features) is None  # batch statistics


def test_hooks_training_and_autograd_take_the_module_path(taken):
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=12).eval()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    stem_inputs = []
    stem_hook = model.stem[1].register_forward_pre_hook(lambda m, i: stem_inputs.append(i[0].shape))
    handle = model.blocks[0].conv.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        model(x)
        # the hooked block keeps its conv output as returned; the others still take the in-place path
        assert taken[0] == len(model.blocks) - 1
        block = model.blocks[0]
        torch.testing.assert_close(seen[0], block.conv(block.norm(model.stem(x))), rtol=0, atol=0)
    handle.remove()
    stem_hook.remove()
    assert stem_inputs and all(shape == (2, 12, 16, 16) for shape in stem_inputs)  # the stem's BatchNorm was called
    taken[0] = 0
    model(x).sum().backward()  # autograd: module path
    model.train()
    with torch.no_grad():
        model(x)  # training mode: dropout is live
    assert taken[0] == 0


@pytest.mark.parametrize('kwargs, shape', [(dict(), (2, 3, 16, 16)), (dict(data_dim=1, in_chans=1), (2, 1, 64))])
def test_monte_carlo_dropout_autocast_and_jit_trace_take_the_module_path(kwargs, shape, taken):
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=12, dropout=0.9, **kwargs).eval()
    x = torch.randn(*shape)
    model.blocks[0].drop.train()  # Monte Carlo dropout in one block
    with torch.no_grad():
        model(x)
    assert taken[0] == len(model.blocks) - 1
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model(x)
    assert taken[0] == len(model.blocks) - 1  # autocast: the module path (the residual stream stays float32)
    traced = torch.jit.trace(model, x, check_trace=False)  # the custom FFT backward is not traceable: plain ops
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
