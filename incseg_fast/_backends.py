"""Backend registry: which implementations exist here, and which one a call gets.

A backend is an object exposing the four functions of the contract in DEVELOPERS.md
(``logit_losses``, ``attentive_distillation``, ``structured_attention``, ``local_pod``): the reference
module, or an ``ops.OpBackend`` bound to the compiled or the Triton namespace. The Triton kernels are registered
lazily, so ``import incseg_fast`` neither loads Triton nor decides the interpreter mode early.
"""

import importlib
import importlib.util
import os
import warnings

import torch

from incseg_fast import ops, reference
from incseg_fast.vocabulary import BACKEND_CHOICES, BACKENDS, CUDA_EMULATOR

# Looked up once: find_spec is not traceable by torch.compile, and an install does not change mid-run.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Backends by name. The Triton kernels are registered on first use only, so that importing
# incseg_fast neither loads Triton nor fixes its interpreter mode before the user sets it.
_MODULES = {"reference": reference, "cpu": ops.COMPILED, "cuda": ops.COMPILED, CUDA_EMULATOR: ops.CUDA_EMULATOR}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (never silently replaced by another)."""


def triton_interpreter():
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(name):
    """None when backend ``name`` can run in this process, else a sentence saying why not."""
    if name == "reference":
        return None
    if name in ("cpu", CUDA_EMULATOR):
        return None if ops.HAS_EXTENSION else f"the compiled extension incseg_fast._C is not built ({ops.IMPORT_ERROR})"
    if name == "cuda":
        if not ops.HAS_EXTENSION:
            return f"the compiled extension incseg_fast._C is not built ({ops.IMPORT_ERROR})"
        if not ops.HAS_CUDA_KERNELS:
            return "incseg_fast._C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        if not ops.HAS_EXTENSION:
            return f"the triton backend's op schemas are in incseg_fast._C, which is not built ({ops.IMPORT_ERROR})"
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if not (torch.cuda.is_available() or triton_interpreter()):
            return "triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
        return None
    raise ValueError(f"backend must be one of {list(BACKEND_CHOICES)}, got {name!r}")


def available_backends():
    """The backends that can run here, in preference order (a subset of cuda, triton, cpu, reference)."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def _module(name):
    if name not in _MODULES:  # only "triton" is registered lazily
        importlib.import_module("incseg_fast.triton")  # registers the Triton kernels
        _MODULES[name] = ops.TRITON
    return _MODULES[name]


def auto_choice(device):
    """The backend that ``backend="auto"`` runs for tensors on ``device`` (CUDA: cuda > triton >
    reference; otherwise cpu > reference)."""
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    return next(n for n in order if unavailable_reason(n) is None)


class ReferenceFallbackWarning(UserWarning):
    """``backend="auto"`` runs plain PyTorch on CUDA tensors: neither fused GPU backend can run."""


_warned_reference_on_cuda = False


def _warn_reference_on_cuda():
    """Once per process: a CUDA user expects fused kernels, and would otherwise not know why they are slow."""
    global _warned_reference_on_cuda
    if _warned_reference_on_cuda:
        return
    _warned_reference_on_cuda = True
    warnings.warn(
        "incseg_fast: backend='auto' runs the reference backend (plain PyTorch, slower and heavier) on CUDA "
        f"tensors: cuda is unavailable ({unavailable_reason('cuda')}), and so is triton "
        f"({unavailable_reason('triton')}); `incseg-fast env` says more",
        ReferenceFallbackWarning,
        stacklevel=4,
    )


def resolve(backend, device):
    """The backend module for a call whose tensors live on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        name = auto_choice(device)
        if name == "reference" and device.type == "cuda":
            _warn_reference_on_cuda()
        return _module(name)

    reason = unavailable_reason(backend)  # raises ValueError for unknown names
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is not available: {reason}")
    if backend in ("cpu", CUDA_EMULATOR) and device.type != "cpu":
        raise ValueError(f"backend={backend!r} needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreter()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
    return _module(backend)
