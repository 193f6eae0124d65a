"""The whole training step of each loss provider (pytest-benchmark): incseg_fast.bench.train_step's
DeepLabV3-ResNet-101 step of MiB's step 1 (``--bench-quick``: the tiny backbone at 64 x 64).

Each benchmark group is one setting, so pytest-benchmark's table compares the providers. Before
timing, the provider's first step must agree with the mib provider's (loss and gradient norm), or
the benchmark fails. ``python -m incseg_fast.bench --ops train_step`` gives the memory figures too.
"""

import functools

import torch

from incseg_fast.bench import train_step as bench_train_step


@functools.cache
def _mib_first_step(case):
    step = bench_train_step.Step(case, bench_train_step.loss_stages()[bench_train_step.REFERENCE_PROVIDER])
    loss, _, _, grad_norm = step.run()
    return {"first_step": {"loss": loss, "grad_norm": grad_norm}}


def _synchronized_step(step, device):
    step.run()
    if device == "cuda":
        torch.cuda.synchronize()


def test_bench_train_step(benchmark, request, step_case, step_provider):
    step = bench_train_step.Step(step_case, bench_train_step.loss_stages()[step_provider])
    loss, _, _, grad_norm = step.run()
    results = {"mib": _mib_first_step(step_case), step_provider: {"first_step": {"loss": loss, "grad_norm": grad_norm}}}
    bench_train_step.check_agreement(step_case, results)  # raises AgreementError
    benchmark.group = step_case.name
    benchmark.extra_info["agreement"] = results[step_provider]["agreement"]
    quick = request.config.getoption("--bench-quick")
    benchmark.pedantic(_synchronized_step, args=(step, step_case.device), rounds=1 if quick else 3, warmup_rounds=1)
