"""The line ``train`` and ``demo`` print when they start: device, the backend the losses run on, AMP, threads."""

from __future__ import annotations

import torch

from .._environment import run_summary
from .config import TrainConfig
from .methods import fused_losses
from .trainer import amp_dtype, resolve_device


def start_line(configs: list[TrainConfig]) -> str:
    """One line for the runs of ``configs`` (one device, backend and AMP setting: the demo's methods)."""
    cfg = configs[0].resolved()
    device = resolve_device(cfg.device)
    losses = dict.fromkeys(name for c in configs for name in fused_losses(c.resolved()))
    return run_summary(device, cfg.loss_backend, list(losses), amp_dtype(cfg.amp, device), torch.get_num_threads())
