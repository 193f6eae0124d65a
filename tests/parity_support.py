"""What the parity suites share: the device each fused backend runs on (tolerances: incseg_fast.vocabulary)."""

import torch

from incseg_fast.vocabulary import CUDA_EMULATOR, FUSED_BACKENDS, RTOL  # noqa: F401  (re-exported for the suites)

# The fused backends, and the CUDA kernels run thread by thread on the CPU (the same parity suites
# check the CUDA kernels' indexing, tails and arithmetic on machines without a GPU).
PARITY_BACKENDS = FUSED_BACKENDS + (CUDA_EMULATOR,)


def interpreted(backend):
    """Triton without a GPU runs in its (slow) interpreter on CPU tensors."""
    return backend == "triton" and not torch.cuda.is_available()


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
