"""incseg_fast: fused losses for continual (class-incremental) semantic segmentation.

    import incseg_fast as isf
    ce, kd = isf.incremental_loss(logits, labels, old_logits, old_classes=16)
    loss = ce + 10 * kd

Backends: "reference" (plain PyTorch, always there), "cpu" and "cuda" (the compiled extension),
"triton". ``isf.available_backends()`` lists those that can run here.
"""

from importlib import metadata as _metadata

from ._backends import BackendUnavailableError, available_backends
from .api import (
    attentive_distillation,
    balanced_knowledge_distillation,
    entropy_histogram,
    entropy_pseudo_labels,
    entropy_pseudo_labels_,
    histogram_medians,
    incremental_loss,
    knowledge_distillation,
    local_pod,
    sigmoid_losses,
    structured_attention,
    unbiased_cross_entropy,
    unbiased_knowledge_distillation,
)

try:  # the version is written once, in pyproject.toml
    __version__ = _metadata.version("incseg_fast")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BackendUnavailableError",
    "attentive_distillation",
    "available_backends",
    "balanced_knowledge_distillation",
    "entropy_histogram",
    "entropy_pseudo_labels",
    "entropy_pseudo_labels_",
    "histogram_medians",
    "incremental_loss",
    "knowledge_distillation",
    "local_pod",
    "sigmoid_losses",
    "structured_attention",
    "unbiased_cross_entropy",
    "unbiased_knowledge_distillation",
]
