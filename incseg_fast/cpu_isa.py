"""The instruction-set copies of the CPU kernels (docs/KERNELS.md#isa-copies): which one runs, and a cap.

Every hot loop of the CPU kernels is compiled three times (baseline x86-64, AVX2, AVX-512) and the
widest copy the CPU supports runs, capped by the environment variable INCSEG_CPU_ISA. ``cpu_isa_cap``
changes the cap for a block of code, so that one process can time or test every copy side by side.
"""

import contextlib

import torch

from incseg_fast.vocabulary import CPU_ISAS


def _isa_ops():
    from incseg_fast import ops

    if not ops.HAS_EXTENSION:
        raise RuntimeError(f"the compiled extension incseg_fast._C is not available ({ops.IMPORT_ERROR})")
    return torch.ops.incseg_fast_build


def active_cpu_isa():
    """The name of the copy the CPU kernels run now: "baseline", "avx2" or "avx512"."""
    return CPU_ISAS[_isa_ops().cpu_isa()[0]]


def supported_cpu_isas():
    """The copies this CPU can run, narrowest first (those above INCSEG_CPU_ISA included)."""
    return CPU_ISAS[: _isa_ops().cpu_isa()[1] + 1]


@contextlib.contextmanager
def cpu_isa_cap(isa):
    """Run the CPU kernels' ``isa`` copy (or the widest below it that the CPU supports) inside the block."""
    if isa not in CPU_ISAS:
        raise ValueError(f"isa must be one of {', '.join(CPU_ISAS)}, got {isa!r}")
    ops = _isa_ops()
    previous = active_cpu_isa()
    ops.set_cpu_isa_cap(isa)
    try:
        yield
    finally:
        ops.set_cpu_isa_cap(previous)
