"""Per-pixel math of the logit-loss kernels (MATH.md#logit-losses, MATH.md#upsampling), shared by
logit_losses.py (the forward, the backward without ``size=``) and logit_losses_upsampled.py (the
gather backward with ``size=``). Each helper is a ``@triton.jit`` function inlined into its caller,
with its math written above it.

Values that travel together are tuples (Triton passes them to jit functions as one argument):

- taps, ``((row0, row1, row_l1), (col0, col1, col_l1), width)``: where a pixel's bilinear sample
  reads a plane ``width`` wide (``tap`` gives one axis' triple);
- the backward's ``inputs``, ``(target_ptr, log_gamma_ptr, mask_ptr, stats_ptr, HW, Co, alpha,
  ignore_index)``, and ``upstream``, ``(grad_ce_ptr, grad_kd_ptr, count_ptr, kd_divisor)``: the
  backward kernels' arguments of those names (see the kernels), ``alpha`` already restored from its
  two parts;
- a pixel's gradient factors, from ``pixel_gradient_factors`` to ``channel_grad``.

Rounding: every kernel is compiled with ``enable_fp_fusion=False`` (``_launch.FP_FUSION``), so a
product such as ``alpha * y`` is rounded before it is compared or subtracted, as on the CPU
(``-ffp-contract=off``) and in the CUDA kernels (``__fmul_rn``); ``aot_check`` fails on an
unrounded float32 product in the kernels' PTX.
"""

import triton
import triton.language as tl

from ..ops.logit_losses import NUM_STATS

# Rows of the saved statistics (B, NUM_STATS, H, W), as in csrc/common/logit_math.h.
STAT_ROWS = tl.constexpr(NUM_STATS)
STAT_LSE, STAT_LSE_OLD, STAT_LSE_BG, STAT_LSE_TEACHER = (tl.constexpr(row) for row in range(NUM_STATS))


# Which saved logsumexps the backward reads (lse_teacher: with any KD). lse: some term has a softmax
# over all channels (any CE, UNKD/BKD); lse_old: UNCE or plain KD; lse_bg: UNKD/BKD.
@triton.constexpr_function
def reads_lse(ce, kd):
    return ce != "none" or kd in ("unbiased", "balanced")


@triton.constexpr_function
def reads_lse_old(ce, kd):
    return ce == "unbiased" or kd == "plain"


@triton.constexpr_function
def reads_lse_bg(ce, kd):
    return kd in ("unbiased", "balanced")


# logaddexp(a, b) = max + log(1 + exp(min - max)). NaN-propagating max/min: the default ones return
# the other operand, which would turn a NaN logit into a finite loss (RELIABILITY.md#numerics).
@triton.jit
def logaddexp(a, b):
    high = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    low = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
    return high + tl.log(1.0 + tl.exp(low - high))


# The label of each pixel as a channel index: t in [0, C) where valid (t != ignore_index and the pixel
# is on), -1 elsewhere. int32 whatever the labels' dtype: one register per pixel, not two (the
# bfloat16 forward's 4 x 1024 tile needed 255 registers with int64 labels, 181 with these).
@triton.jit
def load_target(
    targets,  # pointers to the pixels' labels (any int dtype)
    on,  # the pixels to read
    ignore_index,
):
    label = tl.load(targets, mask=on, other=ignore_index)
    valid = on & (label != ignore_index)
    return tl.where(valid, label.to(tl.int32), -1), valid


# q = exp(alpha y - lse_teacher), the teacher's probability. alpha y is rounded before the
# subtraction (no fused multiply-add): the forward's running maximum holds the rounded product, and
# a one-hot teacher at |alpha y| ~ 1e4 must give q = exp(0) = 1, not exp(the product's rounding error).
@triton.jit
def teacher_probability(y, alpha, lse_teacher):
    return tl.exp(alpha * y - lse_teacher)


# gamma q_0 of balanced distillation from log gamma (MATH.md#bkd-gamma): a gamma of e^88 or more
# (carried as its log, which does not overflow) meets a q_0 of e^-88 or less, which underflows; their
# product, often ~1, is formed in log space.
@triton.jit
def weighted_teacher_background(y_0, alpha, lse_teacher, log_gamma):
    return tl.exp(log_gamma + (alpha * y_0 - lse_teacher))


# w * v, and exactly 0 where the weight w is 0 (MATH.md#upsampling): a -inf (masked class), +inf or
# NaN sample read with weight 0 contributes nothing instead of 0 * v = NaN.
@triton.jit
def weight_times(w, v):
    return tl.where(w == 0.0, 0.0, w * v)


# n / d correctly rounded in ACC (Triton's float32 `/` on a GPU is approximate).
@triton.jit
def ratio(n, d, ACC: tl.constexpr):
    if ACC == tl.float64:
        result = n.to(tl.float64) / d.to(tl.float64)
    else:
        result = tl.math.div_rn(n.to(tl.float32), d.to(tl.float32))
    return result


# The input samples i0, i1 and the weight l1 of i1 that output index d of n_out reads from n_in samples
# (F.interpolate, bilinear, align_corners=False; csrc/common/upsample.h's tap):
#   s = max((d + 0.5) n_in / n_out - 0.5, 0),  i0 = floor(s),  i1 = min(i0 + 1, n_in - 1),  l1 = s - i0,
# in ACC (float64 coordinates for float64 logits, as PyTorch's).
@triton.jit
def tap(d, n_in, n_out, ACC: tl.constexpr):
    s = tl.maximum(ratio(n_in, n_out, ACC) * (d.to(ACC) + 0.5) - 0.5, 0.0)
    i0 = s.to(tl.int32)  # s >= 0: truncation is floor; int32 offsets within a plane (fewer registers)
    return i0, tl.minimum(i0 + 1, n_in - 1), s - i0.to(ACC)


# The weight with which an output index whose tap is (i0, i1, l1) reads input sample i:
# [i0 == i] (1 - l1) + [i1 == i] l1.
@triton.jit
def tap_weight(taps, i):
    i0, i1, l1 = taps
    return tl.where(i0 == i, 1.0 - l1, 0.0) + tl.where(i1 == i, l1, 0.0)


def readers(n_in, n_out):
    """The most output indices that read one input sample (n_out >= n_in): those d with
    i - 1 < s(d) < i + 1, an open interval of 2 n_out / n_in of d."""
    return (2 * n_out + n_in - 1) // n_in


@triton.jit
def first_reader(i, n_in, n_out):
    """The first output index whose tap reads input sample i in exact arithmetic: the smallest d with
    s(d) = (d + 0.5) n_in / n_out - 0.5 > i - 1, i.e. 2 n_in d > (2i - 1) n_out - n_in, in integers
    (the numerator is negative only for i = 0, whose readers start at 0)."""
    numerator = (2 * i - 1) * n_out - n_in
    return tl.where(numerator < 0, 0, numerator // (2 * n_in) + 1)


# The values at output pixels p of the channel planes starting at `planes`, in ACC: the planes' own
# pixels, or with UPSAMPLE their bilinear upsampling from the four samples the taps name
# (csrc/common/upsample.h's bilinear, not rounded to the logits' dtype):
#   top = (1 - col_l1) v[row0, col0] + col_l1 v[row0, col1],  bottom likewise on row1,
#   value = (1 - row_l1) top + row_l1 bottom.
@triton.jit
def sample(
    planes,  # pointer(s) to the first pixel of each channel plane
    mask,  # which (channel, pixel) values to read; the others are 0
    p,  # output pixel offsets (read directly without UPSAMPLE)
    taps,  # ((row0, row1, row_l1), (col0, col1, col_l1), width): used only with UPSAMPLE
    UPSAMPLE: tl.constexpr,
    ACC: tl.constexpr,
):
    if UPSAMPLE:
        row0, row1, row_l1 = taps[0]
        col0, col1, col_l1 = taps[1]
        width = taps[2]
        top_left = tl.load(planes + (row0 * width + col0), mask=mask, other=0.0).to(ACC)
        top_right = tl.load(planes + (row0 * width + col1), mask=mask, other=0.0).to(ACC)
        bottom_left = tl.load(planes + (row1 * width + col0), mask=mask, other=0.0).to(ACC)
        bottom_right = tl.load(planes + (row1 * width + col1), mask=mask, other=0.0).to(ACC)
        top = weight_times(1.0 - col_l1, top_left) + weight_times(col_l1, top_right)
        bottom = weight_times(1.0 - col_l1, bottom_left) + weight_times(col_l1, bottom_right)
        values = weight_times(1.0 - row_l1, top) + weight_times(row_l1, bottom)
    else:
        values = tl.load(planes + p, mask=mask, other=0.0).to(ACC)
    return values


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
def pixel_gradient_factors(
    p,  # (pixels,) offsets in the image's (HW,) maps
    on,  # the pixels to compute (the others load as 0 and give finite, unused factors)
    b,  # the image
    x_0,  # (pixels,) the background logits
    y_0,  # (pixels,) the teacher's background logits; read only for UNKD/BKD
    inputs,  # the forward's inputs and statistics (module docstring)
    upstream,  # the upstream gradients and their "mean" divisors (module docstring)
    CE: tl.constexpr,
    KD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    MEAN: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per pixel: ``factors`` = (target, w_target, grad_0, shift_old, factor_old, shift_new, factor_new)
    for channel_grad (channel 0's gradient, and the factor and shift such that the exp terms of a lane
    c >= 1 are factor * exp(x_c - shift); old: c < Co, new: c >= Co), and ``teacher`` = (w_teacher,
    lse_teacher) for teacher_term."""
    target_ptr, log_gamma_ptr, mask_ptr, stats_ptr, HW, Co, alpha, ignore_index = inputs
    grad_ce_ptr, grad_kd_ptr, count_ptr, kd_divisor = upstream
    pix = b * HW + p
    stats = stats_ptr + b * STAT_ROWS * HW + p
    zeros = tl.zeros(on.shape, dtype=ACC)
    lse = zeros
    lse_old = zeros
    lse_bg = zeros
    lse_teacher = zeros
    if reads_lse(CE, KD):
        lse = tl.load(stats + STAT_LSE * HW, mask=on, other=0.0)
    if reads_lse_old(CE, KD):
        lse_old = tl.load(stats + STAT_LSE_OLD * HW, mask=on, other=0.0)
    if reads_lse_bg(CE, KD):
        lse_bg = tl.load(stats + STAT_LSE_BG * HW, mask=on, other=0.0)

    coef_p = zeros
    coef_old = zeros
    coef_bg = zeros
    w_target = zeros
    w_teacher = zeros
    target = tl.zeros(on.shape, dtype=tl.int32)

    if CE != "none":
        target, valid = load_target(target_ptr + pix, on, ignore_index)
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
        lse_teacher = tl.load(stats + STAT_LSE_TEACHER * HW, mask=on, other=0.0)
        if KD == "plain":
            coef_old += w_kd
        else:
            q_0 = teacher_probability(y_0, alpha, lse_teacher)
            weighted_q_0 = q_0
            if KD == "balanced":
                log_gamma = tl.load(log_gamma_ptr + b).to(ACC)
                weighted_q_0 = weighted_teacher_background(y_0, alpha, lse_teacher, log_gamma)
            coef_p += w_kd * (weighted_q_0 + 1.0 - q_0)
            coef_bg = -w_kd * weighted_q_0

    grad_0 = zeros
    shift_old = lse
    factor_old = coef_old
    shift_new = lse
    factor_new = coef_p
    if reads_lse(CE, KD):
        grad_0 += coef_p * tl.exp(x_0 - lse)
    if reads_lse_old(CE, KD):
        grad_0 += coef_old * tl.exp(x_0 - lse_old)
        shift_old = lse_old
        if reads_lse(CE, KD):
            factor_old += coef_p * tl.exp(lse_old - lse)
    else:
        factor_old += coef_p
    if reads_lse_bg(CE, KD):
        grad_0 += coef_bg * tl.exp(x_0 - lse_bg)
        shift_new = lse_bg
        factor_new = coef_bg + coef_p * tl.exp(lse_bg - lse)
    factors = (target, w_target, grad_0, shift_old, factor_old, shift_new, factor_new)
    return factors, (w_teacher, lse_teacher)


@triton.jit
def channel_grad(
    xs,  # (channels, pixels) logits
    c,  # (channels,) their channel indices
    Co,
    factors,  # per pixel, from pixel_gradient_factors
    CE: tl.constexpr,
    KD: tl.constexpr,
    NEG: tl.constexpr,
):
    """dL/dx of a (channels, pixels) tile of logits, without the teacher term (teacher_term)."""
    target, w_target, grad_0, shift_old, factor_old, shift_new, factor_new = factors
    old_lane = (c < Co)[:, None]
    if reads_lse(CE, KD):
        shifted = tl.where(old_lane, xs - shift_old[None, :], xs - shift_new[None, :])
        factor = tl.where(old_lane, factor_old[None, :], factor_new[None, :])
    else:  # plain KD alone: lanes >= Co get no gradient
        shifted = tl.where(old_lane, xs - shift_old[None, :], NEG)
        factor = factor_old[None, :]
    grad = tl.where((c == 0)[:, None], grad_0[None, :], factor * tl.exp(shifted))
    if CE != "none":
        grad -= tl.where(c[:, None] == target[None, :], w_target[None, :], 0.0)
    return grad


# The teacher's part of dL/dx, subtracted on the distilled lanes (plain KD: c < Co; UNKD/BKD:
# 1 <= c < Co): w_teacher q_c, q_c = exp(alpha y_c - lse_t).
@triton.jit
def teacher_term(
    ys,  # (channels, pixels) teacher logits
    alpha,
    teacher,  # (w_teacher, lse_teacher) per pixel, from pixel_gradient_factors
    distilled,  # (channels, 1) the distilled lanes
):
    w_teacher, lse_teacher = teacher
    return tl.where(distilled, w_teacher[None, :] * teacher_probability(ys, alpha, lse_teacher[None, :]), 0.0)
