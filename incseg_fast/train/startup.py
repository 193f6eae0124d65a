"""The line ``train`` and ``demo`` print when they start: device, the backend the losses run on, AMP, threads."""

from __future__ import annotations

import torch

from .._environment import run_summary
from .config import TrainConfig
from .trainer import amp_dtype, resolve_device


def fused_losses(cfg: TrainConfig) -> list[str]:
    """The incseg_fast functions a run of ``cfg`` (resolved) calls: loss_terms' and CAF's fusion module's."""
    spec = cfg.method_spec
    return (
        ["incremental_loss"]
        + ["attentive_distillation"] * bool(cfg.lambda_ad)
        + ["structured_attention"] * bool(spec.caf_module)
    )


def start_line(configs: list[TrainConfig]) -> str:
    """One line for the runs of ``configs`` (one device, backend and AMP setting: the demo's methods)."""
    cfg = configs[0].resolved()
    device = resolve_device(cfg.device)
    losses = dict.fromkeys(name for c in configs for name in fused_losses(c.resolved()))
    return run_summary(device, cfg.loss_backend, list(losses), amp_dtype(cfg.amp, device), torch.get_num_threads())
