"""Parity of every non-reference backend with incseg_fast.reference for the logit losses (MATH.md#logit-losses).

Each backend runs through the public API on fresh random inputs; the reference runs on float64
copies of the same values. Losses and dL/dx are compared, with random upstream gradients (random
maps for reduction="none"). Triton without a GPU runs in its interpreter on CPU tensors, which is
slow, so it gets the small default shapes and skips the cases marked heavy; "cuda" and Triton on a
GPU use CUDA tensors.
"""

import itertools

import pytest
import torch
from parity_support import ONE_HOT_ALPHA, RTOL, WIDER_TEACHERS, device_for, interpreted, one_hot_teacher

import incseg_fast as isf
from incseg_fast import reference
from incseg_fast.vocabulary import INCREMENTAL_CE_MODES as CE_MODES
from incseg_fast.vocabulary import KD_MODES, REDUCTIONS

DISTILLATIONS = ("knowledge_distillation", "unbiased_knowledge_distillation", "balanced_knowledge_distillation")


def _skip_if_interpreted(backend):
    if interpreted(backend):
        pytest.skip("too large for the Triton interpreter")


class Inputs:
    """Fresh random logits, teacher logits (in teacher_dtype, x's dtype by default) and labels (odd H, W by
    default)."""

    def __init__(
        self,
        generator,
        *,
        batch=2,
        channels=7,
        old_classes=4,
        height=9,
        width=9,
        dtype=torch.float32,
        teacher_dtype=None,
        label_dtype=torch.int64,
        ignore_index=255,
        ignore_fraction=0.2,
        scale=3.0,
    ):
        shape = (batch, channels, height, width)
        self.x = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        self.y = (2 * torch.randn((batch, old_classes, height, width), generator=generator, dtype=torch.float64)).to(
            teacher_dtype or dtype
        )
        t = torch.randint(0, channels, (batch, height, width), generator=generator)
        ignored = torch.rand((batch, height, width), generator=generator) < ignore_fraction
        self.t = torch.where(ignored, torch.full_like(t, ignore_index), t).to(label_dtype)
        self.float_mask = torch.rand((batch, height, width), generator=generator, dtype=torch.float64)
        self.bool_mask = torch.rand((batch, height, width), generator=generator) < 0.7
        self.gamma = 0.2 + 2 * torch.rand((batch,), generator=generator, dtype=torch.float64)
        self.old_classes = old_classes
        self.ignore_index = ignore_index


def _assert_close(actual, expected, rtol, what, floor=0.0):
    """|actual - expected| <= rtol * max(max|expected|, floor).

    floor is 0 (an all-zero reference must be matched exactly) except where a test passes the
    scale the values would have if they were not identically zero.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    scale = max(scale, floor)
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e}"


def _on(value, device, float_dtype=None):
    """A copy on `device`; floating tensors converted to float_dtype when given."""
    if not isinstance(value, torch.Tensor):
        return value
    if float_dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=float_dtype)
    return value.to(device=device)


def _check(backend, name, x, args, kwargs, generator, *, expect_zero=(), grad_floor=0.0):
    """Run isf.<name> on `backend` and reference.<name> on float64 copies; compare outputs and dL/dx.

    args/kwargs hold the other inputs in the dtype the backend gets (CPU tensors). Each output is
    weighted by a random upstream gradient of its shape. Outputs named in expect_zero must be
    exactly zero; grad_floor is the gradient scale to compare against where the reference
    gradient is zero by construction.
    """
    device = device_for(backend)
    rtol = RTOL[x.dtype]
    xb = x.detach().to(device).clone().requires_grad_()
    outputs = getattr(isf, name)(
        xb, *[_on(a, device) for a in args], backend=backend, **{k: _on(v, device) for k, v in kwargs.items()}
    )
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)

    xr = x.detach().to(torch.float64).clone().requires_grad_()
    ref_outputs = getattr(reference, name)(
        xr,
        *[_on(a, "cpu", torch.float64) for a in args],
        **{k: _on(v, "cpu", torch.float64) for k, v in kwargs.items()},
    )
    ref_outputs = ref_outputs if isinstance(ref_outputs, tuple) else (ref_outputs,)

    expected_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    upstream = [torch.randn(r.shape, generator=generator, dtype=torch.float64) for r in ref_outputs]
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs, strict=True)):
        assert out.dtype == expected_dtype, f"output {i}: dtype {out.dtype}, expected {expected_dtype}"
        if i in expect_zero:
            assert out.abs().max().item() == 0.0, f"output {i} should be exactly 0"
        _assert_close(out, ref, rtol, f"{name} output {i}")

    sum(((o * u.to(device=device, dtype=o.dtype)).sum() for o, u in zip(outputs, upstream, strict=True))).backward()
    sum(((r * u).sum() for r, u in zip(ref_outputs, upstream, strict=True))).backward()
    assert xb.grad.dtype == x.dtype and xb.grad.shape == x.shape
    _assert_close(xb.grad, xr.grad, rtol, f"{name} dL/dx", floor=grad_floor)


# ---------------------------------------------------------------------------------------------
# The fused objective: every ce x kd combination.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ce,kd", list(itertools.product(CE_MODES, KD_MODES)))
def test_incremental_loss_modes(backend, generator, ce, kd):
    inp = Inputs(generator)
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce=ce, kd=kd, alpha=0.6, mask=inp.float_mask),
        generator,
        expect_zero=(1,) if kd == "none" else (),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kd", ["unbiased", "balanced", "plain"])
def test_incremental_loss_dtypes(backend, generator, dtype, kd):
    inp = Inputs(generator, dtype=dtype, scale=2.0)
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd=kd, alpha=1.5, mask=inp.bool_mask),
        generator,
    )


@pytest.mark.parametrize(
    "label_dtype,ignore_index", [(torch.int64, -100), (torch.int32, 255), (torch.uint8, 255), (torch.int64, 0)]
)
def test_label_dtypes_and_ignore_index(backend, generator, label_dtype, ignore_index):
    inp = Inputs(generator, label_dtype=label_dtype, ignore_index=ignore_index)
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd="unbiased", ignore_index=ignore_index),
        generator,
    )


@pytest.mark.parametrize(
    "label_dtype,ignore_index",
    [(torch.uint8, -1), (torch.uint8, 256), (torch.int32, 2**32), (torch.int32, -(2**31) - 1)],
)
def test_ignore_index_outside_the_label_dtype_ignores_nothing(backend, generator, label_dtype, ignore_index):
    """Compared as integers, never wrapped into the labels' dtype (-1 is not uint8's 255)."""
    inp = Inputs(generator, label_dtype=label_dtype, ignore_fraction=0.0)
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd="unbiased", ignore_index=ignore_index),
        generator,
    )


@pytest.mark.parametrize("channels,old_classes", [(5, 5), (5, 1), (2, 1), (2, 2)])
def test_old_classes_edges(backend, generator, channels, old_classes):
    """C == Co (the background set is {0}) and Co == 1 (unbiased CE is plain CE)."""
    inp = Inputs(generator, channels=channels, old_classes=old_classes)
    for ce, kd in (("unbiased", "unbiased"), ("plain", "balanced"), ("unbiased", "plain")):
        _check(
            backend,
            "incremental_loss",
            inp.x,
            (inp.t, inp.y),
            dict(old_classes=old_classes, ce=ce, kd=kd, alpha=0.8, mask=inp.float_mask),
            generator,
        )


def test_all_ignored_batch(backend, generator):
    """CE mean over zero pixels is 0 with a zero gradient; the distillation term still counts."""
    inp = Inputs(generator, ignore_fraction=1.0)
    assert (inp.t == 255).all()
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd="unbiased"),
        generator,
        expect_zero=(0,),
    )
    _check(
        backend,
        "unbiased_cross_entropy",
        inp.x,
        (inp.t, inp.old_classes),
        dict(reduction="none"),
        generator,
        expect_zero=(0,),
    )


@pytest.mark.parametrize(
    "channels,old_classes,height,width", [(21, 16, 23, 29), (61, 31, 8, 17), (151, 101, 9, 15), (151, 150, 32, 33)]
)
def test_many_channels_and_tiles(backend, generator, channels, old_classes, height, width):
    """Up to 151 classes; H*W = 667 and 1056 span several CPU tiles (512 pixels) plus a partial one."""
    _skip_if_interpreted(backend)
    inp = Inputs(generator, batch=3, channels=channels, old_classes=old_classes, height=height, width=width)
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=old_classes, ce="unbiased", kd="balanced", alpha=1.3, mask=inp.float_mask),
        generator,
    )
    _check(backend, "knowledge_distillation", inp.x, (inp.y,), dict(reduction="none"), generator)


def test_large_logits(backend, generator):
    """Logits of magnitude ~100 (exp would overflow without the max shift; old classes far below)."""
    inp = Inputs(generator, scale=40.0)
    inp.x[:, : inp.old_classes] -= 60.0
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd="unbiased", alpha=3.0),
        generator,
    )


@pytest.mark.parametrize("name", DISTILLATIONS)
def test_one_hot_teacher_at_large_scaled_logits(backend, generator, name):
    """|alpha * y| ~ 1e4 with a one-hot teacher: class 0 in image 0 (q_0 of UNKD/BKD), class 1 in image 1.
    BKD gets gamma (computed from this y it would be infinite in image 1)."""
    inp = Inputs(generator)
    options = dict(alpha=ONE_HOT_ALPHA, mask=inp.float_mask, reduction="none")
    if name == "balanced_knowledge_distillation":
        options["gamma"] = inp.gamma
    _check(backend, name, inp.x, (one_hot_teacher(inp.y),), options, generator)


@pytest.mark.parametrize("kd", ["unbiased", "balanced", "plain"])
def test_minus_infinity_logits_of_new_classes(backend, generator, kd):
    """A class masked out with -inf logits (legitimate: probability 0) beyond Co, where no label
    points; one image has every new class at -inf."""
    inp = Inputs(generator, channels=9, old_classes=4)
    inp.x[:, 6] = float("-inf")
    inp.x[1, 4:] = float("-inf")
    inp.t[(inp.t >= 4) & (inp.t != inp.ignore_index)] = 2
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (inp.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd=kd, alpha=1.2, mask=inp.float_mask),
        generator,
    )


def test_non_contiguous_inputs(backend, generator):
    _skip_if_interpreted(backend)
    inp = Inputs(generator)
    x = inp.x.to(memory_format=torch.channels_last)
    y = inp.y.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() and not y.is_contiguous()
    _check(
        backend,
        "incremental_loss",
        x,
        (inp.t.transpose(1, 2).contiguous().transpose(1, 2), y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd="balanced", mask=inp.float_mask),
        generator,
    )


# ---------------------------------------------------------------------------------------------
# The separate public losses: every reduction, masks, alpha, gamma given and computed.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("old_classes", [1, 3, 7])
def test_unbiased_cross_entropy(backend, generator, reduction, old_classes):
    inp = Inputs(generator, old_classes=old_classes)
    # With Co == C every label is background/old, the loss is lse - lse = 0 and so is dL/dx; the
    # kernels' rounding then shows against the size one pixel's gradient would have.
    valid = (inp.t != inp.ignore_index).sum().item()
    floor = (1.0 / valid if reduction == "mean" else 1.0) if old_classes == inp.x.shape[1] else 0.0
    _check(
        backend,
        "unbiased_cross_entropy",
        inp.x,
        (inp.t, old_classes),
        dict(reduction=reduction),
        generator,
        grad_floor=floor,
    )


@pytest.mark.parametrize("name", DISTILLATIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_distillation(backend, generator, name, reduction, mask):
    inp = Inputs(generator)
    masks = {"none": None, "bool": inp.bool_mask, "float": inp.float_mask}
    _check(backend, name, inp.x, (inp.y,), dict(alpha=0.7, mask=masks[mask], reduction=reduction), generator)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_balanced_distillation_given_gamma(backend, generator, reduction):
    inp = Inputs(generator)
    _check(
        backend,
        "balanced_knowledge_distillation",
        inp.x,
        (inp.y,),
        dict(alpha=1.2, mask=inp.float_mask, reduction=reduction, gamma=inp.gamma),
        generator,
    )


def test_balanced_distillation_gamma_of_a_dominant_class(backend, generator):
    """One class's mean teacher logit leads the background's by 60 (gamma ~ 1e26) and, in the other
    image, the background leads by 60 (gamma ~ 1e-26): every backend stays finite and exact."""
    inp = Inputs(generator)
    inp.y[0, 2] += 60.0
    inp.y[1, 0] += 60.0
    _check(backend, "balanced_knowledge_distillation", inp.x, (inp.y,), dict(alpha=0.01, reduction="sum"), generator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_per_pixel_maps_low_precision(backend, generator, dtype):
    """reduction="none" maps and their gradients in every dtype."""
    inp = Inputs(generator, dtype=dtype, scale=2.0)
    _check(backend, "unbiased_cross_entropy", inp.x, (inp.t, inp.old_classes), dict(reduction="none"), generator)
    _check(
        backend,
        "unbiased_knowledge_distillation",
        inp.x,
        (inp.y,),
        dict(alpha=0.9, mask=inp.float_mask, reduction="none"),
        generator,
    )


# ---------------------------------------------------------------------------------------------
# A teacher wider than the student (MATH.md#teacher-dtype): MiB's AMP loop runs the old model
# outside autocast. The kernels read it in its own dtype; the tolerance is the student's.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,teacher_dtype", WIDER_TEACHERS, ids=str)
@pytest.mark.parametrize("name", DISTILLATIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_distillation_with_a_wider_teacher(backend, generator, dtype, teacher_dtype, name, reduction):
    inp = Inputs(generator, dtype=dtype, teacher_dtype=teacher_dtype, scale=2.0, height=7, width=11)
    _check(backend, name, inp.x, (inp.y,), dict(alpha=0.7, mask=inp.float_mask, reduction=reduction), generator)


@pytest.mark.parametrize("dtype,teacher_dtype", WIDER_TEACHERS, ids=str)
@pytest.mark.parametrize("kd", ["unbiased", "balanced", "plain"])
@pytest.mark.parametrize(
    "shape,size",
    [((7, 11), None), ((8, 12), None), ((5, 7), (13, 17))],
    ids=["odd", "packed", "size"],  # packed: H*W a multiple of every pack width (the CUDA kernels' wide loads)
)
def test_incremental_loss_with_a_wider_teacher(backend, generator, dtype, teacher_dtype, kd, shape, size):
    inp = Inputs(generator, dtype=dtype, teacher_dtype=teacher_dtype, scale=2.0, height=shape[0], width=shape[1])
    labels = inp if size is None else Inputs(generator, height=size[0], width=size[1])
    _check(
        backend,
        "incremental_loss",
        inp.x,
        (labels.t, inp.y),
        dict(old_classes=inp.old_classes, ce="unbiased", kd=kd, alpha=1.5, mask=labels.bool_mask, size=size),
        generator,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_float32_teacher_is_closer_to_the_truth_than_its_cast_copy(backend, generator, dtype):
    """The per-pixel losses of a 16-bit student with its float32 teacher are the float32 teacher's (to
    float32 accumulation), not those of the teacher rounded to the student's dtype: far closer to the
    float64 truth than the losses of the cast copy."""
    inp = Inputs(generator, dtype=dtype, teacher_dtype=torch.float32, scale=2.0)
    device = device_for(backend)
    truth = reference.unbiased_knowledge_distillation(inp.x.double(), inp.y.double(), reduction="none")

    def error(y):
        loss = isf.unbiased_knowledge_distillation(inp.x.to(device), y.to(device), reduction="none", backend=backend)
        return (loss.double().cpu() - truth).abs().max().item()

    cast_error = error(inp.y.to(dtype))
    assert cast_error > 0
    assert error(inp.y) < cast_error / 10


@pytest.mark.parametrize("batch,height,width", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs_give_the_defined_result(backend, batch, height, width, reduction):
    """A dimension of 0: "sum" and "mean" are 0 (a mean over nothing is 0), "none" an empty map,
    the gradient empty (MATH.md#empty)."""
    device = device_for(backend)
    x = torch.randn(batch, 5, height, width, device=device, requires_grad=True)
    y = torch.randn(batch, 3, height, width, device=device)
    t = torch.zeros(batch, height, width, dtype=torch.int64, device=device)
    ce = isf.unbiased_cross_entropy(x, t, 3, reduction=reduction, backend=backend)
    kd = isf.balanced_knowledge_distillation(x, y, reduction=reduction, backend=backend)
    expected_shape = (batch, height, width) if reduction == "none" else ()
    for loss in (ce, kd):
        assert loss.shape == expected_shape and loss.dtype == torch.float32
        assert loss.numel() == 0 or loss.item() == 0.0
    (ce.sum() + kd.sum()).backward()
    assert x.grad.shape == x.shape
