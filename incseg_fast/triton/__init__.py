"""The Triton backend: Triton kernels registered for the ops of the namespace ``incseg_fast_triton``.

The schemas are the compiled extension's (csrc/ops.cpp), and fake kernels and autograd are the
ones every namespace shares (incseg_fast/ops); importing this package registers the Triton
launchers as the ops' CUDA kernels, and as their CPU kernels for ``TRITON_INTERPRET=1``. Use it
through ``incseg_fast.ops.TRITON`` (the backend "triton" of the public API). The interpreter mode is
read when the kernels are decorated: set ``TRITON_INTERPRET=1`` before this package is imported.
"""

import os

import torch

from .. import ops
from .attention import (
    attentive_distillation_backward,
    attentive_distillation_forward,
    structured_attention,
    structured_attention_backward,
)
from .logit_losses import logit_losses_bwd, logit_losses_fwd
from .pod import local_pod_backward, local_pod_forward
from .pseudo_labels import entropy_histogram, entropy_pseudo_labels, entropy_pseudo_labels_
from .sigmoid_losses import sigmoid_losses_bwd, sigmoid_losses_fwd

__all__ = ["is_available"]

_KERNELS = {
    "logit_losses_fwd": logit_losses_fwd,
    "logit_losses_bwd": logit_losses_bwd,
    "attentive_distillation_forward": attentive_distillation_forward,
    "attentive_distillation_backward": attentive_distillation_backward,
    "structured_attention": structured_attention,
    "structured_attention_backward": structured_attention_backward,
    "local_pod_forward": local_pod_forward,
    "local_pod_backward": local_pod_backward,
    "entropy_pseudo_labels": entropy_pseudo_labels,
    "entropy_pseudo_labels_": entropy_pseudo_labels_,
    "entropy_histogram": entropy_histogram,
    "sigmoid_losses_fwd": sigmoid_losses_fwd,
    "sigmoid_losses_bwd": sigmoid_losses_bwd,
}


def is_available():
    """True when the ops' schemas are built and there is a CUDA device or the interpreter is on."""
    return ops.HAS_EXTENSION and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if ops.HAS_EXTENSION:
    for _name, _kernel in _KERNELS.items():
        # CPU tensors reach the kernels only under the interpreter; _launch.check_device says so otherwise.
        torch.library.register_kernel(f"{ops.TRITON_NAMESPACE}::{_name}", ("cuda", "cpu"), _kernel)
