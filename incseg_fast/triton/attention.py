"""Triton kernels for CAF's attentive distillation and structured attention (MATH.md#feature-losses).

Tiles are (BLOCK_C channels, BLOCK_P contiguous pixels) of one image, looping over the channel
tiles of one channel group. Per-pixel quantities (S = sum_c f^2, P = sum_c D a f) are reduced
over a group's channels in registers and written as one partial per group; per-channel quantities
(dL/da) as one partial per pixel block; torch adds the partials up in a fixed order. The launchers
are the kernels of the ops incseg_fast_triton::attentive_distillation_forward/backward and
structured_attention(_backward) (schemas in csrc/ops.cpp; fake kernels and autograd in
incseg_fast/ops/attention.py). Gradient derivations are beside the kernels.
"""

import torch
import triton
import triton.language as tl

from .._validate import teacher_dtype
from ..vocabulary import FEATURE_REDUCTIONS
from . import _launch

__all__ = [
    "attentive_distillation_forward",
    "attentive_distillation_backward",
    "structured_attention",
    "structured_attention_backward",
]


# ---------------------------------------------------------------------------------------------
# The grid is (pixel blocks, channel groups, B): a program owns BLOCK_P pixels of one image and the
# channels [group * channels_per_group, ...) of one group, looping over them BLOCK_C at a time.
# Deep features on small maps (2048 x 32 x 32) have few pixel blocks, so the channels are split
# too (_launch.channel_groups); reductions over channels then leave one partial per group, which
# torch adds up over the (short) group axis.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _program_tile(HW, channels_per_group, C, BLOCK_P: tl.constexpr):
    """(b, pixel offsets, in-image mask, first channel, end of this program's channels)."""
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_start = tl.program_id(1) * channels_per_group
    c_stop = tl.minimum(C, c_start + channels_per_group)
    return b, p, p < HW, c_start, c_stop


# Structured attention (MATH.md#sab): out = (1 + a_ch[b,c] a_sp[b,p]) v[b,c,p].
@triton.jit
def _structured_attention_fwd_kernel(
    v_ptr,
    a_ch_ptr,
    a_sp_ptr,
    out_ptr,
    C,
    HW,
    channels_per_group,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    a_sp = tl.load(a_sp_ptr + b * HW + p, mask=in_image, other=0.0).to(ACC)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < c_stop
        a_ch = tl.load(a_ch_ptr + b * C + c, mask=in_c, other=0.0).to(ACC)
        offsets = (b * C + c[:, None]) * HW + p[None, :]
        tile_mask = in_c[:, None] & in_image[None, :]
        v = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
        out = (1.0 + a_ch[:, None] * a_sp[None, :]) * v
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=tile_mask)


# With G = dL/dout:  dL/dv = G (1 + a_ch a_sp),  dL/da_sp[p] = sum_c G v a_ch (one partial per
# channel group), dL/da_ch[c] = sum_p G v a_sp (one partial per pixel block).
@triton.jit
def _structured_attention_bwd_kernel(
    grad_out_ptr,
    v_ptr,
    a_ch_ptr,
    a_sp_ptr,
    grad_v_ptr,  # out: (B, C, HW) dL/dv (NEED_V)
    grad_a_sp_part_ptr,  # out: (groups, B, HW) per-group partials of dL/da_sp (NEED_SP)
    grad_a_ch_part_ptr,  # out: (B, pixel blocks, C) per-block partials of dL/da_ch (NEED_CH)
    C,
    HW,
    channels_per_group,
    NEED_V: tl.constexpr,
    NEED_CH: tl.constexpr,
    NEED_SP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    pixel_part = b * tl.num_programs(0) + tl.program_id(0)
    a_sp = tl.load(a_sp_ptr + b * HW + p, mask=in_image, other=0.0).to(ACC)
    grad_a_sp = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < c_stop
        a_ch = tl.load(a_ch_ptr + b * C + c, mask=in_c, other=0.0).to(ACC)
        offsets = (b * C + c[:, None]) * HW + p[None, :]
        tile_mask = in_c[:, None] & in_image[None, :]
        grad_out = tl.load(grad_out_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
        if NEED_V:
            grad_v = grad_out * (1.0 + a_ch[:, None] * a_sp[None, :])
            tl.store(grad_v_ptr + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_CH or NEED_SP:
            grad_times_v = grad_out * tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
            if NEED_SP:
                grad_a_sp += tl.sum(grad_times_v * a_ch[:, None], axis=0)
            if NEED_CH:
                tl.store(
                    grad_a_ch_part_ptr + pixel_part * C + c, tl.sum(grad_times_v * a_sp[None, :], axis=1), mask=in_c
                )
    if NEED_SP:
        group_row = tl.program_id(1) * tl.num_programs(2) + b
        tl.store(grad_a_sp_part_ptr + group_row * HW + p, grad_a_sp, mask=in_image)


def _check_structured_attention(v, a_ch, a_sp):
    if v.dim() != 4:
        raise ValueError(f"v must be (B, C, H, W), got shape {tuple(v.shape)}")
    B, C, H, W = v.shape
    if tuple(a_ch.shape) != (B, C):
        raise ValueError(f"a_ch must have shape {(B, C)}, got {tuple(a_ch.shape)}")
    if tuple(a_sp.shape) != (B, H, W):
        raise ValueError(f"a_sp must have shape {(B, H, W)}, got {tuple(a_sp.shape)}")
    _launch.check_device(v, a_ch, a_sp)


def _geometry(features):
    """Grid, tiles and channel groups for (B, C, H, W) ``features``."""
    B, C, H, W = features.shape
    block_c, block_p, num_warps = _launch.tiles(C, H * W, B, features.dtype, features.device)
    pixel_blocks = triton.cdiv(H * W, block_p)
    per_group, groups = _launch.channel_groups(C, block_c, pixel_blocks * B, features.device)
    meta = dict(BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps, enable_fp_fusion=_launch.FP_FUSION)
    return (pixel_blocks, groups, B), per_group, meta


def structured_attention(v, a_ch, a_sp):
    """The kernel of incseg_fast_triton::structured_attention: (1 + a_ch ⊗ a_sp) * v in v's dtype."""
    _check_structured_attention(v, a_ch, a_sp)
    v, a_ch, a_sp = v.contiguous(), a_ch.contiguous(), a_sp.contiguous()
    B, C, H, W = v.shape
    _, acc_tl = _launch.accumulator_dtype(v.dtype)
    grid, per_group, meta = _geometry(v)
    out = torch.empty_like(v)
    _structured_attention_fwd_kernel[grid](v, a_ch, a_sp, out, C, H * W, per_group, ACC=acc_tl, **meta)
    return out


def structured_attention_backward(grad_out, v, a_ch, a_sp, output_mask):
    """The kernel of incseg_fast_triton::structured_attention_backward: (dv, da_ch, da_sp), empty where masked."""
    _check_structured_attention(v, a_ch, a_sp)
    if grad_out.shape != v.shape:
        raise ValueError(f"grad_out must have shape {tuple(v.shape)}, got {tuple(grad_out.shape)}")
    want_v, want_ch, want_sp = output_mask
    if not any(output_mask):
        return v.new_empty((0,)), a_ch.new_empty((0,)), a_sp.new_empty((0,))
    grad_out, v, a_ch, a_sp = grad_out.contiguous(), v.contiguous(), a_ch.contiguous(), a_sp.contiguous()
    B, C, H, W = v.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(v.dtype)
    grid, per_group, meta = _geometry(v)
    grad_v = torch.empty_like(v) if want_v else v  # not written unless wanted
    grad_a_sp_parts = v.new_empty((grid[1], B, H, W), dtype=acc_torch) if want_sp else v
    grad_a_ch_parts = v.new_empty((B, grid[0], C), dtype=acc_torch) if want_ch else v
    _structured_attention_bwd_kernel[grid](
        grad_out,
        v,
        a_ch,
        a_sp,
        grad_v,
        grad_a_sp_parts,
        grad_a_ch_parts,
        C,
        H * W,
        per_group,
        NEED_V=want_v,
        NEED_CH=want_ch,
        NEED_SP=want_sp,
        ACC=acc_tl,
        **meta,
    )
    return (
        grad_v if want_v else v.new_empty((0,)),
        grad_a_ch_parts.sum(dim=1).to(a_ch.dtype) if want_ch else a_ch.new_empty((0,)),
        grad_a_sp_parts.sum(dim=0).to(a_sp.dtype) if want_sp else a_sp.new_empty((0,)),
    )


# ---------------------------------------------------------------------------------------------
# Attentive distillation (MATH.md#ad):
#   S_f[p] = sum_c f_c^2,  N_f = sqrt(sum_p S_f^2),  Ŝ_f = S_f / N_f (0 where N_f = 0),
#   D = (a Ŝ_f + 1) f - (b Ŝ_g + 1) g,  L = sum D^2 (/ B C H W for "mean").
# When the old model nearly matches the new one (g ≈ f, b ≈ a: right after a step starts) D is a
# small difference of large terms, and float32 products would lose its leading digits. So D is
# formed from differences that are computed directly:
#   D = (f - g)(1 + b Ŝ_g) + f ((a - b) Ŝ_f + b ΔŜ),   ΔŜ = Ŝ_f - Ŝ_g = ΔS/N_f - S_g ΔN/(N_f N_g),
#   ΔS = sum_c (f - g)(f + g),   ΔN = N_f - N_g = sum_p ΔS (S_f + S_g) / (N_f + N_g).
# Forward: pass 1 writes per-group partials of S_f, S_g, ΔS; torch adds them and forms 1/N and the
# saved maps Ŝ_f, Ŝ_g, ΔŜ (the state every backend saves, csrc/ops.cpp); pass 2 writes one partial
# of sum D^2 per program and, when the spatial map will be differentiated, per-group partials of
# P_f = sum_c D a f and P_g = sum_c D b g (dL/dŜ per unit of upstream gradient).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _saved_maps(spatial_ptr, b, p, in_image, HW):
    """Ŝ_f, Ŝ_g and ΔŜ = Ŝ_f - Ŝ_g at pixels p of image b, from the saved (3, B, HW) maps."""
    B = tl.num_programs(2)
    s_hat_f = tl.load(spatial_ptr + b * HW + p, mask=in_image, other=0.0)
    s_hat_g = tl.load(spatial_ptr + (B + b) * HW + p, mask=in_image, other=0.0)
    delta_s_hat = tl.load(spatial_ptr + (2 * B + b) * HW + p, mask=in_image, other=0.0)
    return s_hat_f, s_hat_g, delta_s_hat


@triton.jit
def _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat):
    """D = (a Ŝ_f + 1) f - (b Ŝ_g + 1) g, written so that nearly equal pairs keep their precision."""
    return (f - g) * (1.0 + b_att[:, None] * s_hat_g[None, :]) + f * (
        (a - b_att)[:, None] * s_hat_f[None, :] + b_att[:, None] * delta_s_hat[None, :]
    )


@triton.jit
def _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C: tl.constexpr):
    """Channels [c0, min(c0 + BLOCK_C, c_stop)) of image b at pixels p: indices and masks."""
    c = c0 + tl.arange(0, BLOCK_C)
    in_c = c < c_stop
    offsets = (b * C + c[:, None]) * HW + p[None, :]
    return c, in_c, offsets, in_c[:, None] & in_image[None, :]


@triton.jit
def _load_pair(f_ptr, g_ptr, a_ptr, b_ptr, b, c, in_c, offsets, tile_mask, C, ACC: tl.constexpr):
    """The f, g tiles and the a, b rows of one channel tile, in the accumulation dtype."""
    f = tl.load(f_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + b * C + c, mask=in_c, other=0.0).to(ACC)
    b_att = tl.load(b_ptr + b * C + c, mask=in_c, other=0.0).to(ACC)
    return f, g, a, b_att


@triton.jit
def _ad_spatial_kernel(
    f_ptr,
    g_ptr,
    spatial_part_ptr,  # out: (3, groups, B, HW) per-group partials of S_f, S_g, ΔS
    C,
    HW,
    channels_per_group,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    s_f = tl.zeros([BLOCK_P], dtype=ACC)
    s_g = tl.zeros([BLOCK_P], dtype=ACC)
    delta_s = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(c_start, c_stop, BLOCK_C):
        _, _, offsets, tile_mask = _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C)
        f = tl.load(f_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
        s_f += tl.sum(f * f, axis=0)
        s_g += tl.sum(g * g, axis=0)
        delta_s += tl.sum((f - g) * (f + g), axis=0)
    row = tl.program_id(1) * tl.num_programs(2) + b
    rows_per_map = tl.num_programs(1) * tl.num_programs(2)
    tl.store(spatial_part_ptr + row * HW + p, s_f, mask=in_image)
    tl.store(spatial_part_ptr + (rows_per_map + row) * HW + p, s_g, mask=in_image)
    tl.store(spatial_part_ptr + (2 * rows_per_map + row) * HW + p, delta_s, mask=in_image)


@triton.jit
def _ad_loss_kernel(
    f_ptr,
    g_ptr,
    a_ptr,
    b_ptr,
    spatial_ptr,  # (3, B, HW) the saved maps Ŝ_f, Ŝ_g, ΔŜ
    loss_part_ptr,  # out: (B, groups, pixel blocks) partial sums of D^2
    p_part_ptr,  # out: (2, groups, B, HW) per-group partials of P_f, P_g (SAVE_P)
    C,
    HW,
    channels_per_group,
    SAVE_P: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    s_hat_f, s_hat_g, delta_s_hat = _saved_maps(spatial_ptr, b, p, in_image, HW)
    total = tl.zeros([BLOCK_P], dtype=ACC)
    p_f = tl.zeros([BLOCK_P], dtype=ACC)
    p_g = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c, in_c, offsets, tile_mask = _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C)
        f, g, a, b_att = _load_pair(f_ptr, g_ptr, a_ptr, b_ptr, b, c, in_c, offsets, tile_mask, C, ACC)
        diff = _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat)
        total += tl.sum(diff * diff, axis=0)
        if SAVE_P:
            p_f += tl.sum(diff * a[:, None] * f, axis=0)
            p_g += tl.sum(diff * b_att[:, None] * g, axis=0)
    part = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(loss_part_ptr + part, tl.sum(total, axis=0))
    if SAVE_P:
        row = tl.program_id(1) * tl.num_programs(2) + b
        tl.store(p_part_ptr + row * HW + p, p_f, mask=in_image)
        tl.store(p_part_ptr + (tl.num_programs(1) * tl.num_programs(2) + row) * HW + p, p_g, mask=in_image)


# Backward, with w = 2 dL/dloss (/ B C H W for "mean") so that dL/dD = w D:
#   dL/da[c] = w sum_p D Ŝ_f f             dL/db[c] = -w sum_p D Ŝ_g g
#   dL/dŜ_f[p] = w P_f[p],  dL/dŜ_g[p] = -w P_g[p]   (P saved by the forward)
# Through Ŝ = S/N with dŜ_p/dS_q = (δ_pq - Ŝ_p Ŝ_q)/N:  dL/dS_f = w (1/N_f)(P_f - Ŝ_f T_f), T_f = sum_p P_f Ŝ_f
# (likewise for g with -w), and dS/df_c = 2 f_c, so with sgrad = (1/N)(P - Ŝ T) per pixel:
#   dL/df = w [D (a Ŝ_f + 1) + 2 f sgrad_f],   dL/dg = -w [D (b Ŝ_g + 1) + 2 g sgrad_g].
# sgrad is formed by torch from the saved P (two (B, H, W) maps) before the one pass over f and g.
@triton.jit
def _ad_bwd_kernel(
    f_ptr,
    g_ptr,
    a_ptr,
    b_ptr,
    spatial_ptr,  # (3, B, HW) the saved maps Ŝ_f, Ŝ_g, ΔŜ
    grad_ptr,  # 0-dim upstream gradient of the loss
    sgrad_ptr,  # (2, B, HW) sgrad_f, sgrad_g (read when SPATIAL)
    grad_f_ptr,
    grad_g_ptr,  # out: (B, C, HW) (NEED_F, NEED_G)
    grad_a_part_ptr,
    grad_b_part_ptr,  # out: (B, pixel blocks, C) partials (NEED_A, NEED_B)
    C,
    HW,
    channels_per_group,
    divisor,
    SPATIAL: tl.constexpr,
    NEED_F: tl.constexpr,
    NEED_G: tl.constexpr,
    NEED_A: tl.constexpr,
    NEED_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    B = tl.num_programs(2)
    pixel_part = b * tl.num_programs(0) + tl.program_id(0)
    w = 2.0 * tl.load(grad_ptr).to(ACC) / divisor
    s_hat_f, s_hat_g, delta_s_hat = _saved_maps(spatial_ptr, b, p, in_image, HW)
    # Per-pixel factor of f (resp. g) in the spatial term: 2 sgrad.
    spatial_f = tl.zeros([BLOCK_P], dtype=ACC)
    spatial_g = tl.zeros([BLOCK_P], dtype=ACC)
    if SPATIAL:
        spatial_f = 2.0 * tl.load(sgrad_ptr + b * HW + p, mask=in_image, other=0.0)
        spatial_g = 2.0 * tl.load(sgrad_ptr + (B + b) * HW + p, mask=in_image, other=0.0)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c, in_c, offsets, tile_mask = _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C)
        f, g, a, b_att = _load_pair(f_ptr, g_ptr, a_ptr, b_ptr, b, c, in_c, offsets, tile_mask, C, ACC)
        w_diff = w * _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat)
        if NEED_F:
            grad_f = w_diff * (a[:, None] * s_hat_f[None, :] + 1.0) + w * f * spatial_f[None, :]
            tl.store(grad_f_ptr + offsets, grad_f.to(grad_f_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_G:
            grad_g = -(w_diff * (b_att[:, None] * s_hat_g[None, :] + 1.0) + w * g * spatial_g[None, :])
            tl.store(grad_g_ptr + offsets, grad_g.to(grad_g_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_A:
            tl.store(grad_a_part_ptr + pixel_part * C + c, tl.sum(w_diff * s_hat_f[None, :] * f, axis=1), mask=in_c)
        if NEED_B:
            tl.store(grad_b_part_ptr + pixel_part * C + c, -tl.sum(w_diff * s_hat_g[None, :] * g, axis=1), mask=in_c)


def _check_attentive_distillation(f, g, a, b, reduction):
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FEATURE_REDUCTIONS}, got {reduction!r}")
    if f.dim() != 4:
        raise ValueError(f"f must be (B, C, H, W), got shape {tuple(f.shape)}")
    if g.shape != f.shape:
        raise ValueError(f"g must have the shape of f {tuple(f.shape)}, got {tuple(g.shape)}")
    for name, attention in (("a", a), ("b", b)):
        if tuple(attention.shape) != tuple(f.shape[:2]):
            raise ValueError(f"{name} must have shape {tuple(f.shape[:2])}, got {tuple(attention.shape)}")
    _launch.check_device(f, g, a, b)
    teacher_dtype(g, "g", f, "f")  # g, b: read in their own dtype by the loads (MATH.md#teacher-dtype)


def _saved_state(spatial_sums):
    """The saved maps (Ŝ_f, Ŝ_g, ΔŜ) (3, B, H, W) and 1/N (2, B) from S_f, S_g, ΔS (3, B, H, W).

    Formed in float64 (B·H·W values, not features) and rounded once: N² = Σ_p S² of float32 maps
    underflows for features below ~1e-10 (Ŝ became 0, the gradients tens of percent off) and
    overflows above ~1e9 (NaN), while S itself stays a normal float32 from ~1e-19 to ~1e19
    (RELIABILITY.md#numerics).
    """
    dtype = spatial_sums.dtype
    spatial_sums = spatial_sums.double()
    s_f, s_g, delta_s = spatial_sums
    norm_f, norm_g = spatial_sums[:2].square().sum(dim=(2, 3)).sqrt()
    norm_sum = norm_f + norm_g
    squares_difference = (delta_s * (s_f + s_g)).sum(dim=(1, 2))  # N_f^2 - N_g^2
    # "!= 0", never "> 0": a NaN norm (a NaN feature) must stay NaN, not pass for an all-zero map.
    nonzero = norm_sum != 0
    norm_difference = torch.where(nonzero, squares_difference / torch.where(nonzero, norm_sum, 1.0), 0.0)
    inv_f = torch.where(norm_f != 0, 1.0 / torch.where(norm_f != 0, norm_f, 1.0), 0.0)
    inv_g = torch.where(norm_g != 0, 1.0 / torch.where(norm_g != 0, norm_g, 1.0), 0.0)
    s_hat_f = s_f * inv_f[:, None, None]
    s_hat_g = s_g * inv_g[:, None, None]
    # The difference form is for nearly equal maps (norms within a factor of 2, finite and nonzero).
    # Otherwise Ŝ_f - Ŝ_g itself: with N_f << N_g the form's two terms are ~ΔS/N_f and cancel (3.6e-5
    # loss error for features of 1e-12 against 1), and an infinite norm makes norm_difference NaN,
    # which must not reach the pixels whose Ŝ is 0.
    close = (norm_f <= 2 * norm_g) & (norm_g <= 2 * norm_f) & (norm_f != 0) & torch.isfinite(norm_sum)
    both = close[:, None, None]
    delta_s_hat = torch.where(
        both, delta_s * inv_f[:, None, None] - s_g * (norm_difference * inv_f * inv_g)[:, None, None], s_hat_f - s_hat_g
    )
    return torch.stack([s_hat_f, s_hat_g, delta_s_hat]).to(dtype), torch.stack([inv_f, inv_g]).to(dtype)


def attentive_distillation_forward(f, g, a, b, reduction, save_spatial_grad):
    """The kernel of incseg_fast_triton::attentive_distillation_forward: (loss, spatial, inv_norm, pixel_grad)."""
    _check_attentive_distillation(f, g, a, b, reduction)
    f, g, a, b = f.contiguous(), g.contiguous(), a.contiguous(), b.contiguous()
    B, C, H, W = f.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(f.dtype)
    grid, per_group, meta = _geometry(f)

    spatial_parts = f.new_empty((3, grid[1], B, H, W), dtype=acc_torch)
    _ad_spatial_kernel[grid](f, g, spatial_parts, C, H * W, per_group, ACC=acc_tl, **meta)
    spatial, inv_norm = _saved_state(spatial_parts.sum(dim=1))

    loss_parts = f.new_empty((B, grid[1], grid[0]), dtype=acc_torch)
    p_parts = f.new_empty((2, grid[1], B, H, W), dtype=acc_torch) if save_spatial_grad else loss_parts
    _ad_loss_kernel[grid](
        f, g, a, b, spatial, loss_parts, p_parts, C, H * W, per_group, SAVE_P=save_spatial_grad, ACC=acc_tl, **meta
    )
    loss = loss_parts.sum()
    if reduction == "mean":
        loss = loss / f.numel()
    pixel_grad = p_parts.sum(dim=1) if save_spatial_grad else f.new_empty((0,), dtype=acc_torch)
    return loss, spatial, inv_norm, pixel_grad


def attentive_distillation_backward(
    grad_loss, f, g, a, b, spatial, inv_norm, pixel_grad, reduction, spatial_chain, output_mask
):
    """The kernel of incseg_fast_triton::attentive_distillation_backward: (df, dg, da, db), empty where masked."""
    _check_attentive_distillation(f, g, a, b, reduction)
    B, C, H, W = f.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(f.dtype)
    if tuple(spatial.shape) != (3, B, H, W) or tuple(inv_norm.shape) != (2, B):
        raise ValueError(
            f"spatial and inv_norm must be the forward's {(3, B, H, W)} and {(2, B)} saved state, "
            f"got {tuple(spatial.shape)} and {tuple(inv_norm.shape)}"
        )
    want_f, want_g, want_a, want_b = output_mask
    use_pixel_grad = spatial_chain and (want_f or want_g)
    if use_pixel_grad and tuple(pixel_grad.shape) != (2, B, H, W):
        raise ValueError(
            f"pixel_grad must be the forward's {(2, B, H, W)} saved P (forward with "
            f"save_spatial_grad), got {tuple(pixel_grad.shape)}"
        )
    _launch.check_device(grad_loss, spatial, inv_norm)
    empty = (f.new_empty((0,)), g.new_empty((0,)), a.new_empty((0,)), b.new_empty((0,)))
    if not any(output_mask):
        return empty
    f, g, a, b = f.contiguous(), g.contiguous(), a.contiguous(), b.contiguous()
    spatial = spatial.contiguous()
    grid, per_group, meta = _geometry(f)
    sgrad = spatial  # not read unless use_pixel_grad
    if use_pixel_grad:
        dot = (pixel_grad * spatial[:2]).sum(dim=(2, 3))  # T per side and image
        sgrad = (inv_norm[:, :, None, None] * (pixel_grad - spatial[:2] * dot[:, :, None, None])).contiguous()
    grad_f = torch.empty_like(f) if want_f else f  # not written unless wanted
    grad_g = torch.empty_like(g) if want_g else f
    grad_a_parts = f.new_empty((B, grid[0], C), dtype=acc_torch) if want_a else f
    grad_b_parts = f.new_empty((B, grid[0], C), dtype=acc_torch) if want_b else f
    _ad_bwd_kernel[grid](
        f,
        g,
        a,
        b,
        spatial,
        grad_loss.to(acc_torch),
        sgrad,
        grad_f,
        grad_g,
        grad_a_parts,
        grad_b_parts,
        C,
        H * W,
        per_group,
        f.numel() if reduction == "mean" else 1,
        SPATIAL=use_pixel_grad,
        NEED_F=want_f,
        NEED_G=want_g,
        NEED_A=want_a,
        NEED_B=want_b,
        ACC=acc_tl,
        **meta,
    )
    return (
        grad_f if want_f else empty[0],
        grad_g if want_g else empty[1],
        grad_a_parts.sum(dim=1).to(a.dtype) if want_a else empty[2],
        grad_b_parts.sum(dim=1).to(b.dtype) if want_b else empty[3],
    )
