"""Triton kernels of PLOP's Local POD (MATH.md#local-pod): the kernels of incseg_fast_triton::local_pod_*.

Forward: one launch per scale, one program per (image, channel, row block of the scale): it reads
the block's rows once (e = (new - old)(new + old)), writes their width-pooled means and the block's
height-pooled means into P (csrc/common/pod_math.h's layout), scratch of the call. The per-image
distances come from P in float64 by torch (P is far smaller than the features, and torch's
reductions have a fixed order). Backward: the same pooling again (P lives only during the call),
then one program per (image, channel, rows tile) gathers each element's P terms of every scale and
writes 2 k_n new (Σ P^w / w + P^h / h) once.
"""

import math

import torch
import triton
import triton.language as tl

from ..ops.pod import pooled_size
from ..vocabulary import REDUCTIONS
from . import _launch

# Elements per program tile: rows x pooled blocks x columns in the forward; rows x columns in the
# backward, whose gathers of every scale's P keep more values live (4096 spilled in float64 on sm_90).
_TILE = 4096
_GRAD_TILE = 1024


@triton.jit
def _pool_kernel(
    new_ptr,
    old_ptr,
    pooled_ptr,
    H,
    W,
    P,
    s,
    h,
    w,
    offset,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    q = tl.arange(0, BLOCK_W)
    j = tl.arange(0, BLOCK_S)
    in_columns = q < s * w
    in_block = ((q[None, :] // w) == j[:, None]) & in_columns[None, :]  # [BLOCK_S, BLOCK_W]: column q in block j
    column_sums = tl.zeros([BLOCK_W], dtype=ACC)
    features = plane * H * W
    out = pooled_ptr + plane * P + offset
    for r0 in range(i * h, (i + 1) * h, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_rows = r < (i + 1) * h
        mask = in_rows[:, None] & in_columns[None, :]
        offsets = features + r[:, None] * W + q[None, :]
        a = tl.load(new_ptr + offsets, mask=mask, other=0.0).to(ACC)
        b = tl.load(old_ptr + offsets, mask=mask, other=0.0).to(ACC)
        e = (a - b) * (a + b)
        column_sums += tl.sum(e, axis=0)
        row_sums = tl.sum(tl.where(in_block[None, :, :], e[:, None, :], 0.0), axis=2)  # [BLOCK_R, BLOCK_S]
        tl.store(out + r[:, None] * s + j[None, :], row_sums / w, mask=in_rows[:, None] & (j[None, :] < s))
    tl.store(out + s * s * h + i * (s * w) + q, column_sums / h, mask=in_columns)


@triton.jit
def _grad_kernel(
    new_ptr,
    pooled_ptr,
    geometry_ptr,
    weight_ptr,
    grad_ptr,
    C,
    H,
    W,
    P,
    num_scales,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    q = tl.arange(0, BLOCK_W)
    mask = (r < H)[:, None] & (q < W)[None, :]
    pooled = pooled_ptr + plane * P
    spread = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    for k in range(num_scales):
        s = tl.load(geometry_ptr + 4 * k)
        h = tl.load(geometry_ptr + 4 * k + 1)
        w = tl.load(geometry_ptr + 4 * k + 2)
        offset = tl.load(geometry_ptr + 4 * k + 3)
        in_cell = mask & (r < s * h)[:, None] & (q < s * w)[None, :]
        width_means = tl.load(pooled + offset + r[:, None] * s + q[None, :] // w, mask=in_cell, other=0.0)
        height_means = tl.load(
            pooled + offset + s * s * h + (r[:, None] // h) * (s * w) + q[None, :], mask=in_cell, other=0.0
        )
        spread += width_means / w + height_means / h
    weight = tl.load(weight_ptr + plane // C)
    offsets = plane * H * W + r[:, None] * W + q[None, :]
    a = tl.load(new_ptr + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(grad_ptr + offsets, (weight * a * spread).to(grad_ptr.dtype.element_ty), mask=mask)


def _check(new, scales, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if new.dim() != 4 or new.numel() == 0:
        raise ValueError(f"new must be non-empty (B, C, H, W), got shape {tuple(new.shape)}")
    H, W = new.shape[2:]
    if not scales or any(not 1 <= s <= min(H, W) for s in scales):
        raise ValueError(f"every scale must be in [1, min(H, W)] = [1, {min(H, W)}], got {list(scales)}")


def _geometry(H, W, scales):
    """Per scale (s, h, w, offset of its block in a channel's pooled values)."""
    rows, offset = [], 0
    for s in scales:
        rows.append((s, H // s, W // s, offset))
        offset += s * s * (H // s + W // s)
    return rows


def _rows_per_tile(*block, tile=_TILE):
    """Rows of a program's tile: ``tile`` elements with the other (power-of-two) block sizes."""
    return max(1, tile // math.prod(block))


def pool_blocks(H, W, s):
    """(BLOCK_R, BLOCK_S, BLOCK_W) of the pooling at scale s: all pooled columns, s column blocks."""
    block_s, block_w = triton.next_power_of_2(s), triton.next_power_of_2(s * (W // s))
    return min(_rows_per_tile(block_s, block_w), triton.next_power_of_2(H // s)), block_s, block_w


def grad_blocks(H, W):
    """(BLOCK_R, BLOCK_W) of the backward: whole rows."""
    block_w = triton.next_power_of_2(W)
    return min(_rows_per_tile(block_w, tile=_GRAD_TILE), triton.next_power_of_2(H)), block_w


def _pool(new, old, scales):
    """P (B, C, pooled) of contiguous ``new`` and ``old``, in the accumulation dtype."""
    B, C, H, W = new.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(new.dtype)
    P = pooled_size(H, W, scales)
    pooled = new.new_empty((B, C, P), dtype=acc_torch)
    for s, h, w, offset in _geometry(H, W, scales):
        block_r, block_s, block_w = pool_blocks(H, W, s)
        _pool_kernel[(B * C, s)](
            new,
            old,
            pooled,
            H,
            W,
            P,
            s,
            h,
            w,
            offset,
            ACC=acc_tl,
            BLOCK_R=block_r,
            BLOCK_S=block_s,
            BLOCK_W=block_w,
            enable_fp_fusion=_launch.FP_FUSION,
        )
    return pooled


def _check_pair(new, old, scales, reduction):
    _check(new, scales, reduction)
    if old.shape != new.shape:
        raise ValueError(f"old must have new's shape {tuple(new.shape)}, got {tuple(old.shape)}")


def local_pod_forward(new, old, scales, reduction):
    """The kernel of incseg_fast_triton::local_pod_forward: (loss, inv_norm)."""
    _check_pair(new, old, scales, reduction)
    _launch.check_device(new, old)
    B = new.shape[0]
    acc_torch, _ = _launch.accumulator_dtype(new.dtype)
    pooled = _pool(new.contiguous(), old.contiguous(), scales)
    squared = pooled.to(torch.float64).square().sum(dim=(1, 2))
    lengths = squared.sqrt()
    # "!= 0", never "> 0": a NaN distance stays NaN instead of passing for a zero one.
    inv_norm = torch.where(squared != 0, 1.0 / torch.where(squared != 0, lengths, 1.0), 0.0).to(acc_torch)
    if reduction == "none":
        loss = lengths
    else:
        loss = lengths.sum() / (B if reduction == "mean" else 1)
    return loss.to(acc_torch), inv_norm


def local_pod_backward(grad_loss, new, old, inv_norm, scales, reduction):
    """The kernel of incseg_fast_triton::local_pod_backward: d loss / d new, pooling again."""
    _check_pair(new, old, scales, reduction)
    B, C, H, W = new.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(new.dtype)
    if tuple(inv_norm.shape) != (B,):
        raise ValueError(f"inv_norm must be the forward's {(B,)} saved state, got {tuple(inv_norm.shape)}")
    _launch.check_device(grad_loss, new, old, inv_norm)
    new = new.contiguous()
    pooled = _pool(new, old.contiguous(), scales)
    scale = 1.0 / B if reduction == "mean" else 1.0
    weight = (2 * scale * grad_loss.to(acc_torch).reshape(-1).expand(B) * inv_norm).contiguous()
    geometry = torch.tensor(_geometry(H, W, scales), dtype=torch.int32, device=new.device)
    grad = torch.empty_like(new)
    block_r, block_w = grad_blocks(H, W)
    _grad_kernel[(B * C, triton.cdiv(H, block_r))](
        new,
        pooled,
        geometry,
        weight,
        grad,
        C,
        H,
        W,
        pooled.shape[2],
        len(scales),
        ACC=acc_tl,
        BLOCK_R=block_r,
        BLOCK_W=block_w,
        enable_fp_fusion=_launch.FP_FUSION,
    )
    return grad
