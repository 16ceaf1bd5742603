"""One training epoch and one evaluation pass, timm style, with the DCLS recipe hooks."""
import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import AverageMeter, dispatch_clip_grad, unwrap_model


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
    # the epoch's means over every rank's samples (the meters above hold this rank's: the log lines are local)
    means = _global_means([loss_m, task_m, *aux_m.values()], args.distributed, device)
    metrics = OrderedDict(loss=means[0], task_loss=means[1])
    for name, mean in zip(aux_m, means[2:]):  # always present, so summary.csv keeps its columns
        metrics[name] = mean
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
    """Top-1/top-5 and loss over ``loader``, each sample counted once: under a distributed sampler the samples
    it repeats to give every rank as many are left out, and the sums are added over the ranks."""
    model.eval()
    real = _real_samples(loader)  # this rank's samples that are not padding (they come first), None: all
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for inputs, target in loader:
        inputs, target = inputs.to(device), target.to(device)
        n = inputs.shape[0]
        keep = n if real is None else max(0, min(n, real))
        real = None if real is None else real - n
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            # every batch through the model, padding included: a DDP forward may synchronise buffers across ranks
            output = model(inputs)[:keep]
            target = target[:keep]
            if keep == 0:
                continue
            loss = loss_fn(output, target)
        k = min(5, output.shape[-1])
        correct = output.topk(k, dim=1).indices.eq(target.view(-1, 1))
        sums += torch.stack([loss.detach().double() * keep, correct[:, :1].sum().double(),
                             correct.sum().double(), torch.tensor(float(keep), dtype=torch.float64, device=device)])
    if args.distributed:
        dist.all_reduce(sums)
    loss_sum, top1, top5, count = sums.tolist()
    count = max(count, 1.)
    metrics = OrderedDict(loss=loss_sum / count, top1=100. * top1 / count, top5=100. * top5 / count)
    if is_primary:
        _logger.info(f"Eval{log_suffix}: loss {metrics['loss']:.4f} top1 {metrics['top1']:.3f} "
                     f"top5 {metrics['top5']:.3f} ({int(count)} samples)")
    return metrics


def _real_samples(loader) -> Optional[int]:
    """How many of this rank's samples are the dataset's own under a distributed sampler, which pads the index
    list (wrapping around) so every rank gets as many: rank ``r`` reads list positions ``r, r + W, ...``, the padding
    sits at positions ``>= len(dataset)``, so last. None without such a sampler (every sample counts)."""
    sampler = getattr(loader, 'sampler', None)
    if not all(hasattr(sampler, a) for a in ('rank', 'num_replicas', 'dataset')):
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


def _global_means(meters, distributed: bool, device: torch.device):
    """The meters' means over every rank's updates (sums and counts added over the ranks); 0 for an empty one."""
    totals = torch.tensor([[m.sum, m.count] for m in meters], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(totals)
    return [s / c if c else 0. for s, c in totals.tolist()]
