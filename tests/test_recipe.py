"""DCLS recipe units: parameter groups, lr scales, clamp timing, repulsive loss, EMA of shared positions."""
import itertools
import math
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import dcls_timm  # noqa: F401
from dcls_timm.layers import Dcls2d, position_parameters, share_positions
from dcls_timm.recipe import DclsRecipe, dcls_param_groups, repulsive_loss, repulsive_term
from dcls_timm.training import train_one_epoch


def _model():
    return timm.create_model('convnext_atto_dcls', num_classes=3)


def _by_id(groups):
    return {id(p): g for g in groups for p in g['params']}


def test_groups_cover_every_parameter_once_and_positions_get_the_rules():
    model = _model()
    groups = dcls_param_groups(model, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g['params']]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    where = _by_id(groups)
    for p in position_parameters(model):
        assert where[id(p)]['weight_decay'] == 0 and where[id(p)]['lr_scale'] == 5.
        assert where[id(p)]['group_name'] == 'positions'
    conv_w = model.stages[0].blocks[0].conv_dw.weight
    assert where[id(conv_w)]['weight_decay'] == 0.05 and 'lr_scale' not in where[id(conv_w)]
    assert where[id(model.stages[0].blocks[0].conv_dw.bias)]['weight_decay'] == 0


def test_positions_keep_x5_on_top_of_layer_decay():
    model = _model()
    groups = dcls_param_groups(model, weight_decay=0.05, layer_decay=0.7)
    where = _by_id(groups)
    for i, stage in enumerate(model.stages):
        pos = where[id(stage.positions.P)]
        neighbour = where[id(stage.downsample[1].weight)] if i > 0 else where[id(stage.blocks[0].conv_dw.weight)]
        assert pos['lr_scale'] == pytest.approx(5 * neighbour['lr_scale'])
        assert pos['lr_scale'] < 5  # layer decay applied, not lost
        assert pos['weight_decay'] == 0


def test_lr_scale_through_warmup_and_to_min_lr():
    model = _model()
    recipe = DclsRecipe()
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05,
                              param_group_fn=lambda m: recipe.param_groups(m, 0.05))
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=3, warmup_lr=1e-6,
                                   min_lr=1e-5)
    names = [g['group_name'] for g in opt.param_groups]
    pos, base = names.index('positions'), names.index('decay')
    for epoch in [0, 1, 2, 3, 6, 10]:
        sched.step(epoch)
        lrs = [g['lr'] for g in opt.param_groups]
        assert lrs[pos] == pytest.approx(5 * lrs[base])
    assert opt.param_groups[base]['lr'] == pytest.approx(1e-5)
    assert opt.param_groups[pos]['lr'] == pytest.approx(5e-5)  # minimum lr scaled too


def test_repulsive_term_matches_brute_force():
    P = torch.randn(2, 3, 2, 5) * 0.8
    ndim, o, i, k = P.shape
    total = 0.
    for a, b in itertools.product(range(o), range(i)):
        pts = P[:, a, b, :].T
        for u, v in itertools.combinations(range(k), 2):
            total += max(0., 1. - (pts[u] - pts[v]).norm().item())
    expected = 2 * total / (k * (k - 1) * o * i)
    assert repulsive_term(P).item() == pytest.approx(expected, rel=1e-6)
    # two elements 0.5 apart: each ordered pair contributes 0.5
    P2 = torch.tensor([[0., 0.5], [0., 0.]]).view(2, 1, 1, 2)
    assert repulsive_term(P2).item() == pytest.approx(0.5)
    # far apart: no repulsion, and coincident points do not break the gradient
    assert repulsive_term(torch.tensor([[0., 3.], [0., 0.]]).view(2, 1, 1, 2)).item() == 0.
    P3 = torch.zeros(2, 1, 1, 3, requires_grad=True)
    repulsive_term(P3).backward()
    assert torch.isfinite(P3.grad).all()


def test_repulsive_loss_counts_shared_tensors_once():
    convs = [Dcls2d(2, 2, 4, dilated_kernel_size=7, groups=2, version='v0') for _ in range(3)]
    lone = Dcls2d(2, 2, 4, dilated_kernel_size=7, groups=2, version='v1')
    model = nn.Module()
    model.convs = nn.ModuleList(convs)
    model.lone = lone
    model.positions = share_positions(convs)
    expected = (repulsive_term(model.positions.P) + repulsive_term(lone.P)) / 2
    assert repulsive_loss(model).item() == pytest.approx(expected.item())


def test_repulsive_schedule():
    recipe = DclsRecipe(repulsive_after_epoch=20)
    model = _model()
    assert recipe.repulsive(model, 20) is None
    assert recipe.repulsive(model, 21) is not None
    assert DclsRecipe(repulsive_weight=0).repulsive(model, 100) is None


class _Loader(list):
    sampler = None


def _tiny_loader(n_batches=5, batch=2):
    g = torch.Generator().manual_seed(0)
    return _Loader([(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 3, (batch,), generator=g))
                    for _ in range(n_batches)])


def _args(**kw):
    base = dict(grad_accum_steps=1, channels_last=False, distributed=False, world_size=1, clip_grad=None,
                clip_mode='norm', log_interval=100, mixup_off_epoch=0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize('accum', [1, 2])
def test_clamp_after_every_optimizer_step_before_ema(accum):
    model = _model()
    recipe = DclsRecipe(repulsive_weight=0)
    groups = recipe.param_groups(model, 0.)
    for g in groups:  # huge position steps push positions off the grid; the rest stays put
        g['lr'] = 50. if g['group_name'] == 'positions' else 0.
    opt = torch.optim.SGD(groups, lr=0.)
    steps, events = [], []
    orig_step = opt.step

    def step(*a, **k):
        steps.append(1)
        events.append('step')
        return orig_step(*a, **k)
    opt.step = step
    orig_after = recipe.after_optimizer_step

    def after(m):
        events.append('clamp')
        orig_after(m)
        assert all(p.abs().max() <= 8 for p in position_parameters(m))
    recipe.after_optimizer_step = after

    class Ema:
        def update(self, m, step=None):
            events.append('ema')
            assert all(p.abs().max() <= 8 for p in position_parameters(m))  # EMA sees clamped positions

    loader = _tiny_loader(5)
    _, updates = train_one_epoch(0, model, loader, opt, nn.CrossEntropyLoss(), _args(grad_accum_steps=accum),
                                 torch.device('cpu'), recipe=recipe, model_ema=Ema(), is_primary=False)
    assert updates == len(steps) == math.ceil(5 / accum)
    assert events == ['step', 'clamp', 'ema'] * len(steps)


def test_ema_updates_shared_positions_once_per_step_in_training():
    model = _model()
    ema = ModelEmaV3(model, decay=0.5)
    start = ema.module.stages[0].positions.P.detach().clone()
    recipe = DclsRecipe(repulsive_weight=0)
    opt = torch.optim.SGD(recipe.param_groups(model, 0.), lr=0.1)
    train_one_epoch(0, model, _tiny_loader(1), opt, nn.CrossEntropyLoss(), _args(), torch.device('cpu'),
                    recipe=recipe, model_ema=ema, is_primary=False)
    # one update with decay 0.5 (ModelEmaV3 without warm-up); once per block would give 0.5 ** 2 here
    expected = 0.5 * start + 0.5 * model.stages[0].positions.P.detach()
    torch.testing.assert_close(ema.module.stages[0].positions.P, expected)
