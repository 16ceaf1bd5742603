"""The training run behind train.py: configuration, data, epoch loop, atomic checkpoints, exact resume."""
from .checkpoint import AtomicCheckpointSaver, load_training_checkpoint, rng_state, set_rng_state
from .config import ConfigError, build_parser, parse_args
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .trainer import main, run
