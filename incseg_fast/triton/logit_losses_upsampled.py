"""The Triton backward of the logit losses with ``size=`` (MATH.md#upsampling): dL/dx at x's own resolution.

The forward needs no kernel of its own: logit_losses.py's forward kernel with ``UPSAMPLE`` interpolates
every logit of x and y from its four low-resolution samples where it reads it (logit_math's
``sample``) and saves the per-pixel statistics at the output resolution, as without ``size=``.

The backward is a gather. x_up = U x channel by channel, U the separable bilinear upsampling:
x_up[c, Y, X] = sum_{i, j} R[Y, i] K[X, j] x[c, i, j] with the tap weights R (rows) and K (columns) of
F.interpolate (csrc/common/upsample.h). So dL/dx = U^T dL/dx_up:

    dL/dx[c, i, j] = sum_{Y, X} R[Y, i] K[X, j] G[c, Y, X],    G[c, p] = dL/dx_up[c, p],

and G at output pixel p is the per-pixel gradient of MATH.md#logit-backward taken at x_up[:, p] and
y_up[:, p]: per channel a function of p's saved statistics, label, mask and upstream gradients, of
x_up[c, p] and (c < Co) y_up[c, p] only (logit_math's ``pixel_gradient_factors``, ``channel_grad``
and ``teacher_term``, shared with the backward without ``size=``). R[Y, i] is nonzero only for the
rows Y whose taps read row i: in exact arithmetic they lie in [first, first + readers)
(``first_reader``, ``readers`` in logit_math.py), likewise K. (A tap rounded across a sample boundary can read i
with a weight of the order of the coordinate's rounding error from just outside that window; such a
weight is dropped, an error of the order of the one the rounded taps already make.)

A program owns BLOCK_E consecutive elements (i, j) of x's plane and BLOCK_C channels of one image;
its lanes are (element, column step) pairs, COLS = next_pow2(column readers) lanes per element, so
one step of its loop covers every output column that reads its elements, in one output row. It
walks the rows that read its elements in increasing order, rebuilds each pixel's coefficients once
for its channels, interpolates x_up and y_up from four samples, and adds R K G into a
(channel, lane) accumulator, masked where the weight is 0; at the end it sums each element's lanes.
Fixed order, no atomics: the same result run to run, and nothing of the output's size besides the
saved statistics. Every output pixel is visited by the (up to 2 x 2) elements its taps read, each
recomputing G there: the price of a gather that keeps no full-resolution gradient.
"""

import torch
import triton
import triton.language as tl

from . import _launch
from .logit_math import (
    channel_grad,
    first_reader,
    pixel_gradient_factors,
    readers,
    sample,
    tap,
    tap_weight,
    teacher_term,
)

__all__ = ["upsampled_backward"]

# Lanes (element x column step) and channels per program. On a GPU: 8 channels x 128 lanes, 4 warps
# (one lane, 8 values per thread per visited row; 256 lanes spilled registers). Not tuned on
# hardware (no GPU was available; see docs/TRITON.md). Under the interpreter, wider tiles: fewer,
# larger numpy steps.
GPU_BLOCK_C = 8
GPU_LANES = 128
GPU_NUM_WARPS = 4
INTERPRETER_LANES = 512


@triton.jit
def _upsampled_bwd_kernel(
    x_ptr,  # (B, C, x_h, x_w)
    target_ptr,
    y_ptr,  # (B, Co, y_h, y_w)
    log_gamma_ptr,
    mask_ptr,  # the forward's inputs; target and mask (B, out_h, out_w)
    stats_ptr,  # (B, 4, out_h, out_w) the forward's statistics
    count_ptr,  # 0-dim int64: non-ignored pixels
    grad_ce_ptr,
    grad_kd_ptr,  # upstream gradients: (B, out_h, out_w) maps (PER_PIXEL) or 0-dim
    grad_x_ptr,  # out: (B, C, x_h, x_w) dL/dx in x's dtype
    C,
    Co,
    out_h,
    out_w,
    x_h,
    x_w,
    y_h,
    y_w,
    row_readers,
    col_readers,  # readers(x_h, out_h), readers(x_w, out_w) <= COLS
    alpha_high,
    alpha_low,
    ignore_index,
    kd_divisor,
    CE: tl.constexpr,
    KD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    MEAN: tl.constexpr,
    ACC: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COLS: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    first_element = tl.program_id(0).to(tl.int64) * BLOCK_E
    x_plane = x_h * x_w
    y_plane = y_h * y_w
    HW = out_h * out_w
    # Lane l: element q = first_element + l // COLS, column step l % COLS.
    lane = tl.arange(0, BLOCK_E * COLS)
    q = first_element + lane // COLS
    in_plane = q < x_plane
    i = q // x_w
    j = q % x_w
    col = first_reader(j, x_w, out_w) + lane % COLS
    x_cols = tap(col, x_w, out_w, ACC)
    y_cols = tap(col, y_w, out_w, ACC)
    col_weight = tap_weight(x_cols, j)
    col_on = in_plane & (lane % COLS < col_readers) & (col < out_w) & (col_weight != 0.0)
    first_row = first_reader(i, x_h, out_h)

    c = c0 + tl.arange(0, BLOCK_C)
    channel_lane = (c < C)[:, None]
    # Plain KD distils all Co channels; UNKD/BKD distil channels 1..Co-1 (channel 0 is in coef_bg).
    first_teacher_channel = 0 if KD == "plain" else 1
    teacher_lane = ((c >= first_teacher_channel) & (c < Co))[:, None]
    alpha = tl.cast(alpha_high, ACC) + tl.cast(alpha_low, ACC)
    # The forward's inputs and statistics, and the upstream gradients with their "mean" divisors.
    inputs = (target_ptr, log_gamma_ptr, mask_ptr, stats_ptr, HW, Co, alpha, ignore_index)
    upstream = (grad_ce_ptr, grad_kd_ptr, count_ptr, kd_divisor)
    x_image = x_ptr + b * C * x_plane
    y_image = y_ptr + b * Co * y_plane
    total = tl.zeros([BLOCK_C, BLOCK_E * COLS], dtype=ACC)

    for row_step in range(0, row_readers):
        row = first_row + row_step
        x_rows = tap(row, x_h, out_h, ACC)
        x_taps = (x_rows, x_cols, x_w)
        y_taps = (tap(row, y_h, out_h, ACC), y_cols, y_w)
        row_weight = tap_weight(x_rows, i)
        on = col_on & (row < out_h) & (row_weight != 0.0)
        p = row * out_w + col
        x_0 = sample(x_image, on, p, x_taps, True, ACC)
        y_0 = x_0  # unread unless UNKD/BKD
        if KD == "unbiased" or KD == "balanced":
            y_0 = sample(y_image, on, p, y_taps, True, ACC)
        factors, teacher = pixel_gradient_factors(
            p, on, b, x_0, y_0, inputs, upstream, CE, KD, HAS_MASK, PER_PIXEL, MEAN, ACC
        )
        tile_on = channel_lane & on[None, :]
        xs = sample(x_image + c[:, None] * x_plane, tile_on, p[None, :], x_taps, True, ACC)
        grad = channel_grad(xs, c, Co, factors, CE, KD, NEG)
        if KD != "none":
            if c0 < Co:
                ys = sample(y_image + c[:, None] * y_plane, teacher_lane & on[None, :], p[None, :], y_taps, True, ACC)
                grad -= teacher_term(ys, alpha, teacher, teacher_lane)
        total += tl.where(tile_on, (row_weight * col_weight)[None, :] * grad, 0.0)

    per_element = tl.sum(tl.reshape(total, [BLOCK_C, BLOCK_E, COLS]), axis=2)
    element = first_element + tl.arange(0, BLOCK_E)
    tl.store(
        grad_x_ptr + (b * C + c[:, None]) * x_plane + element[None, :],
        per_element.to(grad_x_ptr.dtype.element_ty),
        mask=channel_lane & (element < x_plane)[None, :],
    )


def tiles(channels, cols, dtype):
    """(BLOCK_C, BLOCK_E, num_warps) of the gather for COLS = ``cols`` lanes per element."""
    if _launch.interpreter():
        block_c, lanes, num_warps = _launch.INTERPRETER_BLOCK_C, INTERPRETER_LANES, 1
    else:
        block_c, lanes, num_warps = GPU_BLOCK_C, GPU_LANES, GPU_NUM_WARPS
        if dtype == torch.float64:
            lanes //= 2
    return min(block_c, triton.next_power_of_2(channels)), max(1, lanes // cols), num_warps


def upsampled_backward(
    grad_ce,
    grad_kd,
    x,
    target,
    y,
    log_gamma,
    mask,
    stats,
    valid_count,
    *,
    old_classes,
    ce,
    kd,
    alpha,
    ignore_index,
    reduction,
    out_size,
):
    """dL/dx (B, C, h, w) for the losses of x and y upsampled to out_size; the arguments are those of
    logit_losses.logit_losses_bwd, checked and contiguous there."""
    B, C, h, w = x.shape
    H, W = out_size
    y_h, y_w = (h, w) if y is None else y.shape[2:]
    acc_torch, acc_tl = _launch.accumulator_dtype(x.dtype)
    col_readers = readers(w, W)
    cols = triton.next_power_of_2(col_readers)
    block_c, block_e, num_warps = tiles(C, cols, x.dtype)
    grid = (triton.cdiv(h * w, block_e), triton.cdiv(C, block_c), B)
    grad_x = torch.empty_like(x)
    _upsampled_bwd_kernel[grid](
        x,
        x if target is None else target,
        x if y is None else y,
        x if log_gamma is None else log_gamma,
        x if mask is None else mask,
        stats,
        valid_count,
        grad_ce,
        grad_kd,
        grad_x,
        C,
        old_classes,
        H,
        W,
        h,
        w,
        y_h,
        y_w,
        readers(h, H),
        col_readers,
        *_launch.split_float(alpha),
        int(ignore_index),
        B * H * W if reduction == "mean" else 1,
        CE=ce,
        KD=kd,
        HAS_MASK=mask is not None,
        PER_PIXEL=reduction == "none",
        MEAN=reduction == "mean",
        ACC=acc_tl,
        NEG=_launch.lowest(acc_torch),
        BLOCK_C=block_c,
        BLOCK_E=block_e,
        COLS=cols,
        num_warps=num_warps,
        enable_fp_fusion=_launch.FP_FUSION,
    )
    return grad_x
