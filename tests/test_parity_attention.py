"""Parity of every non-reference backend with incseg_fast.reference for the attention ops (MATH.md#feature-losses).

Each backend runs through the public API on fresh random inputs; the reference runs on float64
copies of the same values. Triton without a GPU runs in its interpreter on CPU tensors, which is
slow, so it gets tiny shapes only; "cuda" and Triton on a GPU use CUDA tensors.
"""

import itertools

import pytest
import torch
from parity_support import RTOL, WIDER_TEACHERS, device_for, interpreted

import incseg_fast as isf
from incseg_fast import reference
from incseg_fast.vocabulary import FEATURE_REDUCTIONS, FLOAT_DTYPES

INPUT_NAMES = ("f", "g", "a", "b")


def _shape(backend, batch, channels, height, width):
    """The requested (B, C, H, W), shrunk for the Triton interpreter."""
    if interpreted(backend):
        return min(batch, 2), min(channels, 8), min(height, 7), min(width, 7)
    return batch, channels, height, width


def _features(generator, shape, dtype, device):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _channel_attention(generator, shape, dtype, device):
    """Squeeze-excitation outputs: in (0, 1), never constant."""
    return torch.sigmoid(torch.randn(shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def _feature_pair(generator, shape, dtype, device, teacher_dtype=None):
    """f, g, a, b; the teacher's g, b in teacher_dtype (dtype by default)."""
    batch, channels = shape[:2]
    teacher_dtype = teacher_dtype or dtype
    return (
        _features(generator, shape, dtype, device),
        _features(generator, shape, teacher_dtype, device),
        _channel_attention(generator, (batch, channels), dtype, device),
        _channel_attention(generator, (batch, channels), teacher_dtype, device),
    )


def _random_upstream(generator):
    """A random upstream gradient for a scalar loss: magnitude in [0.5, 3), either sign."""
    magnitude = 0.5 + 2.5 * torch.rand((), generator=generator).item()
    return magnitude if torch.rand((), generator=generator).item() < 0.5 else -magnitude


def _assert_close(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max|expected| (relative to the reference's scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would prove nothing"
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e}"


def _check_attentive_distillation(backend, inputs, *, reduction, detach_spatial, wanted, upstream, rtol):
    """Loss and gradients of `backend` against the float64 reference, gradients for the `wanted` inputs only."""
    leaves = [x.detach().clone().requires_grad_(name in wanted) for name, x in zip(INPUT_NAMES, inputs, strict=True)]
    loss = isf.attentive_distillation(*leaves, reduction=reduction, detach_spatial=detach_spatial, backend=backend)
    expected_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.dim() == 0

    ref_leaves = [
        x.detach().to(torch.float64).cpu().requires_grad_(name in wanted)
        for name, x in zip(INPUT_NAMES, inputs, strict=True)
    ]
    ref_loss = reference.attentive_distillation(*ref_leaves, reduction=reduction, detach_spatial=detach_spatial)
    _assert_close(loss, ref_loss, rtol, "loss")
    if not wanted:
        assert not loss.requires_grad
        return
    (loss * upstream).backward()
    (ref_loss * upstream).backward()
    for name, leaf, ref_leaf in zip(INPUT_NAMES, leaves, ref_leaves, strict=True):
        if name in wanted:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"d{name}"
            _assert_close(leaf.grad, ref_leaf.grad, rtol, f"d{name}")
        else:
            assert leaf.grad is None, f"d{name} computed although {name} does not require grad"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", FEATURE_REDUCTIONS)
@pytest.mark.parametrize("detach_spatial", (False, True), ids=("spatial_grad", "detach_spatial"))
def test_attentive_distillation_dtypes(backend, generator, dtype, reduction, detach_spatial):
    shape = _shape(backend, 3, 19, 13, 11)
    inputs = _feature_pair(generator, shape, dtype, device_for(backend))
    _check_attentive_distillation(
        backend,
        inputs,
        reduction=reduction,
        detach_spatial=detach_spatial,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[dtype],
    )


GRAD_SUBSETS = [subset for k in range(len(INPUT_NAMES) + 1) for subset in itertools.combinations(INPUT_NAMES, k)]


@pytest.mark.parametrize("wanted", GRAD_SUBSETS, ids=lambda s: "+".join(s) or "no_grad")
@pytest.mark.parametrize("detach_spatial", (False, True), ids=("spatial_grad", "detach_spatial"))
def test_attentive_distillation_gradient_subsets(backend, generator, wanted, detach_spatial):
    shape = _shape(backend, 2, 7, 9, 5)
    inputs = _feature_pair(generator, shape, torch.float32, device_for(backend))
    _check_attentive_distillation(
        backend,
        inputs,
        reduction="mean",
        detach_spatial=detach_spatial,
        wanted=wanted,
        upstream=_random_upstream(generator),
        rtol=RTOL[torch.float32],
    )


@pytest.mark.parametrize("zero_map", ("f", "g", "both"))
@pytest.mark.parametrize("detach_spatial", (False, True), ids=("spatial_grad", "detach_spatial"))
def test_attentive_distillation_zero_feature_map(backend, generator, zero_map, detach_spatial):
    """An all-zero feature map of one image has N == 0: Ŝ = 0 there and the other images are unaffected."""
    shape = _shape(backend, 3, 6, 7, 5)
    f, g, a, b = _feature_pair(generator, shape, torch.float64, device_for(backend))
    if zero_map == "f":
        f[0] = 0
    elif zero_map == "g":
        g[-1] = 0
    else:  # both maps of the same image
        f[-1] = 0
        g[-1] = 0
    _check_attentive_distillation(
        backend,
        (f, g, a, b),
        reduction="sum",
        detach_spatial=detach_spatial,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[torch.float64],
    )


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_attentive_distillation_nearly_identical_pair(backend, generator, dtype):
    """The old and new models nearly agree (as right after a step starts): D is small against AD(f)."""
    shape = _shape(backend, 2, 16, 9, 7)
    f, _, a, _ = _feature_pair(generator, shape, dtype, device_for(backend))
    g = f + 1e-3 * _features(generator, shape, dtype, device_for(backend))
    b = a * (1 + 1e-3 * _features(generator, a.shape, dtype, device_for(backend)))
    _check_attentive_distillation(
        backend,
        (f, g, a, b),
        reduction="mean",
        detach_spatial=False,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[dtype],
    )


def test_attentive_distillation_identical_pair_is_exactly_zero(backend, generator):
    """A copied old model (f == g, a == b) gives a loss and gradients of exactly zero."""
    f, _, a, _ = _feature_pair(generator, _shape(backend, 2, 16, 9, 7), torch.float32, device_for(backend))
    leaves = [x.clone().requires_grad_() for x in (f, f, a, a)]
    loss = isf.attentive_distillation(*leaves, backend=backend)
    loss.backward()
    assert loss.item() == 0
    for name, leaf in zip(INPUT_NAMES, leaves, strict=True):
        assert torch.count_nonzero(leaf.grad) == 0, f"d{name}"


@pytest.mark.parametrize(
    "shape",
    [(2, 2048, 5, 7), (1, 3, 37, 41), (1, 5, 15, 13), (5, 1, 1, 1), (2, 33, 1, 67), (2, 5, 32, 36)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_attentive_distillation_shapes(backend, generator, shape, dtype):
    """Many channels, images larger than one pixel chunk, chunk tails, single pixels and channels.

    For the CUDA kernels: 2048 channels on 35 pixels are split into channel groups; 32x36 pixels are
    read in 16-byte packs, over several blocks per image with a partly filled last block.
    """
    if interpreted(backend) and shape[1] > 8:
        pytest.skip("too large for the Triton interpreter")
    inputs = _feature_pair(generator, _shape(backend, *shape), dtype, device_for(backend))
    _check_attentive_distillation(
        backend,
        inputs,
        reduction="mean",
        detach_spatial=False,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[dtype],
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("detach_spatial", (False, True), ids=("spatial_grad", "detach_spatial"))
def test_attentive_distillation_packed_channel_groups(backend, generator, dtype, detach_spatial):
    """H*W = 128, a multiple of every dtype's 16-byte pack, and 301 channels, which the CUDA kernels
    split into two channel groups of unequal size (151 and 150)."""
    if interpreted(backend):
        pytest.skip("too large for the Triton interpreter")
    inputs = _feature_pair(generator, (2, 301, 8, 16), dtype, device_for(backend))
    _check_attentive_distillation(
        backend,
        inputs,
        reduction="sum",
        detach_spatial=detach_spatial,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[dtype],
    )


@pytest.mark.parametrize("dtype,teacher_dtype", WIDER_TEACHERS, ids=str)
@pytest.mark.parametrize("reduction", FEATURE_REDUCTIONS)
@pytest.mark.parametrize("detach_spatial", (False, True), ids=("spatial_grad", "detach_spatial"))
@pytest.mark.parametrize("shape", [(3, 19, 13, 11), (2, 37, 8, 16)], ids=("odd", "packed"))
def test_attentive_distillation_wider_teacher(
    backend, generator, dtype, teacher_dtype, reduction, detach_spatial, shape
):
    """The old features g (and their attention b) in a wider dtype than the new ones (MATH.md#teacher-dtype),
    read in their own dtype; every gradient in its input's dtype, at the student's tolerance."""
    inputs = _feature_pair(generator, _shape(backend, *shape), dtype, device_for(backend), teacher_dtype)
    _check_attentive_distillation(
        backend,
        inputs,
        reduction=reduction,
        detach_spatial=detach_spatial,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[dtype],
    )


def test_attentive_distillation_non_contiguous(backend, generator):
    shape = _shape(backend, 2, 6, 9, 7)
    f, g, a, b = _feature_pair(generator, shape, torch.float32, device_for(backend))
    f = f.to(memory_format=torch.channels_last)
    g = g.transpose(2, 3).contiguous().transpose(2, 3)
    _check_attentive_distillation(
        backend,
        (f, g, a, b),
        reduction="mean",
        detach_spatial=False,
        wanted=INPUT_NAMES,
        upstream=_random_upstream(generator),
        rtol=RTOL[torch.float32],
    )


def _check_structured_attention(backend, v, a_ch, a_sp, wanted, grad_out, rtol):
    leaves = [
        x.detach().clone().requires_grad_(name in wanted)
        for name, x in zip(("v", "a_ch", "a_sp"), (v, a_ch, a_sp), strict=True)
    ]
    out = isf.structured_attention(*leaves, backend=backend)
    assert out.dtype == v.dtype and out.shape == v.shape
    ref_leaves = [
        x.detach().to(torch.float64).cpu().requires_grad_(name in wanted)
        for name, x in zip(("v", "a_ch", "a_sp"), (v, a_ch, a_sp), strict=True)
    ]
    ref_v, ref_a_ch, ref_a_sp = ref_leaves
    ref_out = reference.structured_attention(ref_v, ref_a_ch, ref_a_sp.reshape(ref_v.shape[0], *ref_v.shape[2:]))
    _assert_close(out, ref_out, rtol, "out")
    out.backward(grad_out)
    ref_out.backward(grad_out.to(device="cpu", dtype=torch.float64))
    for name, leaf, ref_leaf in zip(("v", "a_ch", "a_sp"), leaves, ref_leaves, strict=True):
        if name in wanted:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"d{name}"
            _assert_close(leaf.grad, ref_leaf.grad, rtol, f"d{name}")
        else:
            assert leaf.grad is None, f"d{name}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(3, 17, 13, 11), (2, 2048, 3, 5), (1, 4, 37, 41), (2, 301, 8, 16)], ids=lambda s: "x".join(map(str, s))
)
def test_structured_attention(backend, generator, dtype, shape):
    """Pixel tails; for the CUDA kernels also channel groups (2048 and 301 channels) and 16-byte packs (8x16)."""
    if interpreted(backend) and shape[1] > 8:
        pytest.skip("too large for the Triton interpreter")
    batch, channels, height, width = _shape(backend, *shape)
    device = device_for(backend)
    v = _features(generator, (batch, channels, height, width), dtype, device)
    a_ch = _features(generator, (batch, channels), dtype, device)
    a_sp = _features(generator, (batch, height, width), dtype, device)
    grad_out = _features(generator, (batch, channels, height, width), dtype, device)
    _check_structured_attention(backend, v, a_ch, a_sp, ("v", "a_ch", "a_sp"), grad_out, RTOL[dtype])


@pytest.mark.parametrize("wanted", [("v",), ("a_ch",), ("a_sp",), ("a_ch", "a_sp")], ids="+".join)
def test_structured_attention_gradient_subsets(backend, generator, wanted):
    batch, channels, height, width = _shape(backend, 2, 5, 7, 9)
    device = device_for(backend)
    v = _features(generator, (batch, channels, height, width), torch.float32, device)
    a_ch = _features(generator, (batch, channels), torch.float32, device)
    a_sp = _features(generator, (batch, 1, height, width), torch.float32, device)  # the (B, 1, H, W) form
    grad_out = _features(generator, (batch, channels, height, width), torch.float32, device)
    _check_structured_attention(backend, v, a_ch, a_sp, wanted, grad_out, RTOL[torch.float32])


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)], ids=str)
def test_empty_features_give_the_defined_result(backend, shape):
    """A dimension of 0: the loss is 0 for "mean" and "sum", gradients are empty (MATH.md#empty)."""
    device = device_for(backend)
    f = torch.randn(shape, device=device, requires_grad=True)
    a = torch.rand(shape[:2], device=device, requires_grad=True)
    for reduction in FEATURE_REDUCTIONS:
        loss = isf.attentive_distillation(f, f.detach() + 1, a, a.detach(), reduction=reduction, backend=backend)
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
    out = isf.structured_attention(f, a, f.detach().sum(1), backend=backend)
    assert out.shape == f.shape
    out.sum().backward()
    assert f.grad.shape == f.shape and a.grad.shape == a.shape
