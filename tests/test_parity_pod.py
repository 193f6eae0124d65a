"""Local POD (MATH.md#local-pod): the reference against PLOP's formula, and every fused backend against the reference.

``_plop_local_pod`` is a second, independent statement of the formula, written from PLOP's
description of its code (slice each cell, take its means over columns and over rows, concatenate,
L2 distance per image, mean over the batch): it pools the new and the old features separately,
with explicit loops over the cells, where the reference pools their difference by reshaping.
"""

import pytest
import torch
from parity_support import RTOL, device_for, interpreted

import incseg_fast as isf
from incseg_fast import _backends, cpu_isa, reference
from incseg_fast.vocabulary import FLOAT_DTYPES, REDUCTIONS


def _plop_local_pod(new, old, scales, *, cell_size_from_width):
    """One layer's Local POD, cells sliced one by one. With ``cell_size_from_width`` both axes are cut
    with ⌊W/s⌋ as PLOP's code does (the same as per-axis sizes on square maps); otherwise each axis
    uses its own length (MATH.md#local-pod, the decision for non-square maps)."""

    def embedding(x):
        x = x.pow(2)
        B, _, H, W = x.shape
        pooled = []
        for s in scales:
            h, w = (W // s, W // s) if cell_size_from_width else (H // s, W // s)
            for i in range(s):
                for j in range(s):
                    cell = x[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w]
                    pooled.append(cell.mean(dim=3).reshape(B, -1))  # over the cell's columns: C x h
                    pooled.append(cell.mean(dim=2).reshape(B, -1))  # over the cell's rows: C x w
        return torch.cat(pooled, dim=1)

    return (embedding(new) - embedding(old)).pow(2).sum(dim=1).sqrt().mean()


def _plop_merged_logits(new, old_channels):
    """The new logits as PLOP compares them with the old ones: background plus every new class, then the old classes."""
    merged = torch.zeros(new.shape[0], old_channels, *new.shape[2:], dtype=new.dtype)
    merged[:, 0] = new[:, 0] + new[:, old_channels:].sum(dim=1)
    merged[:, 1:] = new[:, 1:old_channels]
    return merged


def _randn(generator, shape, dtype=torch.float64, device="cpu"):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("shape", [(3, 5, 16, 16), (2, 3, 13, 13), (2, 4, 9, 9)])
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 3), (2,)])
def test_reference_matches_plops_formula_on_square_maps(generator, shape, scales):
    new, old = _randn(generator, shape), _randn(generator, shape)
    expected = _plop_local_pod(new, old, scales, cell_size_from_width=True)
    torch.testing.assert_close(reference.local_pod(new, old, scales=scales), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(2, 5, 13, 11), (3, 3, 7, 17)])
def test_reference_cuts_each_axis_by_its_own_length(generator, shape):
    new, old = _randn(generator, shape), _randn(generator, shape)
    expected = _plop_local_pod(new, old, (1, 2, 4), cell_size_from_width=False)
    torch.testing.assert_close(reference.local_pod(new, old), expected, rtol=1e-12, atol=0)


def test_reference_ignores_the_remainder_rows_and_columns_of_each_scale(generator):
    """With only scale 4 on 10 x 9 maps the cells are 2 x 2: rows 8, 9 and column 8 enter no cell."""
    new, old = _randn(generator, (2, 3, 10, 9)), _randn(generator, (2, 3, 10, 9))
    changed = new.clone()
    changed[:, :, 8:] += 5
    changed[:, :, :, 8] -= 3
    torch.testing.assert_close(
        reference.local_pod(changed, old, scales=(4,)), reference.local_pod(new, old, scales=(4,)), rtol=0, atol=0
    )
    assert reference.local_pod(changed, old, scales=(1,)) != reference.local_pod(new, old, scales=(1,))


def test_reference_merges_new_classes_into_the_background_as_plop(generator):
    new, old = _randn(generator, (2, 7, 12, 12)), _randn(generator, (2, 4, 12, 12))
    expected = _plop_local_pod(_plop_merged_logits(new, 4), old, (1, 2, 4), cell_size_from_width=True)
    torch.testing.assert_close(reference.local_pod(new, old), expected, rtol=1e-12, atol=0)


def test_reference_by_hand():
    """One 2 x 2 channel, scale 1: rows' means (1+4)/2, (9+16)/2 and columns' means (1+9)/2, (4+16)/2
    of new^2 against an all-zero old map; scale 2: every pixel is its own cell, each value twice."""
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    old = torch.zeros_like(new)
    scale_1 = [2.5, 12.5, 5.0, 10.0]
    scale_2 = [1.0, 4.0, 9.0, 16.0] * 2
    expected = sum(v * v for v in scale_1 + scale_2) ** 0.5
    assert reference.local_pod(new, old, scales=(1, 2)).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_reference(generator, reduction):
    new = _randn(generator, (2, 3, 7, 6)).requires_grad_()
    old = _randn(generator, (2, 3, 7, 6))
    assert torch.autograd.gradcheck(lambda x: reference.local_pod(x, old, reduction=reduction), (new,))


def test_reference_gradient_is_the_spread_of_math_md(generator):
    """MATH.md#local-pod-gradient: 2 a k Σ_s [in a cell] (P^w / w + P^h / h), written out cell by cell."""
    new, old = _randn(generator, (2, 3, 11, 9)).requires_grad_(), _randn(generator, (2, 3, 11, 9))
    reference.local_pod(new, old, reduction="sum").backward()
    e = new.detach().square() - old.square()
    lengths = reference.local_pod(new.detach(), old, reduction="none")
    spread = torch.zeros_like(e)
    for s in (1, 2, 4):
        h, w = 11 // s, 9 // s
        for i in range(s):
            for j in range(s):
                rows, columns = slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w)
                cell = e[:, :, rows, columns]
                spread[:, :, rows, columns] += cell.mean(dim=3, keepdim=True) / w + cell.mean(dim=2, keepdim=True) / h
    expected = 2 * new.detach() * spread / lengths.view(-1, 1, 1, 1)
    torch.testing.assert_close(new.grad, expected, rtol=1e-12, atol=1e-14)


def _shape(backend, shape):
    """The requested (B, C, H, W), shrunk for the Triton interpreter and the CUDA emulator."""
    if interpreted(backend) or backend == "cuda_emulator":
        return min(shape[0], 2), min(shape[1], 5), min(shape[2], 13), min(shape[3], 11)
    return shape


def _upstream(generator, reduction, batch):
    """Random upstream gradients away from 1, either sign; one per image for "none"."""
    shape = (batch,) if reduction == "none" else ()
    magnitude = 0.5 + 2.5 * torch.rand(shape, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    return magnitude * sign


def _assert_close(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max|expected| (relative to the reference's scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would prove nothing"
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e}"


def _check_against_reference(backend, new, old, *, scales, reduction, upstream):
    leaf = new.detach().clone().requires_grad_()
    loss = isf.local_pod(leaf, old, scales=scales, reduction=reduction, backend=backend)
    assert loss.dtype == (torch.float64 if new.dtype == torch.float64 else torch.float32)
    ref_leaf = new.detach().cpu().double().requires_grad_()
    ref_loss = reference.local_pod(ref_leaf, old.cpu().double(), scales=scales, reduction=reduction)
    rtol = RTOL[new.dtype]
    _assert_close(loss, ref_loss, rtol, "loss")
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (ref_loss * upstream).sum().backward()
    assert leaf.grad.dtype == new.dtype
    _assert_close(leaf.grad, ref_leaf.grad, rtol, "d loss / d new")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference(generator, backend, dtype, reduction):
    device = device_for(backend)
    shape = _shape(backend, (3, 7, 19, 23))
    new, old = _randn(generator, shape, dtype, device), _randn(generator, shape, dtype, device)
    upstream = _upstream(generator, reduction, shape[0])
    _check_against_reference(backend, new, old, scales=(1, 2, 4), reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("scales", [(3,), (2, 1, 5), (1, 1)], ids=str)
def test_backend_matches_reference_at_other_scales(generator, backend, scales):
    device = device_for(backend)
    shape = _shape(backend, (2, 5, 13, 11))
    new, old = _randn(generator, shape, torch.float32, device), _randn(generator, shape, torch.float32, device)
    upstream = _upstream(generator, "mean", shape[0])
    _check_against_reference(backend, new, old, scales=scales, reduction="mean", upstream=upstream)


@pytest.mark.parametrize(
    ("shape", "scales"),
    [((2, 3, 1, 9), (1,)), ((2, 3, 7, 1), (1,)), ((2, 3, 5, 6), (5, 1)), ((2, 3, 6, 7), (6, 4, 3))],
    ids=str,
)
def test_backend_matches_reference_on_thin_maps_and_one_pixel_cells(generator, backend, shape, scales):
    """Single rows or columns, and cells of one pixel beside coarser ones: the CPU's row and column
    segments at their extremes (one segment per axis; one per pixel)."""
    device = device_for(backend)
    new, old = _randn(generator, shape, torch.float32, device), _randn(generator, shape, torch.float32, device)
    upstream = _upstream(generator, "none", shape[0])
    _check_against_reference(backend, new, old, scales=scales, reduction="none", upstream=upstream)


def test_backend_merges_new_logits_like_the_reference(generator, backend):
    device = device_for(backend)
    batch, _, height, width = _shape(backend, (2, 9, 11, 13))
    new = _randn(generator, (batch, 6, height, width), torch.float32, device)
    old = _randn(generator, (batch, 4, height, width), torch.float32, device)
    _check_against_reference(
        backend, new, old, scales=(1, 2, 4), reduction="mean", upstream=_upstream(generator, "mean", batch)
    )


def test_backend_keeps_the_digits_of_nearly_equal_features(generator, backend):
    """At the start of a step the new model is a copy of the old one: P is a small difference of
    large squares, which the kernels form as (new - old)(new + old)."""
    device = device_for(backend)
    shape = _shape(backend, (2, 5, 13, 11))
    old = (10 * _randn(generator, shape)).float()
    new = (old.double() + 1e-3 * _randn(generator, shape)).float()
    _check_against_reference(
        backend,
        new.to(device),
        old.to(device),
        scales=(1, 2, 4),
        reduction="sum",
        upstream=_upstream(generator, "sum", shape[0]),
    )


def test_backend_gives_zero_loss_and_gradient_for_identical_features(generator, backend):
    device = device_for(backend)
    shape = _shape(backend, (2, 5, 9, 11))
    old = _randn(generator, shape, torch.float32, device)
    new = old.clone().requires_grad_()
    loss = isf.local_pod(new, old, backend=backend)
    loss.backward()
    assert loss.item() == 0
    assert torch.equal(new.grad, torch.zeros_like(new))


def test_backend_is_deterministic(generator, backend):
    device = device_for(backend)
    shape = _shape(backend, (3, 7, 13, 11))
    new, old = _randn(generator, shape, torch.float32, device), _randn(generator, shape, torch.float32, device)
    results = []
    for _ in range(2):
        leaf = new.clone().requires_grad_()
        loss = isf.local_pod(leaf, old, backend=backend)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_backend_reads_non_contiguous_features(generator, backend):
    device = device_for(backend)
    shape = _shape(backend, (2, 5, 13, 11))
    new = _randn(generator, shape, torch.float32, device).contiguous(memory_format=torch.channels_last)
    old = _randn(generator, (shape[0], shape[1], shape[3], shape[2]), torch.float32, device).transpose(2, 3)
    _check_against_reference(
        backend, new, old, scales=(1, 2, 4), reduction="mean", upstream=_upstream(generator, "mean", shape[0])
    )


def test_cpu_result_does_not_depend_on_the_thread_count(generator):
    if "cpu" not in isf.available_backends():
        pytest.skip("the cpu backend is not built")
    new, old = _randn(generator, (4, 16, 21, 19), torch.float32), _randn(generator, (4, 16, 21, 19), torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaf = new.clone().requires_grad_()
            loss = isf.local_pod(leaf, old, backend="cpu")
            loss.backward()
            results.append((loss.detach(), leaf.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_result_is_the_same_in_every_isa_copy(generator):
    """The lane sums keep one order in every copy: the vectorised copies give the scalar one's bits."""
    if "cpu" not in isf.available_backends():
        pytest.skip("the cpu backend is not built")
    new, old = _randn(generator, (2, 6, 37, 29), torch.float32), _randn(generator, (2, 6, 37, 29), torch.float32)
    results = []
    for isa in cpu_isa.supported_cpu_isas():
        with cpu_isa.cpu_isa_cap(isa):
            leaf = new.clone().requires_grad_()
            loss = isf.local_pod(leaf, old, scales=(1, 2, 4, 3), backend="cpu")
            loss.backward()
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("backend_name", ["cpu", "cuda_emulator"])
def test_many_channels_span_several_thread_blocks_per_image(generator, backend_name):
    """C·H and C·W above a CUDA block's 256 threads: each image's per-warp partials come from several blocks."""
    reason = _backends.unavailable_reason(backend_name)
    if reason is not None:
        pytest.skip(reason)
    new, old = _randn(generator, (2, 61, 9, 11), torch.float32), _randn(generator, (2, 61, 9, 11), torch.float32)
    _check_against_reference(
        backend_name, new, old, scales=(1, 2, 4), reduction="none", upstream=_upstream(generator, "none", 2)
    )
