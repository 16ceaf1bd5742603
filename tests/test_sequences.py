"""Continuous kernels on sequences (SPEC 8): CCNN 1-D and 2-D, the original CKConv/CKCNN and its published layout,
causal convolutions, FFT paths, the pMNIST permutation, CCNN's init, timm API, export, FLOPs, a Fashion-MNIST run."""
import copy
import math
from unittest import mock

import pytest
import timm
import torch

import dcls_timm  # noqa: F401
import dcls_timm.layers.flexconv as flexconv
from dcls_timm.layers import SeparableFlexConv, SirenCKConv, causal_conv1d, continuous_convs
from dcls_timm.layers.flexconv import FlexConv
from dcls_timm.models.ckcnn import _PUBLISHED_RENAMES

CCNN_PARAMS = [  # (model, kwargs, SPEC 8.1 total)
    ('ccnn_4_140', dict(data_dim=1, in_chans=1), 198_769),    # sMNIST / pMNIST / Speech raw
    ('ccnn_4_140', dict(data_dim=1, in_chans=3), 199_117),    # sCIFAR10
    ('ccnn_4_140', dict(data_dim=1, in_chans=20), 202_075),   # Speech Commands MFCC
    ('ccnn_4_140', dict(), 201_042),                          # CIFAR-10 2-D
    ('ccnn_4_140', dict(num_classes=100), 213_732),           # CIFAR-100 2-D
    ('ccnn_6_380', dict(data_dim=1, in_chans=1), 1_993_091),
    ('ccnn_6_380', dict(data_dim=1, in_chans=3), 1_993_983),
    ('ccnn_6_380', dict(data_dim=1, in_chans=20), 2_001_565),
    ('ccnn_6_380', dict(), 1_999_366),
    ('ccnn_6_380', dict(num_classes=100), 2_033_656),
    ('ckcnn_2_30', dict(in_chans=1), 98_286),
    ('ckcnn_2_30', dict(in_chans=3), 100_386),
    ('ckcnn_2_30', dict(in_chans=20), 118_236),
    ('ckcnn_2_100', dict(in_chans=1), 1_030_546),
    ('ckcnn_2_100', dict(in_chans=3), 1_037_546),
]


@pytest.mark.parametrize('name, kwargs, total', CCNN_PARAMS)
def test_parameter_totals(name, kwargs, total):
    model = timm.create_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == total


def test_ccnn_1d_structure_and_init():
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', data_dim=1, in_chans=1)
    convs = continuous_convs(model)
    assert len(convs) == 5 and all(c.causal and c.dim == 1 and c.kernel_size == -1 for c in convs)
    conv = convs[0]
    assert 'mask_mean' in dict(conv.named_buffers()) and conv.mask_mean.item() == 1.0  # fixed at the causal end
    assert conv.kernel_sizes(784) == (65,) and conv.kernel_sizes(161) == (14,)  # SPEC 8.1
    net = conv.kernel_net
    for f in net.filters:  # CCNN init: filter biases 0, envelope centres 1 - 0.125 U(0, 1)
        assert f.linear.bias.abs().max() == 0 and f.mu.min() >= 0.875 and f.mu.max() <= 1.
    assert all(torch.all(l.bias == 1.) for l in net.linears) and net.output.bias.abs().max() == 0
    assert isinstance(model.blocks[0].drop, torch.nn.Dropout1d)
    before = net.output.weight.detach().clone()
    assert conv.initialized.item() == 0
    model.eval()
    model(torch.randn(2, 1, 28, 28))  # the first forward rescales the output layer once by sqrt(1 / 65)
    torch.testing.assert_close(net.output.weight, before * math.sqrt(1 / 65))
    assert conv.initialized.item() == 1
    model(torch.randn(2, 1, 784))
    torch.testing.assert_close(net.output.weight, before * math.sqrt(1 / 65))
    # the 2-D model uses CCNN's init too: 5 x 5 taps at init on the 33 grid, known at construction, so the rescale
    # is done there (copies made before any forward pass, e.g. bake_kernels or an EMA, see the initialised model)
    torch.manual_seed(0)
    with mock.patch.object(FlexConv, '_finish_init'):
        pending = continuous_convs(timm.create_model('ccnn_4_140'))[1].kernel_net.output.weight.detach().clone()
    torch.manual_seed(0)
    two_d = timm.create_model('ccnn_4_140')
    c2 = continuous_convs(two_d)[1]
    assert not c2.causal and c2.initialized.item() == 1 and torch.all(c2.kernel_net.linears[0].bias == 1.)
    torch.testing.assert_close(c2.kernel_net.output.weight, pending * math.sqrt(1 / 25))
    two_d.eval()(torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(c2.kernel_net.output.weight, pending * math.sqrt(1 / 25))


def test_initialized_buffer_is_saved_and_old_state_dicts_load_as_initialized():
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', data_dim=1, in_chans=1, width=8).eval()
    sd = model.state_dict()
    assert 'stem.0.depthwise.initialized' in sd and sd['stem.0.depthwise.initialized'].item() == 0
    old = {k: v.clone() for k, v in sd.items() if not k.endswith('.initialized')}  # saved before the buffer
    fresh = timm.create_model('ccnn_4_140', data_dim=1, in_chans=1, width=8).eval()
    fresh.load_state_dict(old)  # strict: the load hook supplies initialized = 1
    assert all(c.initialized.item() == 1 for c in continuous_convs(fresh))
    fresh(torch.randn(1, 1, 100))
    torch.testing.assert_close(fresh.stem[0].depthwise.kernel_net.output.weight,
                               old['stem.0.depthwise.kernel_net.output.weight'])  # never rescaled again
    from dcls_timm.models.ccnn import checkpoint_filter_fn
    assert set(checkpoint_filter_fn(old, fresh)) == set(fresh.state_dict())


def _prefix_unchanged(layer, x, t, atol=0.):
    x2 = x.clone()
    x2[..., t] += 1.
    with torch.no_grad():
        a, b = layer(x), layer(x2)
    torch.testing.assert_close(a[..., :t], b[..., :t], rtol=0, atol=atol)
    assert (a[..., t:] - b[..., t:]).abs().max() > 0


@pytest.mark.parametrize('fft', ['never', 'always'])
def test_causality(fft):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 120)
    flex = SeparableFlexConv(3, 4, -1, dim=1, causal=True, init='ccnn', mask_learn_mean=False, fft=fft)
    with torch.no_grad():
        flex.depthwise.mask_sigma.fill_(0.5)  # a long kernel
    siren = SirenCKConv(3, 4, omega_0=20., fft=fft)
    atol = 0. if fft == 'never' else 1e-5  # the FFT path: float32 round-off only
    for layer in (flex, siren):
        for t in (0, 37, 119):
            _prefix_unchanged(layer, x, t, atol)
    # CCNN 1-D features in eval mode (BatchNorm is per channel): causal up to the mean over time
    model = timm.create_model('ccnn_4_140', data_dim=1, in_chans=3, width=8, fft=fft).eval()
    _prefix_unchanged(model.forward_features, x, 60, atol)


@pytest.fixture(params=[None, 1, 2], ids=['one-chunk', 'chunks-of-1', 'chunks-of-2'])
def chunks(request, monkeypatch):
    """The depthwise causal FFT convolution over chunks of 1 or 2 samples (batches of 3: a shorter last chunk),
    or as the CPU heuristic chooses (one chunk for these small tensors)."""
    if request.param is not None:
        monkeypatch.setattr(flexconv, '_chunk', lambda x, size: request.param)
    return request.param


def test_chunk_sizes():
    # about CAUSAL_FFT_CHUNK_BYTES of spectra per chunk on a CPU (at least one sample); the whole batch elsewhere
    x = torch.empty(100, 140, 784)
    per_sample = 140 * 801 * 8
    assert flexconv._chunk(x, 1600) == flexconv.CAUSAL_FFT_CHUNK_BYTES // per_sample >= 2
    assert flexconv._chunk(torch.empty(3, 10 ** 6, 2), 2 * 10 ** 6) == 1
    assert flexconv._chunk(torch.empty(100, 140, 784, device='meta'), 1600) == 100


@pytest.mark.parametrize('length,taps', [(30, 7), (30, 40), (17, 1)])
def test_depthwise_causal_fft_gradients_equal_the_direct_ones(length, taps, chunks):
    # the FFT path's backward is written out: values and every gradient against autograd through conv1d (float64)
    torch.manual_seed(0)
    x = torch.randn(3, 4, length, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, taps, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, length, dtype=torch.float64)
    out, ref = causal_conv1d(x, w, b, groups=4, fft=True), causal_conv1d(x, w, b, groups=4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    only_w = torch.autograd.grad(causal_conv1d(x.detach(), w, None, groups=4, fft=True), w, g)[0]
    torch.testing.assert_close(only_w, torch.autograd.grad(causal_conv1d(x.detach(), w, None, groups=4), w, g)[0])
    only_x = torch.autograd.grad(causal_conv1d(x, w.detach(), None, groups=4, fft=True), x, g)[0]
    torch.testing.assert_close(only_x, torch.autograd.grad(causal_conv1d(x, w.detach(), None, groups=4), x, g)[0])
    # the saved spectra survive a backward: a second one through a retained graph gives the same gradients
    out = causal_conv1d(x, w, b, groups=4, fft=True)
    first = torch.autograd.grad(out, (x, w), g, retain_graph=True)
    for a, r in zip(torch.autograd.grad(out, (x, w), g), first):
        assert torch.equal(a, r)
    # an empty batch: empty input gradient, zero kernel gradient
    empty = x[:0].detach().requires_grad_()
    grads = torch.autograd.grad(causal_conv1d(empty, w, None, groups=4, fft=True).sum(), (empty, w))
    assert grads[0].shape == empty.shape and torch.equal(grads[1], torch.zeros_like(w))


@pytest.mark.parametrize('batch', [0, 1, 5])
def test_kernel_gradient_batch_sum_accumulated_or_fused(batch):
    # the CPU accumulates the kernel gradient's batch sum in place; other devices take one fused product and sum
    from dcls_timm.layers.flexconv import _batch_sum_of_products
    torch.manual_seed(0)
    a, b = torch.randn(batch, 3, 9, dtype=torch.complex128), torch.randn(batch, 3, 9, dtype=torch.complex128)
    ref = torch.einsum('bcf,bcf->cf', a, b)
    for accumulate in (None, True, False):
        torch.testing.assert_close(_batch_sum_of_products(a, b, accumulate), ref, rtol=1e-12, atol=1e-12)


def test_depthwise_causal_fft_without_autograd_is_bit_equal_and_leaves_its_inputs(chunks):
    # without autograd the spectrum product and the bias add run in place: same bits as the graph-building forward
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 4, 50), torch.randn(4, 1, 50, requires_grad=True), torch.randn(4)
    copies = x.clone(), w.detach().clone(), b.clone()
    graph = causal_conv1d(x, w, b, groups=4, fft=True)
    assert graph.requires_grad
    with torch.no_grad():
        plain = causal_conv1d(x, w, b, groups=4, fft=True)
    with torch.inference_mode():
        inference = causal_conv1d(x, w, b, groups=4, fft=True)
    assert torch.equal(plain, graph.detach()) and torch.equal(inference, plain)
    for t, c in zip((x, w.detach(), b), copies):
        assert torch.equal(t, c)


def test_causal_conv_definition_and_fft_equals_direct():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 30), torch.randn(4, 3, 7), torch.randn(4)
    out = causal_conv1d(x, w, b)
    t = 10  # out[t] = sum_i w[i] x[t - (n - 1 - i)] + b
    ref = sum(w[:, :, i] @ x[:, :, t - 6 + i].T for i in range(7)).T + b
    torch.testing.assert_close(out[..., t], ref)
    torch.testing.assert_close(causal_conv1d(x, w, b, fft=True), out, rtol=1e-4, atol=1e-5)
    dw = torch.randn(3, 1, 40)  # depthwise, kernel longer than the input
    torch.testing.assert_close(causal_conv1d(x, dw, None, groups=3, fft=True), causal_conv1d(x, dw, None, groups=3),
                               rtol=1e-4, atol=1e-5)
    # whole layers, values and gradients
    for make in (lambda fft: SirenCKConv(2, 3, omega_0=30., fft=fft),
                 lambda fft: FlexConv(2, 3, 101, dim=1, causal=True, init='ccnn', fft=fft)):
        torch.manual_seed(1)
        a = make('never')
        torch.manual_seed(1)
        f = make('always')
        xs = torch.randn(2, 2, 90)
        xa, xf = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        ya, yf = a(xa), f(xf)
        torch.testing.assert_close(yf, ya, rtol=1e-4, atol=4e-5)
        ya.square().sum().backward()
        yf.square().sum().backward()
        torch.testing.assert_close(xf.grad, xa.grad, rtol=1e-3, atol=1e-4)


def _published_layout(model):
    """The model's weights in the authors' flat layout (inverse of the filter's renames), plus their buffers."""
    inverse = {}
    for b in range(2):
        for c in (1, 2):
            inverse[f'blocks.{b}.conv{c}.bias'] = f'backbone.{b}.cconv{c}.bias'
            for i, j in enumerate((0, 4, 8)):
                for p in ('bias', 'weight_g', 'weight_v'):
                    inverse[f'blocks.{b}.conv{c}.kernel_net.layers.{i}.{p}'] = \
                        f'backbone.{b}.cconv{c}.Kernel.kernel_net.{j}.{p}'
            for p in ('weight', 'bias'):
                inverse[f'blocks.{b}.norm{c}.{p}'] = f'backbone.{b}.norm{c}.layer_norm.{p}'
    for p in ('weight', 'bias'):
        inverse[f'blocks.0.shortcut.{p}'] = f'backbone.0.shortcut.0.{p}'
        inverse[f'head.fc.{p}'] = f'finallyr.{p}'
    sd = {inverse[k]: v for k, v in model.state_dict().items() if k != 'seq_input.permutation'}
    sd['backbone.0.cconv1.train_length'] = torch.tensor(784)  # present in some files, absent in others
    sd['backbone.1.cconv2.conv_kernel'] = torch.randn(30, 30, 5)  # stale cache: ignored
    return sd


@pytest.mark.parametrize('tag', ['smnist', 'pmnist'])
def test_ckcnn_published_layout_loads_and_matches(tmp_path, tag):
    torch.manual_seed(0)
    cfg = timm.models.get_pretrained_cfg(f'ckcnn_2_30.{tag}').to_dict()
    assert cfg['url'].startswith('https://github.com/dwromero/ckconv/raw/d44c6441a98792477d6259368c210089bb33fe7a/'
                                 f'saved/MNIST_perm_{tag == "pmnist"}_model_CKCNN_blcks_2_nohid_30_')
    assert cfg['license'] == 'mit'
    omega = 31.09195739463897 if tag == 'smnist' else 43.45667389601194
    direct = timm.create_model('ckcnn_2_30', omega_0=omega, permute=tag == 'pmnist')
    with torch.no_grad():
        for p in direct.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path / 'published.pt'
    torch.save(_published_layout(direct), path)
    loaded = timm.create_model(f'ckcnn_2_30.{tag}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.blocks[0].conv1.kernel_net.omega_0 == omega  # the tag's model arguments
    assert (loaded.seq_input.permutation is not None) == (tag == 'pmnist')
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), direct.eval()(x))
    assert all(pattern.pattern.startswith('^') for pattern, _ in _PUBLISHED_RENAMES)


def test_ckcnn_pretrained_cfgs():
    tags = [n for n in timm.list_pretrained('ckcnn*')]
    assert sorted(tags) == sorted(['ckcnn_2_30.smnist', 'ckcnn_2_30.pmnist', 'ckcnn_2_30.scifar10',
                                   'ckcnn_2_30.speech_mfcc', 'ckcnn_2_100.smnist', 'ckcnn_2_100.pmnist',
                                   'ckcnn_2_100.scifar10'])
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert cfg['url'].endswith('.pt') and 'kernomega0_' in cfg['url'] and cfg['num_classes'] == 10
        assert any('paper test accuracy' in n for n in cfg['notes'])
    assert timm.models.get_pretrained_cfg('ckcnn_2_30.speech_mfcc').input_size == (20, 1, 161)


def test_permutation_is_stored_and_restored():
    model = timm.create_model('ckcnn_2_30', permute=True, hidden=4)
    perm = model.seq_input.permutation
    assert perm[:4].tolist() == [693, 85, 647, 392] and sorted(perm.tolist()) == list(range(784))
    sd = model.state_dict()
    assert torch.equal(sd['seq_input.permutation'], perm)
    other = timm.create_model('ckcnn_2_30', permute=True, permutation_seed=5, hidden=4)
    assert not torch.equal(other.seq_input.permutation, perm)
    other.load_state_dict(sd)
    assert torch.equal(other.seq_input.permutation, perm)
    plain = timm.create_model('ckcnn_2_30', hidden=4)
    assert 'seq_input.permutation' not in plain.state_dict()
    plain.load_state_dict({k: v for k, v in sd.items() if k != 'seq_input.permutation'})
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x.view(2, 1, 784)[..., perm]))
    ccnn = timm.create_model('ccnn_4_140', data_dim=1, in_chans=1, width=8, permute=True)
    assert torch.equal(ccnn.state_dict()['seq_input.permutation'], perm)


@pytest.mark.parametrize('name, kwargs', [('ckcnn_2_30', dict(hidden=6)),
                                          ('ccnn_4_140', dict(data_dim=1, width=8))])
def test_timm_api_for_sequence_models(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, in_chans=2, **kwargs)
    x = torch.randn(2, 2, 10, 6)  # images are read row major: 60 steps
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.eval()
    torch.testing.assert_close(model(x), model(x.view(2, 2, 60)))
    final, inter = model.forward_intermediates(x, output_fmt='NCL')
    torch.testing.assert_close(final, model.forward_features(x))
    assert all(t.shape[-1] == 60 and t.dim() == 3 for t in inter)
    assert model.forward_head(final, pre_logits=True).shape == (2, model.num_features)
    torch.manual_seed(0)
    feats = timm.create_model(name, features_only=True, in_chans=2, **kwargs).eval()
    outs = feats(x)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels() and all(o.dim() == 3 for o in outs)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_recipe_export_and_flops_for_ccnn_1d():
    from dcls_timm.export import bake_kernels
    from dcls_timm.info import model_info
    from dcls_timm.recipe import CompositeRecipe, FlexConvRecipe
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', data_dim=1, in_chans=1, width=8).eval()
    x = torch.randn(2, 1, 12, 12)
    ref = model(x)
    recipe = CompositeRecipe([FlexConvRecipe()])
    mask = [g for g in recipe.param_groups(model, weight_decay=0.) if g['group_name'] == 'mask']
    assert len(mask) == 1 and len(mask[0]['params']) == 5  # widths only: the means are fixed buffers
    assert torch.isfinite(recipe.aux_losses(model, 0)['antialias_loss'])
    baked = bake_kernels(model)  # causal kernels bake as centred kernels with zeros on the future side
    assert not continuous_convs(baked)
    torch.testing.assert_close(baked(x), ref, rtol=1e-4, atol=1e-5)
    info = model_info(model, (1, 12, 12))
    assert info['params'] == sum(p.numel() for p in model.parameters()) and info['gflops'] > 0


def test_fashion_mnist_as_784_step_sequences_learns(fashion_mnist_root, tmp_path):
    from test_train import _fashion_mnist_subset
    from dcls_timm.training import parse_args, run
    data = _fashion_mnist_subset(fashion_mnist_root, tmp_path / 'fmnist_subset', 50, 20)
    argv = ['--model', 'ckcnn_2_30', '--model-kwargs', 'hidden=16', 'omega_0=30.5', '--data-dir', str(data),
            '--val-split', 'test', '--num-classes', '10', '--input-size', '1', '28', '28', '--input-img-mode', 'L',
            '--mean', '0.286', '--std', '0.353', '--crop-pct', '1.0', '--color-jitter', '0', '--hflip', '0',
            '--scale', '1', '1', '--ratio', '1', '1', '--smoothing', '0', '--opt', 'adam', '--weight-decay', '0',
            '-b', '32', '--epochs', '3', '--warmup-epochs', '0', '--sched', 'cosine', '--sched-on-updates',
            '--lr', '3e-3', '--workers', '0', '--device', 'cpu', '--output', str(tmp_path / 'out'),
            '--experiment', 'seq']
    result = run(parse_args(argv))
    assert result['eval']['top1'] > 30  # 10 classes: chance is 10 %


def test_depthwise_causal_path_follows_autograd():
    # FFTs from 5 taps when autograd records (their written-out backward is the faster one), direct convolution up
    # to 100 taps without it; both give the same layer output
    layer = FlexConv(3, 3, -1, dim=1, causal=True, depthwise=True, init='ccnn')
    assert layer._use_fft((65,)) and layer._use_fft((5,)) and not layer._use_fft((4,))
    with torch.no_grad():
        assert not layer._use_fft((65,)) and not layer._use_fft((100,)) and layer._use_fft((101,))
        # large inputs: FFTs from 5 taps without autograd too (chunked, they reuse memory)
        large = flexconv.DEPTHWISE_CAUSAL_FFT_LARGE_INPUT
        assert layer._use_fft((65,), input_bytes=large) and not layer._use_fft((65,), input_bytes=large - 1)
        assert layer._use_fft((5,), input_bytes=large) and not layer._use_fft((4,), input_bytes=large)
    assert not layer._use_fft((65,), autograd=False)
    x = torch.randn(2, 3, 200)
    with torch.no_grad():
        direct = layer(x)
    assert layer.causal_taps() > 5
    torch.testing.assert_close(layer(x).detach(), direct, rtol=1e-5, atol=1e-5)


def test_depthwise_causal_fft_higher_order_and_functorch_match_the_direct_convolution(chunks):
    # double backward (gradient penalties, Hessian-vector products), torch.func transforms and forward-mode AD
    # through the FFT path agree with the direct convolution (float64)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 7, dtype=torch.float64, requires_grad=True)

    def conv(fft):
        return lambda x, w: causal_conv1d(x, w, None, groups=3, fft=fft)

    assert torch.autograd.gradgradcheck(conv(True), (x, w))
    for fn in (lambda f: torch.autograd.functional.hvp(lambda x: f(x, w).pow(3).sum(), x.detach(),
                                                        torch.ones_like(x))[1],
               lambda f: torch.func.grad(lambda x, w: f(x, w).pow(2).sum(), argnums=1)(x.detach(), w.detach()),
               lambda f: torch.func.vmap(lambda x: f(x.unsqueeze(0), w.detach()))(x.detach()),
               lambda f: torch.func.jacrev(lambda w: f(x.detach(), w).sum(-1), argnums=0)(w.detach()),
               lambda f: torch.func.jvp(lambda w: f(x.detach(), w), (w.detach(),), (torch.ones_like(w),))[1]):
        torch.testing.assert_close(fn(conv(True)), fn(conv(False)), rtol=1e-10, atol=1e-10)
    # a gradient penalty trains the kernel through the FFT path as through the direct one
    penalties = []
    for fft in (True, False):
        g = torch.autograd.grad(conv(fft)(x, w).square().sum(), x, create_graph=True)[0]
        penalties.append(torch.autograd.grad(g.square().sum(), w)[0])
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('fft, groups', [(False, 4), (True, 4), (False, 1), (True, 1)])
def test_input_affine_equals_the_affine_map_applied_first(fft, groups, chunks):
    # input_affine = (scale, shift): written into the padded input without autograd, applied first with it;
    # every route gives conv(x * scale + shift), gradients included
    torch.manual_seed(0)
    x = torch.randn(3, 4, 40, dtype=torch.float64)
    w = torch.randn(4 if groups == 4 else 5, 4 // groups, 30, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True) + 0.5
    shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
    before = x.clone()
    ref = causal_conv1d(x * scale.view(-1, 1) + shift.view(-1, 1), w, b, groups=groups, fft=fft)
    with torch.no_grad():
        torch.testing.assert_close(causal_conv1d(x, w, b, groups, fft, input_affine=(scale, shift)), ref.detach(),
                                   rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)
    out = causal_conv1d(x, w, b, groups, fft, input_affine=(scale, shift))
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (w, scale, shift), g), torch.autograd.grad(ref, (w, scale, shift), g)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    # only the bias learns (e.g. bias-only fine-tuning): the affine map is still applied, the bias gets its gradient
    bias_only = b.clone().requires_grad_()
    out = causal_conv1d(x, w.detach(), bias_only, groups, fft, input_affine=(scale.detach(), shift.detach()))
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, bias_only, g)[0], g.sum((0, 2)))
    with torch.no_grad():  # an empty batch
        assert causal_conv1d(x[:0], w, b, groups, fft, input_affine=(scale, shift)).shape == (0, w.shape[0], 40)


@pytest.mark.parametrize('fft', [False, True])
def test_input_affine_keeps_the_input_dtype_on_every_route(fft):
    # a float32 (scale, shift) with a bfloat16 input: written into the padded input, or applied first (autograd,
    # empty batch), the affine map is taken in the input's dtype and every route returns it
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 20).bfloat16(), torch.randn(4, 1, 8).bfloat16()
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    with torch.no_grad():
        padded = causal_conv1d(x, w, None, 4, fft, input_affine=(scale, shift))
        empty = causal_conv1d(x[:0], w, None, 4, fft, input_affine=(scale, shift))
    first = causal_conv1d(x, w, None, 4, fft, input_affine=(scale.requires_grad_(), shift))
    assert padded.dtype == empty.dtype == first.dtype == torch.bfloat16
    # the FFT route computes in float32 (the padded affine too), the applied-first one rounds x * scale + shift to
    # bfloat16 first: both are one bfloat16 rounding from the float64 result
    ref = causal_conv1d(x.double() * scale.detach().double().view(-1, 1) + shift.double().view(-1, 1), w.double(),
                        None, 4)
    for out in (padded, first.detach()):
        torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.1)


def test_chunked_fft_model_equals_the_direct_convolutions(monkeypatch):
    # a CCNN over chunks of one sample, FFTs from 5 taps in evaluation too (as for large inputs): the numbers of the
    # direct convolutions, eval outputs with non-trivial BatchNorms (written while padding), training gradients
    monkeypatch.setattr(flexconv, '_chunk', lambda x, size: 1)
    monkeypatch.setattr(flexconv, 'DEPTHWISE_CAUSAL_FFT_LARGE_INPUT', 0)
    torch.manual_seed(0)
    model = timm.create_model('ccnn_4_140', width=8, hidden=8, data_dim=1, in_chans=1, dropout=0.).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 1, 40, dtype=torch.float64)
    model(x)  # the one-time kernel-network rescale
    direct = copy.deepcopy(model)
    for m in continuous_convs(direct):
        m.fft = 'never'
    assert all(m._use_fft(m.kernel_sizes(40), autograd=False) for m in continuous_convs(model) if m.depthwise)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), direct.eval()(x), rtol=1e-10, atol=1e-10)
    for net in (model.train(), direct.train()):
        net(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), direct.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)
