"""CCNN's 1-D training paths: the depthwise bias folded into the pointwise conv's bias, the channel dropout folded
into the linear layer's weight (one per sample), the residual added in place. Same values and gradients as the module
path (float64), the same dropout masks from the same generator state, and the module path wherever a hook could
tell."""
import copy

import pytest
import timm
import torch

import dcls_timm.layers.flexconv as flexconv
import dcls_timm.models.ccnn as ccnn
from dcls_timm.layers import SeparableFlexConv, continuous_convs


def _module_path(monkeypatch):
    monkeypatch.setattr(ccnn.CCNNBlock, '_sequence_path', lambda self, x: None)
    monkeypatch.setattr(flexconv.SeparableFlexConv, '_bias_folded', lambda self, x: None)


def _model(dropout=0.3, spread=False, fft='auto'):
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=8, hidden=8, data_dim=1, in_chans=1, dropout=dropout,
                              fft=fft).double()
    model(torch.randn(2, 1, 40, dtype=torch.float64))  # the one-time kernel-network rescale
    with torch.no_grad():
        for m in continuous_convs(model):
            m.bias.uniform_(-1, 1)  # non-zero depthwise biases: the fold carries them through the pointwise conv
            if spread:
                m.mask_sigma.fill_(1.)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dropout, training', [(0.3, True), (1.0, True), (0., True), (0.3, False)])
@pytest.mark.parametrize('fft, spread', [('never', False), ('auto', True)])  # direct causal convs, the FFT route
def test_training_step_equals_the_module_path(dropout, training, fft, spread, monkeypatch):
    model = _model(dropout, spread, fft).train(training)  # eval: autograd without dropout (e.g. attributions)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 1, 40, dtype=torch.float64)
    folds = {'bias': [0], 'block': [0]}
    for key, owner, name in (('bias', flexconv.SeparableFlexConv, '_bias_folded'),
                             ('block', ccnn.CCNNBlock, '_sequence_path')):
        original = getattr(owner, name)

        def counted(self, x, original=original, key=key):
            out = original(self, x)
            folds[key][0] += out is not None
            return out
        monkeypatch.setattr(owner, name, counted)
    torch.manual_seed(1)
    out = model(x)
    out.square().sum().backward()
    # every separable conv (stem and blocks) folds its bias; every block takes the sequence path
    assert folds['bias'][0] == 1 + len(model.blocks)
    assert folds['block'][0] == len(model.blocks)
    _module_path(monkeypatch)
    torch.manual_seed(1)  # the same dropout masks
    ref = reference(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    got, want = _grads(model), _grads(reference)
    assert got.keys() == want.keys()
    scale = max(g.abs().max() for g in want.values())
    for name in want:  # relative to the largest gradient: the stem's biases feed a BatchNorm (zero gradient)
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10 * scale, msg=name)


def test_separable_bias_fold_without_pointwise_bias_and_without_autograd():
    torch.manual_seed(0)
    conv = SeparableFlexConv(4, 6, -1, dim=1, causal=True, bias=False).double()
    with torch.no_grad():
        conv.depthwise.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 30, dtype=torch.float64)
    with torch.no_grad():
        assert conv._bias_folded(x) is not None
        torch.testing.assert_close(conv(x), conv.pointwise(conv.depthwise(x)), rtol=1e-12, atol=1e-12)


def test_hooks_autocast_and_other_layers_take_the_module_path():
    model = _model()
    x = torch.randn(2, 1, 40, dtype=torch.float64)
    h = torch.randn(2, 8, 40, dtype=torch.float64)  # a block's input
    block = model.blocks[0]
    assert block._sequence_path(h) is not None and block.conv._bias_folded(h) is not None
    seen = []
    for module in (block.drop, block.act2):  # hooks see the dropout's output, and the GELU's before the residual
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        assert block._sequence_path(h) is None
        handle.remove()
    handle = block.drop.register_forward_hook(lambda m, i, o: seen.append(o))
    model(x)
    assert len(seen) == 1
    handle.remove()
    handle = block.conv.depthwise.register_forward_hook(lambda m, i, o: seen.append(o))
    assert block.conv._bias_folded(h) is None  # ... and the depthwise conv's biased output
    handle.remove()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert block._sequence_path(h) is None and block.conv._bias_folded(h) is None
    block.act2 = torch.nn.Tanh()  # its backward keeps its output: no residual added into it
    assert block._sequence_path(h) is None
    model(x).sum().backward()  # the module path: no in-place error


def test_baked_model_trains_on_the_module_path():
    # bake_kernels makes the depthwise convs plain modules: no skip_bias to call, the module path serves
    from dcls_timm.export import bake_kernels
    model = _model().float()
    baked = bake_kernels(model.eval(), sequence_length=40).train()
    assert baked.blocks[0].conv._bias_folded(torch.randn(2, 8, 40)) is None
    x = torch.randn(3, 1, 40)
    torch.manual_seed(2)
    out = baked(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and baked.blocks[0].linear.weight.grad is not None


def test_backward_hooks_take_the_module_path(monkeypatch):
    # a skipped module call would skip its backward hooks, and whatever they do to the gradients
    model = _model()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 1, 40, dtype=torch.float64)
    h = torch.randn(2, 8, 40, dtype=torch.float64)
    block = model.blocks[0]

    def halve(module, grad_input, grad_output):
        return tuple(None if g is None else g / 2 for g in grad_input)
    for name in ('linear', 'drop', 'conv.pointwise', 'act2'):
        for kind in ('register_full_backward_hook', 'register_backward_hook', 'register_full_backward_pre_hook'):
            fresh = copy.deepcopy(block)  # a module takes old-style or full backward hooks, not both in turn
            getattr(fresh.get_submodule(name), kind)(halve if 'pre' not in kind else lambda m, g: (g[0] / 2,))
            assert fresh._sequence_path(h) is None
            assert (fresh.conv._bias_folded(h) is None) == (name == 'conv.pointwise')
            with torch.no_grad():  # no backward: nothing a hook could see
                assert fresh.conv._bias_folded(h) is not None
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    assert block._sequence_path(h) is None and block.conv._bias_folded(h) is None
    model(x).sum().backward()  # the module path: no in-place change of a hooked GELU's output
    handle.remove()
    # a hook that changes the gradients: the same gradients as the module path with the same hook
    model.zero_grad()
    calls = []
    for net in (model, reference):
        net.blocks[0].linear.register_full_backward_hook(lambda m, gi, go: calls.append(m) or (gi[0] / 2,))
    torch.manual_seed(1)
    model(x).square().sum().backward()
    _module_path(monkeypatch)
    torch.manual_seed(1)
    reference(x).square().sum().backward()
    assert len(calls) == 2
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_bias_fold_keeps_the_module_path_for_mixed_dtypes_and_invalid_dropout():
    torch.manual_seed(0)
    conv = SeparableFlexConv(4, 6, -1, dim=1, causal=True)
    conv.depthwise.double()
    x = torch.randn(2, 4, 30)
    assert conv._bias_folded(x) is None
    assert conv(x).dtype == conv.pointwise(conv.depthwise(x)).dtype
    model = _model()
    block = model.blocks[0]
    block.drop.p = -0.1  # set after construction: the module's own error, not a silently skipped dropout
    with pytest.raises(ValueError, match='dropout probability'):
        block(torch.randn(2, 8, 40, dtype=torch.float64))
