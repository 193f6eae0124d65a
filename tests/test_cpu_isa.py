"""The CPU kernels' instruction-set copies (csrc/cpu/toolkit.h): the run-time cap that selects one, and
a check of the built extension's machine code that every vectorised copy really is vectorised."""

import importlib.util
import os

import pytest
import torch

from incseg_fast import cpu_isa, incremental_loss, ops, reference
from incseg_fast.vocabulary import CPU_ISAS

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="incseg_fast._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _isa_check():
    spec = importlib.util.spec_from_file_location("isa_check", os.path.join(ROOT, "tools", "isa_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supported_copies_start_with_baseline_and_include_the_active_one():
    supported = cpu_isa.supported_cpu_isas()
    assert supported[0] == "baseline"
    assert cpu_isa.active_cpu_isa() in supported


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cap_selects_the_widest_supported_copy_below_it_and_is_restored(isa):
    before = cpu_isa.active_cpu_isa()
    supported = cpu_isa.supported_cpu_isas()
    with cpu_isa.cpu_isa_cap(isa):
        assert cpu_isa.active_cpu_isa() == min(isa, supported[-1], key=CPU_ISAS.index)
    assert cpu_isa.active_cpu_isa() == before


def test_cap_restores_the_copy_when_the_block_raises():
    before = cpu_isa.active_cpu_isa()
    with pytest.raises(RuntimeError, match="inside"), cpu_isa.cpu_isa_cap("baseline"):
        raise RuntimeError("inside")
    assert cpu_isa.active_cpu_isa() == before


def test_unknown_cap_names_the_argument():
    with pytest.raises(ValueError, match="isa must be one of baseline, avx2, avx512, got 'sse9'"):
        with cpu_isa.cpu_isa_cap("sse9"):
            pass


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_each_copy_matches_the_reference_in_one_process(generator, isa):
    """The cap reaches forward and backward alike (the benchmark's "cpu:<isa>" providers rely on it)."""
    x = torch.randn(2, 9, 13, 37, generator=generator).requires_grad_()
    y = torch.randn(2, 6, 13, 37, generator=generator)
    t = torch.randint(0, 9, (2, 13, 37), generator=generator)
    t[:, :2] = 255
    upstream = (torch.tensor(0.7), torch.tensor(2.5))
    x64 = x.detach().double().requires_grad_()
    want = reference.incremental_loss(x64, t, y.double(), old_classes=6, alpha=1.5)
    torch.autograd.backward(want, [u.double() for u in upstream])
    with cpu_isa.cpu_isa_cap(isa):
        got = incremental_loss(x, t, y, old_classes=6, alpha=1.5, backend="cpu")
        torch.autograd.backward(got, list(upstream))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5 * x64.grad.abs().max().item())


def test_every_vectorised_copy_in_the_built_extension_is_packed():
    """tools/isa_check.py on the extension this suite runs: no AVX2 copy left scalar by the vectoriser."""
    isa_check = _isa_check()
    copies = isa_check.kernel_copies(isa_check.built_extension())
    assert len(copies) > 50, sorted(copies)  # the parse found the kernels
    assert isa_check.failures(copies) == []
