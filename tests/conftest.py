"""Shared test set-up.

Without a CUDA device, Triton runs through its interpreter on CPU tensors; that mode is read
when kernels are decorated, so it is set here before any test module imports incseg_fast.triton.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import incseg_fast as isf  # noqa: E402  (after the interpreter flag)
from parity_support import FUSED_BACKENDS  # noqa: E402


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(20261121)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    """Each fused backend in turn; those that cannot run here are skipped."""
    if request.param not in isf.available_backends():
        pytest.skip(f"backend {request.param!r} is not available here")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Small convolutions run fastest on one thread, and it is robust on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
