"""Exact top-1/top-5 over a dataset, on one process or split across ranks without padding, with optional skipping of
unreadable images, progress reporting and a clean stop on a signal."""
import atexit
import multiprocessing
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

from dcls_timm.errors import UnreadableImageError

__all__ = ['evaluate_dataset', 'Batches', 'EvaluationStopped', 'counts_to_metrics']


class EvaluationStopped(Exception):
    """A stop was requested (on this rank or another) before the dataset was finished: its counts are dropped."""


class _Skipped:
    """Stands in for an unreadable sample (``--skip-unreadable``); the collate function takes it out of the batch."""
    __slots__ = ('path', 'message')

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message


class _SkipUnreadable(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UnreadableImageError as e:
            return _Skipped(e.path or str(e), str(e))


def _collate(batch: List[Any]) -> Tuple[Optional[Any], List[_Skipped]]:
    skipped = [b for b in batch if isinstance(b, _Skipped)]
    kept = [b for b in batch if not isinstance(b, _Skipped)] if skipped else batch
    return (default_collate(kept) if kept else None), skipped


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WORKERS: List[Any] = []  # the DataLoader worker processes started here, killed at exit if still alive


def _ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT (sent to the whole process group by Slurm, torchrun and Ctrl-C) to the
    main process, which decides when to stop, and then stops them. They start with the signals blocked (see
    :func:`_signals_blocked`), so that none can kill a worker before it gets here."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, 'pthread_sigmask'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextmanager
def _signals_blocked():
    """Block SIGTERM/SIGINT in this thread while DataLoader workers are forked (they inherit the mask); a signal that
    arrives meanwhile is delivered when the block ends."""
    if not hasattr(signal, 'pthread_sigmask') or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _kill_workers(workers: List[Any]) -> None:
    """Workers ignore SIGTERM, so ``Process.terminate`` (torch's and multiprocessing's last resort) cannot end one
    that is still alive after it was asked to stop: SIGKILL it."""
    for p in workers:
        try:
            if p.is_alive():
                p.kill()
                p.join(1)
        except (OSError, ValueError, AssertionError):  # already reaped, or not our child any more
            pass


atexit.register(lambda: _kill_workers(_WORKERS))  # runs before multiprocessing's own exit handler (LIFO)


def counts_to_metrics(correct1: float, correct5: float, loss_sum: float, images: int) -> Dict[str, float]:
    """top1/top5 (%) and mean loss from the summed counts (empty when no image was evaluated)."""
    if not images:
        return {}
    return {'top1': 100 * correct1 / images, 'top5': 100 * correct5 / images, 'loss': loss_sum / images}


class Batches:
    """A started DataLoader iterator over this rank's share of a dataset (every world_size-th image, no padding).

    Creating it starts the DataLoader workers, which load their first batches at once: the runner starts the next
    unit's batches while the current unit is evaluated, so that no unit waits for its workers to start.
    """

    def __init__(self, dataset, device: torch.device, batch_size: int = 64, workers: int = 4,
                 distributed: bool = False, skip_unreadable: bool = False):
        self.dataset = dataset
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        source = _SkipUnreadable(dataset) if skip_unreadable else dataset
        subset = torch.utils.data.Subset(source, range(rank, len(dataset), world))
        loader = torch.utils.data.DataLoader(
            subset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == 'cuda',
            collate_fn=_collate, worker_init_fn=_ignore_signals if workers else None)
        before = set(multiprocessing.active_children()) if workers else set()
        with _signals_blocked():
            self.iterator = iter(loader)
        self.workers = [p for p in multiprocessing.active_children() if p not in before] if workers else []
        _WORKERS[:] = [p for p in _WORKERS if p.is_alive()] + self.workers

    def close(self) -> None:
        """Stop the workers now: dropping the DataLoader iterator asks them to stop and joins them; any left is
        killed."""
        # shut the iterator down explicitly: an exception in flight keeps it alive, and its SIGCHLD handler would
        # turn a worker killed below into a second error ("DataLoader worker ... is killed by signal")
        shutdown = getattr(self.iterator, '_shutdown_workers', None)
        if shutdown is not None:
            shutdown()
        self.iterator = iter(())
        _kill_workers(self.workers)
        self.workers = []


@torch.no_grad()
def evaluate_dataset(
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        device: torch.device,
        batch_size: int = 64,
        workers: int = 4,
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
        class_indices: Optional[Sequence[int]] = None,
        distributed: bool = False,
        skip_unreadable: bool = False,
        normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        stop: Optional[Any] = None,
        progress: Optional[Callable[[int], Any]] = None,
        batches: Optional[Batches] = None,
) -> Dict[str, Any]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``, with the summed counts.

    Under ``torch.distributed`` each rank takes every world_size-th image, with no padding, and the counts are summed,
    so the numbers equal a single-process run exactly.

    Args:
        class_indices: Keep only these logit columns (ascending 1k indices, e.g. the 200 classes of ImageNet-A);
            dataset labels must be 1k indices among them.
        skip_unreadable: Leave out images that raise :class:`UnreadableImageError` (else the error propagates); they
            are counted and listed (``skipped``, ``skipped_files``) and excluded from every denominator.
        normalize: ``(mean, std)`` (0-1 scale) applied on ``device`` to uint8 images (timm's prefetcher convention:
            the dataset's transform then ends with ToNumpy / PILToTensor instead of Normalize).
        stop: An object with ``is_set()`` (:class:`~dcls_timm.evaluation.progress.StopRequest`), polled between
            batches; when it is set on any rank, every rank raises :class:`EvaluationStopped` at the end.
        progress: Called with the number of images done (over all ranks, estimated from this rank's share).
        batches: The already started :class:`Batches` of ``dataset`` (built with the same arguments), if any.

    Returns:
        ``top1``, ``top5``, ``loss`` (absent if every image was skipped), ``images`` (evaluated), ``correct1``,
        ``correct5``, ``loss_sum``, ``skipped``, ``skipped_files`` (sorted), ``seconds`` (wall time, loader start-up
        included) and ``images_per_sec``.
    """
    start = time.perf_counter()
    world = dist.get_world_size() if distributed else 1
    cuda = device.type == 'cuda'
    if batches is None:
        batches = Batches(dataset, device, batch_size, workers, distributed, skip_unreadable)
    elif batches.dataset is not dataset:
        raise ValueError('evaluate_dataset: the batches are of another dataset.')
    columns, remap = None, None
    if class_indices is not None:
        columns = torch.tensor(list(class_indices), device=device)
        remap = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long, device=device)
        remap[columns] = torch.arange(len(columns), device=device)
    mean = std = None
    if normalize is not None:
        mean = torch.tensor([255 * m for m in normalize[0]], device=device).view(1, -1, 1, 1)
        std = torch.tensor([255 * s for s in normalize[1]], device=device).view(1, -1, 1, 1)
    # top-1 hits, top-5 hits, loss sum, images, skipped images, stop requested, images with non-finite logits
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    skipped_files: List[str] = []
    stopped = stop is not None and stop.is_set()
    model.eval()
    if stopped:
        batches.close()
    else:
        try:
            for batch, skipped in batches.iterator:
                if skipped:
                    skipped_files += [s.path for s in skipped]
                    sums[4] += len(skipped)
                if batch is not None:
                    images, target = batch[0], batch[1]
                    images = images.to(device, non_blocking=cuda)
                    target = target.to(device, non_blocking=cuda)
                    if mean is not None:
                        images = images.float().sub_(mean).div_(std)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    with amp_autocast():
                        output = model(images)
                    output = output.float()
                    sums[6] += (~torch.isfinite(output).all(dim=1)).sum()  # checked once, at the end
                    if columns is not None:
                        output, target = output[:, columns], remap[target]
                        if (target < 0).any():
                            raise ValueError('A label is outside the kept classes.')
                    top = output.topk(min(5, output.shape[1]), dim=1).indices
                    sums[0] += (top[:, 0] == target).sum()
                    sums[1] += (top == target[:, None]).any(dim=1).sum()
                    sums[2] += F.cross_entropy(output, target, reduction='sum')
                    sums[3] += target.numel()
                if progress is not None:
                    progress(world * (len(skipped) + (0 if batch is None else len(batch[1]))))
                if stop is not None and stop.is_set():
                    stopped = True
                    break
        except Exception:  # noqa: BLE001  (e.g. a DataLoader worker killed by the same signal)
            if stop is None or not stop.is_set():
                raise
            stopped = True
        finally:
            batches.close()
    sums[5] = float(stopped)
    if distributed:
        dist.all_reduce(sums)
        if sums[4].item() > 0:
            gathered: List[Optional[List[str]]] = [None] * world
            dist.all_gather_object(gathered, skipped_files)
            skipped_files = [f for files in gathered for f in files]
    if sums[5].item() > 0:
        raise EvaluationStopped()
    n, skipped_total = int(sums[3].item()), int(sums[4].item())
    if n == 0 and skipped_total == 0:
        raise ValueError('The dataset is empty.')
    if sums[6].item() > 0:  # NaN/inf logits would be counted as wrong (or right) answers without a word
        hint = ('; with AMP, float16 can overflow: try --amp-dtype bfloat16 or --no-amp'
                if amp_autocast is not nullcontext else '')
        raise ValueError(f'the model gave non-finite logits for {int(sums[6].item())} of {n} images{hint}.')
    seconds = time.perf_counter() - start
    c1, c5, loss_sum = sums[0].item(), sums[1].item(), sums[2].item()
    return {**counts_to_metrics(c1, c5, loss_sum, n), 'images': n, 'correct1': int(c1), 'correct5': int(c5),
            'loss_sum': loss_sum, 'skipped': skipped_total, 'skipped_files': sorted(skipped_files),
            'seconds': seconds, 'images_per_sec': (n + skipped_total) / seconds if seconds > 0 else 0.0}
