"""Exact top-1/top-5 over a dataset, on one process or split across ranks without padding."""
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['evaluate_dataset']


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
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``.

    Under ``torch.distributed`` each rank takes every world_size-th image, with no padding, and the counts are summed,
    so the numbers equal a single-process run exactly.

    Args:
        class_indices: Keep only these logit columns (ascending 1k indices, e.g. the 200 classes of ImageNet-A);
            dataset labels must be 1k indices among them.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == 'cuda')
    columns, remap = None, None
    if class_indices is not None:
        columns = torch.tensor(list(class_indices), device=device)
        remap = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long, device=device)
        remap[columns] = torch.arange(len(columns), device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    model.eval()
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(images)
        output = output.float()
        if columns is not None:
            output, target = output[:, columns], remap[target]
            if (target < 0).any():
                raise ValueError('A label is outside the kept classes.')
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        sums[0] += (top[:, 0] == target).sum()
        sums[1] += (top == target[:, None]).any(dim=1).sum()
        sums[2] += F.cross_entropy(output, target, reduction='sum')
        sums[3] += target.numel()
    if distributed:
        dist.all_reduce(sums)
    n = int(sums[3].item())
    if n == 0:
        raise ValueError('The dataset is empty.')
    return {'top1': 100 * sums[0].item() / n, 'top5': 100 * sums[1].item() / n, 'loss': sums[2].item() / n,
            'images': n}
