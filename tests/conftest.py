"""Shared test set-up.

Without a CUDA device, Triton runs through its interpreter on CPU tensors; that mode is read
when kernels are decorated, so it is set here before any test module imports incseg_fast.triton.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(20261121)
