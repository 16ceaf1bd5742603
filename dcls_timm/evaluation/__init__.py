"""Evaluation suites (ImageNet, ImageNet-C/A/R, Sketch, Stylized) behind validate.py."""
from dcls_timm.checkpoint import CheckpointMismatchError, load_weights

from .classes import imagenet_wnids, subset_classes
from .datasets import WnidImageFolder
from .evaluator import EvaluationStopped, evaluate_dataset
from .metrics import (
    ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corruption_summary)
from .runner import build_parser, main, run
from .store import FORMAT as RESULTS_FORMAT, ResultsStore
from .suites import SUITES
