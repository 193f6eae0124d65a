"""Shared test set-up.

Without a CUDA device, Triton runs through its interpreter on CPU tensors; that mode is read
when kernels are decorated, so it is set here before any test module imports incseg_fast.triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from parity_support import PARITY_BACKENDS  # noqa: E402

from incseg_fast import _backends  # noqa: E402  (after the interpreter flag)


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(20261121)


def _available(name):
    reason = _backends.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name!r} is not available here: {reason}")
    return name


@pytest.fixture(params=PARITY_BACKENDS)
def backend(request):
    """Each fused backend (and the CUDA kernels' CPU emulation) in turn; those that cannot run here are skipped."""
    return _available(request.param)


@pytest.fixture(params=("reference", *PARITY_BACKENDS))
def every_backend(request):
    """The reference too, for faults that were the reference's as well as the kernels'."""
    return _available(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Small convolutions run fastest on one thread, and it is robust on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
