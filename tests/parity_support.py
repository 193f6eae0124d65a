"""What the parity suites share: the device each fused backend runs on (tolerances: incseg_fast.vocabulary)."""
import torch

from incseg_fast.vocabulary import FUSED_BACKENDS, RTOL  # noqa: F401  (re-exported for the suites)


def interpreted(backend):
    """Triton without a GPU runs in its (slow) interpreter on CPU tensors."""
    return backend == "triton" and not torch.cuda.is_available()


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
