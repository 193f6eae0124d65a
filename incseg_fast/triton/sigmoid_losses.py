"""Triton kernels of the sigmoid losses with composed targets (MATH.md#sigmoid-losses).

Forward: a program owns BLOCK_P output pixels of one image; it forms their labels (and SSUL's
pseudo-labels from the teacher's argmax), then walks the channels, composing each channel's target
(0, sigmoid(y_c) or the one-hot of the label) as it reads the logit, and writes the three per-pixel
terms; the host adds them up in a fixed order (torch.sum), so results repeat run to run.

Backward without size=: the same walk writes dL/dx directly. With size=: a gather, as for the logit
losses (logit_losses_upsampled.py describes the lanes): a program owns BLOCK_E elements of x's plane
and BLOCK_C channels, visits every output pixel whose taps read them, recomputes its label, target and
gradient there, and sums R K G in a fixed order: no atomics, no full-resolution gradient.
"""

import torch
import triton
import triton.language as tl

from ..reference import ignored
from . import _launch
from .logit_math import first_reader, readers, sample, tap, tap_weight

__all__ = ["sigmoid_losses_fwd", "sigmoid_losses_bwd"]

INTERPRETER_LANES = 512
GPU_LANES = 128


@triton.jit
def _labels(
    target_image,
    y_image,
    p,
    on,
    y_plane,
    y_taps,
    Co,
    ignore_index,
    threshold_parts,
    background,
    HAS_TARGET: tl.constexpr,
    PSEUDO: tl.constexpr,
    UPSAMPLE: tl.constexpr,
    ACC: tl.constexpr,
):
    """(label, valid) at output pixels p: the labels after pseudo-labelling (MATH.md#sigmoid-pseudo)."""
    label = tl.zeros(p.shape, dtype=tl.int64)
    valid = on
    if HAS_TARGET:
        label = tl.load(target_image + p, mask=on, other=0).to(tl.int64)
        valid = on & (label != ignore_index)
    if PSEUDO:
        best = tl.full(p.shape, float("-inf"), ACC)
        best_channel = tl.full(p.shape, -1, tl.int64)
        for c in range(0, Co):
            v = sample(y_image + c * y_plane, on, p, y_taps, UPSAMPLE, ACC)
            better = v > best  # strict: the first maximum wins, as torch.max
            best = tl.where(better, v, best)
            best_channel = tl.where(better, c, best_channel)
        # sigmoid(best) >= threshold, with the threshold in two float32 parts (exact for float64 ACC)
        score = 1.0 / (1.0 + tl.exp(-best)) - threshold_parts[0]
        confident = (best_channel >= background) & (score >= threshold_parts[1])
        label = tl.where(valid & (label < background) & confident, best_channel, label)
    return label, valid


@triton.jit
def _target(c, label, valid, ys, negative_channels, label_channels_from):
    """The composed target of channel(s) c: 0, sigmoid(y_c) or [label == c] (MATH.md#sigmoid-notation)."""
    one_hot = tl.where(valid & (label == c), 1.0, 0.0)
    soft = 1.0 / (1.0 + tl.exp(-ys))
    return tl.where(c < negative_channels, 0.0, tl.where(c < label_channels_from, soft, one_hot))


@triton.jit
def _bce(xs, tau, pos):
    """MATH.md#sigmoid-bce: (1 - tau) x + (1 + (pos - 1) tau) softplus(-x)."""
    softplus_neg = tl.maximum(-xs, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(xs)))
    return (1.0 - tau) * xs + (1.0 + (pos - 1.0) * tau) * softplus_neg


@triton.jit
def _bce_grad(xs, tau, pos):
    return (1.0 - tau) - (1.0 + (pos - 1.0) * tau) / (1.0 + tl.exp(xs))


@triton.jit
def _sigmoid_fwd_kernel(
    x_ptr,
    target_ptr,
    y_ptr,
    pos_ptr,
    weight_ptr,  # inputs; weights (C,) in ACC
    label_ptr,
    soft_ptr,
    negative_ptr,  # out: (B, H, W) per-pixel terms in ACC
    C,
    Co,
    H,
    W,
    x_h,
    x_w,
    y_h,
    y_w,
    negative_channels,
    label_channels_from,
    ignore_index,
    threshold_high,
    threshold_low,
    background,
    HAS_TARGET: tl.constexpr,
    PSEUDO: tl.constexpr,
    SKIP_IGNORED: tl.constexpr,
    UPSAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    on = p < HW
    row = p // W
    col = p % W
    x_taps = (tap(row, x_h, H, ACC), tap(col, x_w, W, ACC), x_w)
    y_taps = (tap(row, y_h, H, ACC), tap(col, y_w, W, ACC), y_w)
    x_image = x_ptr + b * C * x_h * x_w
    y_image = y_ptr + b * Co * y_h * y_w
    label, valid = _labels(
        target_ptr + b * HW,
        y_image,
        p,
        on,
        y_h * y_w,
        y_taps,
        Co,
        ignore_index,
        (threshold_high, threshold_low),
        background,
        HAS_TARGET,
        PSEUDO,
        UPSAMPLE,
        ACC,
    )
    label_term = tl.zeros([BLOCK_P], dtype=ACC)
    soft_term = tl.zeros([BLOCK_P], dtype=ACC)
    negative_term = tl.zeros([BLOCK_P], dtype=ACC)
    for c in range(0, C):
        # The channel index as a vector: the interpreter rejects masks built from scalar comparisons.
        channel = tl.full([BLOCK_P], c, tl.int32)
        xs = sample(x_image + c * x_h * x_w, on, p, x_taps, UPSAMPLE, ACC)
        is_soft = (channel >= negative_channels) & (channel < label_channels_from)
        ys = sample(y_image + c * y_h * y_w, on & is_soft, p, y_taps, UPSAMPLE, ACC)
        tau = _target(channel, label, valid, ys, negative_channels, label_channels_from)
        loss = tl.load(weight_ptr + c).to(ACC) * _bce(xs, tau, tl.load(pos_ptr + c).to(ACC))
        label_term += tl.where(channel >= label_channels_from, loss, 0.0)
        soft_term += tl.where(is_soft, loss, 0.0)
        negative_term += tl.where(channel < negative_channels, loss, 0.0)
    if SKIP_IGNORED:
        label_term = tl.where(valid, label_term, 0.0)
    out = b * HW + p
    tl.store(label_ptr + out, label_term, mask=on)
    tl.store(soft_ptr + out, soft_term, mask=on)
    tl.store(negative_ptr + out, negative_term, mask=on)


@triton.jit
def _upstream(grad_ptr, pixel, on, divisor, PER_PIXEL: tl.constexpr, ACC: tl.constexpr):
    """The upstream gradient of one term at the pixels, divided by the reduction's divisor."""
    if PER_PIXEL:
        grad = tl.load(grad_ptr + pixel, mask=on, other=0.0).to(ACC)
    else:
        grad = tl.load(grad_ptr).to(ACC) + tl.zeros(pixel.shape, dtype=ACC)
    return grad / divisor  # an int: 1 may arrive as a constexpr


@triton.jit
def _sigmoid_bwd_kernel(
    grad_label_ptr,
    grad_soft_ptr,
    grad_negative_ptr,  # (B, H, W) maps (PER_PIXEL) or 0-dim
    x_ptr,
    target_ptr,
    y_ptr,
    pos_ptr,
    weight_ptr,
    grad_x_ptr,  # out: (B, C, x_h, x_w) in x's dtype
    label_divisor,
    pixel_divisor,  # counted pixels and B H W for "mean", else 1
    C,
    Co,
    H,
    W,
    x_h,
    x_w,
    y_h,
    y_w,
    row_readers,
    col_readers,  # with UPSAMPLE: the most output rows / columns that read one sample
    negative_channels,
    label_channels_from,
    ignore_index,
    threshold_high,
    threshold_low,
    background,
    HAS_TARGET: tl.constexpr,
    PSEUDO: tl.constexpr,
    SKIP_IGNORED: tl.constexpr,
    UPSAMPLE: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COLS: tl.constexpr,
):
    """Without UPSAMPLE, lanes are output pixels (COLS = 1, row_readers = 1) and each gradient is
    stored as computed; with UPSAMPLE, lanes are (element of x's plane, column step) pairs and the
    program walks the output rows that read its elements, accumulating R K G."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_on = (c < C)[:, None]
    first_element = tl.program_id(0).to(tl.int64) * BLOCK_E
    lane = tl.arange(0, BLOCK_E * COLS)
    element = first_element + lane // COLS
    x_plane = x_h * x_w
    HW = H * W
    x_image = x_ptr + b * C * x_plane
    y_image = y_ptr + b * Co * y_h * y_w
    pos = tl.load(pos_ptr + c, mask=c < C, other=1.0).to(ACC)[:, None]
    weight = tl.load(weight_ptr + c, mask=c < C, other=0.0).to(ACC)[:, None]
    is_soft = ((c >= negative_channels) & (c < label_channels_from))[:, None]
    term_label = (c >= label_channels_from)[:, None]
    term_negative = (c < negative_channels)[:, None]
    i = element // x_w
    j = element % x_w
    # Without UPSAMPLE (x_h, x_w = H, W) the taps are the identity: first reader j, weight 1.
    col = first_reader(j, x_w, W) + lane % COLS
    col_taps = tap(col, x_w, W, ACC)
    y_col_taps = tap(col, y_w, W, ACC)
    col_weight = tap_weight(col_taps, j)
    col_on = (element < x_plane) & (lane % COLS < col_readers) & (col < W) & (col_weight != 0.0)
    first_row = first_reader(i, x_h, H)
    total = tl.zeros([BLOCK_C, BLOCK_E * COLS], dtype=ACC)
    for row_step in range(0, row_readers):
        row = first_row + row_step
        row_taps = tap(row, x_h, H, ACC)
        row_weight = tap_weight(row_taps, i)
        on = col_on & (row < H) & (row_weight != 0.0)
        p = row * W + col
        x_taps = (row_taps, col_taps, x_w)
        y_taps = (tap(row, y_h, H, ACC), y_col_taps, y_w)
        label, valid = _labels(
            target_ptr + b * HW,
            y_image,
            p,
            on,
            y_h * y_w,
            y_taps,
            Co,
            ignore_index,
            (threshold_high, threshold_low),
            background,
            HAS_TARGET,
            PSEUDO,
            UPSAMPLE,
            ACC,
        )
        pixel = b * HW + p
        g_label = _upstream(grad_label_ptr, pixel, on, label_divisor, PER_PIXEL, ACC)
        if SKIP_IGNORED:
            g_label = tl.where(valid, g_label, 0.0)
        g_soft = _upstream(grad_soft_ptr, pixel, on, pixel_divisor, PER_PIXEL, ACC)
        g_negative = _upstream(grad_negative_ptr, pixel, on, pixel_divisor, PER_PIXEL, ACC)
        tile_on = channel_on & on[None, :]
        xs = sample(x_image + c[:, None] * x_plane, tile_on, p[None, :], x_taps, UPSAMPLE, ACC)
        ys = sample(y_image + c[:, None] * y_h * y_w, tile_on & is_soft, p[None, :], y_taps, UPSAMPLE, ACC)
        tau = _target(c[:, None], label[None, :], valid[None, :], ys, negative_channels, label_channels_from)
        upstream = tl.where(term_label, g_label[None, :], tl.where(term_negative, g_negative[None, :], g_soft[None, :]))
        grad = upstream * weight * _bce_grad(xs, tau, pos)
        total += tl.where(tile_on, (row_weight * col_weight)[None, :] * grad, 0.0)
    per_element = tl.sum(tl.reshape(total, [BLOCK_C, BLOCK_E, COLS]), axis=2)
    out_element = first_element + tl.arange(0, BLOCK_E)
    tl.store(
        grad_x_ptr + (b * C + c[:, None]) * x_plane + out_element[None, :],
        per_element.to(grad_x_ptr.dtype.element_ty),
        mask=channel_on & (out_element < x_plane)[None, :],
    )


def gpu_backward_tile(dtype):
    """(BLOCK_C, BLOCK_E, num_warps) of the backward without size= on a GPU: _launch.gpu_tile, with half
    the channels for float64 (at 8 channels its per-pixel and per-element forms spill on sm_90)."""
    block_c, block_e, num_warps = _launch.gpu_tile(dtype)
    return (block_c // 2 if dtype == torch.float64 else block_c), block_e, num_warps


def gather_tiles(channels, col_readers, dtype):
    """(BLOCK_C, BLOCK_E, COLS, num_warps) of the size= backward: COLS lanes per element (the column
    readers, to a power of 2), BLOCK_C channels; fewer lanes for float64 on a GPU (registers)."""
    cols = triton.next_power_of_2(col_readers)
    lanes = INTERPRETER_LANES if _launch.interpreter() else GPU_LANES // (2 if dtype == torch.float64 else 1)
    block_c = min(_launch.GPU_BLOCK_C, triton.next_power_of_2(channels))
    return block_c, max(1, lanes // cols), cols, 1 if _launch.interpreter() else _launch.GPU_NUM_WARPS


def _prepare(x, target, y, pos_weight, channel_weight, size):
    """Contiguous inputs, the weights as (C,) tensors in the accumulation dtype, the resolutions."""
    _launch.check_device(x, target, y)
    acc_torch, acc_tl = _launch.accumulator_dtype(x.dtype)
    B, C, h, w = x.shape
    H, W = (h, w) if size is None else tuple(size)
    ones = torch.ones(C, dtype=acc_torch, device=x.device)
    weights = tuple(ones if v is None else v.to(acc_torch).contiguous() for v in (pos_weight, channel_weight))
    y_h, y_w = (H, W) if y is None else y.shape[2:]
    shapes = dict(B=B, C=C, Co=0 if y is None else y.shape[1], H=H, W=W, h=h, w=w, y_h=y_h, y_w=y_w)
    x = x.contiguous()
    return (
        x,
        None if target is None else target.contiguous(),
        None if y is None else y.contiguous(),
        weights,
        shapes,
        acc_tl,
    )


def _flags(target, pseudo_threshold, ignored_pixels, size, acc_tl):
    return dict(
        HAS_TARGET=target is not None,
        PSEUDO=pseudo_threshold is not None,
        SKIP_IGNORED=target is not None and ignored_pixels == "skip",
        UPSAMPLE=size is not None,
        ACC=acc_tl,
    )


def _label_count(target, B, H, W, ignore_index, ignored_pixels, device):
    """The pixels the label term counts (MATH.md#sigmoid-reductions), int64 0-dim."""
    if target is None or ignored_pixels == "negative":
        return torch.tensor(B * H * W, dtype=torch.int64, device=device)
    return (~ignored(target, ignore_index)).sum()


def sigmoid_losses_fwd(
    x,
    target,
    y,
    pos_weight,
    channel_weight,
    *,
    negative_channels,
    label_channels_from,
    pseudo_threshold,
    pseudo_background,
    ignore_index,
    ignored_pixels,
    reduction,
    size=None,
):
    x, target, y, (pos, weight), s, acc_tl = _prepare(x, target, y, pos_weight, channel_weight, size)
    acc_torch = torch.float64 if acc_tl == tl.float64 else torch.float32
    maps = [torch.empty((s["B"], s["H"], s["W"]), dtype=acc_torch, device=x.device) for _ in range(3)]
    HW = s["H"] * s["W"]
    _, block_p, num_warps = (
        _launch.gather_tiles(1, HW) if size is not None else _launch.tiles(1, HW, s["B"], x.dtype, x.device)
    )
    if HW * s["B"] > 0:
        _sigmoid_fwd_kernel[(triton.cdiv(HW, block_p), s["B"])](
            x,
            x if target is None else target,
            x if y is None else y,
            pos,
            weight,
            *maps,
            s["C"],
            s["Co"],
            s["H"],
            s["W"],
            s["h"],
            s["w"],
            s["y_h"],
            s["y_w"],
            negative_channels,
            label_channels_from,
            int(ignore_index),
            *_launch.split_float(-1.0 if pseudo_threshold is None else float(pseudo_threshold)),
            pseudo_background,
            **_flags(target, pseudo_threshold, ignored_pixels, size, acc_tl),
            BLOCK_P=block_p,
            num_warps=num_warps,
            enable_fp_fusion=_launch.FP_FUSION,
        )
    count = _label_count(target, s["B"], s["H"], s["W"], ignore_index, ignored_pixels, x.device)
    if reduction == "none":
        return (*maps, count)
    totals = [m.sum(dtype=torch.float64) for m in maps]
    if reduction == "mean":
        pixels = max(s["B"] * HW, 1)
        totals = [totals[0] / count.clamp(min=1), totals[1] / pixels, totals[2] / pixels]
    return (*(t.to(acc_torch) for t in totals), count)


def sigmoid_losses_bwd(
    grad_label,
    grad_soft,
    grad_negative,
    x,
    target,
    y,
    pos_weight,
    channel_weight,
    label_count,
    *,
    negative_channels,
    label_channels_from,
    pseudo_threshold,
    pseudo_background,
    ignore_index,
    ignored_pixels,
    reduction,
    size=None,
):
    x, target, y, (pos, weight), s, acc_tl = _prepare(x, target, y, pos_weight, channel_weight, size)
    acc_torch = torch.float64 if acc_tl == tl.float64 else torch.float32
    grads = [g.to(device=x.device, dtype=acc_torch).contiguous() for g in (grad_label, grad_soft, grad_negative)]
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    mean = reduction == "mean"
    label_divisor = max(int(label_count), 1) if mean else 1
    pixel_divisor = max(s["B"] * s["H"] * s["W"], 1) if mean else 1
    if size is None:
        row_readers, col_readers, cols = 1, 1, 1
        block_c, block_e, num_warps = _launch.tiles(s["C"], s["H"] * s["W"], s["B"], x.dtype, x.device)
        if not _launch.interpreter():
            block_c = min(block_c, gpu_backward_tile(x.dtype)[0])
    else:
        row_readers, col_readers = readers(s["h"], s["H"]), readers(s["w"], s["W"])
        block_c, block_e, cols, num_warps = gather_tiles(s["C"], col_readers, x.dtype)
    grid = (triton.cdiv(s["h"] * s["w"], block_e), triton.cdiv(s["C"], block_c), s["B"])
    _sigmoid_bwd_kernel[grid](
        *grads,
        x,
        x if target is None else target,
        x if y is None else y,
        pos,
        weight,
        grad_x,
        label_divisor,
        pixel_divisor,
        s["C"],
        s["Co"],
        s["H"],
        s["W"],
        s["h"],
        s["w"],
        s["y_h"],
        s["y_w"],
        row_readers,
        col_readers,
        negative_channels,
        label_channels_from,
        int(ignore_index),
        *_launch.split_float(-1.0 if pseudo_threshold is None else float(pseudo_threshold)),
        pseudo_background,
        **_flags(target, pseudo_threshold, ignored_pixels, size, acc_tl),
        PER_PIXEL=reduction == "none",
        BLOCK_C=block_c,
        BLOCK_E=block_e,
        COLS=cols,
        num_warps=num_warps,
        enable_fp_fusion=_launch.FP_FUSION,
    )
    return grad_x
