"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs.

Each case runs on every available backend (validation is shared, but a backend must not be
reachable around it).
"""

import re

import pytest
import torch

import incseg_fast as isf


def _inputs(B=2, C=6, Co=4, H=5, W=3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, C, H, W, generator=g)
    y = torch.randn(B, Co, H, W, generator=g)
    t = torch.randint(0, C, (B, H, W), generator=g)
    return x, t, y


CPU_BACKENDS = [b for b in isf.available_backends() if b in ("reference", "cpu")] + ["auto"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def test_logits_must_be_4d_float(backend):
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="x must be 4-D"):
        isf.unbiased_cross_entropy(x[0], t, 4, backend=backend)
    with pytest.raises(TypeError, match="x must be float16"):
        isf.unbiased_cross_entropy(x.long(), t, 4, backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        isf.knowledge_distillation(x.numpy(), y, backend=backend)


def test_labels_dtype_shape_and_range(backend):
    x, t, y = _inputs()
    with pytest.raises(TypeError, match="t must be an int64, int32 or uint8"):
        isf.unbiased_cross_entropy(x, t.float(), 4, backend=backend)
    with pytest.raises(ValueError, match=r"t must have shape \(B, H, W\)"):
        isf.unbiased_cross_entropy(x, t[:, :4], 4, backend=backend)
    bad = t.clone()
    bad[1, 2, 1] = 6  # == C, not ignore_index
    with pytest.raises(ValueError, match="t has label 6 outside"):
        isf.unbiased_cross_entropy(x, bad, 4, backend=backend)
    bad[1, 2, 1] = -1
    with pytest.raises(ValueError, match="t has label -1 outside"):
        isf.incremental_loss(x, bad, y, old_classes=4, backend=backend)
    bad[1, 2, 1] = 255
    isf.unbiased_cross_entropy(x, bad, 4, backend=backend)  # ignore_index is fine
    with pytest.raises(ValueError, match="label 255 outside"):
        isf.unbiased_cross_entropy(x, bad, 4, ignore_index=-100, backend=backend)
    with pytest.raises(ValueError, match="label 255 outside"):  # -1 does not wrap to uint8's 255
        isf.unbiased_cross_entropy(x, bad.to(torch.uint8), 4, ignore_index=-1, backend=backend)


def test_ignore_index_must_be_an_int64(backend):
    x, t, _ = _inputs()
    for too_far in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="ignore_index must be"):
            isf.unbiased_cross_entropy(x, t, 4, ignore_index=too_far, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        isf.unbiased_cross_entropy(x, t, 4, ignore_index=255.0, backend=backend)


def test_old_classes_bounds(backend):
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="old_classes must be <= 6"):
        isf.unbiased_cross_entropy(x, t, 7, backend=backend)
    with pytest.raises(ValueError, match="old_classes must be >= 1"):
        isf.unbiased_cross_entropy(x, t, 0, backend=backend)
    with pytest.raises(TypeError, match="old_classes must be an int"):
        isf.unbiased_cross_entropy(x, t, 2.0, backend=backend)
    with pytest.raises(ValueError, match="old_classes=3 but y has 4 channels"):
        isf.incremental_loss(x, t, y, old_classes=3, backend=backend)


def test_teacher_shape_dtype_and_co_greater_than_c(backend):
    x, t, y = _inputs()
    too_many = torch.randn(2, 7, 5, 3)
    with pytest.raises(ValueError, match="Co > C is not allowed"):
        isf.knowledge_distillation(x, too_many, backend=backend)
    with pytest.raises(ValueError, match="y must have shape"):
        isf.unbiased_knowledge_distillation(x, y[:, :, :4], backend=backend)
    with pytest.raises(TypeError, match="y has dtype torch.bfloat16 but x has torch.float32"):
        isf.balanced_knowledge_distillation(x, y.bfloat16(), backend=backend)
    with pytest.raises(ValueError, match="must not require grad"):
        isf.knowledge_distillation(x, y.requires_grad_(), backend=backend)
    with pytest.raises(ValueError, match="y .* is required with kd='unbiased'"):
        isf.incremental_loss(x, t, None, old_classes=4, backend=backend)


@pytest.mark.parametrize(
    "x_dtype,y_dtype,hint",
    [
        (torch.float32, torch.float16, "y.to(x.dtype)"),  # narrower than the student
        (torch.bfloat16, torch.float16, "y.to(x.dtype)"),  # neither is wider
        (torch.bfloat16, torch.float64, "y.to(torch.float32)"),  # wider than the one wider dtype
        (torch.float64, torch.float32, "y.to(x.dtype)"),
    ],
)
def test_teacher_dtype_must_be_the_student_s_or_the_wider_one(backend, x_dtype, y_dtype, hint):
    """MATH.md#teacher-dtype: y in x's dtype, or float32 for a 16-bit x, float64 for a float32 x."""
    x, t, y = _inputs()
    for wider in (x.dtype, torch.float64):
        isf.knowledge_distillation(x, y.to(wider), backend=backend)  # allowed: no error
    isf.incremental_loss(x.bfloat16(), t, y, old_classes=4, kd="balanced", backend=backend)
    with pytest.raises(TypeError, match=rf"y has dtype {y_dtype} but x has {x_dtype}.*{re.escape(hint)}"):
        isf.unbiased_knowledge_distillation(x.to(x_dtype), y.to(y_dtype), backend=backend)
    with pytest.raises(TypeError, match="y must be float16, bfloat16, float32 or float64"):
        isf.incremental_loss(x, t, y.long(), old_classes=4, backend=backend)


def test_mask_gamma_alpha(backend):
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="mask must have shape"):
        isf.knowledge_distillation(x, y, mask=torch.ones(2, 5), backend=backend)
    with pytest.raises(TypeError, match="mask must be a bool or floating"):
        isf.knowledge_distillation(x, y, mask=torch.ones(2, 5, 3, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"gamma must have shape \(B,\)"):
        isf.balanced_knowledge_distillation(x, y, gamma=torch.ones(3), backend=backend)
    for bad in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
            isf.balanced_knowledge_distillation(x, y, gamma=torch.tensor([1.0, bad]), backend=backend)
    with pytest.raises(ValueError, match="alpha must be finite"):
        isf.knowledge_distillation(x, y, alpha=float("nan"), backend=backend)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        isf.knowledge_distillation(x, y, alpha="1", backend=backend)


def test_modes_and_reductions(backend):
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        isf.unbiased_cross_entropy(x, t, 4, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="ce must be one of"):
        isf.incremental_loss(x, t, y, old_classes=4, ce="focal", backend=backend)
    with pytest.raises(ValueError, match="kd must be one of"):
        isf.incremental_loss(x, t, y, old_classes=4, kd="pod", backend=backend)


def test_attention_arguments(backend):
    f, g = torch.randn(2, 8, 4, 5), torch.randn(2, 8, 4, 5)
    a, b = torch.rand(2, 8), torch.rand(2, 8)
    with pytest.raises(ValueError, match="g must have the same shape as f"):
        isf.attentive_distillation(f, g[:, :4], a, b, backend=backend)
    with pytest.raises(ValueError, match=r"a must have shape \(B, C\)"):
        isf.attentive_distillation(f, g, a[:, :3], b, backend=backend)
    with pytest.raises(TypeError, match="b has dtype torch.float64 but g has torch.float32"):
        isf.attentive_distillation(f, g, a, b.double(), backend=backend)
    with pytest.raises(TypeError, match="a has dtype torch.float64 but f has torch.float32"):
        isf.attentive_distillation(f, g.double(), a.double(), b.double(), backend=backend)
    with pytest.raises(TypeError, match=r"g has dtype torch.bfloat16 but f has torch.float32.*g.to\(f.dtype\)"):
        isf.attentive_distillation(f, g.bfloat16(), a, b.bfloat16(), backend=backend)
    isf.attentive_distillation(f.bfloat16(), g, a.bfloat16(), b, backend=backend)  # a wider teacher: allowed
    with pytest.raises(ValueError, match="reduction must be one of"):
        isf.attentive_distillation(f, g, a, b, reduction="none", backend=backend)
    with pytest.raises(ValueError, match=r"a_sp must have shape \(B, H, W\)"):
        isf.structured_attention(f, a, torch.rand(2, 5, 4), backend=backend)
    with pytest.raises(ValueError, match=r"a_ch must have shape \(B, C\)"):
        isf.structured_attention(f, a[:1], torch.rand(2, 4, 5), backend=backend)


def test_unknown_and_unavailable_backends():
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        isf.unbiased_cross_entropy(x, t, 4, backend="mps")
    with pytest.raises(TypeError, match="backend must be a string"):
        isf.unbiased_cross_entropy(x, t, 4, backend=None)
    if "cuda" not in isf.available_backends():
        with pytest.raises(isf.BackendUnavailableError, match="backend='cuda' is not available"):
            isf.unbiased_cross_entropy(x, t, 4, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_mixed_devices_raise():
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="y is on cuda"):
        isf.knowledge_distillation(x, y.cuda())
    with pytest.raises(ValueError, match="t is on cuda"):
        isf.unbiased_cross_entropy(x, t.cuda(), 4)


def test_mixed_devices_raise_with_meta_tensors():
    """Device checks run on any device pair; meta tensors stand in for a second device here."""
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
        isf.knowledge_distillation(x, y.to("meta"))
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        isf.knowledge_distillation(x, y, mask=torch.ones(2, 5, 3, device="meta"))


def test_labels_or_teacher_at_another_resolution_suggest_size(backend):
    """A MiB-style trainer ported without size=: the error says how to compute the loss at the labels' resolution."""
    from incseg_fast.losses import UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss

    x, _, y = _inputs(H=5, W=3)
    labels = torch.randint(0, 6, (2, 20, 12))
    hint = "pass size=targets.shape[-2:] to compute the loss at that resolution"
    with pytest.raises(ValueError, match=r"got \(2, 20, 12\): " + hint.replace("[", r"\[").replace("]", r"\]")):
        UnbiasedCrossEntropy(old_cl=4, backend=backend)(x, labels)
    with pytest.raises(ValueError, match=r"got \(2, 20, 12\): pass size=t\.shape"):
        isf.unbiased_cross_entropy(x, labels, 4, backend=backend)
    with pytest.raises(ValueError, match=r"mask must .* got \(2, 20, 12\): pass size=mask\.shape"):
        isf.knowledge_distillation(x, y, mask=torch.ones(2, 20, 12), backend=backend)
    # labels smaller than the logits: size= would not help (it upsamples only), so no hint
    with pytest.raises(ValueError) as smaller:
        isf.unbiased_cross_entropy(x, labels[:, :2, :2], 4, backend=backend)
    assert "size=" not in str(smaller.value)

    # distillation: teacher logits at another resolution are an error, never a loss at the lower one
    upsampled_teacher = torch.nn.functional.interpolate(y, size=(20, 12), mode="bilinear")
    with pytest.raises(ValueError, match=r"got \(2, 4, 20, 12\) \(or pass size=\(H, W\)"):
        UnbiasedKnowledgeDistillationLoss(backend=backend)(x, upsampled_teacher)
    with pytest.raises(ValueError, match=r"like x, got \(2, 4, 20, 12\) \(or pass size="):
        isf.unbiased_knowledge_distillation(x, upsampled_teacher, backend=backend)
    # and with size= the same calls compute the loss of the upsampled logits
    assert torch.isfinite(UnbiasedCrossEntropy(old_cl=4, backend=backend)(x, labels, size=labels.shape[-2:]))
    assert torch.isfinite(UnbiasedKnowledgeDistillationLoss(backend=backend)(x, upsampled_teacher, size=(20, 12)))
