"""The continual-segmentation trainer: methods, loop, reports."""
from .config import DATASET_DEFAULTS, METHODS, Method, TrainConfig
from .results import write_reports
from .trainer import evaluate, evaluate_checkpoint, run, train_step

__all__ = ["DATASET_DEFAULTS", "METHODS", "Method", "TrainConfig", "evaluate", "evaluate_checkpoint", "run",
           "train_step", "write_reports"]
