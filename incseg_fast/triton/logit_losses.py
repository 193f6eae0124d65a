"""Triton kernels for the logit losses of MATH.md#logit-losses (UNCE / CE and KD / UNKD / BKD), fused.

One forward pass reads x, y and t once and writes the two loss terms (per-pixel maps, or one
partial sum per program that a one-program kernel adds up in a fixed order) plus the per-pixel
statistics the backward needs, (B, 4, H, W) = lse, lse_old, lse_bg, lse_teacher as every backend
saves them (csrc/ops.cpp). One backward pass reads x, y, t and those statistics once and writes
dL/dx once, combining both upstream gradients. No logits-sized temporary is created. The gradient
derivations are written beside the kernels.

With ``size=`` (MATH.md#upsampling) the forward interpolates every logit of x and y it reads from its
four low-resolution samples (``UPSAMPLE``, ``_tap``, ``_sample``) and saves the statistics at the
output resolution; the backward is the gather of logit_losses_upsampled.py, which shares this
backward's per-pixel factors (``_pixel_gradient_factors``) and channel tiles (``_channel_grad``).

The launchers below are the kernels of the ops ``incseg_fast_triton::logit_losses_fwd`` and
``logit_losses_bwd`` (schemas in csrc/ops.cpp, fake kernels and autograd in incseg_fast/ops).
"""

import struct

import torch
import triton
import triton.language as tl

from ..ops.logit_losses import NUM_STATS
from ..vocabulary import CE_MODES, KD_MODES, REDUCTIONS
from . import _launch

__all__ = ["logit_losses_fwd", "logit_losses_bwd"]

# Rows of the saved statistics (B, NUM_STATS, H, W), as in csrc/common/logit_math.h.
_NUM_STATS = tl.constexpr(NUM_STATS)
_STAT_LSE, _STAT_LSE_OLD, _STAT_LSE_BG, _STAT_LSE_TEACHER = (tl.constexpr(row) for row in range(NUM_STATS))


@triton.jit
def _logaddexp(a, b):
    # NaN-propagating max/min: the default ones return the other operand, which would turn a NaN
    # logit into a finite loss (RELIABILITY.md#numerics).
    high = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    low = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
    return high + tl.log(1.0 + tl.exp(low - high))


@triton.jit
def _ratio(n, d, ACC: tl.constexpr):
    """n / d correctly rounded in ACC (Triton's float32 `/` on a GPU is approximate)."""
    if ACC == tl.float64:
        ratio = n.to(tl.float64) / d.to(tl.float64)
    else:
        ratio = tl.math.div_rn(n.to(tl.float32), d.to(tl.float32))
    return ratio


@triton.jit
def _tap(d, n_in, n_out, ACC: tl.constexpr):
    """The input samples i0, i1 and the weight l1 of i1 that output index d of n_out reads from n_in
    samples (F.interpolate, bilinear, align_corners=False; csrc/common/upsample.h's tap):
    s = max((d + 0.5) n_in / n_out - 0.5, 0), i0 = floor(s), i1 = min(i0 + 1, n_in - 1), l1 = s - i0,
    in ACC (float64 coordinates for float64 logits, as PyTorch's)."""
    s = tl.maximum(_ratio(n_in, n_out, ACC) * (d.to(ACC) + 0.5) - 0.5, 0.0)
    i0 = s.to(tl.int32)  # s >= 0: truncation is floor; int32 offsets within a plane (fewer registers)
    return i0, tl.minimum(i0 + 1, n_in - 1), s - i0.to(ACC)


@triton.jit
def _sample(planes, mask, p, row0, row1, row_l1, col0, col1, col_l1, width, UPSAMPLE: tl.constexpr, ACC: tl.constexpr):
    """The values at output pixels p of the channel planes starting at `planes`, in ACC: the planes'
    own pixels, or with UPSAMPLE their bilinear upsampling from the four samples (row0|row1, col0|col1)
    of planes `width` wide (csrc/common/upsample.h's bilinear, not rounded to the logits' dtype)."""
    if UPSAMPLE:
        top_left = tl.load(planes + (row0 * width + col0), mask=mask, other=0.0).to(ACC)
        top_right = tl.load(planes + (row0 * width + col1), mask=mask, other=0.0).to(ACC)
        bottom_left = tl.load(planes + (row1 * width + col0), mask=mask, other=0.0).to(ACC)
        bottom_right = tl.load(planes + (row1 * width + col1), mask=mask, other=0.0).to(ACC)
        top = (1.0 - col_l1) * top_left + col_l1 * top_right
        bottom = (1.0 - col_l1) * bottom_left + col_l1 * bottom_right
        values = (1.0 - row_l1) * top + row_l1 * bottom
    else:
        values = tl.load(planes + p, mask=mask, other=0.0).to(ACC)
    return values


# Forward, per pixel (b, p). The channels split into old = [0, Co) and new = [Co, C); each has its own
# online logsumexp (running max and rescaled sum), so every logit costs one exp, taken against the
# max of its own set (no underflow of one set against the other's max):
#   lse_old = logsumexp_old x,  lse_new = logsumexp_new x (-inf when Co == C),
#   lse = logaddexp(lse_old, lse_new),  lse_bg = logaddexp(x_0, lse_new)   (bgset = {0} U new).
# Teacher: lse_t = logsumexp_{c<Co} alpha y_c and W = sum_{1<=c<Co} exp(alpha y_c - lse_t) x_c, W
# accumulated against the teacher's running max and rescaled with it (q is never materialised);
# q_0 = exp(alpha y_0 - lse_t). Then, since sum_c q_c = 1:
#   UNCE = lse - (t < Co ? lse_old : x_t);  CE = lse - x_t;  both 0 where t == ignore_index
#   KD   = -(q_0 x_0 + W - lse_old) / Co
#   UNKD/BKD = -(gamma q_0 (lse_bg - lse) + W - (1 - q_0) lse) / Co   (gamma = 1 for UNKD)
# KD terms are multiplied by the mask.
@triton.jit
def _logit_losses_fwd_kernel(
    x_ptr,  # (B, C, x_h, x_w) logits
    target_ptr,  # (B, HW) labels (any int dtype); unread when CE == "none"
    y_ptr,  # (B, Co, y_h, y_w) teacher logits; unread when KD == "none"
    gamma_ptr,  # (B,) balanced-KD weight; read only when KD == "balanced"
    mask_ptr,  # (B, HW) distillation weight; read only when HAS_MASK
    ce_ptr,
    kd_ptr,  # out: per-pixel maps (PER_PIXEL) or one partial sum per program
    count_ptr,  # out: non-ignored pixels per program (int32)
    stats_ptr,  # out: (B, 4, HW) lse, lse_old, lse_bg, lse_teacher (0 when KD == "none")
    C,
    Co,
    HW,
    out_h,
    out_w,  # the output's H, W (HW = H * W: labels, mask, statistics and maps)
    x_h,
    x_w,
    y_h,
    y_w,  # x's and y's own resolutions: H, W each, or smaller with UPSAMPLE
    alpha_high,
    alpha_low,
    ignore_index,
    CE: tl.constexpr,
    KD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    UPSAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = p < HW
    pix = b * HW + p
    ch = tl.arange(0, BLOCK_C)
    zeros = tl.zeros([BLOCK_P], dtype=ACC)
    alpha = tl.cast(alpha_high, ACC) + tl.cast(alpha_low, ACC)
    # With UPSAMPLE each pixel's logits are interpolated from four samples (_sample): the taps of its
    # row and column into x's and y's planes, once per program. Without, the planes are HW pixels (an
    # argument Triton specialises when divisible by 16, which lets the loads vectorise).
    if UPSAMPLE:
        x_plane = x_h * x_w
        y_plane = y_h * y_w
        row = p // out_w
        col = p % out_w
        x_row0, x_row1, x_row_l1 = _tap(row, x_h, out_h, ACC)
        x_col0, x_col1, x_col_l1 = _tap(col, x_w, out_w, ACC)
        y_row0, y_row1, y_row_l1 = _tap(row, y_h, out_h, ACC)
        y_col0, y_col1, y_col_l1 = _tap(col, y_w, out_w, ACC)
    else:  # the taps are unused by _sample
        x_plane = HW
        y_plane = HW
        x_row0, x_row1, x_row_l1 = p, p, zeros
        x_col0, x_col1, x_col_l1 = p, p, zeros
        y_row0, y_row1, y_row_l1 = p, p, zeros
        y_col0, y_col1, y_col_l1 = p, p, zeros

    max_old = zeros + NEG
    sum_old = zeros
    max_new = zeros + NEG
    sum_new = zeros
    max_teacher = zeros + NEG
    sum_teacher = zeros
    weighted_x = zeros  # sum_{1<=c<Co} exp(alpha y_c - max_teacher) x_c
    x_target = zeros

    if CE != "none":
        target = tl.load(target_ptr + pix, mask=in_image, other=ignore_index).to(tl.int64)
        valid = in_image & (target != ignore_index)
    else:
        target = tl.zeros([BLOCK_P], dtype=tl.int64)
        valid = tl.zeros([BLOCK_P], dtype=tl.int1)

    for c0 in range(0, C, BLOCK_C):
        c = c0 + ch
        # Channel-only lane masks: out-of-image pixels load as 0 and give finite, unused statistics.
        old_lane = (c < Co)[:, None]
        new_lane = ((c >= Co) & (c < C))[:, None]
        xs = _sample(
            x_ptr + (b * C + c[:, None]) * x_plane,
            (c < C)[:, None] & in_image[None, :],
            p[None, :],
            x_row0,
            x_row1,
            x_row_l1,
            x_col0,
            x_col1,
            x_col_l1,
            x_w,
            UPSAMPLE,
            ACC,
        )
        new_max_old = tl.maximum(max_old, tl.max(tl.where(old_lane, xs, NEG), axis=0))
        new_max_new = tl.maximum(max_new, tl.max(tl.where(new_lane, xs, NEG), axis=0))
        shifted = tl.where(old_lane, xs - new_max_old[None, :], tl.where(new_lane, xs - new_max_new[None, :], NEG))
        e = tl.exp(shifted)  # 0 on lanes beyond C
        sum_old = sum_old * tl.exp(max_old - new_max_old) + tl.sum(tl.where(old_lane, e, 0.0), axis=0)
        sum_new = sum_new * tl.exp(max_new - new_max_new) + tl.sum(tl.where(new_lane, e, 0.0), axis=0)
        max_old = new_max_old
        max_new = new_max_new
        if CE != "none":
            x_target += tl.sum(tl.where(c[:, None] == target[None, :], xs, 0.0), axis=0)
        if KD != "none":
            if c0 < Co:
                ys = _sample(
                    y_ptr + (b * Co + c[:, None]) * y_plane,
                    old_lane & in_image[None, :],
                    p[None, :],
                    y_row0,
                    y_row1,
                    y_row_l1,
                    y_col0,
                    y_col1,
                    y_col_l1,
                    y_w,
                    UPSAMPLE,
                    ACC,
                )
                scaled = tl.where(old_lane, alpha * ys, NEG)
                new_max = tl.maximum(max_teacher, tl.max(scaled, axis=0))
                rescale = tl.exp(max_teacher - new_max)
                e_teacher = tl.exp(scaled - new_max[None, :])  # 0 on lanes beyond Co
                sum_teacher = sum_teacher * rescale + tl.sum(e_teacher, axis=0)
                distilled = old_lane & (c >= 1)[:, None]  # lanes beyond Co may hold -inf logits: 0 * -inf
                weighted_x = weighted_x * rescale + tl.sum(tl.where(distilled, e_teacher * xs, 0.0), axis=0)
                max_teacher = new_max

    lse_old = max_old + tl.log(sum_old)
    # No new channel (C == Co, or all of them -inf) sums to exactly 0; a NaN sum (a NaN or +inf new
    # logit) must stay NaN, so the test is "== 0", never "> 0".
    no_new = sum_new == 0.0
    lse_new = tl.where(no_new, NEG, max_new + tl.log(tl.where(no_new, 1.0, sum_new)))
    lse = _logaddexp(lse_old, lse_new)

    ce_map = zeros
    if CE == "unbiased":
        ce_map = tl.where(valid, lse - tl.where(target < Co, lse_old, x_target), 0.0)
    elif CE == "plain":
        ce_map = tl.where(valid, lse - x_target, 0.0)

    x_0 = _sample(
        x_ptr + b * C * x_plane, in_image, p, x_row0, x_row1, x_row_l1, x_col0, x_col1, x_col_l1, x_w, UPSAMPLE, ACC
    )
    lse_bg = _logaddexp(x_0, lse_new)
    kd_map = zeros
    lse_teacher = zeros
    if KD != "none":
        y_0 = _sample(
            y_ptr + b * Co * y_plane,
            in_image,
            p,
            y_row0,
            y_row1,
            y_row_l1,
            y_col0,
            y_col1,
            y_col_l1,
            y_w,
            UPSAMPLE,
            ACC,
        )
        lse_teacher = max_teacher + tl.log(sum_teacher)
        q_0 = tl.exp(alpha * y_0 - lse_teacher)
        old_term = weighted_x / sum_teacher  # sum_{1<=c<Co} q_c x_c
        if KD == "plain":
            kd_map = -(q_0 * x_0 + old_term - lse_old) / Co
        else:
            gamma = 1.0
            if KD == "balanced":
                gamma = tl.load(gamma_ptr + b).to(ACC)
            kd_map = -(gamma * q_0 * (lse_bg - lse) + old_term - (1.0 - q_0) * lse) / Co
        if HAS_MASK:
            kd_map *= tl.load(mask_ptr + pix, mask=in_image, other=0.0).to(ACC)
        kd_map = tl.where(in_image, kd_map, 0.0)

    stats = stats_ptr + b * _NUM_STATS * HW + p
    tl.store(stats + _STAT_LSE * HW, lse, mask=in_image)
    tl.store(stats + _STAT_LSE_OLD * HW, lse_old, mask=in_image)
    tl.store(stats + _STAT_LSE_BG * HW, lse_bg, mask=in_image)
    tl.store(stats + _STAT_LSE_TEACHER * HW, lse_teacher, mask=in_image)

    if PER_PIXEL:
        tl.store(ce_ptr + pix, ce_map, mask=in_image)
        tl.store(kd_ptr + pix, kd_map, mask=in_image)
    else:
        part = b * tl.num_programs(0) + pid_p
        tl.store(ce_ptr + part, tl.sum(ce_map, axis=0))
        tl.store(kd_ptr + part, tl.sum(kd_map, axis=0))
    tl.store(count_ptr + b * tl.num_programs(0) + pid_p, tl.sum(valid.to(tl.int32), axis=0))


# Backward, per pixel, with e(s)_c = exp(x_c - s) (a softmax over the set whose lse is s):
#   d UNCE/dx_c = e(lse)_c - [t<Co][c<Co] e(lse_old)_c - [t>=Co][c==t]
#   d CE/dx_c   = e(lse)_c - [c==t]
#   d KD/dx_c   = (m/Co) [c<Co] (e(lse_old)_c - q_c)
#   d BKD/dx_c  = (m/Co) ((gamma q_0 + 1 - q_0) e(lse)_c - gamma q_0 [c in bg] e(lse_bg)_c - [1<=c<Co] q_c)
#                 (UNKD: gamma = 1, which is MATH.md#unkd's p_c - q_0 [c in bg] e(lse_bg)_c - [1<=c<Co] q_c)
# with q_c = exp(alpha y_c - lse_t). Scaled by the upstream gradients w_ce and w_kd (divided by the
# number of valid pixels, resp. B*H*W, for "mean"), dL/dx is a sum of per-pixel coefficients times
#   coef_p e(lse) + coef_old [c<Co] e(lse_old) + coef_bg [c in bg] e(lse_bg) - w_target [c==t] - w_kd' q_c.
# One exp per logit: e(lse)_c = e(s)_c exp(s - lse) for either s, so a lane 1 <= c < Co uses
# s = lse_old and a lane c >= Co uses s = lse_bg (both exps <= 1, nothing overflows); lane 0, in
# both sets, is computed per pixel from x_0.
@triton.jit
def _pixel_gradient_factors(
    stats,  # the pixels' saved statistics (row 0; rows are HW apart)
    HW,
    on,  # the pixels to compute (others load as 0 and give finite, unused factors)
    pix,  # b * HW + p
    b,
    x_0,
    y_0,  # the pixels' background logits (y_0: read only for UNKD/BKD)
    target_ptr,
    gamma_ptr,
    mask_ptr,
    count_ptr,
    grad_ce_ptr,
    grad_kd_ptr,
    Co,
    alpha,
    ignore_index,
    kd_divisor,
    CE: tl.constexpr,
    KD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    MEAN: tl.constexpr,
    NEED_LSE: tl.constexpr,
    NEED_OLD: tl.constexpr,
    NEED_BG: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per pixel: (target, w_target, w_teacher, lse_teacher, grad_0, shift_old, factor_old, shift_new,
    factor_new): channel 0's gradient, and the factor and shift such that the exp terms of a lane
    c >= 1 are factor * exp(x_c - shift) (old: c < Co, new: c >= Co); see _channel_grad."""
    zeros = tl.zeros(on.shape, dtype=ACC)
    # NEED_LSE: some term has coef_p; NEED_OLD: coef_old; NEED_BG: coef_bg (see _needed_statistics).
    lse = zeros
    lse_old = zeros
    lse_bg = zeros
    lse_teacher = zeros
    if NEED_LSE:
        lse = tl.load(stats + _STAT_LSE * HW, mask=on, other=0.0)
    if NEED_OLD:
        lse_old = tl.load(stats + _STAT_LSE_OLD * HW, mask=on, other=0.0)
    if NEED_BG:
        lse_bg = tl.load(stats + _STAT_LSE_BG * HW, mask=on, other=0.0)

    coef_p = zeros
    coef_old = zeros
    coef_bg = zeros
    w_target = zeros
    w_teacher = zeros
    target = tl.zeros(on.shape, dtype=tl.int64)

    if CE != "none":
        target = tl.load(target_ptr + pix, mask=on, other=ignore_index).to(tl.int64)
        valid = on & (target != ignore_index)
        if PER_PIXEL:
            w_ce = tl.load(grad_ce_ptr + pix, mask=on, other=0.0).to(ACC)
        else:
            w_ce = tl.load(grad_ce_ptr).to(ACC) + zeros
            if MEAN:
                w_ce = w_ce / tl.maximum(tl.load(count_ptr).to(ACC), 1.0)
        w_ce = tl.where(valid, w_ce, 0.0)
        coef_p += w_ce
        if CE == "unbiased":
            coef_old -= tl.where(target < Co, w_ce, 0.0)
            w_target = tl.where(target >= Co, w_ce, 0.0)
        else:
            w_target = w_ce

    if KD != "none":
        if PER_PIXEL:
            w_kd = tl.load(grad_kd_ptr + pix, mask=on, other=0.0).to(ACC)
        else:
            w_kd = tl.load(grad_kd_ptr).to(ACC) / kd_divisor + zeros
        w_kd = w_kd / Co
        if HAS_MASK:
            w_kd *= tl.load(mask_ptr + pix, mask=on, other=0.0).to(ACC)
        w_kd = tl.where(on, w_kd, 0.0)
        w_teacher = w_kd
        lse_teacher = tl.load(stats + _STAT_LSE_TEACHER * HW, mask=on, other=0.0)
        if KD == "plain":
            coef_old += w_kd
        else:
            gamma = 1.0
            if KD == "balanced":
                gamma = tl.load(gamma_ptr + b).to(ACC)
            q_0 = tl.exp(alpha * y_0 - lse_teacher)
            coef_p += w_kd * (gamma * q_0 + 1.0 - q_0)
            coef_bg = -w_kd * gamma * q_0

    grad_0 = zeros
    shift_old = lse
    factor_old = coef_old
    shift_new = lse
    factor_new = coef_p
    if NEED_LSE:
        grad_0 += coef_p * tl.exp(x_0 - lse)
    if NEED_OLD:
        grad_0 += coef_old * tl.exp(x_0 - lse_old)
        shift_old = lse_old
        if NEED_LSE:
            factor_old += coef_p * tl.exp(lse_old - lse)
    else:
        factor_old += coef_p
    if NEED_BG:
        grad_0 += coef_bg * tl.exp(x_0 - lse_bg)
        shift_new = lse_bg
        factor_new = coef_bg + coef_p * tl.exp(lse_bg - lse)
    return target, w_target, w_teacher, lse_teacher, grad_0, shift_old, factor_old, shift_new, factor_new


@triton.jit
def _channel_grad(
    xs,  # (channels, pixels) logits
    c,  # (channels,) their channel indices
    Co,
    target,
    w_target,
    grad_0,
    shift_old,
    factor_old,
    shift_new,
    factor_new,  # per pixel, from _pixel_gradient_factors
    CE: tl.constexpr,
    NEED_LSE: tl.constexpr,
    NEG: tl.constexpr,
):
    """dL/dx of a (channels, pixels) tile of logits, without the teacher term (-w_teacher q_c)."""
    old_lane = (c < Co)[:, None]
    if NEED_LSE:
        shifted = tl.where(old_lane, xs - shift_old[None, :], xs - shift_new[None, :])
        factor = tl.where(old_lane, factor_old[None, :], factor_new[None, :])
    else:  # plain KD alone: lanes >= Co get no gradient
        shifted = tl.where(old_lane, xs - shift_old[None, :], NEG)
        factor = factor_old[None, :]
    grad = tl.where((c == 0)[:, None], grad_0[None, :], factor * tl.exp(shifted))
    if CE != "none":
        grad -= tl.where(c[:, None] == target[None, :], w_target[None, :], 0.0)
    return grad


@triton.jit
def _logit_losses_bwd_kernel(
    x_ptr,
    target_ptr,
    y_ptr,
    gamma_ptr,
    mask_ptr,  # the forward's inputs (see the forward kernel)
    stats_ptr,  # (B, 4, HW) the forward's statistics; only the rows the modes need are read
    count_ptr,  # 0-dim int64: non-ignored pixels (the CE "mean" denominator, read on the device)
    grad_ce_ptr,
    grad_kd_ptr,  # upstream gradients: (B, HW) maps (PER_PIXEL) or 0-dim
    grad_x_ptr,  # out: (B, C, HW) dL/dx in x's dtype
    C,
    Co,
    HW,
    alpha_high,
    alpha_low,
    ignore_index,
    kd_divisor,
    CE: tl.constexpr,
    KD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    MEAN: tl.constexpr,
    NEED_LSE: tl.constexpr,
    NEED_OLD: tl.constexpr,
    NEED_BG: tl.constexpr,
    ACC: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_image = p < HW
    ch = tl.arange(0, BLOCK_C)
    alpha = tl.cast(alpha_high, ACC) + tl.cast(alpha_low, ACC)

    x_0 = tl.load(x_ptr + b * C * HW + p, mask=in_image, other=0.0).to(ACC)
    y_0 = x_0  # unread unless UNKD/BKD
    if KD == "unbiased" or KD == "balanced":
        y_0 = tl.load(y_ptr + b * Co * HW + p, mask=in_image, other=0.0).to(ACC)
    target, w_target, w_teacher, lse_teacher, grad_0, shift_old, factor_old, shift_new, factor_new = (
        _pixel_gradient_factors(
            stats_ptr + b * _NUM_STATS * HW + p,
            HW,
            in_image,
            b * HW + p,
            b,
            x_0,
            y_0,
            target_ptr,
            gamma_ptr,
            mask_ptr,
            count_ptr,
            grad_ce_ptr,
            grad_kd_ptr,
            Co,
            alpha,
            ignore_index,
            kd_divisor,
            CE,
            KD,
            HAS_MASK,
            PER_PIXEL,
            MEAN,
            NEED_LSE,
            NEED_OLD,
            NEED_BG,
            ACC,
        )
    )

    # Plain KD distils all Co channels; UNKD/BKD distil channels 1..Co-1 (channel 0 is in coef_bg).
    first_teacher_channel = 0 if KD == "plain" else 1
    for c0 in range(0, C, BLOCK_C):
        c = c0 + ch
        load_mask = (c < C)[:, None] & in_image[None, :]
        offsets = (b * C + c[:, None]) * HW + p[None, :]
        xs = tl.load(x_ptr + offsets, mask=load_mask, other=0.0).to(ACC)
        grad = _channel_grad(
            xs, c, Co, target, w_target, grad_0, shift_old, factor_old, shift_new, factor_new, CE, NEED_LSE, NEG
        )
        if KD != "none":
            if c0 < Co:
                in_teacher = ((c >= first_teacher_channel) & (c < Co))[:, None]
                ys = tl.load(
                    y_ptr + (b * Co + c[:, None]) * HW + p[None, :], mask=in_teacher & in_image[None, :], other=0.0
                ).to(ACC)
                q = tl.exp(alpha * ys - lse_teacher[None, :])
                grad -= tl.where(in_teacher, w_teacher[None, :] * q, 0.0)
        tl.store(grad_x_ptr + offsets, grad.to(grad_x_ptr.dtype.element_ty), mask=load_mask)


# The forward's per-program partials (loss sums, valid-pixel counts) added up in a fixed order by
# one program: deterministic, and one launch instead of a chain of small torch reductions.
@triton.jit
def _finish_reduction_kernel(
    ce_part_ptr,
    kd_part_ptr,
    count_part_ptr,
    ce_ptr,
    kd_ptr,
    count_ptr,
    num_parts,
    kd_divisor,
    REDUCE: tl.constexpr,
    MEAN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    ce_total = tl.zeros([BLOCK], dtype=ACC)
    kd_total = tl.zeros([BLOCK], dtype=ACC)
    count_total = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, num_parts, BLOCK):
        index = start + tl.arange(0, BLOCK)
        in_range = index < num_parts
        count_total += tl.load(count_part_ptr + index, mask=in_range, other=0).to(tl.int64)
        if REDUCE:
            ce_total += tl.load(ce_part_ptr + index, mask=in_range, other=0.0)
            kd_total += tl.load(kd_part_ptr + index, mask=in_range, other=0.0)
    count = tl.sum(count_total, axis=0)
    tl.store(count_ptr, count)
    if REDUCE:
        ce = tl.sum(ce_total, axis=0)
        kd = tl.sum(kd_total, axis=0)
        if MEAN:
            ce = ce / tl.maximum(count, 1).to(ACC)
            kd = kd / kd_divisor
        tl.store(ce_ptr, ce)
        tl.store(kd_ptr, kd)


def _needed_statistics(ce, kd):
    """Which saved per-pixel logsumexps the backward reads: (lse, lse_old, lse_bg); lse_teacher with KD."""
    need_old = ce == "unbiased" or kd == "plain"
    need_bg = kd in ("unbiased", "balanced")
    need_lse = ce != "none" or need_bg
    return need_lse, need_old, need_bg


def _check_modes(ce, kd, reduction):
    if ce not in CE_MODES:
        raise ValueError(f"ce must be one of {CE_MODES}, got {ce!r}")
    if kd not in KD_MODES:
        raise ValueError(f"kd must be one of {KD_MODES}, got {kd!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _output_resolution(x, size):
    """(H, W) of the labels, mask, statistics and per-pixel losses: x's own, or size= (upsampling only)."""
    h, w = x.shape[2], x.shape[3]
    if size is None:
        return h, w
    if len(size) != 2:
        raise ValueError(f"size must be [H, W], got {list(size)}")
    H, W = (int(v) for v in size)
    if H < 1 or W < 1:
        raise ValueError(f"size must be [H, W] with H, W >= 1, got {list(size)}")
    if h < 1 or w < 1:
        raise ValueError(f"size= needs x with a resolution h, w >= 1, got x of shape {tuple(x.shape)}")
    if H < h or W < w:
        raise ValueError(f"size={list(size)} is smaller than x's resolution {(h, w)}: downsampling is not supported")
    return H, W


def _check_teacher_shape(y, B, old_classes, H, W, size):
    if size is None:
        if tuple(y.shape) != (B, old_classes, H, W):
            raise ValueError(f"y must have shape {(B, old_classes, H, W)}, got {tuple(y.shape)}")
    elif y.dim() != 4 or tuple(y.shape[:2]) != (B, old_classes) or not (1 <= y.shape[2] <= H and 1 <= y.shape[3] <= W):
        raise ValueError(
            f"y must be (B, old_classes, h', w') with B={B}, old_classes={old_classes}, 1 <= h' <= {H}, "
            f"1 <= w' <= {W} for size={list(size)} (downsampling is not supported), got {tuple(y.shape)}"
        )


def _check_shapes(x, target, y, gamma, mask, old_classes, ce, kd, size):
    """The kernels index with these shapes: a direct op call must not read out of bounds. Returns the
    output resolution (H, W): x's own, or size= (x and y are then upsampled to it)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    H, W = _output_resolution(x, size)
    if not 1 <= old_classes <= C:
        raise ValueError(f"old_classes must be in [1, C={C}], got {old_classes}")
    if (target is None) != (ce == "none"):
        raise ValueError(f"target must be given exactly when ce != 'none' (ce={ce!r})")
    if target is not None and tuple(target.shape) != (B, H, W):
        raise ValueError(f"target must have shape {(B, H, W)}, got {tuple(target.shape)}")
    if (y is None) != (kd == "none"):
        raise ValueError(f"y must be given exactly when kd != 'none' (kd={kd!r})")
    if y is not None:
        _check_teacher_shape(y, B, old_classes, H, W, size)
    if (gamma is None) != (kd != "balanced"):
        raise ValueError(f"gamma must be given exactly when kd == 'balanced' (kd={kd!r})")
    if gamma is not None and tuple(gamma.shape) != (B,):
        raise ValueError(f"gamma must have shape {(B,)}, got {tuple(gamma.shape)}")
    if mask is not None and tuple(mask.shape) != (B, H, W):
        raise ValueError(f"mask must have shape {(B, H, W)}, got {tuple(mask.shape)}")
    return H, W


def _lowest(dtype):
    """NEG, the kernels' stand-in for -inf in running maxima and in lanes outside a set (so that
    exp(old_max - new_max) never computes inf - inf): the dtype's lowest finite value, below or equal
    to every finite logit. (It was -1e30, above logits of -1e36: their maximum came out -1e30, every
    exp 0 and the losses NaN.)"""
    return torch.finfo(dtype).min


def _split_float(value):
    """Triton passes Python floats as float32: (high, low) float32 parts whose float64 sum is ``value``
    to ~48 bits, so float64 runs see alpha at (almost) full precision without a device tensor."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, value - high


def _contiguous(tensor):
    return None if tensor is None else tensor.contiguous()


def logit_losses_fwd(x, target, y, gamma, mask, *, old_classes, ce, kd, alpha, ignore_index, reduction, size=None):
    """The kernel of incseg_fast_triton::logit_losses_fwd: (ce_loss, kd_loss, stats, valid_count)."""
    _check_modes(ce, kd, reduction)
    H, W = _check_shapes(x, target, y, gamma, mask, old_classes, ce, kd, size)
    _launch.check_device(x, target, y, gamma, mask)
    x, target, y, gamma, mask = (_contiguous(t) for t in (x, target, y, gamma, mask))
    B, C, h, w = x.shape
    y_h, y_w = (h, w) if y is None else y.shape[2:]
    HW = H * W
    acc_torch, acc_tl = _launch.accumulator_dtype(x.dtype)
    if size is None:
        block_c, block_p, num_warps = _launch.tiles(C, HW, B, x.dtype, x.device)
    else:
        block_c, block_p, num_warps = _launch.gather_tiles(C, HW)
    grid = (triton.cdiv(HW, block_p), B)
    programs = grid[0] * grid[1]

    stats = x.new_empty((B, NUM_STATS, H, W), dtype=acc_torch)
    per_pixel = reduction == "none"
    loss_shape = (B, H, W) if per_pixel else (programs,)
    ce_out = x.new_empty(loss_shape, dtype=acc_torch)
    kd_out = x.new_empty(loss_shape, dtype=acc_torch)
    counts = x.new_empty((programs,), dtype=torch.int32)
    _logit_losses_fwd_kernel[grid](
        x,
        x if target is None else target,
        x if y is None else y,
        x if gamma is None else gamma,
        x if mask is None else mask,
        ce_out,
        kd_out,
        counts,
        stats,
        C,
        old_classes,
        HW,
        H,
        W,
        h,
        w,
        y_h,
        y_w,
        *_split_float(alpha),
        int(ignore_index),
        CE=ce,
        KD=kd,
        HAS_MASK=mask is not None,
        PER_PIXEL=per_pixel,
        UPSAMPLE=size is not None,
        ACC=acc_tl,
        NEG=_lowest(acc_torch),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=num_warps,
    )
    valid_count = x.new_empty((), dtype=torch.int64)
    ce_loss, kd_loss = (ce_out, kd_out) if per_pixel else (x.new_empty((), dtype=acc_torch) for _ in range(2))
    _finish_reduction_kernel[(1,)](
        ce_out,
        kd_out,
        counts,
        ce_loss,
        kd_loss,
        valid_count,
        programs,
        B * HW,
        REDUCE=not per_pixel,
        MEAN=reduction == "mean",
        ACC=acc_tl,
        BLOCK=_launch.reduction_block(programs),
    )
    return ce_loss, kd_loss, stats, valid_count


def logit_losses_bwd(
    grad_ce,
    grad_kd,
    x,
    target,
    y,
    gamma,
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
    size=None,
):
    """The kernel of incseg_fast_triton::logit_losses_bwd: dL/dx from both upstream gradients (at x's own
    resolution with size=)."""
    _check_modes(ce, kd, reduction)
    H, W = _check_shapes(x, target, y, gamma, mask, old_classes, ce, kd, size)
    B, C = x.shape[:2]
    acc_torch, acc_tl = _launch.accumulator_dtype(x.dtype)
    if tuple(stats.shape) != (B, NUM_STATS, H, W) or stats.dtype != acc_torch:
        raise ValueError(
            f"stats must be the forward's {(B, NUM_STATS, H, W)} {acc_torch} statistics, "
            f"got {tuple(stats.shape)} {stats.dtype}"
        )
    loss_shape = (B, H, W) if reduction == "none" else ()
    for name, grad in (("grad_ce", grad_ce), ("grad_kd", grad_kd)):
        if tuple(grad.shape) != loss_shape:
            raise ValueError(f"{name} must have shape {loss_shape}, got {tuple(grad.shape)}")
    _launch.check_device(x, target, y, gamma, mask, stats, grad_ce, grad_kd, valid_count)
    x, target, y, gamma, mask, stats = (_contiguous(t) for t in (x, target, y, gamma, mask, stats))
    grad_ce = grad_ce.to(acc_torch).contiguous()
    grad_kd = grad_kd.to(acc_torch).contiguous()
    if size is not None:
        from .logit_losses_upsampled import upsampled_backward  # that module builds on this one's kernels

        return upsampled_backward(
            grad_ce,
            grad_kd,
            x,
            target,
            y,
            gamma,
            mask,
            stats,
            valid_count,
            old_classes=old_classes,
            ce=ce,
            kd=kd,
            alpha=alpha,
            ignore_index=ignore_index,
            reduction=reduction,
            out_size=(H, W),
        )

    HW = H * W
    block_c, block_p, num_warps = _launch.tiles(C, HW, B, x.dtype, x.device)
    grid = (triton.cdiv(HW, block_p), B)
    grad_x = torch.empty_like(x)
    need_lse, need_old, need_bg = _needed_statistics(ce, kd)
    _logit_losses_bwd_kernel[grid](
        x,
        x if target is None else target,
        x if y is None else y,
        x if gamma is None else gamma,
        x if mask is None else mask,
        stats,
        valid_count,
        grad_ce,
        grad_kd,
        grad_x,
        C,
        old_classes,
        HW,
        *_split_float(alpha),
        int(ignore_index),
        B * HW if reduction == "mean" else 1,
        CE=ce,
        KD=kd,
        HAS_MASK=mask is not None,
        PER_PIXEL=reduction == "none",
        MEAN=reduction == "mean",
        NEED_LSE=need_lse,
        NEED_OLD=need_old,
        NEED_BG=need_bg,
        ACC=acc_tl,
        NEG=_lowest(acc_torch),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=num_warps,
    )
    return grad_x
