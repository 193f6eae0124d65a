"""What the parity suites share: the device each fused backend runs on (tolerances: incseg_fast.vocabulary)."""

import torch

from incseg_fast.vocabulary import CUDA_EMULATOR, FUSED_BACKENDS, RTOL, WIDER_TEACHER_DTYPE  # noqa: F401  (re-exported)

# The fused backends, and the CUDA kernels run thread by thread on the CPU (the same parity suites
# check the CUDA kernels' indexing, tails and arithmetic on machines without a GPU).
PARITY_BACKENDS = FUSED_BACKENDS + (CUDA_EMULATOR,)

# (student dtype, teacher dtype) of a mixed-precision loop whose teacher runs outside autocast
# (MATH.md#teacher-dtype): the parity suites run each, at the student's tolerance.
WIDER_TEACHERS = tuple(WIDER_TEACHER_DTYPE.items())


def interpreted(backend):
    """Triton without a GPU runs in its (slow) interpreter on CPU tensors."""
    return backend == "triton" and not torch.cuda.is_available()


def device_for(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


# A teacher whose scaled logits alpha * y reach ~1e4 with one class far above the others in each
# image (class b % Co in image b): q is one-hot in float32 and exactly representable, so the
# distillation terms must be exact to RTOL. A kernel that fuses alpha * y - lse into a multiply-add
# while its maximum holds the rounded product gets q = exp(the product's rounding error), ~5e-4 off
# (Triton on a GPU unless compiled with enable_fp_fusion=False; the CPU kernels unless built with
# -ffp-contract=off).
ONE_HOT_ALPHA = 3.3  # not a power of two: alpha * y is inexact
ONE_HOT_SPIKE = 3000.0


def one_hot_teacher(y):
    """``y`` with ONE_HOT_SPIKE added to class b % Co of image b, in ``y``'s dtype."""
    spiked = y.clone()
    for b in range(y.shape[0]):
        spiked[b, b % y.shape[1]] += ONE_HOT_SPIKE
    return spiked
