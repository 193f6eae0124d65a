"""tools/triton_check.py's verdict on one kernel (make cuda-check runs the tool itself: it needs nvcc's ptxas)."""

import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
triton_check = importlib.import_module("triton_check")


def assembled(registers, spilled=0, status=0):
    """What _assemble returns for a kernel ptxas assembled with these resources."""
    record = dict(registers=registers, stack=spilled, spill_stores=spilled, spill_loads=spilled, entry=True)
    return status, "ptxas info ...", record


@pytest.mark.parametrize(
    "result,failed,flags",
    [
        (assembled(150), False, []),
        (assembled(168, spilled=8), False, ["spill"]),  # ptxas's occupancy trade below the ceiling
        (assembled(255), False, ["ceiling"]),
        (assembled(255, spilled=4), True, ["spill", "ceiling"]),  # register-bound
        (assembled(168, spilled=triton_check.SPILL_TOLERANCE + 4), True, ["spill"]),
        ((255, "ptxas fatal: Unsupported .version", None), True, []),
    ],
)
def test_verdict(result, failed, flags):
    problems, line = triton_check._verdict("a kernel", [], result)
    assert bool(problems) == failed, problems
    assert "a kernel" in line
    for flag in ("spill", "ceiling"):
        assert (flag in line) == (flag in flags), line


def test_unrounded_products_fail_a_kernel_without_spills():
    problems, _ = triton_check._verdict("a kernel", ["fma.rn.f32 %r1, %r2, %r3, %r4;"], assembled(100))
    assert len(problems) == 1 and "unrounded" in problems[0]
