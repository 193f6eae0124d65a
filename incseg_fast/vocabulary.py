"""The one vocabulary of the package: modes, reductions, backends, dtypes and test tolerances.

Validation, the op wrappers, the Triton kernels, the CLI's choices, the tests and the benchmarks
all import these names from here (the C++ side parses the same strings in csrc/common/logit_host.h).
"""

import torch

# Modes of the fused logit-loss op (MATH.md#logit-losses): "none" switches a term off.
CE_MODES = ("unbiased", "plain", "none")
KD_MODES = ("unbiased", "balanced", "plain", "none")
REDUCTIONS = ("mean", "sum", "none")
# What incremental_loss accepts for ce: it always has a classification term.
INCREMENTAL_CE_MODES = ("unbiased", "plain")
# Attentive distillation reduces to a scalar.
FEATURE_REDUCTIONS = ("mean", "sum")
# Local POD (MATH.md#local-pod): PLOP's pyramid, and the most scales one call takes (csrc/common/pod_math.h).
POD_SCALES = (1, 2, 4)
POD_MAX_SCALES = 8

# Backends in the order "auto" prefers them (for the device a call's tensors live on).
BACKENDS = ("cuda", "triton", "cpu", "reference")
FUSED_BACKENDS = ("cpu", "cuda", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS
# For tests only: the CUDA kernels' bodies run thread by thread on the CPU (slow; small shapes).
# Accepted by name, never chosen by "auto" nor listed by available_backends().
CUDA_EMULATOR = "cuda_emulator"

# The CPU kernels' instruction-set copies, narrowest first (the position is csrc/cpu/toolkit.h's Isa).
CPU_ISAS = ("baseline", "avx2", "avx512")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)
# The one wider dtype a frozen teacher may have besides the student's own (MATH.md#teacher-dtype): a
# mixed-precision loop runs the old model outside autocast. Kernels read it in that dtype, no copy.
WIDER_TEACHER_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}

# Parity tolerance of each input dtype, relative to the float64 reference's scale (DEVELOPERS.md).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def accumulation_dtype(dtype):
    """The dtype the kernels accumulate in and return losses in: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# How the sigmoid losses treat ignore_index pixels in their label term (MATH.md#sigmoid-ignore).
SIGMOID_IGNORED_PIXELS = ("skip", "negative")
