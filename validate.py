#!/usr/bin/env python
"""Evaluate a model on ImageNet and its robustness sets, on one process or under torchrun.

    python validate.py --model convnext_tiny_dcls --checkpoint out/model_best.pth.tar --use-ema \
        --data-dir /data --suite imagenet,imagenet-c,imagenet-a,imagenet-r,sketch --results-file results.json

Every flag: python validate.py --help. The work is done by dcls_timm.evaluation.
"""
import dcls_timm  # noqa: F401  (registers the models)
from dcls_timm.errors import run_cli
from dcls_timm.evaluation import CheckpointMismatchError, main

if __name__ == '__main__':
    run_cli(main, 'validate.py', (CheckpointMismatchError,))
