"""The numerical faults found by the property tests (tests/test_properties.py) and by the reliability
issue, each kept as the failing case that showed it (docs/RELIABILITY.md#numerics).

Three of them were faults of the CPU kernels (csrc/cpu), fixed since: FMA contraction of alpha * y in
the AVX copies (now -ffp-contract=off), a float32 loss built from a double above FLT_MAX, and a
folded backward coefficient that overflowed with a huge gamma (now the direct form).
"""

import pytest
import torch
from parity_support import RTOL, device_for

import incseg_fast as isf
from incseg_fast import reference

NAN, INF = float("nan"), float("inf")


def _relative_error(actual, expected):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Issue fault (a): the distillation gradient of a one-hot teacher at large |alpha * y|.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["knowledge_distillation", "unbiased_knowledge_distillation"])
def test_one_hot_teacher_at_large_scaled_logits_is_exact(backend, generator, name):
    """Teacher logits of magnitude ~1e3 scaled by alpha = 3.3 (not a power of two): q is one-hot in
    float32 and exactly representable, so the gradient must be exact to RTOL, as it is in float64."""
    device = device_for(backend)
    x = (2 * torch.randn(2, 6, 5, 7, generator=generator)).to(device).requires_grad_()
    y = (1e3 * torch.randn(2, 4, 5, 7, generator=generator)).to(device)
    loss = getattr(isf, name)(x, y, alpha=3.3, reduction="sum", backend=backend)
    loss.backward()
    xr = x.detach().cpu().double().requires_grad_()
    getattr(reference, name)(xr, y.cpu().double(), alpha=3.3, reduction="sum").backward()
    assert _relative_error(x.grad, xr.grad) <= RTOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# NaN and +inf logits that decide the result reach the loss and the gradient (issue fault (a): a
# +inf teacher logit gave a finite loss on cpu; the properties found NaN and +inf student logits
# dropped on every backend).
# ---------------------------------------------------------------------------------------------

# (tensor, channel) of the poisoned logit; x has C = 5 channels and Co = 3, so channel 4 is new.
POISONED_PLACES = [("x", 0), ("x", 1), ("x", 4), ("y", 0), ("y", 2)]


@pytest.mark.parametrize("tensor,channel", POISONED_PLACES, ids=lambda v: str(v))
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("kd", ["plain", "unbiased", "balanced"])
def test_nan_or_inf_logit_reaches_both_losses(backend, generator, tensor, channel, value, kd):
    device = device_for(backend)
    x = torch.randn(1, 5, 2, 3, generator=generator)
    y = torch.randn(1, 3, 2, 3, generator=generator)
    t = torch.tensor([[[0, 1, 4], [2, 3, 0]]])
    (x if tensor == "x" else y)[0, channel, 0, 0] = value
    xb = x.to(device, copy=True).requires_grad_()
    ce, kd_loss = isf.incremental_loss(xb, t.to(device), y.to(device), old_classes=3, kd=kd, backend=backend)
    (ce + kd_loss).backward()
    if tensor == "x":  # pixel (0, 0) has label 0: its CE term depends on every logit
        assert not torch.isfinite(ce), f"CE {ce.item()} is finite"
    if tensor == "y" or channel < 3 or kd != "plain":  # plain KD reads channels [0, Co) only
        assert not torch.isfinite(kd_loss), f"KD {kd_loss.item()} is finite"
    assert not torch.isfinite(xb.grad[0, :, 0, 0]).all(), "the poisoned pixel's gradient is finite"
    if not (tensor == "y" and kd == "balanced"):  # gamma, pooled over the image's teacher logits, is NaN too
        assert torch.isfinite(xb.grad[0, :, 1]).all(), "a NaN leaked into another pixel's gradient"


def test_balanced_distillation_with_a_huge_gamma_stays_finite(backend, generator):
    """gamma = 1e35 (the API accepts any finite gamma >= 0; a computed one reaches ~1e38) with little
    mass in the new classes: the gradients are ~1e34, finite and exact (found by the properties on cpu)."""
    device = device_for(backend)
    x = 3 * torch.randn(1, 6, 3, 3, generator=generator)
    x[:, 3:] -= 8
    y = 2 * torch.randn(1, 3, 3, 3, generator=generator)
    gamma = torch.tensor([1e35])
    xb = x.to(device, copy=True).requires_grad_()
    isf.balanced_knowledge_distillation(
        xb, y.to(device), gamma=gamma.to(device), reduction="sum", backend=backend
    ).backward()
    xr = x.double().requires_grad_()
    reference.balanced_knowledge_distillation(xr, y.double(), gamma=gamma.double(), reduction="sum").backward()
    assert torch.isfinite(xb.grad).all()
    assert _relative_error(xb.grad, xr.grad) <= RTOL[torch.float32]


@pytest.mark.parametrize("others", ["finite", "minus_inf"])
def test_nan_among_new_channels_reaches_the_loss(backend, others):
    """C = 3, Co = 1: the new channels are a NaN and a finite or -inf logit. A running maximum that
    skipped the NaN stayed -inf, and the new set passed for empty (found on cuda_emulator)."""
    device = device_for(backend)
    x = torch.tensor([0.3, NAN, 0.5 if others == "finite" else -INF]).view(1, 3, 1, 1).to(device)
    t = torch.zeros(1, 1, 1, dtype=torch.int64, device=device)
    for reduction in ("none", "sum"):
        loss = isf.unbiased_cross_entropy(x, t, 1, reduction=reduction, backend=backend)
        assert torch.isnan(loss).all(), f"{reduction}: {loss}"


def test_masked_new_classes_stay_exact(backend, generator):
    """Every new channel -inf at some pixels (the empty new set that a NaN must not look like)."""
    device = device_for(backend)
    x = torch.randn(2, 5, 3, 3, generator=generator)
    x[:, 3:, 1] = -INF
    x[1, 4] = -INF
    y = torch.randn(2, 3, 3, 3, generator=generator)
    t = torch.randint(0, 3, (2, 3, 3), generator=generator)
    xb = x.to(device, copy=True).requires_grad_()
    ce, kd = isf.incremental_loss(xb, t.to(device), y.to(device), old_classes=3, kd="unbiased", backend=backend)
    (ce + 0.7 * kd).backward()
    xr = x.double().requires_grad_()
    ce_r, kd_r = reference.incremental_loss(xr, t, y.double(), old_classes=3, kd="unbiased")
    (ce_r + 0.7 * kd_r).backward()
    for actual, expected in ((ce, ce_r), (kd, kd_r), (xb.grad, xr.grad)):
        assert torch.isfinite(actual).all() and _relative_error(actual, expected) <= RTOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# Issue fault (b): attentive distillation at small and large feature magnitudes.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e-17, 1e-12, 1e-10, 1e12, 1e17])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 2, 2, 1), (2, 5, 4, 3)], ids=str)
def test_attentive_distillation_small_and_large_features(backend, generator, magnitude, shape):
    """Triton summed S^2 in float32: N underflowed for features below ~1e-10 (Ŝ = 0, gradients off by
    up to 100%) and overflowed above ~1e9 (NaN). Inside the float32 bounds every backend is exact."""
    device = device_for(backend)
    inputs = [
        magnitude * torch.randn(shape, generator=generator),
        magnitude * torch.randn(shape, generator=generator),
        torch.rand(shape[:2], generator=generator),
        torch.rand(shape[:2], generator=generator),
    ]
    leaves = [t.to(device, copy=True).requires_grad_() for t in inputs]
    loss = isf.attentive_distillation(*leaves, reduction="sum", backend=backend)
    loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    ref_loss = reference.attentive_distillation(*ref_leaves, reduction="sum")
    ref_loss.backward()
    assert _relative_error(loss, ref_loss) <= RTOL[torch.float32]
    for name, leaf, ref_leaf in zip("fgab", leaves, ref_leaves, strict=True):
        assert _relative_error(leaf.grad, ref_leaf.grad) <= RTOL[torch.float32], f"d{name}"


def test_attentive_distillation_features_of_very_different_magnitudes(backend):
    """f ~ 1e-12 against g ~ 1 (found by the properties on triton): Triton's ΔŜ = ΔS/N_f - S_g ΔN/(N_f N_g)
    subtracted two terms of ~1/N_f, a loss error of 3.6e-5; it now takes Ŝ_f - Ŝ_g unless the norms are close."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)  # the falsifying example's draws, in its order
    f = 1e-12 * torch.randn(1, 1, 1, 3, generator=gen, dtype=torch.float64)
    a, b = (torch.sigmoid(torch.randn(1, 1, generator=gen, dtype=torch.float64)) for _ in range(2))
    g = torch.randn(1, 1, 1, 3, generator=gen, dtype=torch.float64)
    inputs = [t.float() for t in (f, g, a, b)]
    leaves = [t.to(device, copy=True).requires_grad_() for t in inputs]
    loss = isf.attentive_distillation(*leaves, backend=backend)
    loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    ref_loss = reference.attentive_distillation(*ref_leaves)
    ref_loss.backward()
    assert _relative_error(loss, ref_loss) <= RTOL[torch.float32]
    for name, leaf, ref_leaf in zip("fgab", leaves, ref_leaves, strict=True):
        assert _relative_error(leaf.grad, ref_leaf.grad) <= RTOL[torch.float32], f"d{name}"


def test_attentive_distillation_overflowing_loss_is_not_an_exception(backend, generator):
    """Features of 1e20: sum D^2 ~ 1e41 does not fit in float32; the loss is +inf or NaN, never an error."""
    device = device_for(backend)
    f, g = (1e20 * torch.randn(2, 3, 4, 5, generator=generator)).to(device), torch.zeros(2, 3, 4, 5, device=device)
    a = torch.rand(2, 3, generator=generator).to(device)
    loss = isf.attentive_distillation(f, g, a, a, reduction="sum", backend=backend)
    assert not torch.isfinite(loss)


def test_reference_nan_feature_reaches_every_spatial_map():
    """The reference took a NaN norm for the all-zero map's (`> 0` is false for NaN): Ŝ was 0 and the
    other pixels' gradients finite, while every backend gave NaN."""
    f = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    f[0, 1, 2, 0] = NAN
    assert torch.isnan(reference.spatial_attention(f)).all()
