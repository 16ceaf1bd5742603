"""One training epoch and one evaluation pass, timm style, with the DCLS recipe hooks."""
import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import AverageMeter, accuracy, dispatch_clip_grad, reduce_tensor, unwrap_model


__all__ = ['NonFiniteLossError', 'train_one_epoch', 'evaluate']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before anything is saved."""


def _all_finite(loss: torch.Tensor, distributed: bool) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if distributed:  # every rank must stop together, or the others would hang in the next all-reduce
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        args: Any,
        device: torch.device,
        lr_scheduler=None,
        recipe: Optional[Any] = None,
        model_ema: Optional[nn.Module] = None,
        mixup_fn: Optional[Callable] = None,
        amp_autocast: Callable = nullcontext,
        loss_scaler=None,
        num_updates: int = 0,
        is_primary: bool = True,
) -> Tuple[Dict[str, float], int]:
    """Train one epoch.

    The recipe's auxiliary losses (e.g. the DCLS repulsive loss) are added to the task loss and logged apart. Each
    optimizer step (once ``grad_accum_steps`` micro-batches are accumulated) is followed by the recipe's hook
    (e.g. position clamping) and then the EMA update.

    Returns:
        Epoch metrics (loss, task_loss, each auxiliary loss, img_per_sec, lr of every parameter group) and the
        update count.
    """
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        # with the prefetcher the mixing runs in the loader's collate function and there is no mixup_fn
        if getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        if mixup_fn is not None:
            mixup_fn.mixup_enabled = False
    model.train()
    unwrapped = unwrap_model(model)
    accum = args.grad_accum_steps
    num_batches = len(loader)
    last_accum_steps = num_batches % accum or accum
    last_batch_start = num_batches - last_accum_steps
    updates_per_epoch = (num_batches + accum - 1) // accum
    aux_names = recipe.aux_loss_names if recipe is not None else ()
    loss_m, task_m = AverageMeter(), AverageMeter()
    aux_m = {name: AverageMeter() for name in aux_names}
    seen, start = 0, time.perf_counter()
    optimizer.zero_grad()
    for batch_idx, (inputs, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum == 0
        steps = last_accum_steps if batch_idx >= last_batch_start else accum
        inputs, target = inputs.to(device), target.to(device)
        if mixup_fn is not None:
            inputs, target = mixup_fn(inputs, target)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)

        sync = need_update or not args.distributed
        with (nullcontext() if sync else model.no_sync()):
            with amp_autocast():
                output = model(inputs)
                task_loss = loss_fn(output, target)
            aux = recipe.aux_losses(unwrapped, epoch) if recipe is not None else {}
            loss = task_loss + sum(aux.values()) if aux else task_loss
            if not _all_finite(loss, args.distributed):
                raise NonFiniteLossError(
                    f'Loss is {loss.item()} at epoch {epoch}, batch {batch_idx} (task loss {task_loss.item()}). '
                    'Training stopped; the last saved checkpoint is unchanged. Try a lower --lr, --clip-grad, or '
                    'turning off --amp.')
            scaled = loss / steps
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        n = inputs.shape[0]
        seen += n
        loss_m.update(loss.item(), n)
        task_m.update(task_loss.item(), n)
        for name, value in aux.items():
            aux_m[name].update(value.item(), n)
        if not need_update:
            continue
        optimizer.zero_grad()
        if recipe is not None:
            recipe.after_optimizer_step(unwrapped)
        if model_ema is not None:
            model_ema.update(unwrapped, step=num_updates)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=loss_m.avg)
        update_idx = batch_idx // accum
        if is_primary and (update_idx % args.log_interval == 0 or last_batch):
            lr = optimizer.param_groups[0]['lr']
            aux_text = ''.join(f'{k} {m.avg:.4f} ' for k, m in aux_m.items())
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch}] loss {loss_m.val:.4f} ({loss_m.avg:.4f}) '
                f'task {task_m.avg:.4f} {aux_text}lr {lr:.3e} '
                f'{seen * args.world_size / (time.perf_counter() - start):.1f} img/s')

    elapsed = time.perf_counter() - start
    metrics = OrderedDict(loss=loss_m.avg, task_loss=task_m.avg)
    for name, meter in aux_m.items():  # always present, so summary.csv keeps its columns
        metrics[name] = meter.avg if meter.count else 0.
    metrics['img_per_sec'] = seen * args.world_size / max(elapsed, 1e-9)
    for i, group in enumerate(optimizer.param_groups):
        metrics[f"lr_{group.get('group_name', i)}"] = group['lr']
    return metrics, num_updates


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        loss_fn: Callable,
        args: Any,
        device: torch.device,
        amp_autocast: Callable = nullcontext,
        log_suffix: str = '',
        is_primary: bool = True,
) -> Dict[str, float]:
    """Top-1/top-5 and loss over ``loader`` (averaged over ranks when distributed)."""
    model.eval()
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    for inputs, target in loader:
        inputs, target = inputs.to(device), target.to(device)
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(inputs)
            loss = loss_fn(output, target)
        k = min(5, output.shape[-1])
        acc1, acc5 = accuracy(output, target, topk=(1, k))
        if args.distributed:
            loss = reduce_tensor(loss.detach(), args.world_size)
            acc1 = reduce_tensor(acc1, args.world_size)
            acc5 = reduce_tensor(acc5, args.world_size)
        n = inputs.shape[0]
        loss_m.update(loss.item(), n)
        top1_m.update(acc1.item(), n)
        top5_m.update(acc5.item(), n)
    metrics = OrderedDict(loss=loss_m.avg, top1=top1_m.avg, top5=top5_m.avg)
    if is_primary:
        _logger.info(f'Eval{log_suffix}: loss {loss_m.avg:.4f} top1 {top1_m.avg:.3f} top5 {top5_m.avg:.3f}')
    return metrics
