"""The training run behind train.py: set-up, epoch loop, logging, checkpoints."""
import argparse
import json
import logging
import os
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import Mixup, FastCollateMixup, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.fastvit import FastVit
from timm.optim import create_optimizer_v2, get_optimizer_info, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import (
    ModelEmaV3, NativeScaler, distribute_bn, get_outdir, unwrap_model, init_distributed_device, random_seed,
    setup_default_logging, trim_summary, update_summary,
)

from dcls_timm.checkpoint import check_layer_settings, load_into, load_weights, pick_weights
from dcls_timm.cpu_memory import keep_freed_memory
from dcls_timm.errors import ConfigError, check_model_name
from dcls_timm.layers import continuous_convs
from dcls_timm.recipe import CompositeRecipe, DclsRecipe, FlexConvRecipe, L2PenaltyRecipe, PositionMonitor

from .checkpoint import AtomicCheckpointSaver, load_training_checkpoint, plain_args, rng_state, set_rng_state
from .config import parse_args
from .data import build_dataset, build_loader
from .engine import evaluate, train_one_epoch

__all__ = ['run', 'main', 'build_model', 'build_optimizer', 'build_scheduler']

_logger = logging.getLogger('train')


def _check_num_classes(dataset, num_classes: int) -> None:
    classes = getattr(dataset, 'classes', None)
    reader = getattr(dataset, 'reader', None)
    if classes is None and reader is not None and hasattr(reader, 'class_to_idx'):
        classes = reader.class_to_idx
    if classes is not None and len(classes) > num_classes:
        raise ConfigError(f'The dataset has {len(classes)} classes but the model outputs {num_classes}: '
                          f'set --num-classes {len(classes)}.')


def _resolve_lr(args: Any) -> float:
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
    _logger.info(f'lr {lr:.3e} = lr-base {args.lr_base} x ({global_batch} / {args.lr_base_size}) '
                 f'[{args.lr_base_scale} scaling]')
    return lr


def _flexconv_recipe(args: Any, model: nn.Module) -> FlexConvRecipe:
    """The FlexConv recipe with the defaults of the model's kernel networks: FlexConv's (masks at lr x 0.1, the
    anti-aliasing regulariser at 0.1, SPEC 2.2-2.3) or CCNN's (``init='ccnn'``: masks at the full lr, as its authors'
    code; no regulariser, whose budget assumes FlexConv's init: CCNN's filters, scaled by 2 pi omega_0, start some
    1e4 above any grid's Nyquist frequency, so the term, about 8.7e8 for CCNN-4,140, would set the masks alone)."""
    ccnn = any(m.initialized is not None for m in continuous_convs(model))
    antialias = args.antialias_factor if args.antialias_factor is not None else (0. if ccnn else 0.1)
    if ccnn and antialias > 0:
        raise ConfigError(f'--antialias-factor {antialias}: the anti-aliasing regulariser budgets FlexConv kernel '
                          f"networks; {args.model}'s have CCNN's init, whose filter frequencies start far above any "
                          "grid's Nyquist frequency (the term would dominate training): use --antialias-factor 0.")
    mask_lr = args.mask_lr_scale if args.mask_lr_scale is not None else (1. if ccnn else 0.1)
    return FlexConvRecipe(mask_lr_scale=mask_lr, antialias_factor=antialias, antialias_target=args.antialias_target)


def _recipe(args: Any, model: nn.Module) -> Optional[CompositeRecipe]:
    """The recipes that apply: each is on for models it fits ('auto'), forced ('on') or off."""
    parts = []
    for flag, cls, make in [
        ('dcls_recipe', DclsRecipe, lambda: DclsRecipe(
            position_lr_scale=args.position_lr_scale, position_weight_decay=args.position_weight_decay,
            clamp=not args.no_clamp_positions, repulsive_weight=args.repulsive_weight,
            repulsive_after_epoch=args.repulsive_after_epoch)),
        ('flexconv_recipe', FlexConvRecipe, lambda: _flexconv_recipe(args, model)),
    ]:
        mode, fits = getattr(args, flag), cls.applies_to(model)
        if mode == 'on' and not fits:
            raise ConfigError(f"--{flag.replace('_', '-')} on, but model '{args.model}' has no layers it applies to.")
        if mode == 'on' or (mode == 'auto' and fits):
            parts.append(make())
    if args.l2_penalty < 0:
        raise ConfigError(f'--l2-penalty must be >= 0, got {args.l2_penalty}.')
    if args.l2_penalty > 0:
        parts.append(L2PenaltyRecipe(args.l2_penalty, args.l2_penalty_scope))
    return CompositeRecipe(parts) if parts else None


def _losses(args: Any, mixup_active: bool):
    if mixup_active:
        train = BinaryCrossEntropy(target_threshold=args.bce_target_thresh) if args.bce_loss \
            else SoftTargetCrossEntropy()
    elif args.smoothing:
        train = BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh) \
            if args.bce_loss else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train = BinaryCrossEntropy(target_threshold=args.bce_target_thresh) if args.bce_loss \
            else nn.CrossEntropyLoss()
    return train, nn.CrossEntropyLoss()


def _has_fused_cpu_kernel(opt: str) -> bool:
    try:
        info = get_optimizer_info(opt.lower().split('_')[-1])  # 'lookahead_adamw' wraps AdamW
    except ValueError:
        return False  # timm's factory reports the unknown name
    return info.opt_class in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def build_optimizer(args: Any, model: nn.Module, recipe: Optional[CompositeRecipe] = None) -> torch.optim.Optimizer:
    """timm's optimizer with the recipe's parameter groups (e.g. DCLS positions with ``lr_scale``), as train.py
    builds it. Resolves ``args.lr`` first (``args.world_size`` must be set)."""
    args.lr = _resolve_lr(args)
    opt_kwargs = optimizer_kwargs(args)
    if torch.device(args.device or 'cpu').type == 'cpu' and not {'fused', 'foreach'} & set(opt_kwargs) \
            and _has_fused_cpu_kernel(args.opt):
        # PyTorch picks the per-tensor loop on CPU: its fused kernel is 3-4x faster (--opt-kwargs fused=False: off)
        opt_kwargs['fused'] = True
    if recipe is not None:
        opt_kwargs['param_group_fn'] = partial(
            recipe.param_groups, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    return create_optimizer_v2(model, **opt_kwargs)


def build_scheduler(args: Any, optimizer: torch.optim.Optimizer, updates_per_epoch: int, start_epoch: int = 0,
                    state: Optional[Dict[str, Any]] = None):
    """timm's scheduler as train.py builds it, positioned at ``start_epoch``; returns (scheduler, total epochs).

    The training loop then calls ``step_update(num_updates)`` after every optimizer update and
    ``step(epoch + 1, metric)`` after every epoch; timm acts on the one that matches ``--sched-on-updates``. With
    ``--warmup-prefix`` the warm-up comes before the ``--epochs`` of the schedule, so the total is their sum.
    """
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric='loss' in args.eval_metric),
        updates_per_epoch=updates_per_epoch)
    if lr_scheduler is None:
        # timm applies a group's lr_scale (positions x5, layer decay) when a scheduler sets the lr; without one
        # (--sched none) it is applied here, once for all (idempotent, so also right after an optimizer resume)
        for group in optimizer.param_groups:
            group['lr'] = args.lr * group.get('lr_scale', 1.)
    else:
        if state is not None:
            lr_scheduler.load_state_dict(state)
        if start_epoch > 0:  # as timm's train.py: a per-update schedule ignores step(epoch)
            if args.sched_on_updates:
                lr_scheduler.step_update(start_epoch * updates_per_epoch)
            else:
                lr_scheduler.step(start_epoch)
    return lr_scheduler, num_epochs


def build_model(args: Any) -> nn.Module:
    """The run's model: ``timm.create_model`` with the run's arguments, then the ``--initial-checkpoint`` weights.

    The initial checkpoint goes through the project's loader (:func:`dcls_timm.checkpoint.load_weights`, as
    validate.py): a train.py/timm checkpoint (its EMA weights when it has them, as timm's ``checkpoint_path`` did),
    a plain state dict, or an upstream layout the model's filter converts (ConvNeXt-dcls, ResNet-50-dcls).
    """
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp, **args.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot create model '{args.model}' with these arguments: {e}") from None
    if args.initial_checkpoint:
        info = load_weights(model, args.initial_checkpoint, use_ema=None)
        if getattr(args, 'rank', 0) == 0:
            _logger.info(f"Initial weights: {info['entry'] or 'state dict'} of {args.initial_checkpoint}")
    return model


def run(args: Any) -> Dict[str, Any]:
    """Train with parsed arguments; returns the final metrics and where the outputs are.

    On CPU (unless ``keep_cpu_memory`` is off) this changes the C library's allocator settings for the whole
    calling process (:func:`dcls_timm.cpu_memory.keep_freed_memory`), not only for the training run.
    """
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.grad_accum_steps < 1:
        raise ConfigError('--grad-accum-steps must be >= 1.')
    check_model_name(args.model)
    device = init_distributed_device(args)
    primary = args.rank == 0
    if device.type == 'cpu' and args.keep_cpu_memory and keep_freed_memory() and primary:
        _logger.info('CPU: freed memory is kept for reuse (dcls_timm.cpu_memory; --no-keep-cpu-memory to leave '
                     'the C library as it is).')
    random_seed(args.seed, args.rank)
    # data first: a wrong path fails before a large model is built
    dataset_train = build_dataset(args, args.train_split, is_training=True, subset=args.train_subset)
    full_batch = args.batch_size * args.world_size
    if len(dataset_train) < full_batch:
        raise ConfigError(f'The batch ({args.batch_size} x {args.world_size} processes = {full_batch}) is larger than '
                          f'the {len(dataset_train)} training images: lower -b/--batch-size.')
    dataset_eval = build_dataset(args, args.val_split, is_training=False, subset=args.val_subset) \
        if args.val_split else None

    model = build_model(args)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    _check_num_classes(dataset_train, args.num_classes)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(device)
    if args.channels_last:
        if device.type == 'cpu' and isinstance(model, FastVit):
            # measured 2026-12-02 with torch 2.14.1: timm's own fastvit_sa24 (no DCLS layer) aborts with heap
            # corruption ("corrupted size vs. prev_size") within a few channels-last training steps on CPU (its
            # stem alone does too); inference in that layout is fine
            raise ConfigError('--channels-last: training FastViT channels-last on CPU corrupts memory in this PyTorch '
                              "(also timm's own fastvit models: an upstream bug); train it without --channels-last "
                              'on CPU.')
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if primary:
        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f'Model {args.model}: {n_params:,} parameters')

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None

    recipe = _recipe(args, model)
    if recipe is not None and primary:
        _logger.info(f'DCLS recipe: {recipe}')
    optimizer = build_optimizer(args, model, recipe)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None

    checkpoint = load_training_checkpoint(args.resume) if args.resume else None
    start_epoch = 0
    if checkpoint is not None:
        check_layer_settings(model, checkpoint, args.resume)
        load_into(model, pick_weights(checkpoint, args.resume)[1], args.resume)
        if model_ema is not None:  # the EMA weights, or the model's where the run had no EMA
            load_into(model_ema.module, pick_weights(checkpoint, args.resume, use_ema=None)[1], args.resume)
        if not args.no_resume_opt:
            saved_args = checkpoint.get('args')
            saved_args = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args
            saved_opt = saved_args.get('opt', args.opt) if isinstance(saved_args, dict) else args.opt
            if saved_opt != args.opt:
                raise ConfigError(f'{args.resume} was trained with --opt {saved_opt}, this run uses --opt {args.opt}: '
                                  'add --no-resume-opt to start a fresh optimizer.')
            try:
                optimizer.load_state_dict(checkpoint['optimizer'])
            except ValueError as e:
                raise ConfigError(f'The optimizer state in {args.resume} does not fit this model/optimizer ({e}); '
                                  'add --no-resume-opt to start a fresh optimizer.') from None
            if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
                loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
        start_epoch = checkpoint['epoch'] + 1
        if primary:
            _logger.info(f'Resumed from {args.resume} (epoch {checkpoint["epoch"]} done)')

    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)

    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn, collate_fn = None, None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if not args.no_prefetcher:  # timm's prefetcher mixes uint8 images in the collate
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    if args.train_interpolation == 'random' and args.no_aug:
        args.train_interpolation = data_config['interpolation']
    loader_train = build_loader(dataset_train, args, data_config, True, device, collate_fn=collate_fn)
    loader_eval = build_loader(dataset_eval, args, data_config, False, device) if dataset_eval is not None else None
    train_loss_fn, eval_loss_fn = _losses(args, mixup_active)
    train_loss_fn, eval_loss_fn = train_loss_fn.to(device), eval_loss_fn.to(device)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = build_scheduler(
        args, optimizer, updates_per_epoch, start_epoch=start_epoch,
        state=checkpoint.get('lr_scheduler') if checkpoint is not None else None)

    output_dir, saver, writer = None, None, None
    rng_by_rank: Dict[str, Any] = {}
    if primary:
        name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), args.model])
        args.experiment = name
        output_dir = get_outdir(args.output, name)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(plain_args(args), f, default_flow_style=False)
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing='loss' in args.eval_metric,
            max_history=args.checkpoint_hist,
            extra_state=lambda: {'rng': rng_state(),
                                 **({'rng_ranks': rng_by_rank['states']} if rng_by_rank.get('states') else {}),
                                 **({'lr_scheduler': lr_scheduler.state_dict()} if lr_scheduler is not None else {})})
        if checkpoint is not None and 'saver' in checkpoint and \
                os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict(checkpoint['saver'])
            trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        if not args.no_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(output_dir, 'tensorboard'))
        _logger.info(f'Output: {output_dir}; {num_epochs} epochs of {updates_per_epoch} updates')

    monitor = PositionMonitor(unwrap_model(model)) if DclsRecipe.applies_to(unwrap_model(model)) else None
    if checkpoint is not None and 'rng' in checkpoint:
        _restore_rng(checkpoint, args)  # last: everything before consumed randomness a fresh run did not

    num_updates = start_epoch * updates_per_epoch
    # with an EMA, its metric picks model_best and drives a plateau schedule, as in timm's train.py: the EMA
    # weights are the ones reported and evaluated (SPEC 1.7); --eval-metric ema_<name> says so explicitly
    metric_name = args.eval_metric
    if model_ema is not None and not metric_name.startswith('ema_'):
        metric_name = f'ema_{metric_name}'
    eval_metrics: Dict[str, float] = {}
    best = (None, None)
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_metrics, num_updates = train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss_fn, args, device, lr_scheduler=lr_scheduler,
            recipe=recipe, model_ema=model_ema, mixup_fn=mixup_fn, amp_autocast=amp_autocast,
            loss_scaler=loss_scaler, num_updates=num_updates, is_primary=primary)
        if args.distributed and args.dist_bn:
            # DDP broadcasts the model's buffers from rank 0 at each forward, but each rank's EMA copies its own
            # BatchNorm statistics: without this, every rank evaluated a different EMA and the metrics mixed them
            for m in (model, model_ema):
                if m is not None:
                    distribute_bn(m, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = {}
        if loader_eval is not None:
            eval_metrics = evaluate(model, loader_eval, eval_loss_fn, args, device, amp_autocast, is_primary=primary)
            if model_ema is not None:
                ema_metrics = evaluate(model_ema, loader_eval, eval_loss_fn, args, device, amp_autocast,
                                       log_suffix=' (EMA)', is_primary=primary)
                eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        if lr_scheduler is not None:  # --sched none: a constant lr
            lr_scheduler.step(epoch + 1, eval_metrics.get(metric_name))
        # every rank's random state goes into the checkpoint (each rank draws its own augmentations)
        rng_by_rank['states'] = _gather_objects(rng_state()) if args.distributed else None
        if primary:
            speeds = monitor.epoch_speed() if monitor is not None else {}
            _log_epoch(writer, epoch, train_metrics, eval_metrics, speeds, monitor)
            update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'))
            best = saver.save_checkpoint(epoch, metric=eval_metrics.get(metric_name))
    if writer is not None:
        writer.close()

    result = {'epochs': num_epochs, 'output_dir': output_dir, 'eval': eval_metrics,
              'best_metric': best[0], 'best_epoch': best[1], 'best_metric_name': metric_name,
              'world_size': args.world_size}
    if args.distributed:
        # the model and its EMA (BatchNorm statistics included)
        result['ranks_in_sync'] = all(_ranks_in_sync(unwrap_model(m), device) for m in (model, model_ema)
                                      if m is not None)
        if primary and not result['ranks_in_sync']:
            _logger.error('The ranks ended with different weights.')
    if primary:
        with open(os.path.join(output_dir, 'results.json'), 'w') as f:
            json.dump(result, f, indent=2)
        _logger.info(f'Done. Final eval {eval_metrics}; best {metric_name} {best[0]} (epoch {best[1]}). '
                     f'Checkpoints: {output_dir}; TensorBoard: tensorboard --logdir {output_dir}/tensorboard')
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _gather_objects(obj: Any) -> List[Any]:
    gathered: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _restore_rng(checkpoint: Dict[str, Any], args) -> None:
    """Each rank's own random state from the checkpoint (``rng_ranks``, saved under torchrun). A file with rank 0's
    state only (a single-process run, or another world size) seeds each rank apart from it, as a fresh run is
    seeded (seed + rank): the same state on every rank would draw the same augmentations everywhere."""
    ranks = checkpoint.get('rng_ranks')
    if args.distributed and isinstance(ranks, list) and len(ranks) == args.world_size:
        set_rng_state(ranks[args.rank])
        return
    set_rng_state(checkpoint['rng'])
    if args.distributed:
        _logger.warning(f"{args.resume} holds no random state for each of these {args.world_size} ranks (saved by "
                        f"{len(ranks) if isinstance(ranks, list) else 1} process(es)): each rank is seeded from it "
                        f"plus its rank, so the run continues as a fresh one would, not exactly as it would have.")
        random_seed(int(torch.randint(2 ** 31 - 1, (1,)).item()), args.rank)


def _ranks_in_sync(model: nn.Module, device: torch.device) -> bool:
    """True if every rank holds the same weights (compares per-tensor sums and absolute sums)."""
    local = torch.stack([t for p in model.state_dict().values() if p.is_floating_point()
                         for t in (p.double().sum(), p.double().abs().sum())]).to(device)
    gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _log_epoch(writer, epoch: int, train: Dict[str, float], evals: Dict[str, float], speeds: Dict[str, float],
               monitor: Optional[PositionMonitor]) -> None:
    if writer is None:
        return
    for k, v in train.items():
        writer.add_scalar(f'lr/{k[3:]}' if k.startswith('lr_') else f'train/{k}', v, epoch)
    for k, v in evals.items():
        writer.add_scalar(f'eval_ema/{k[4:]}' if k.startswith('ema_') else f'eval/{k}', v, epoch)
    for name, v in speeds.items():
        writer.add_scalar(f'position_speed/{name}', v, epoch)
    if monitor is not None:
        for name, P in monitor.positions().items():
            writer.add_histogram(f'positions/{name}', P, epoch)
    writer.flush()


def main(argv: Optional[Sequence[str]] = None, defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    setup_default_logging()
    return run(parse_args(argv, defaults))
