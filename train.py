#!/usr/bin/env python
"""Train timm models (ConvNeXt-dcls and any other) with the DCLS recipe, on one process or under torchrun.

    python train.py -c configs/quickstart_fashion_mnist.yaml
    torchrun --nproc_per_node=8 train.py -c configs/convnext_tiny_dcls_in1k.yaml --data-dir /data/imagenet

Every flag: python train.py --help. The work is done by dcls_timm.training.
"""
import dcls_timm  # noqa: F401  (registers the models)
from dcls_timm.errors import run_cli
from dcls_timm.training import NonFiniteLossError, main

if __name__ == '__main__':
    run_cli(main, 'train.py', (NonFiniteLossError,))
