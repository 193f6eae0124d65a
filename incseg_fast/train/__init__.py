"""The continual-segmentation trainer: methods, loop, reports."""

from .checkpoint import CheckpointError, load_checkpoint
from .config import DATASET_DEFAULTS, TrainConfig
from .methods import METHODS, Method
from .results import write_reports
from .rundir import RunOptionsError
from .trainer import evaluate, evaluate_checkpoint, run, train_step

__all__ = [
    "CheckpointError",
    "DATASET_DEFAULTS",
    "METHODS",
    "Method",
    "RunOptionsError",
    "TrainConfig",
    "evaluate",
    "evaluate_checkpoint",
    "load_checkpoint",
    "run",
    "train_step",
    "write_reports",
]
