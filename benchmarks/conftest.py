"""pytest-benchmark suite options and parametrisation: every case of ``incseg_fast.bench.cases`` times
every provider, forward and forward+backward; every setting of ``incseg_fast.bench.train_step`` times
every provider's whole training step.

    .venv/bin/python -m pytest -q benchmarks --benchmark-only [--bench-quick] [--bench-dtype bf16]
"""

import torch

from incseg_fast.bench import cases as bench_cases
from incseg_fast.bench import train_step as bench_train_step


def pytest_addoption(parser):
    group = parser.getgroup("incseg_fast benchmarks")
    group.addoption(
        "--bench-quick", action="store_true", help="the small smoke-test sizes and few rounds instead of the real sizes"
    )
    group.addoption(
        "--bench-dtype",
        choices=("fp32", "bf16"),
        help="dtype of the floating inputs, for every case (default fp32, and voc512 in fp32 and bf16)",
    )


def pytest_generate_tests(metafunc):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "step_case" in metafunc.fixturenames:
        steps = bench_train_step.select_cases(
            dtype_name=metafunc.config.getoption("--bench-dtype"),
            device=device,
            quick=metafunc.config.getoption("--bench-quick"),
        )
        pairs = [(case, provider) for case in steps for provider in bench_train_step.PROVIDERS]
        metafunc.parametrize(
            "step_case, step_provider", pairs, ids=[f"{case.name}-{provider}" for case, provider in pairs]
        )
    if "case" not in metafunc.fixturenames:
        return
    selected = bench_cases.select_cases(
        dtype_name=metafunc.config.getoption("--bench-dtype"),
        device=device,
        quick=metafunc.config.getoption("--bench-quick"),
    )
    pairs = [(case, provider) for case in selected for provider in bench_cases.provider_names(case.op, device)]
    metafunc.parametrize("case, provider", pairs, ids=[f"{case.name}-{provider}" for case, provider in pairs])
