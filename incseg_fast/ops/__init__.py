"""The compiled backends ("cpu" and "cuda"): torch.ops.incseg_fast.* from incseg_fast._C.

Importing this package loads the extension (which registers the op schemas and device kernels),
then the Python side of each op family: fake kernels, autograd and the contract wrappers.
The same wrappers serve both backends; the dispatcher picks the kernel by the tensors' device.
"""
import torch

try:
    from incseg_fast import _C  # noqa: F401  (the import registers the ops)
except ImportError as error:  # not built: the package still works on the reference path
    HAS_EXTENSION = False
    IMPORT_ERROR = str(error)
else:
    HAS_EXTENSION = True
    IMPORT_ERROR = None


def _ops_with_kernel(dispatch_key):
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("incseg_fast::")]
    return names, [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key)]


def _has_kernels_for(dispatch_key):
    names, with_kernel = _ops_with_kernel(dispatch_key)
    return bool(names) and len(names) == len(with_kernel)


HAS_CUDA_KERNELS = HAS_EXTENSION and _has_kernels_for("CUDA")

if HAS_EXTENSION:
    from .attention import attentive_distillation, structured_attention  # noqa: E402,F401
    from .logit_losses import logit_losses  # noqa: E402,F401
