"""The reference path against docs/MATH.md, checked three independent ways:

1. small cases computed by hand (numbers in the test);
2. MiB-style eager chains, written the way MiB's utils/loss.py computes them;
3. the analytic per-pixel gradients written in MATH.md, against autograd; plus gradcheck in float64.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from incseg_fast import reference as ref
from incseg_fast.bench.mib import (
    mib_knowledge_distillation,
    mib_unbiased_cross_entropy,
    mib_unbiased_knowledge_distillation,
)
from incseg_fast.vocabulary import REDUCTIONS

LN = math.log


def _pixel(values):
    """A (1, C, 1, 1) tensor holding one pixel's logits."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def _random_case(generator, B=2, C=7, Co=4, H=5, W=3, ignore_fraction=0.2, dtype=torch.float64):
    x = torch.randn(B, C, H, W, generator=generator, dtype=dtype) * 3
    y = torch.randn(B, Co, H, W, generator=generator, dtype=dtype) * 3
    t = torch.randint(0, C, (B, H, W), generator=generator)
    ignore = torch.rand(B, H, W, generator=generator) < ignore_fraction
    t[ignore] = 255
    mask = torch.rand(B, H, W, generator=generator, dtype=dtype)
    return x, t, y, mask


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed cases: exp(x) = (1, 2, 3), so lse = ln 6, lse_old(Co=2) = ln 3, lse_bg = ln 4.
# ---------------------------------------------------------------------------------------------
X123 = [0.0, LN(2), LN(3)]
Y13 = [0.0, LN(3)]  # teacher probabilities q = (1/4, 3/4)


@pytest.mark.parametrize("label, expected", [(0, LN(6) - LN(3)), (1, LN(6) - LN(3)), (2, LN(6) - LN(3))])
def test_unbiased_ce_by_hand(label, expected):
    t = torch.tensor([[[label]]])
    loss = ref.unbiased_cross_entropy(_pixel(X123), t, 2)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_plain_ce_and_ignored_pixel_by_hand():
    x = torch.cat([_pixel(X123), _pixel(X123)], dim=3)  # two pixels
    t = torch.tensor([[[1, 255]]])
    ce, _ = ref.logit_losses(
        x, t, None, None, None, old_classes=2, ce="plain", kd="none", alpha=1.0, ignore_index=255, reduction="none"
    )
    assert ce[0, 0].tolist() == pytest.approx([LN(6) - LN(2), 0.0], rel=1e-12)
    mean, _ = ref.logit_losses(
        x, t, None, None, None, old_classes=2, ce="plain", kd="none", alpha=1.0, ignore_index=255, reduction="mean"
    )
    assert mean.item() == pytest.approx(LN(6) - LN(2), rel=1e-12)  # divides by the 1 valid pixel


def test_kd_by_hand():
    loss = ref.knowledge_distillation(_pixel(X123), _pixel(Y13))
    s = [1 / 3, 2 / 3]  # softmax of the first two logits: exp = (1, 2)
    expected = -(0.25 * LN(s[0]) + 0.75 * LN(s[1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_unbiased_kd_by_hand():
    loss = ref.unbiased_knowledge_distillation(_pixel(X123), _pixel(Y13))
    expected = -(0.25 * (LN(4) - LN(6)) + 0.75 * (LN(2) - LN(6))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_balanced_kd_by_hand():
    # The teacher's pooled logits are (0, ln 3): g = (1/4, 3/4), gamma = 3.
    assert ref.balanced_log_gamma(_pixel(Y13)).exp().item() == pytest.approx(3.0, rel=1e-12)
    loss = ref.balanced_knowledge_distillation(_pixel(X123), _pixel(Y13))
    expected = -(3 * 0.25 * (LN(4) - LN(6)) + 0.75 * (LN(2) - LN(6))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_alpha_scales_teacher_logits_by_hand():
    loss = ref.knowledge_distillation(_pixel(X123), _pixel([0.0, LN(3) / 2]), alpha=2.0)
    expected = -(0.25 * LN(1 / 3) + 0.75 * LN(2 / 3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_attentive_distillation_by_hand():
    f = torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 2)
    g = torch.tensor([1.0, -2.0], dtype=torch.float64).view(1, 1, 1, 2)
    a = torch.tensor([[0.5]], dtype=torch.float64)
    b = torch.tensor([[0.25]], dtype=torch.float64)
    nf, ng = math.sqrt(9**2 + 16**2), math.sqrt(1**2 + 4**2)
    ad_f = [(0.5 * 9 / nf + 1) * 3, (0.5 * 16 / nf + 1) * 4]
    ad_g = [(0.25 * 1 / ng + 1) * 1, (0.25 * 4 / ng + 1) * -2]
    squares = [(p - q) ** 2 for p, q in zip(ad_f, ad_g, strict=True)]
    assert ref.attentive_distillation(f, g, a, b).item() == pytest.approx(sum(squares) / 2, rel=1e-12)
    assert ref.attentive_distillation(f, g, a, b, reduction="sum").item() == pytest.approx(sum(squares), rel=1e-12)


def test_spatial_attention_zero_map_is_zero_with_finite_grad():
    f = torch.zeros(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s_hat = ref.spatial_attention(f)
    assert torch.equal(s_hat, torch.zeros_like(s_hat))
    s_hat.sum().backward()
    assert torch.isfinite(f.grad).all()


def test_structured_attention_by_hand():
    v = torch.tensor([[[[2.0, -1.0]], [[0.5, 4.0]]]])  # (1, 2, 1, 2)
    a_ch = torch.tensor([[0.5, -2.0]])
    a_sp = torch.tensor([[[1.0, 3.0]]])
    out = ref.structured_attention(v, a_ch, a_sp)
    expected = [[[(1 + 0.5 * 1) * 2.0, (1 + 0.5 * 3) * -1.0]], [[(1 - 2.0 * 1) * 0.5, (1 - 2.0 * 3) * 4.0]]]
    torch.testing.assert_close(out[0], torch.tensor(expected), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. MiB-style eager chains (the computation MiB's utils/loss.py performs; incseg_fast/bench/mib.py).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("old_classes", [1, 3, 6])
def test_unbiased_ce_matches_mib(generator, reduction, old_classes):
    x, t, _, _ = _random_case(generator, C=6)
    ours = ref.unbiased_cross_entropy(x, t, old_classes, reduction=reduction)
    torch.testing.assert_close(ours, mib_unbiased_cross_entropy(x, t, old_classes, reduction=reduction))


def test_unbiased_ce_with_one_old_class_is_cross_entropy(generator):
    x, t, _, _ = _random_case(generator)
    torch.testing.assert_close(ref.unbiased_cross_entropy(x, t, 1), F.cross_entropy(x, t, ignore_index=255))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_distillation_matches_mib(generator, reduction, alpha, use_mask):
    x, _, y, mask = _random_case(generator)
    mask = mask if use_mask else None
    torch.testing.assert_close(
        ref.knowledge_distillation(x, y, alpha=alpha, mask=mask, reduction=reduction),
        mib_knowledge_distillation(x, y, mask=mask, reduction=reduction, alpha=alpha),
    )
    torch.testing.assert_close(
        ref.unbiased_knowledge_distillation(x, y, alpha=alpha, mask=mask, reduction=reduction),
        mib_unbiased_knowledge_distillation(x, y, mask=mask, reduction=reduction, alpha=alpha),
    )


def test_balanced_kd_with_gamma_one_is_unbiased_kd(generator):
    x, _, y, mask = _random_case(generator)
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        ref.balanced_knowledge_distillation(x, y, mask=mask, gamma=ones),
        ref.unbiased_knowledge_distillation(x, y, mask=mask),
    )


def test_unbiased_kd_with_all_classes_old_is_full_softmax_kd(generator):
    """C == Co: bgset = {0}, so UNKD is KD over all channels (MiB's indexing breaks here)."""
    x, _, _, _ = _random_case(generator, C=5)
    y = torch.randn(2, 5, 5, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(ref.unbiased_knowledge_distillation(x, y), ref.knowledge_distillation(x, y))


def test_incremental_loss_equals_separate_losses(generator):
    x, t, y, mask = _random_case(generator)
    ce, kd = ref.incremental_loss(x, t, y, old_classes=4, kd="balanced", alpha=2.0, mask=mask)
    torch.testing.assert_close(ce, ref.unbiased_cross_entropy(x, t, 4))
    torch.testing.assert_close(kd, ref.balanced_knowledge_distillation(x, y, alpha=2.0, mask=mask))
    ce, kd = ref.incremental_loss(x, t, None, old_classes=4, ce="plain", kd="none")
    torch.testing.assert_close(ce, F.cross_entropy(x, t, ignore_index=255))
    assert kd.item() == 0.0


def test_all_ignored_batch_gives_zero_loss_and_grad(generator):
    x, t, _, _ = _random_case(generator)
    x.requires_grad_(True)
    t.fill_(255)
    loss = ref.unbiased_cross_entropy(x, t, 3)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# 3. MATH.md's analytic gradients and gradcheck.
# ---------------------------------------------------------------------------------------------


def _spec_gradient(x, t, y, mask, gamma, Co, ce, kd, alpha):
    """dl/dx per pixel from the formulas in MATH.md#unce to #bkd (the loss maps are independent per pixel)."""
    C = x.shape[1]
    p = torch.softmax(x, dim=1)
    grad = torch.zeros_like(x)
    if ce != "none":
        valid = (t != 255).unsqueeze(1).to(x.dtype)
        safe_t = torch.where(t == 255, torch.zeros_like(t), t)
        onehot = F.one_hot(safe_t, C).permute(0, 3, 1, 2).to(x.dtype)
        if ce == "unbiased":
            old = (safe_t < Co).unsqueeze(1).to(x.dtype)
            p_old = torch.zeros_like(x)
            p_old[:, :Co] = torch.softmax(x[:, :Co], dim=1)
            g_ce = p - old * p_old - (1 - old) * onehot
        else:
            g_ce = p - onehot
        grad += valid * g_ce
    if kd != "none":
        q = torch.softmax(alpha * y, dim=1)
        m = (mask if mask is not None else torch.ones_like(x[:, 0])).unsqueeze(1)
        g_kd = torch.zeros_like(x)
        if kd == "plain":
            g_kd[:, :Co] = torch.softmax(x[:, :Co], dim=1) - q
        else:
            # MATH.md#unkd with the background term weighted by gamma (2.4): differentiating
            # -(1/Co)[gamma q0 (lse_bg - lse) + sum_{1<=c<Co} q_c (x_c - lse)] gives
            # (1/Co)[(gamma q0 + 1 - q0) p_c - gamma q0 [c in bgset] p_bg_c - [1<=c<Co] q_c].
            weight = gamma.view(-1, 1, 1) if kd == "balanced" else torch.ones_like(q[:, 0])
            in_bg = torch.zeros_like(x)
            in_bg[:, 0] = 1
            in_bg[:, Co:] = 1
            bg_logits = x.masked_fill(in_bg == 0, float("-inf"))
            p_bg = torch.softmax(bg_logits, dim=1)
            bg_weight = (weight * q[:, 0]).unsqueeze(1)
            g_kd = (bg_weight + 1 - q[:, :1]) * p - bg_weight * p_bg
            g_kd[:, 1:Co] -= q[:, 1:]
        grad += m * g_kd / Co
    return grad


@pytest.mark.parametrize("ce", ["unbiased", "plain", "none"])
@pytest.mark.parametrize("kd", ["unbiased", "balanced", "plain", "none"])
@pytest.mark.parametrize("Co", [1, 4, 7])
def test_gradients_match_spec_formulas(generator, ce, kd, Co):
    if ce == "none" and kd == "none":
        pytest.skip("no loss term to differentiate")
    x, t, _, mask = _random_case(generator, C=7)
    y = torch.randn(2, Co, 5, 3, generator=generator, dtype=torch.float64)
    gamma = torch.rand(2, generator=generator, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    ce_map, kd_map = ref.logit_losses(
        x, t, y, gamma.log(), mask, old_classes=Co, ce=ce, kd=kd, alpha=1.5, ignore_index=255, reduction="none"
    )
    (ce_map.sum() + kd_map.sum()).backward()
    expected = _spec_gradient(x.detach(), t, y, mask, gamma, Co, ce, kd, 1.5)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ce, kd", [("unbiased", "unbiased"), ("plain", "balanced"), ("unbiased", "plain")])
def test_gradcheck_logit_losses(generator, reduction, ce, kd):
    x, t, y, mask = _random_case(generator, B=2, C=5, Co=3, H=3, W=2)
    gamma = torch.rand(2, generator=generator, dtype=torch.float64) + 0.5
    x.requires_grad_(True)

    def both(x):
        return ref.logit_losses(
            x, t, y, gamma, mask, old_classes=3, ce=ce, kd=kd, alpha=0.7, ignore_index=255, reduction=reduction
        )

    assert torch.autograd.gradcheck(both, (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_attentive_distillation(generator, reduction):
    f, g = (torch.randn(2, 3, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a, b = (torch.rand(2, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *args: ref.attentive_distillation(*args, reduction=reduction), (f, g, a, b))


def test_detached_spatial_gradient_treats_attention_as_constant(generator):
    """With detach_spatial, dL/df = 2 (AD(f) - AD(g)) (a Ŝ_f + 1) / n and dL/da = sum_hw 2 (AD(f)-AD(g)) Ŝ_f f / n."""
    f, g = (torch.randn(2, 3, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a, b = (torch.rand(2, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref.attentive_distillation(f, g, a, b, detach_spatial=True).backward()
    with torch.no_grad():
        s_f, s_g = (m.pow(2).sum(1) / m.pow(2).sum(1).pow(2).sum((1, 2)).sqrt().view(-1, 1, 1) for m in (f, g))
        scale_f = a[:, :, None, None] * s_f[:, None] + 1
        diff = scale_f * f - (b[:, :, None, None] * s_g[:, None] + 1) * g
        n = f.numel()
        torch.testing.assert_close(f.grad, 2 * diff * scale_f / n)
        torch.testing.assert_close(a.grad, (2 * diff * s_f[:, None] * f).sum((2, 3)) / n)


def test_detach_spatial_changes_only_the_gradient(generator):
    f, g = (torch.randn(2, 3, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a, b = (torch.rand(2, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    full = ref.attentive_distillation(f, g, a, b)
    detached = ref.attentive_distillation(f, g, a, b, detach_spatial=True)
    torch.testing.assert_close(full, detached)
    grad_full = torch.autograd.grad(full, f)[0]
    grad_detached = torch.autograd.grad(detached, f)[0]
    assert not torch.allclose(grad_full, grad_detached)


def test_gradcheck_structured_attention(generator):
    v = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    a_ch = torch.randn(2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    a_sp = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ref.structured_attention, (v, a_ch, a_sp))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_compute_in_float32(generator, dtype):
    x, t, y, _ = _random_case(generator)
    ce, kd = ref.incremental_loss(x.to(dtype), t, y.to(dtype), old_classes=4)
    assert ce.dtype == torch.float32 and kd.dtype == torch.float32
    ce64, kd64 = ref.incremental_loss(x.to(dtype).double(), t, y.to(dtype).double(), old_classes=4)
    torch.testing.assert_close(ce.double(), ce64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.double(), kd64, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Entropy pseudo-labels (PLOP; MATH.md#pseudo-labels)
# ---------------------------------------------------------------------------------------------


def test_pseudo_labels_by_hand():
    # Pixel 0: logits (ln 3, 0) -> p = (3/4, 1/4); pixel 1: a tie (1, 1) -> u = 1 and k̂ = 0;
    # pixel 2: (0, 2) -> k̂ = 1. Labels: background, background, new class 5 (kept).
    y = torch.tensor([[LN(3), 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64).view(1, 2, 1, 3)
    t = torch.tensor([[[0, 0, 5]]])
    u0 = -(0.75 * LN(0.75) + 0.25 * LN(0.25)) / LN(2)
    predicted, u = ref.predicted_class_and_entropy(y)
    assert predicted.tolist() == [[[0, 0, 1]]]
    assert u[0, 0, 0].item() == pytest.approx(u0, rel=1e-12)
    assert u[0, 0, 1].item() == pytest.approx(1.0, rel=1e-12)
    thresholds = torch.tensor([u0 + 0.01, 0.5], dtype=torch.float32)
    labels, factor = ref.entropy_pseudo_labels(y, t, thresholds)
    assert labels.tolist() == [[[0, 255, 5]]]  # pixel 1 is not confident: 1 >= θ[0]
    assert factor.tolist() == [pytest.approx(1 / (2 + 1e-6), rel=1e-7)]


def test_pseudo_labels_one_old_class_has_zero_entropy_and_ignore_is_never_background():
    y = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([[[0, 7], [0, 0]]])
    labels, factor = ref.entropy_pseudo_labels(y, t, torch.tensor([1e-3]), ignore_index=0)
    # ignore_index=0 < Co: label 0 is the ignore label, not background; nothing is relabelled.
    assert labels.tolist() == [[[0, 7], [0, 0]]] and factor.tolist() == [0.0]
    labels, factor = ref.entropy_pseudo_labels(y, t, torch.tensor([1e-3]))
    assert labels.tolist() == [[[0, 7], [0, 0]]] and factor.item() == pytest.approx(1.0, rel=1e-6)
    assert ref.predicted_class_and_entropy(y)[1].abs().max().item() == 0.0


def test_minus_infinity_logit_is_a_class_of_probability_zero():
    y = torch.tensor([0.0, 0.0, -math.inf], dtype=torch.float64).view(1, 3, 1, 1)
    u = ref.predicted_class_and_entropy(y)[1].item()
    assert u == pytest.approx(LN(2) / LN(3), rel=1e-12)


def _plop_entropy_selection(y, labels, plop_thresholds, current_classes):
    """PLOP's entropy pseudo-labelling as its train.py computes it (MATH.md#pseudo-labels), written here
    independently: probabilities, their maximum, the entropy as a channel *mean* scaled by 1/log(Co) and
    then by 1/log(N), the background mask labels < Co, the count ratio. Returns (labels, factor, value)."""
    old_classes = y.shape[1]
    probabilities = torch.softmax(y, dim=1)
    pseudo = probabilities.max(dim=1).indices
    mean_plogp = (probabilities * torch.log(probabilities + 1e-8)).mean(dim=1)
    value = -mean_plogp / math.log(old_classes + 1e-8) / math.log(current_classes)
    valid = value < plop_thresholds[pseudo]
    background = labels < old_classes
    relabelled = labels.clone()
    relabelled[background & ~valid] = 255
    relabelled[background & valid] = pseudo[background & valid]
    factor = (background & valid).float().sum(dim=(1, 2)) / (background.float().sum(dim=(1, 2)) + 1e-6)
    return relabelled, factor, value


@pytest.mark.parametrize("old_classes, current_classes", [(2, 3), (6, 8), (16, 17)])
def test_pseudo_labels_match_plop_with_rescaled_thresholds(generator, old_classes, current_classes):
    B, H, W = 3, 17, 23
    y = torch.randn(B, old_classes, H, W, generator=generator, dtype=torch.float64) * 2.5
    t = torch.randint(0, current_classes, (B, H, W), generator=generator)
    t[t < old_classes] = 0  # the step's labels: old classes are background
    t[torch.rand(B, H, W, generator=generator) < 0.1] = 255
    ours = 0.2 + 0.6 * torch.rand(old_classes, generator=generator)
    plop = ours.double() / (old_classes * math.log(current_classes))  # θ = θ_PLOP · Co · log N
    plop_labels, plop_factor, value = _plop_entropy_selection(y, t, plop, current_classes)
    labels, factor = ref.entropy_pseudo_labels(y, t, ours)

    predicted = ref.predicted_class_and_entropy(y)[0]
    # PLOP's 1e-8 inside the logs moves its value by ~1e-9 relative: pixels that close to their
    # threshold may go either way; there must be few of them.
    decided = (value - plop[predicted]).abs() > 1e-6 * plop[predicted]
    assert decided.float().mean() > 0.99
    assert torch.equal(labels[decided], plop_labels[decided])
    relabelled = (t == 0) & (labels != 255)
    assert 0 < relabelled.sum() < (t == 0).sum(), "thresholds must select some background pixels, not all"
    torch.testing.assert_close(factor, plop_factor, rtol=1e-6, atol=0)


def test_entropy_histogram_counts_background_pixels_by_class_and_bin(generator):
    y = torch.randn(2, 4, 9, 11, generator=generator, dtype=torch.float64) * 2
    t = torch.randint(0, 7, (2, 9, 11), generator=generator)
    t[0, 0, :5] = 255
    hist = ref.entropy_histogram(y, t, bins=10)
    predicted, u = ref.predicted_class_and_entropy(y)
    background = (t < 4) & (t != 255)
    assert hist.dtype == torch.int64 and hist.shape == (4, 10)
    assert hist.sum().item() == background.sum().item()
    for c in range(4):
        in_class = background & (predicted == c)
        expected = torch.histc(u[in_class], bins=10, min=0, max=1)  # upper edge 1 falls in the last bin
        assert hist[c].tolist() == expected.long().tolist()


def test_histogram_median_by_hand():
    # Class 0: counts (2, 2, 4, 0): half = 4 is reached at the end of bin 1 -> median 2/4.
    # Class 1: counts (0, 0, 3, 1): half = 2 inside bin 2, 2 of its 3 -> (2 + 2/3)/4.
    # Class 2: no pixel -> 0.
    hist = torch.tensor([[2, 2, 4, 0], [0, 0, 3, 1], [0, 0, 0, 0]])
    medians = ref.histogram_medians(hist)
    assert medians.dtype == torch.float32
    torch.testing.assert_close(medians, torch.tensor([0.5, (2 + 2 / 3) / 4, 0.0]))


def test_histogram_median_approaches_the_sample_median(generator):
    values = torch.rand(20001, generator=generator, dtype=torch.float64) ** 2
    bins = 1000
    hist = torch.bincount(ref.entropy_bins(values, bins), minlength=bins).view(1, bins)
    median = ref.histogram_medians(hist).item()
    assert abs(median - values.median().item()) < 1 / bins
