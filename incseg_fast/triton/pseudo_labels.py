"""Triton kernels of PLOP's entropy pseudo-labels (MATH.md#pseudo-labels): the kernels of the ops
incseg_fast_triton::entropy_pseudo_labels and entropy_histogram (schemas in csrc/ops.cpp, fake kernels
in incseg_fast/ops/pseudo_labels.py).

A program owns BLOCK_P pixels of one image (grid: pixel blocks, B) and streams their Co logits once,
channel by channel, keeping per pixel the running maximum and its channel, Z = Σ e^(v - max) and
S = Σ e^(v - max) (v - max), so that H = log Z - S / Z (MATH.md#pseudo-kernels, the arithmetic of
csrc/common/pseudo_math.h). With size= each logit is interpolated from y's four taps
(MATH.md#upsampling). The labels kernel writes one (confident, background) count pair per program,
which torch adds per image; the histogram kernel adds 1 per background pixel with an integer
atomic (integer sums do not depend on the order).
"""

import math

import torch
import triton
import triton.language as tl

from . import _launch

__all__ = ["entropy_pseudo_labels", "entropy_pseudo_labels_", "entropy_histogram"]


@triton.jit
def _tap(d, n_in, n_out, ACC: tl.constexpr):
    """common/upsample.h's tap of output indices d: (i0, i1, weight of i1), coordinates in ACC."""
    scale = tl.cast(n_in, ACC) / tl.cast(n_out, ACC)  # tl.cast: an argument equal to 1 is a constexpr
    s = tl.maximum(scale * (d.to(ACC) + 0.5) - 0.5, 0.0)
    i0 = s.to(tl.int64)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, s - i0.to(ACC)


@triton.jit
def _logit(y_ptr, plane, c, p, in_image, r0, r1, rl, q0, q1, ql, yw, HW, UPSAMPLE: tl.constexpr, ACC: tl.constexpr):
    """Channel c of the pixels p: y itself, or its bilinear upsampling (upsample::bilinear's order)."""
    if UPSAMPLE:
        base = y_ptr + c * plane
        v00 = tl.load(base + r0 * yw + q0, mask=in_image, other=0.0).to(ACC)
        v01 = tl.load(base + r0 * yw + q1, mask=in_image, other=0.0).to(ACC)
        v10 = tl.load(base + r1 * yw + q0, mask=in_image, other=0.0).to(ACC)
        v11 = tl.load(base + r1 * yw + q1, mask=in_image, other=0.0).to(ACC)
        top = (1.0 - ql) * v00 + ql * v01
        bottom = (1.0 - ql) * v10 + ql * v11
        return (1.0 - rl) * top + rl * bottom
    else:
        return tl.load(y_ptr + c * HW + p, mask=in_image, other=0.0).to(ACC)


@triton.jit
def _pixel_entropy(
    y_ptr, b, p, in_image, Co, H, W, yh, yw, inv_log_hi, inv_log_lo, UPSAMPLE: tl.constexpr, ACC: tl.constexpr
):
    """(u, k̂) of the pixels p of image b: one streaming pass over the Co channels."""
    HW = H * W
    if UPSAMPLE:
        plane = yh * yw
        r0, r1, rl = _tap(p // W, yh, H, ACC)
        q0, q1, ql = _tap(p % W, yw, W, ACC)
    else:
        plane = HW
        r0, r1, rl, q0, q1, ql = p, p, 0.0, p, p, 0.0
    image = y_ptr + b * Co * plane
    m = _logit(image, plane, 0, p, in_image, r0, r1, rl, q0, q1, ql, yw, HW, UPSAMPLE, ACC)
    z = tl.full(m.shape, 1.0, ACC)
    s = tl.zeros(m.shape, ACC)
    k = tl.zeros(m.shape, tl.int32)
    for c in range(1, Co):
        v = _logit(image, plane, c, p, in_image, r0, r1, rl, q0, q1, ql, yw, HW, UPSAMPLE, ACC)
        raised = (v > m) | (v != v)
        e = tl.exp(tl.where(raised, m - v, v - m))
        e = tl.where(v == m, 1.0, e)
        rescale = tl.where(raised, e, 1.0)
        term = tl.where(raised, 1.0, e)
        # Gaps floored at -1e4: a -inf logit adds 0 (MATH.md#pseudo-kernels).
        shift = tl.where(raised, tl.maximum(m - v, -1e4), 0.0)
        gap = tl.where(raised, 0.0, tl.maximum(v - m, -1e4))
        s = rescale * (s + shift * z) + term * gap
        z = rescale * z + term
        k = tl.where(raised, c, k)
        m = tl.where(raised, v, m)
    inv_log_classes = tl.cast(inv_log_hi, ACC) + tl.cast(inv_log_lo, ACC)
    return (tl.log(z) - s / z) * inv_log_classes, k


@triton.jit
def _pseudo_labels_kernel(
    y_ptr,
    labels_ptr,
    thresholds_ptr,
    out_ptr,
    counts_ptr,
    Co,
    H,
    W,
    yh,
    yw,
    inv_log_hi,
    inv_log_lo,
    ignore_index,
    UPSAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    in_image = p < HW
    label = tl.load(labels_ptr + b * HW + p, mask=in_image, other=0).to(tl.int64)
    background = in_image & (label < Co) & (label != ignore_index)
    u, k = _pixel_entropy(y_ptr, b, p, background, Co, H, W, yh, yw, inv_log_hi, inv_log_lo, UPSAMPLE, ACC)
    threshold = tl.load(thresholds_ptr + k, mask=background, other=0.0).to(ACC)
    confident = background & (u < threshold)
    new_label = tl.where(background, tl.where(confident, k.to(tl.int64), ignore_index), label)
    tl.store(out_ptr + b * HW + p, new_label, mask=in_image)
    counts = counts_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * 2
    tl.store(counts, tl.sum(confident.to(tl.int32), axis=0))
    tl.store(counts + 1, tl.sum(background.to(tl.int32), axis=0))


@triton.jit
def _entropy_histogram_kernel(
    y_ptr,
    labels_ptr,
    histogram_ptr,
    Co,
    H,
    W,
    yh,
    yw,
    inv_log_hi,
    inv_log_lo,
    ignore_index,
    bins,
    UPSAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    in_image = p < HW
    label = tl.load(labels_ptr + b * HW + p, mask=in_image, other=0).to(tl.int64)
    background = in_image & (label < Co) & (label != ignore_index)
    u, k = _pixel_entropy(y_ptr, b, p, background, Co, H, W, yh, yw, inv_log_hi, inv_log_lo, UPSAMPLE, ACC)
    # min(floor(u * bins), bins - 1), 0 below 0 or for NaN (pseudo_math.h's entropy_bin)
    scaled = u * tl.cast(bins, ACC)
    bin_index = tl.where(scaled > 0.0, tl.minimum(scaled, tl.cast(bins - 1, ACC)).to(tl.int64), 0)
    tl.atomic_add(histogram_ptr + k.to(tl.int64) * bins + bin_index, 1, mask=background)


def _check(y, labels):
    _launch.check_device(y, labels)
    if y.dim() != 4 or y.shape[1] < 1:
        raise ValueError(f"y must be (B, Co, h, w) with Co >= 1, got {tuple(y.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"labels must be int64, int32 or uint8, got {labels.dtype}")


def _geometry(y, labels, size):
    """(grid, kernel arguments from Co to inv_log_lo, meta) for y and (B, H, W) labels."""
    B, Co, yh, yw = y.shape
    H, W = (yh, yw) if size is None else size
    if labels.shape != (B, H, W):
        raise ValueError(f"labels must be (B, H, W) = {(B, H, W)}, got {tuple(labels.shape)}")
    if size is not None and not (1 <= yh <= H and 1 <= yw <= W):
        raise ValueError(f"size={list(size)} must be at least y's resolution {(yh, yw)} (no downsampling)")
    if size is None:
        _, block_p, num_warps = _launch.tiles(1, H * W, B, y.dtype, y.device)
    else:
        _, block_p, num_warps = _launch.gather_tiles(1, H * W)
    _, acc_tl = _launch.accumulator_dtype(y.dtype)
    inv_log_hi, inv_log_lo = _launch.split_float(1 / math.log(Co) if Co > 1 else 0.0)
    grid = (triton.cdiv(H * W, block_p), B)
    meta = dict(
        UPSAMPLE=size is not None, ACC=acc_tl, BLOCK_P=block_p, num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION
    )
    return grid, (Co, H, W, yh, yw, inv_log_hi, inv_log_lo), meta


def _pseudo_labels_into(y, labels, thresholds, out, *, ignore_index, size):
    """The pseudo-labels into out (int64, contiguous; may be labels itself: each program loads its
    pixels' labels before it stores theirs); returns the adaptive factor."""
    if thresholds.shape != (y.shape[1],) or thresholds.dtype != torch.float32:
        raise ValueError(
            f"thresholds must be float32 (Co,) = ({y.shape[1]},), got {thresholds.dtype} {tuple(thresholds.shape)}"
        )
    acc_torch, _ = _launch.accumulator_dtype(y.dtype)
    grid, args, meta = _geometry(y, labels, size)
    counts = torch.zeros((grid[1], grid[0], 2), dtype=torch.int32, device=labels.device)
    if out.numel() > 0:
        thresholds = thresholds.to(acc_torch).contiguous()
        _pseudo_labels_kernel[grid](y, labels, thresholds, out, counts, *args, ignore_index, **meta)
    per_image = counts.sum(dim=1, dtype=torch.int64).double()
    return (per_image[:, 0] / (per_image[:, 1] + 1e-6)).float()


def entropy_pseudo_labels(y, labels, thresholds, *, ignore_index, size=None):
    """The kernel of incseg_fast_triton::entropy_pseudo_labels: (new labels int64, adaptive factor float32)."""
    _check(y, labels)
    y, labels = y.contiguous(), labels.contiguous()
    out = torch.empty(labels.shape, dtype=torch.int64, device=labels.device)
    return out, _pseudo_labels_into(y, labels, thresholds, out, ignore_index=ignore_index, size=size)


def entropy_pseudo_labels_(y, labels, thresholds, *, ignore_index, size=None):
    """The kernel of incseg_fast_triton::entropy_pseudo_labels_: the new labels written into labels
    (int64, contiguous); returns the adaptive factor."""
    _check(y, labels)
    if labels.dtype != torch.int64 or not labels.is_contiguous():
        raise ValueError(f"labels must be int64 and contiguous to take the pseudo-labels in place, got {labels.dtype}")
    return _pseudo_labels_into(y.contiguous(), labels, thresholds, labels, ignore_index=ignore_index, size=size)


def entropy_histogram(y, labels, *, bins, ignore_index, size=None):
    """The kernel of incseg_fast_triton::entropy_histogram: int64 (Co, bins) counts."""
    _check(y, labels)
    if labels.numel() >= 2**31:
        raise ValueError(
            f"the triton histogram counts in int32: at most 2^31 - 1 pixels per call, got {labels.numel()}"
        )
    y, labels = y.contiguous(), labels.contiguous()
    grid, args, meta = _geometry(y, labels, size)
    histogram = torch.zeros((y.shape[1], bins), dtype=torch.int32, device=labels.device)
    if labels.numel() > 0:
        _entropy_histogram_kernel[grid](y, labels, histogram, *args, ignore_index, bins, **meta)
    return histogram.to(torch.int64)
