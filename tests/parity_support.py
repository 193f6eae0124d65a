"""What the parity suites share: the fused backends, the device each runs on, the tolerances."""
import torch

FUSED_BACKENDS = ("cpu", "cuda", "triton")
# DEVELOPERS.md: relative to the float64 reference's scale.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def interpreted(backend):
    """Triton without a GPU runs in its (slow) interpreter on CPU tensors."""
    return backend == "triton" and not torch.cuda.is_available()


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
