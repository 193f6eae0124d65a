"""The Triton backend: the three functions of the backend contract (DEVELOPERS.md).

The kernels take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before this
package was imported (the interpreter mode is fixed when kernels are decorated).
"""
import importlib.util
import os

import torch

__all__ = ["is_available", "logit_losses", "attentive_distillation", "structured_attention"]


def is_available():
    """True when triton imports and there is a CUDA device or the interpreter is on."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if importlib.util.find_spec("triton") is not None:
    from .attention import attentive_distillation, structured_attention
    from .logit_losses import logit_losses
else:  # the package stays importable; using it says why it cannot run
    def _triton_missing(*args, **kwargs):
        raise RuntimeError("the triton backend needs the triton package (pip install triton)")

    logit_losses = attentive_distillation = structured_attention = _triton_missing
