"""Forward and forward+backward time of every case and provider (pytest-benchmark).

Each benchmark group is one case and phase, so pytest-benchmark's table compares the providers.
The max relative error against the float64 reference goes into ``extra_info`` (correctness is
asserted by ``tests/``, not here). ``python -m incseg_fast.bench`` gives the fuller picture:
interleaved timing, memory and bandwidth.
"""

import pytest
import torch

from incseg_fast.bench import cases as bench_cases
from incseg_fast.bench import measure


def _synchronized(target, device):
    """On CUDA a call only queues kernels: wait for them so the round's time covers them."""
    if device != "cuda":
        return target

    def call(*args):
        outputs = target(*args)
        torch.cuda.synchronize()
        return outputs

    return call


@pytest.mark.parametrize("phase", ["fwd", "fwd_bwd"])
def test_bench(benchmark, request, case, provider, phase):
    ((_, fn),) = bench_cases.providers(case.op, case.device, [provider])
    inputs = case.make_inputs()
    reference_values = measure.outputs_and_grads(case.op.reference, inputs.converted(torch.float64))
    benchmark.group = f"{case.name}-{phase}"
    benchmark.extra_info["max_rel_err"] = measure.max_relative_error(
        measure.outputs_and_grads(fn, inputs), reference_values
    )
    quick = request.config.getoption("--bench-quick")
    target = bench_cases.run_forward if phase == "fwd" else bench_cases.run_forward_backward
    # Warm-up rounds absorb torch.compile's compilation.
    benchmark.pedantic(
        _synchronized(target, case.device),
        args=(fn, inputs),
        setup=inputs.clear_grads,
        rounds=3 if quick else 10,
        warmup_rounds=2,
    )
