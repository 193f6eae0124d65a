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


# ---------------------------------------------------------------------------------------------
# Balanced distillation of a teacher far from its background (second reliability issue): γ of the
# pooled teacher ~e^margin meets q_0 ~e^-margin, and only their product (~1) is formed, in log space.
# ---------------------------------------------------------------------------------------------


def _far_teacher(margin, dtype):
    """The issue's case: x = randn(1, 4, 4, 4) (seed 7); class 1 of y leads the background by `margin`."""
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7)).to(dtype)
    y = torch.zeros(1, 3, 4, 4, dtype=dtype)
    y[:, 1] = margin
    return x, y


@pytest.mark.parametrize("margin", [88.0, 95.0])
def test_balanced_distillation_of_a_teacher_far_from_its_background(every_backend, margin):
    """float32, alpha = 1: q_0 ~ 6e-39 is subnormal at 88 and γ·q_0 (~1) vanished on cpu and
    cuda_emulator (1.2976 instead of 0.9800); above ~88.7 γ overflowed float32 and the loss was inf
    (NaN on the reference's own float32 path) where the float64 truth is 5.53 at 95."""
    backend = every_backend
    device = device_for(backend)
    x, y = _far_teacher(margin, torch.float32)
    xb = x.to(device, copy=True).requires_grad_()
    loss = isf.balanced_knowledge_distillation(xb, y.to(device), backend=backend)
    loss.backward()
    xr = x.double().requires_grad_()
    expected = reference.balanced_knowledge_distillation(xr, y.double())
    expected.backward()
    assert _relative_error(loss, expected) <= RTOL[torch.float32], f"loss {loss.item()} != {expected.item()}"
    assert _relative_error(xb.grad, xr.grad) <= RTOL[torch.float32]


def test_balanced_distillation_beyond_float64s_gamma(every_backend):
    """float64 with a margin of 800: γ = e^800 + 1 overflows float64 itself. γ q_0 = (e^800 + 1) /
    (e^800 + 2) is 1 and q_1 is 1 to double precision, so the loss is the limit
    -(1/Co) mean[(lse_bg - lse) + (x_1 - lse)]."""
    backend = every_backend
    device = device_for(backend)
    x, y = _far_teacher(800.0, torch.float64)
    xb = x.to(device, copy=True).requires_grad_()
    loss = isf.balanced_knowledge_distillation(xb, y.to(device), backend=backend)
    xr = x.clone().requires_grad_()
    lse = xr.logsumexp(1)
    lse_bg = torch.cat([xr[:, :1], xr[:, 3:]], 1).logsumexp(1)
    limit = -((lse_bg - lse) + (xr[:, 1] - lse)).mean() / 3
    (grad,) = torch.autograd.grad(limit, xr)
    loss.backward()
    assert _relative_error(loss, limit) <= RTOL[torch.float64], f"loss {loss.item()} != {limit.item()}"
    assert _relative_error(xb.grad, grad) <= RTOL[torch.float64]


# ---------------------------------------------------------------------------------------------
# size= with -inf logits and non-finite logits (second reliability issue, MATH.md#upsampling): a weight
# of exactly 0 contributes nothing, so a masked class stays -inf instead of 0 * (-inf) = NaN.
# ---------------------------------------------------------------------------------------------

LOGIT_LOSSES = (
    "unbiased_cross_entropy",
    "knowledge_distillation",
    "unbiased_knowledge_distillation",
    "balanced_knowledge_distillation",
    "incremental_loss",
)


def _call(name, x, t, y, **kwargs):
    if name == "unbiased_cross_entropy":
        return isf.unbiased_cross_entropy(x, t, 3, **kwargs)
    if name == "incremental_loss":
        ce, kd = isf.incremental_loss(x, t, y, old_classes=3, kd="balanced", **kwargs)
        return ce + kd
    return getattr(isf, name)(x, y, reduction="sum", **kwargs)


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("size", [(3, 4), (7, 9)], ids=["own-resolution", "upsampled"])
def test_a_masked_class_under_size_is_masked(every_backend, generator, name, size):
    """Channel 4 (a new class) is -inf everywhere: F.interpolate's 0 * (-inf) made UNCE, UNKD and BKD
    NaN on every backend, even at x's own resolution, and plain KD on cpu and cuda_emulator. A class of
    probability 0 changes nothing: the loss and gradient are those of x without it (plain
    interpolation of finite logits), and the masked channel's gradient is 0."""
    backend = every_backend
    device = device_for(backend)
    x = torch.randn(2, 5, 3, 4, generator=generator)
    x[:, 4] = -INF
    y = torch.randn(2, 3, 3, 4, generator=generator)
    t = torch.randint(0, 4, (2, *size), generator=generator)
    xb = x.to(device, copy=True).requires_grad_()
    loss = _call(name, xb, t.to(device), y.to(device), size=size, backend=backend)
    loss.backward()
    unmasked = x[:, :4].double().requires_grad_()
    expected = _call(name, unmasked, t, y.double(), size=size, backend="reference")
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(xb.grad).all(), f"loss {loss.item()}"
    assert _relative_error(loss, expected) <= RTOL[torch.float32]
    assert _relative_error(xb.grad[:, :4], unmasked.grad) <= RTOL[torch.float32]
    # 0, up to the CPU kernels' exp(-inf) of ~1e-38 (logit_math.h lm_exp), as without size=
    assert xb.grad[:, 4].abs().max() <= 1e-37


def _reads(n, N):
    """(N, n) bool: which input samples each output index reads with a nonzero weight, from F.interpolate."""
    basis = torch.eye(n, dtype=torch.float64).view(n, 1, n, 1)
    return torch.nn.functional.interpolate(basis, size=(N, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T != 0


@pytest.mark.parametrize("size", [(3, 4), (7, 9)], ids=["own-resolution", "upsampled"])
@pytest.mark.parametrize("where", [(0, 0), (1, 2), (2, 3)], ids=str)
def test_nan_logit_under_size_reaches_exactly_what_its_pixels_read(every_backend, generator, size, where):
    """One NaN logit of x (3 x 4, at its own resolution or upsampled to 7 x 9): the output pixels that read
    it with a nonzero weight have NaN statistics, so dL/dx is NaN exactly at the samples those pixels read
    with a nonzero weight, in every channel, and finite elsewhere, on every backend. 0 * NaN through
    weight-0 taps spread it further, differently per backend (cuda_emulator's gather skipped them)."""
    backend = every_backend
    device = device_for(backend)
    x = torch.randn(1, 5, 3, 4, generator=generator)
    x[0, 2, where[0], where[1]] = NAN
    t = torch.randint(0, 5, (1, *size), generator=generator)
    xb = x.to(device, copy=True).requires_grad_()
    isf.unbiased_cross_entropy(xb, t.to(device), 3, reduction="sum", size=size, backend=backend).backward()
    rows, cols = _reads(3, size[0]), _reads(4, size[1])
    read_rows = rows[rows[:, where[0]]].any(0)
    read_cols = cols[cols[:, where[1]]].any(0)
    expected = (read_rows[:, None] & read_cols[None, :]).expand(5, 3, 4)
    assert torch.equal(~torch.isfinite(xb.grad[0].cpu()), expected)
