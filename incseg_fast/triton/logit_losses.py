"""Triton kernels for the logit losses of MATH.md#logit-losses (UNCE / CE and KD / UNKD / BKD), fused.

One forward pass reads x, y and t once and writes the two loss terms (per-pixel maps, or one
partial sum per program that a one-program kernel adds up in a fixed order) plus the per-pixel
statistics the backward needs, (B, 4, H, W) = lse, lse_old, lse_bg, lse_teacher as every backend
saves them (csrc/ops.cpp). One backward pass reads x, y, t and those statistics once and writes
dL/dx once, combining both upstream gradients. No logits-sized temporary is created. The gradient
derivations are written beside the kernels.

With ``size=`` (MATH.md#upsampling) the forward interpolates every logit of x and y it reads from its
four low-resolution samples (``UPSAMPLE``, logit_math's ``tap`` and ``sample``) and saves the
statistics at the output resolution; the backward is the gather of logit_losses_upsampled.py. The
per-pixel math both backwards share (gradient factors, channel tiles) is in logit_math.py.

The launchers below are the kernels of the ops ``incseg_fast_triton::logit_losses_fwd`` and
``logit_losses_bwd`` (schemas in csrc/ops.cpp, fake kernels and autograd in incseg_fast/ops).
"""

import torch
import triton
import triton.language as tl

from .._validate import teacher_dtype
from ..ops.logit_losses import NUM_STATS
from ..vocabulary import CE_MODES, KD_MODES, REDUCTIONS
from . import _launch
from .logit_losses_upsampled import upsampled_backward
from .logit_math import (
    STAT_LSE,
    STAT_LSE_BG,
    STAT_LSE_OLD,
    STAT_LSE_TEACHER,
    STAT_ROWS,
    channel_grad,
    load_target,
    logaddexp,
    pixel_gradient_factors,
    sample,
    tap,
    teacher_probability,
    teacher_term,
    weighted_teacher_background,
)

__all__ = ["logit_losses_fwd", "logit_losses_bwd"]


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
#   UNKD/BKD = -(gamma q_0 (lse_bg - lse) + W - (1 - q_0) lse) / Co   (gamma = 1 for UNKD; gamma q_0
#   formed as exp(log gamma + log q_0), logit_math.weighted_teacher_background)
# KD terms are multiplied by the mask.
@triton.jit
def _logit_losses_fwd_kernel(
    x_ptr,  # (B, C, x_h, x_w) logits
    target_ptr,  # (B, HW) labels (any int dtype); unread when CE == "none"
    y_ptr,  # (B, Co, y_h, y_w) teacher logits; unread when KD == "none"
    log_gamma_ptr,  # (B,) log of the balanced-KD weight; read only when KD == "balanced"
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
    # With UPSAMPLE each pixel's logits are interpolated from four samples (sample): the taps of its
    # row and column into x's and y's planes, once per program. Without, the planes are HW pixels (an
    # argument Triton specialises when divisible by 16, which lets the loads vectorise).
    if UPSAMPLE:
        x_plane = x_h * x_w
        y_plane = y_h * y_w
        row = p // out_w
        col = p % out_w
        x_taps = (tap(row, x_h, out_h, ACC), tap(col, x_w, out_w, ACC), x_w)
        y_taps = (tap(row, y_h, out_h, ACC), tap(col, y_w, out_w, ACC), y_w)
    else:
        x_plane = HW
        y_plane = HW
        x_taps = None  # sample reads p itself
        y_taps = None

    max_old = zeros + NEG
    sum_old = zeros
    max_new = zeros + NEG
    sum_new = zeros
    max_teacher = zeros + NEG
    sum_teacher = zeros
    weighted_x = zeros  # sum_{1<=c<Co} exp(alpha y_c - max_teacher) x_c
    x_target = zeros

    if CE != "none":
        target, valid = load_target(target_ptr + pix, in_image, ignore_index)
    else:
        target = tl.zeros([BLOCK_P], dtype=tl.int32)
        valid = tl.zeros([BLOCK_P], dtype=tl.int1)

    for c0 in range(0, C, BLOCK_C):
        c = c0 + ch
        # Channel-only lane masks: out-of-image pixels load as 0 and give finite, unused statistics.
        old_lane = (c < Co)[:, None]
        new_lane = ((c >= Co) & (c < C))[:, None]
        xs = sample(
            x_ptr + (b * C + c[:, None]) * x_plane,
            (c < C)[:, None] & in_image[None, :],
            p[None, :],
            x_taps,
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
                ys = sample(
                    y_ptr + (b * Co + c[:, None]) * y_plane,
                    old_lane & in_image[None, :],
                    p[None, :],
                    y_taps,
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
    lse = logaddexp(lse_old, lse_new)

    ce_map = zeros
    if CE == "unbiased":
        ce_map = tl.where(valid, lse - tl.where(target < Co, lse_old, x_target), 0.0)
    elif CE == "plain":
        ce_map = tl.where(valid, lse - x_target, 0.0)

    x_0 = sample(x_ptr + b * C * x_plane, in_image, p, x_taps, UPSAMPLE, ACC)
    lse_bg = logaddexp(x_0, lse_new)
    kd_map = zeros
    lse_teacher = zeros
    if KD != "none":
        y_0 = sample(y_ptr + b * Co * y_plane, in_image, p, y_taps, UPSAMPLE, ACC)
        lse_teacher = max_teacher + tl.log(sum_teacher)
        q_0 = teacher_probability(y_0, alpha, lse_teacher)
        old_term = weighted_x / sum_teacher  # sum_{1<=c<Co} q_c x_c
        if KD == "plain":
            kd_map = -(q_0 * x_0 + old_term - lse_old) / Co
        else:
            weighted_q_0 = q_0
            if KD == "balanced":
                log_gamma = tl.load(log_gamma_ptr + b).to(ACC)
                weighted_q_0 = weighted_teacher_background(y_0, alpha, lse_teacher, log_gamma)
            kd_map = -(weighted_q_0 * (lse_bg - lse) + old_term - (1.0 - q_0) * lse) / Co
        if HAS_MASK:
            kd_map *= tl.load(mask_ptr + pix, mask=in_image, other=0.0).to(ACC)
        kd_map = tl.where(in_image, kd_map, 0.0)

    stats = stats_ptr + b * STAT_ROWS * HW + p
    tl.store(stats + STAT_LSE * HW, lse, mask=in_image)
    tl.store(stats + STAT_LSE_OLD * HW, lse_old, mask=in_image)
    tl.store(stats + STAT_LSE_BG * HW, lse_bg, mask=in_image)
    tl.store(stats + STAT_LSE_TEACHER * HW, lse_teacher, mask=in_image)

    if PER_PIXEL:
        tl.store(ce_ptr + pix, ce_map, mask=in_image)
        tl.store(kd_ptr + pix, kd_map, mask=in_image)
    else:
        part = b * tl.num_programs(0) + pid_p
        tl.store(ce_ptr + part, tl.sum(ce_map, axis=0))
        tl.store(kd_ptr + part, tl.sum(kd_map, axis=0))
    tl.store(count_ptr + b * tl.num_programs(0) + pid_p, tl.sum(valid.to(tl.int32), axis=0))


# Backward: dL/dx per pixel and channel, as derived above logit_math.pixel_gradient_factors.
@triton.jit
def _logit_losses_bwd_kernel(
    x_ptr,
    target_ptr,
    y_ptr,
    log_gamma_ptr,
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
    # The forward's inputs and statistics, and the upstream gradients with their "mean" divisors.
    inputs = (target_ptr, log_gamma_ptr, mask_ptr, stats_ptr, HW, Co, alpha, ignore_index)
    upstream = (grad_ce_ptr, grad_kd_ptr, count_ptr, kd_divisor)
    factors, teacher = pixel_gradient_factors(
        p, in_image, b, x_0, y_0, inputs, upstream, CE, KD, HAS_MASK, PER_PIXEL, MEAN, ACC
    )

    # Plain KD distils all Co channels; UNKD/BKD distil channels 1..Co-1 (channel 0 is in coef_bg).
    first_teacher_channel = 0 if KD == "plain" else 1
    for c0 in range(0, C, BLOCK_C):
        c = c0 + ch
        load_mask = (c < C)[:, None] & in_image[None, :]
        offsets = (b * C + c[:, None]) * HW + p[None, :]
        xs = tl.load(x_ptr + offsets, mask=load_mask, other=0.0).to(ACC)
        grad = channel_grad(xs, c, Co, factors, CE, KD, NEG)
        if KD != "none":
            if c0 < Co:
                in_teacher = ((c >= first_teacher_channel) & (c < Co))[:, None]
                ys = tl.load(
                    y_ptr + (b * Co + c[:, None]) * HW + p[None, :], mask=in_teacher & in_image[None, :], other=0.0
                ).to(ACC)
                grad -= teacher_term(ys, alpha, teacher, in_teacher)
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


def _check_shapes(x, target, y, log_gamma, mask, old_classes, ce, kd, size):
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
        teacher_dtype(y, "y", x, "x")  # read in its own dtype by the loads (MATH.md#teacher-dtype)
    if (log_gamma is None) != (kd != "balanced"):
        raise ValueError(f"log_gamma must be given exactly when kd == 'balanced' (kd={kd!r})")
    if log_gamma is not None and tuple(log_gamma.shape) != (B,):
        raise ValueError(f"log_gamma must have shape {(B,)}, got {tuple(log_gamma.shape)}")
    if mask is not None and tuple(mask.shape) != (B, H, W):
        raise ValueError(f"mask must have shape {(B, H, W)}, got {tuple(mask.shape)}")
    return H, W


def _contiguous(tensor):
    return None if tensor is None else tensor.contiguous()


def logit_losses_fwd(x, target, y, log_gamma, mask, *, old_classes, ce, kd, alpha, ignore_index, reduction, size=None):
    """The kernel of incseg_fast_triton::logit_losses_fwd: (ce_loss, kd_loss, stats, valid_count)."""
    _check_modes(ce, kd, reduction)
    H, W = _check_shapes(x, target, y, log_gamma, mask, old_classes, ce, kd, size)
    _launch.check_device(x, target, y, log_gamma, mask)
    x, target, y, log_gamma, mask = (_contiguous(t) for t in (x, target, y, log_gamma, mask))
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
        x if log_gamma is None else log_gamma,
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
        *_launch.split_float(alpha),
        int(ignore_index),
        CE=ce,
        KD=kd,
        HAS_MASK=mask is not None,
        PER_PIXEL=per_pixel,
        UPSAMPLE=size is not None,
        ACC=acc_tl,
        NEG=_launch.lowest(acc_torch),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=num_warps,
        enable_fp_fusion=_launch.FP_FUSION,
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
        enable_fp_fusion=_launch.FP_FUSION,
    )
    return ce_loss, kd_loss, stats, valid_count


def logit_losses_bwd(
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
    size=None,
):
    """The kernel of incseg_fast_triton::logit_losses_bwd: dL/dx from both upstream gradients (at x's own
    resolution with size=)."""
    _check_modes(ce, kd, reduction)
    H, W = _check_shapes(x, target, y, log_gamma, mask, old_classes, ce, kd, size)
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
    _launch.check_device(x, target, y, log_gamma, mask, stats, grad_ce, grad_kd, valid_count)
    x, target, y, log_gamma, mask, stats = (_contiguous(t) for t in (x, target, y, log_gamma, mask, stats))
    grad_ce = grad_ce.to(acc_torch).contiguous()
    grad_kd = grad_kd.to(acc_torch).contiguous()
    if size is not None:
        return upsampled_backward(
            grad_ce,
            grad_kd,
            x,
            target,
            y,
            log_gamma,
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
    _logit_losses_bwd_kernel[grid](
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
        HW,
        *_launch.split_float(alpha),
        int(ignore_index),
        B * HW if reduction == "mean" else 1,
        CE=ce,
        KD=kd,
        HAS_MASK=mask is not None,
        PER_PIXEL=reduction == "none",
        MEAN=reduction == "mean",
        ACC=acc_tl,
        NEG=_launch.lowest(acc_torch),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=num_warps,
        enable_fp_fusion=_launch.FP_FUSION,
    )
    return grad_x
