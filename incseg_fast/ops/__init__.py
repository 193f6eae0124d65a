"""The op contract as torch custom ops: the schemas of csrc/ops.cpp, one namespace per implementation family.

Importing this package loads the extension ``incseg_fast._C``, which defines the schemas in every
namespace and registers the compiled CPU (and, when built, CUDA) kernels; then the fake kernels and
autograd formulas of each op family are registered once per namespace. A backend is an
``OpBackend``: the four contract functions of DEVELOPERS.md bound to one namespace.

    incseg_fast                 compiled kernels (backends "cpu" and "cuda": the dispatcher picks by device)
    incseg_fast_triton          Triton kernels (backend "triton"), registered by incseg_fast.triton
    incseg_fast_cuda_emulator   the CUDA kernels run thread by thread on CPU tensors (tests only)
"""

import torch

from . import attention as _attention
from . import logit_losses as _logit_losses
from . import pod as _pod
from . import pseudo_labels as _pseudo_labels
from . import sigmoid_losses as _sigmoid_losses

try:
    from incseg_fast import _C  # noqa: F401  (the import defines the schemas and registers the kernels)
except ImportError as error:  # not built: the package still works on the reference path
    HAS_EXTENSION = False
    IMPORT_ERROR = str(error)
else:
    HAS_EXTENSION = True
    IMPORT_ERROR = None

COMPILED_NAMESPACE = "incseg_fast"
TRITON_NAMESPACE = "incseg_fast_triton"
CUDA_EMULATOR_NAMESPACE = "incseg_fast_cuda_emulator"
NAMESPACES = (COMPILED_NAMESPACE, TRITON_NAMESPACE, CUDA_EMULATOR_NAMESPACE)


class OpBackend:
    """The backend contract (DEVELOPERS.md) on the ops of one namespace."""

    def __init__(self, namespace):
        self.namespace = namespace
        self.ops = getattr(torch.ops, namespace)

    def logit_losses(self, x, target, y, log_gamma, mask, **options):
        return _logit_losses.logit_losses(self.ops, x, target, y, log_gamma, mask, **options)

    def attentive_distillation(self, f, g, a, b, *, reduction, detach_spatial):
        return _attention.attentive_distillation(
            self.ops, f, g, a, b, reduction=reduction, detach_spatial=detach_spatial
        )

    def structured_attention(self, v, a_ch, a_sp):
        return _attention.structured_attention(self.ops, v, a_ch, a_sp)

    def local_pod(self, new, old, *, scales, reduction):
        return _pod.local_pod(self.ops, new, old, scales=scales, reduction=reduction)

    def entropy_pseudo_labels(self, y, t, thresholds, *, ignore_index, size):
        return _pseudo_labels.entropy_pseudo_labels(self.ops, y, t, thresholds, ignore_index=ignore_index, size=size)

    def entropy_pseudo_labels_(self, y, t, thresholds, *, ignore_index, size):
        return _pseudo_labels.entropy_pseudo_labels_(self.ops, y, t, thresholds, ignore_index=ignore_index, size=size)

    def entropy_histogram(self, y, t, *, bins, ignore_index, size):
        return _pseudo_labels.entropy_histogram(self.ops, y, t, bins=bins, ignore_index=ignore_index, size=size)

    def sigmoid_losses(self, x, target, y, pos_weight, channel_weight, **options):
        return _sigmoid_losses.sigmoid_losses(self.ops, x, target, y, pos_weight, channel_weight, **options)


def _has_kernels_for(namespace, dispatch_key):
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(namespace + "::")]
    return bool(names) and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key) for n in names)


HAS_CUDA_KERNELS = False
COMPILED = TRITON = CUDA_EMULATOR = None
if HAS_EXTENSION:
    for _namespace in NAMESPACES:
        _logit_losses.register(_namespace)
        _attention.register(_namespace)
        _pod.register(_namespace)
        _pseudo_labels.register(_namespace)
        _sigmoid_losses.register(_namespace)
    HAS_CUDA_KERNELS = _has_kernels_for(COMPILED_NAMESPACE, "CUDA")
    COMPILED = OpBackend(COMPILED_NAMESPACE)
    TRITON = OpBackend(TRITON_NAMESPACE)
    CUDA_EMULATOR = OpBackend(CUDA_EMULATOR_NAMESPACE)
