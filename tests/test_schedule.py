"""The ImageNet ConvNeXt(-dcls) configs reproduce the upstream ConvNeXt-dcls learning-rate schedule.

Upstream (ConvNeXt / ConvNeXt-dcls ``utils.cosine_scheduler``, set before every update ``u``, 0-based): a warm-up
``linspace(0, base, W)`` over the first W = 20 epochs of updates, then ``final + 0.5 (base - final)
(1 + cos(pi i / T))`` for i = u - W over the remaining T = 280 epochs of updates, final = 1e-6; position parameters
get ``lr_scale`` 5 times all of it. The optimizer and scheduler are built by the same functions train.py uses and
stepped as its training loop steps them (the last test runs that loop itself).
"""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import dcls_timm  # noqa: F401  (registers the models)
from dcls_timm.layers import position_parameters
from dcls_timm.training import parse_args
from dcls_timm.training import trainer
from dcls_timm.training.engine import train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / 'configs').glob('convnext_*_in1k.yaml'))
UPE = 7  # fake updates per epoch: 2100 updates in 300 epochs
BASE, FINAL, WARMUP_EPOCHS, TOTAL_EPOCHS, POS_SCALE = 4e-3, 1e-6, 20, 300, 5.


def upstream_lr(u: int, upe: int, base: float = BASE, final: float = FINAL) -> float:
    """The upstream schedule's lr for update ``u`` (0-based), written from its definition."""
    warmup, total = WARMUP_EPOCHS * upe, TOTAL_EPOCHS * upe
    if u < warmup:
        return base * u / (warmup - 1)  # np.linspace(0, base, warmup)[u]
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (u - warmup) / (total - warmup)))


def _setup(config: str, *overrides: str, world_size: int = 8):
    """Config args, a tiny model of the config's own family, its recipe and optimizer, as train.py builds them.

    8 processes x 128 x grad_accum_steps 4 is the paper's global batch 4096, so lr resolves to lr_base = 4e-3.
    """
    args = parse_args(['-c', str(ROOT / 'configs' / config), *overrides])
    args.world_size, args.distributed, args.rank = world_size, False, 0
    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    if 'dcls' in args.model:
        kwargs['dcls_kernel_size'] = 5
    model = timm.create_model(args.model, num_classes=10, drop_path_rate=args.drop_path, **kwargs)
    recipe = trainer._recipe(args, model)
    optimizer = trainer.build_optimizer(args, model, recipe)
    return args, model, recipe, optimizer


def _split_groups(optimizer, model, recipe):
    """(index of one normal group, index of the position group or None); checks the groups are as expected."""
    groups = optimizer.param_groups
    normal = [i for i, g in enumerate(groups) if g.get('lr_scale', 1.) == 1.]
    pos = [i for i, g in enumerate(groups) if g.get('group_name') == 'positions']
    assert normal and len(normal) + len(pos) == len(groups)
    if recipe is None:
        assert not pos
        return normal[0], None
    assert len(pos) == 1 and groups[pos[0]]['lr_scale'] == POS_SCALE
    assert {id(p) for p in groups[pos[0]]['params']} == {id(p) for p in position_parameters(model)}
    return normal[0], pos[0]


def _replay(args, optimizer, upe: int):
    """The lr of every group at every update, with the scheduler stepped as the training loop steps it: after each
    update ``step_update(num_updates)``, after each epoch ``step(epoch + 1, metric)`` (test_train_loop_uses_it
    checks the real loop against this)."""
    lr_scheduler, num_epochs = trainer.build_scheduler(args, optimizer, upe)
    used, num_updates = [], 0
    for epoch in range(num_epochs):
        for _ in range(upe):
            used.append([g['lr'] for g in optimizer.param_groups])  # what optimizer.step() uses for this update
            num_updates += 1
            lr_scheduler.step_update(num_updates=num_updates, metric=1.)
        lr_scheduler.step(epoch + 1, 50.)
    return torch.tensor(used, dtype=torch.float64), num_epochs


def _errors(lrs: torch.Tensor, upe: int, scale: float = 1.):
    """(max |lr - upstream| over the warm-up, max relative error over the cosine part)."""
    ref = torch.tensor([scale * upstream_lr(u, upe) for u in range(len(lrs))], dtype=torch.float64)
    warmup = WARMUP_EPOCHS * upe
    warm_err = (lrs[:warmup] - ref[:warmup]).abs().max().item()
    cos_err = ((lrs[warmup:] - ref[warmup:]).abs() / ref[warmup:]).max().item()
    return warm_err, cos_err


# Warm-up tolerance: timm's warm-up with warmup_prefix is warmup_lr + u (base - warmup_lr) / W (reaches base at u = W,
# the first cosine update), upstream's linspace(0, base, W) is base u / (W - 1) (reaches base at u = W - 1). Both
# start at 0; they differ by base u / (W (W - 1)), largest at u = W - 1: exactly one warm-up increment base / W.
# The cosine parts are the same formula on the same counts (t = u - W over T = 280 epochs of updates) in float64,
# so they agree to rounding: relative 1e-12.
WARMUP_TOL_INCREMENTS = 1. + 1e-9
COSINE_RTOL = 1e-12


@pytest.mark.parametrize('config', CONFIGS)
def test_config_follows_upstream_schedule(config):
    assert len(CONFIGS) == 6
    args, model, recipe, optimizer = _setup(config)
    assert args.lr == pytest.approx(BASE)
    assert (recipe is not None) == ('dcls' in args.model)
    normal, pos = _split_groups(optimizer, model, recipe)
    lrs, num_epochs = _replay(args, optimizer, UPE)
    assert num_epochs == TOTAL_EPOCHS and len(lrs) == TOTAL_EPOCHS * UPE

    increment = BASE / (WARMUP_EPOCHS * UPE)
    warm_err, cos_err = _errors(lrs[:, normal], UPE)
    assert warm_err <= increment * WARMUP_TOL_INCREMENTS, (warm_err, increment)
    assert cos_err <= COSINE_RTOL, cos_err
    # every epoch boundary, explicitly (already inside the all-update comparison above)
    for epoch in range(TOTAL_EPOCHS):
        u = epoch * UPE
        tol = increment * WARMUP_TOL_INCREMENTS if epoch < WARMUP_EPOCHS else COSINE_RTOL * upstream_lr(u, UPE)
        assert abs(lrs[u, normal].item() - upstream_lr(u, UPE)) <= tol, epoch
    # the landmarks: 0 at the first update, base when the cosine starts, final at the last update's next
    warmup = WARMUP_EPOCHS * UPE
    assert lrs[0, normal].item() == 0.
    assert lrs[warmup, normal].item() == pytest.approx(BASE, rel=1e-12)
    assert abs(lrs[warmup - 1, normal].item() - BASE) <= increment * WARMUP_TOL_INCREMENTS  # no step at the switch
    assert lrs[-1, normal].item() == pytest.approx(upstream_lr(len(lrs) - 1, UPE), rel=COSINE_RTOL)
    assert FINAL < lrs[-1, normal].item() < FINAL + 1e-8
    # every group that is not a position group follows the same curve
    for i, g in enumerate(optimizer.param_groups):
        if i != pos:
            assert torch.equal(lrs[:, i], lrs[:, normal])

    if pos is not None:  # positions: x5 of the same curve throughout (warm-up, cosine and minimum)
        assert torch.allclose(lrs[:, pos], POS_SCALE * lrs[:, normal], rtol=1e-15, atol=0.)
        warm_err_p, cos_err_p = _errors(lrs[:, pos], UPE, scale=POS_SCALE)
        assert warm_err_p <= POS_SCALE * increment * WARMUP_TOL_INCREMENTS, warm_err_p
        assert cos_err_p <= COSINE_RTOL, cos_err_p
        assert lrs[warmup, pos].item() == pytest.approx(POS_SCALE * BASE, rel=1e-12)
        assert POS_SCALE * FINAL < lrs[-1, pos].item() < POS_SCALE * (FINAL + 1e-8)


def test_old_settings_fail_the_same_checks():
    """The configs' former schedule (cosine over all 300 epochs, warm-up inside it from 1e-6) is caught."""
    args, model, recipe, optimizer = _setup(
        'convnext_tiny_dcls_in1k.yaml', '--epochs', '300', '--warmup-lr', '1e-6')
    args.warmup_prefix = False
    normal, pos = _split_groups(optimizer, model, recipe)
    lrs, num_epochs = _replay(args, optimizer, UPE)
    assert num_epochs == TOTAL_EPOCHS
    warmup, increment = WARMUP_EPOCHS * UPE, BASE / (WARMUP_EPOCHS * UPE)
    _, cos_err = _errors(lrs[:, normal], UPE)
    assert cos_err > 0.05  # ~10 % lower mid-run, far more near the end
    mid = TOTAL_EPOCHS * UPE // 2
    assert lrs[mid, normal].item() < 0.92 * upstream_lr(mid, UPE)
    assert BASE - lrs[warmup, normal].item() > increment  # it steps down when warm-up ends, never reaching base
    assert lrs[0, normal].item() == 1e-6


def test_resume_positions_the_schedule():
    """build_scheduler(start_epoch=k) on a fresh optimizer (--resume --no-resume-opt) sets the lr that an
    uninterrupted run uses at the first update of epoch k."""
    args, model, recipe, optimizer = _setup('convnext_tiny_dcls_in1k.yaml')
    expected, _ = _replay(args, optimizer, UPE)
    for epoch in [1, 19, 20, 150, 299]:
        args, model, recipe, optimizer = _setup('convnext_tiny_dcls_in1k.yaml')
        trainer.build_scheduler(args, optimizer, UPE, start_epoch=epoch)
        got = torch.tensor([g['lr'] for g in optimizer.param_groups], dtype=torch.float64)
        assert torch.equal(got, expected[epoch * UPE]), epoch


def test_train_loop_uses_it():
    """The real training loop (train_one_epoch, with the config's 4 accumulation steps per update) uses the replayed
    lr at every update: epochs 0, 19, 20 run in a row, 299 resumed; 2 updates per epoch to keep it short."""
    upe = 2
    args, model, recipe, optimizer = _setup('convnext_tiny_dcls_in1k.yaml', '--log-interval', '1000')
    assert args.grad_accum_steps == 4
    normal, pos = _split_groups(optimizer, model, recipe)
    expected, _ = _replay(args, optimizer, upe)

    args, model, recipe, optimizer = _setup('convnext_tiny_dcls_in1k.yaml', '--log-interval', '1000')
    used = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.append([g['lr'] for g in opt.param_groups]))
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(1, 3, 32, 32, generator=gen), torch.randint(0, 10, (1,), generator=gen))
              for _ in range(upe * args.grad_accum_steps)]
    loss_fn, device = nn.CrossEntropyLoss(), torch.device('cpu')
    for epochs, start in [([0], 0), ([19, 20], 19), ([299], 299)]:
        lr_scheduler, _ = trainer.build_scheduler(args, optimizer, upe, start_epoch=start)
        num_updates, first = start * upe, len(used)
        for epoch in epochs:
            _, num_updates = train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device,
                                             lr_scheduler=lr_scheduler, recipe=recipe, num_updates=num_updates)
            lr_scheduler.step(epoch + 1, 50.)
        assert num_updates == (epochs[-1] + 1) * upe
        got = torch.tensor(used[first:], dtype=torch.float64)
        assert torch.equal(got, expected[start * upe:num_updates]), (epochs, got, expected[start * upe:num_updates])
    got = torch.tensor(used, dtype=torch.float64)
    assert len(got) == 4 * upe
    ref = torch.tensor([upstream_lr(u, upe) for u in [0, 1, 38, 39, 40, 41, 598, 599]], dtype=torch.float64)
    assert (got[:, normal] - ref).abs().max().item() <= BASE / (WARMUP_EPOCHS * upe) * WARMUP_TOL_INCREMENTS
    assert torch.allclose(got[4:, normal], ref[4:], rtol=COSINE_RTOL, atol=0.)
    assert torch.allclose(got[:, pos], POS_SCALE * got[:, normal], rtol=1e-15, atol=0.)
