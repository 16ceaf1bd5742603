"""Every model family: the CPU fast paths give the reference path's numbers.

The fast paths (cropped DCLS kernels, the fast depthwise conv, fused oneDNN inference, BatchNorms folded into
convolutions, CCNN's sequence path, the depthwise bias carried into the pointwise conv, ...) each have their own
tests. This one runs whole models both ways, so a fast path added later is covered too: the reference switches off
every ``fast_path`` attribute and sets global forward and backward hooks (no-ops), under which no path may skip a
module call.
Evaluation outputs, training outputs, every gradient and the BatchNorm statistics after the step must agree, with
positions and masks as created and spread over the whole grid (large kernels: FFT routes).
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcls_timm  # noqa: F401  (registers the models)

# the global full backward hook fires for modules whose inputs need no gradient (the image): expected here
pytestmark = pytest.mark.filterwarnings('ignore:Full backward hook is firing')

CONVNEXT = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32))
CASES = {
    'convnext_tiny_dcls': (CONVNEXT, (3, 64, 64)),
    'convnext_tiny_dcls_gauss': (CONVNEXT, (3, 64, 64)),
    'fastvit_sa24_dcls': (dict(layers=(2, 2, 2, 2), embed_dims=(8, 16, 32, 64), dcls_kernel_size=5,
                               dcls_kernel_count=4), (3, 64, 64)),
    'convformer_s18_dcls': (dict(depths=(2, 2, 2, 2), dims=(8, 16, 24, 32), dcls_kernel_size=5,
                                 dcls_kernel_count=4), (3, 64, 64)),
    'caformer_s18_dcls': (dict(depths=(2, 2, 1, 1), dims=(8, 16, 32, 32), dcls_kernel_size=5,
                               dcls_kernel_count=4), (3, 64, 64)),
    # 64 px: at 32 px the last stage's batch statistics come from 2 values (1x1 maps), too ill-conditioned to compare
    'resnet26_dcls': (dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8), (3, 64, 64)),
    'flexnet_3': (dict(widths=(8, 12)), (3, 32, 32)),
    'ccnn_4_140': (dict(width=16), (3, 32, 32)),
    'ccnn_4_140-1d': (dict(width=16, data_dim=1, in_chans=1), (1, 48)),
    'ckcnn_2_30': (dict(in_chans=1), (1, 48)),
}


# in-place activations (timm's ResNet and FastViT, FlexNet's ReLUs) cannot run under PyTorch's full backward hooks
NO_BACKWARD_HOOKS = {'resnet26_dcls', 'fastvit_sa24_dcls', 'flexnet_3'}


def _model(case: str, spread: bool) -> nn.Module:
    kwargs, _ = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(case.split('-')[0], num_classes=7, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.  # the fast masks are drawn differently (tests/test_dropout.py); here: the arithmetic
            if not spread:
                continue
            P, size = getattr(m, 'P', None), getattr(m, 'dilated_kernel_size', None)
            if isinstance(P, nn.Parameter) and size is not None:  # DCLS positions over the whole grid
                size = (size,) * P.shape[0] if isinstance(size, int) else size
                for axis, d in enumerate(size):
                    P[axis].uniform_(-(d // 2), d - 1 - d // 2, generator=g)
            if isinstance(getattr(m, 'mask_sigma', None), nn.Parameter):  # FlexConv masks: uncropped kernels
                m.mask_sigma.fill_(1.)
    return model


class _Reference:
    """Every ``fast_path`` attribute off and global no-op forward and backward hooks: the modules' own forwards."""

    def __init__(self, model: nn.Module, backward_hooks: bool = True):
        self.modules = [m for m in model.modules() if isinstance(getattr(m, 'fast_path', None), bool)]
        self.backward_hooks = backward_hooks

    def __enter__(self):
        self.saved = [m.fast_path for m in self.modules]
        for m in self.modules:
            m.fast_path = False
        self.hooks = [nn.modules.module.register_module_forward_hook(lambda *args: None)]
        if self.backward_hooks:
            self.hooks.append(nn.modules.module.register_module_full_backward_hook(lambda *args: None))

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        for m, fast in zip(self.modules, self.saved):
            m.fast_path = fast


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float, what: str) -> None:
    err = (actual - expected).abs().max().item() if actual.numel() else 0.
    assert err <= 2e-4 * scale + 1e-6, f'{what}: max error {err:.2e} (scale {scale:.2e})'


@pytest.mark.parametrize('spread', [False, True], ids=['init', 'spread'])
@pytest.mark.parametrize('case', list(CASES))
def test_inference_equals_the_reference(case, spread):
    model = _model(case, spread).eval()
    x = torch.randn(2, *CASES[case][1])
    with torch.inference_mode():
        fast = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        with _Reference(model):
            ref = model(x)
            ref_features = model.forward_head(model.forward_features(x), pre_logits=True)
    _close(fast, ref, ref.abs().max().item(), 'logits')
    _close(features, ref_features, ref_features.abs().max().item(), 'pre-logits')


@pytest.mark.parametrize('spread', [False, True], ids=['init', 'spread'])
@pytest.mark.parametrize('case', list(CASES))
def test_training_step_equals_the_reference(case, spread):
    model = _model(case, spread).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, *CASES[case][1])
    y = torch.tensor([1, 4])
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model.load_state_dict(state)
        inp = x.clone().requires_grad_()
        out = model(inp)
        loss = F.cross_entropy(out, y) + out.pow(2).mean()
        grads = torch.autograd.grad(loss, [inp] + params, allow_unused=True)
        return out.detach(), grads, [b.clone() for b in model.buffers()]

    out, grads, buffers = step()
    with _Reference(model, backward_hooks=case not in NO_BACKWARD_HOOKS):
        ref_out, ref_grads, ref_buffers = step()
    _close(out, ref_out, ref_out.abs().max().item(), 'output')
    # relative to the largest gradient: some are exactly zero in exact arithmetic (a bias before a batch-statistics
    # BatchNorm), their float32 values are rounding noise on either path
    scale = max(g.abs().max().item() for g in ref_grads if g is not None)
    names = ['input'] + [n for n, p in model.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), f'{name}: gradient on one path only'
        if g is not None:
            _close(g, r, scale, f'gradient of {name}')
    for (name, _), b, r in zip(model.named_buffers(), buffers, ref_buffers):
        if b.is_floating_point():
            _close(b, r, r.abs().max().item(), f'buffer {name}')
        else:
            assert torch.equal(b, r), name


class _HalfInEval(nn.Module):
    """Not an identity in eval (as a drop path that scales by the survival rate at test time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


@pytest.mark.parametrize('case', list(CASES))
def test_fast_paths_see_user_changes(case):
    """What a user may change after construction, which the fast paths once missed silently: strided biases (oneDNN's
    fused ops read a bias as packed) and modules in the dropout slots that are not the identity in eval."""
    from timm.layers import DropPath
    model = _model(case, spread=False).eval()
    x = torch.randn(2, *CASES[case][1])
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, 'bias', None)
            if isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.numel() > 1:
                m.bias = nn.Parameter(torch.stack([bias, torch.full_like(bias, 9.)], 1)[:, 0])  # stride 2
                assert not m.bias.is_contiguous()
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, (nn.modules.dropout._DropoutNd, DropPath))]
    for parent, name in slots:
        setattr(parent, name, _HalfInEval().eval())
    with torch.inference_mode():
        fast = model(x)
        with _Reference(model):
            ref = model(x)
    _close(fast, ref, ref.abs().max().item(), 'logits')
