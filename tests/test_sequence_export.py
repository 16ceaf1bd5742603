"""The continuous-kernel recipes' L2 penalty, export and FLOPs of causal / SIREN layers, fixed data subsets."""

import pytest
import timm
import torch

import dcls_timm  # noqa: F401
from dcls_timm.evaluation.datasets import SubsetDataset, fixed_subset
from dcls_timm.export import CausalConv1d, bake_kernels
from dcls_timm.info import model_info
from dcls_timm.layers import SirenCKConv, continuous_convs, kernel_net_convs
from dcls_timm.layers.flexconv import causal_conv1d
from dcls_timm.recipe import CompositeRecipe, L2PenaltyRecipe, l2_penalty


def _ccnn_1d(**kw):
    return timm.create_model('ccnn_4_140', data_dim=1, in_chans=1, width=8, **kw)


def test_l2_penalty_is_the_ccnn_sum_of_norms():
    torch.manual_seed(0)
    model = _ccnn_1d()
    model(torch.randn(2, 1, 10, 10))
    convs = continuous_convs(model)
    kernel_net = {id(p) for m in convs for p in m.kernel_net.parameters()}
    outside = [p for p in model.parameters() if id(p) not in kernel_net]
    # mask widths, pointwise convs, norms, head: all outside the kernel networks
    assert any(p is m.mask_sigma for m in convs for p in outside)
    expected = sum(p.norm() for p in outside) + sum(m.causal_kernel(100).norm() for m in convs)
    torch.testing.assert_close(l2_penalty(model), expected)
    # CKCNN's variant: sampled kernels and the continuous convs' biases only
    expected_k = sum(m.bias.norm() for m in convs if m.bias is not None) + sum(
        m.causal_kernel(100).norm() for m in convs)
    torch.testing.assert_close(l2_penalty(model, 'kernels'), expected_k)
    with pytest.raises(ValueError, match='scope'):
        l2_penalty(model, 'weights')


def test_l2_penalty_reaches_kernel_networks_through_the_sampled_kernel():
    torch.manual_seed(0)
    model = timm.create_model('ckcnn_2_30', in_chans=1, hidden=4, num_classes=3)
    model(torch.randn(2, 1, 16))
    recipe = CompositeRecipe([L2PenaltyRecipe(1e-3)])
    loss = recipe.aux_losses(model, epoch=0)['l2_penalty']
    loss.backward()
    siren = [m for m in model.modules() if isinstance(m, SirenCKConv)]
    assert siren and all(p.grad is not None and p.grad.abs().sum() > 0 for m in siren for p in m.kernel_net.parameters())
    # the penalty is lambda x the sum of norms; a model with no forward yet cannot say its kernel length
    fresh = timm.create_model('ckcnn_2_30', in_chans=1, hidden=4)
    with pytest.raises(RuntimeError, match='as long as its input'):
        l2_penalty(fresh)
    with pytest.raises(ValueError, match='> 0'):
        L2PenaltyRecipe(0.)


def test_train_flag_builds_the_penalty_recipe():
    from dcls_timm.training import parse_args
    from dcls_timm.training.trainer import _recipe
    model = _ccnn_1d()
    args = parse_args(['--model', 'ccnn_4_140', '--l2-penalty', '1e-6', '--weight-decay', '0', '--data-dir', '.'])
    recipe = _recipe(args, model)
    assert 'l2_penalty' in recipe.aux_loss_names and 'antialias_loss' in recipe.aux_loss_names
    args = parse_args(['--model', 'ccnn_4_140', '--data-dir', '.'])
    assert 'l2_penalty' not in _recipe(args, model).aux_loss_names
    cfg = parse_args(['-c', 'configs/ccnn_4_140_smnist.yaml'])
    assert cfg.l2_penalty == 1e-6 and cfg.weight_decay == 0
    with pytest.raises(Exception, match='>= 0'):
        _recipe(parse_args(['--model', 'ccnn_4_140', '--l2-penalty', '-1', '--data-dir', '.']), model)


@pytest.mark.parametrize('fft', [False, True])
def test_causal_conv_module_equals_function(fft):
    torch.manual_seed(0)
    w, b, x = torch.randn(4, 1, 9), torch.randn(4), torch.randn(2, 4, 30)
    conv = CausalConv1d(w, b, groups=4, fft=fft, length=30)
    torch.testing.assert_close(conv(x), causal_conv1d(x, w, b, groups=4), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='baked for sequences of length 30'):
        conv(torch.randn(2, 4, 31))
    assert CausalConv1d(w, b, 4, fft).forward(torch.randn(1, 4, 31)).shape == (1, 4, 31)  # length 0: any


@pytest.mark.parametrize('name, kwargs', [('ckcnn_2_30', dict(hidden=6)), ('ccnn_4_140', dict(data_dim=1, width=8))])
def test_bake_sequence_models_at_a_length(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1, **kwargs).eval()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match='sequence_length'):
        bake_kernels(model)  # no forward pass yet: the kernel length is unknown
    baked = bake_kernels(model, sequence_length=64)
    assert not kernel_net_convs(baked) and any(isinstance(m, CausalConv1d) for m in baked.modules())
    ref = model(x)
    torch.testing.assert_close(baked(x), ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the blocks' no-grad inference path, with the baked depthwise convs
        torch.testing.assert_close(baked(x), ref, rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(baked)
    torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match='baked for sequences of length 64'):
        scripted(torch.randn(2, 1, 10, 10))
    # tracing records no Python check: the graph itself refuses another length (it once ran with this kernel)
    traced = torch.jit.trace(baked, x, check_trace=False)
    torch.testing.assert_close(traced(torch.flip(x, [0])), ref.flip(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        traced(torch.randn(2, 1, 10, 10))
    # long kernels keep the FFT path after baking
    long_model = timm.create_model(name, in_chans=1, **kwargs).eval()
    with torch.no_grad():
        for conv in continuous_convs(long_model):
            if conv.has_mask:
                conv.mask_sigma.fill_(1.)  # uncropped, as after training: 784 taps
    y = torch.randn(1, 1, 28, 28)
    long_ref = long_model(y)
    long_baked = bake_kernels(long_model)  # the last forward's length: 784
    assert any(m.fft for m in long_baked.modules() if isinstance(m, CausalConv1d))
    torch.testing.assert_close(long_baked(y), long_ref, rtol=1e-4, atol=1e-4)


def test_flops_count_fft_convolutions_as_direct_ones():
    torch.manual_seed(0)
    model = timm.create_model('ckcnn_2_30', in_chans=1, num_classes=10)
    info = model_info(model, (1, 28, 28))
    length = 784
    # causal kernels as long as the input: lag i only meets steps t >= i, but fvcore counts the padded dense conv
    convs = length * length * (30 * 1 + 30 * 30 + 30 * 30 + 30 * 30)  # 1 -> 30, 30 -> 30 (x3)
    shortcut = length * 30 * 1
    assert info['gflops_by_operator']['conv'] * 1e9 == pytest.approx(convs + shortcut, rel=1e-6)
    assert info['gflops_kernel_construction'] > 0  # the SIREN networks, reported apart
    assert all(m.fft == 'auto' for m in kernel_net_convs(model))  # restored after counting
    ccnn = _ccnn_1d()
    info = model_info(ccnn, (1, 28, 28))
    assert info['gflops'] > 0 and not any('fft' in op for op in info['gflops_by_operator'])


def test_fixed_subset_is_a_property_of_the_data():
    data = [(torch.full((1,), float(i)), i % 3) for i in range(50)]

    class DS(torch.utils.data.Dataset):
        classes = ['a', 'b', 'c']
        transform = None

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    a, b = fixed_subset(DS(), 10), fixed_subset(DS(), 10)
    assert isinstance(a, SubsetDataset) and len(a) == 10 and a.indices == b.indices == sorted(a.indices)
    assert len(set(a.indices)) == 10 and [a[i][1] for i in range(10)] == [i % 3 for i in a.indices]
    assert a.classes == ['a', 'b', 'c']
    a.transform = 'T'
    assert a.dataset.transform == 'T' and a.transform == 'T'
    with pytest.raises(ValueError, match='1..50'):
        fixed_subset(DS(), 51)
    import pickle
    assert pickle.loads(pickle.dumps(fixed_subset(data, 5))).indices == fixed_subset(data, 5).indices


def test_a_named_tag_builds_its_architecture_without_weights(tmp_path):
    model = timm.create_model('ckcnn_2_30.pmnist')
    assert model.seq_input.permutation is not None  # the tag's permutation, as its weights were trained
    assert model.blocks[0].conv1.kernel_net.omega_0 == pytest.approx(43.45667389601194)
    assert timm.create_model('ckcnn_2_30.pmnist', permute=False).seq_input.permutation is None  # given wins
    assert timm.create_model('ckcnn_2_30').seq_input.permutation is None  # no tag named: the plain defaults
    # a checkpoint of the tag (validate.py --model ckcnn_2_30.pmnist --checkpoint f) meets the right model
    torch.save(model.state_dict(), tmp_path / 'f.pth')
    from dcls_timm.checkpoint import load_weights
    other = timm.create_model('ckcnn_2_30.pmnist')
    load_weights(other, str(tmp_path / 'f.pth'))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))
