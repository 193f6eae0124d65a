"""Triton kernels for CAF's attentive distillation and structured attention (SPEC §3).

Tiles are (BLOCK_C channels, BLOCK_P contiguous pixels) of one image, looping over the channel
tiles of one channel group. Per-pixel quantities (S = sum_c f^2, the backward's dL/dŜ) are reduced
over a group's channels in registers and written as one partial per group; per-channel quantities
(dL/da) as one partial per pixel block; torch adds the partials up in a fixed order. Registered as
torch.library custom ops (namespace incseg_fast_triton). Gradient derivations are beside the kernels.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import _launch

__all__ = ["attentive_distillation", "structured_attention"]


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


# Structured attention (SPEC 3.2): out = (1 + a_ch[b,c] a_sp[b,p]) v[b,c,p].
@triton.jit
def _structured_attention_fwd_kernel(
    v_ptr, a_ch_ptr, a_sp_ptr, out_ptr, C, HW, channels_per_group,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
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
    grad_out_ptr, v_ptr, a_ch_ptr, a_sp_ptr, grad_v_ptr, grad_a_sp_part_ptr, grad_a_ch_part_ptr,
    C, HW, channels_per_group,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
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
        v = tl.load(v_ptr + offsets, mask=tile_mask, other=0.0).to(ACC)
        grad_v = grad_out * (1.0 + a_ch[:, None] * a_sp[None, :])
        tl.store(grad_v_ptr + offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=tile_mask)
        grad_times_v = grad_out * v
        grad_a_sp += tl.sum(grad_times_v * a_ch[:, None], axis=0)
        tl.store(grad_a_ch_part_ptr + pixel_part * C + c, tl.sum(grad_times_v * a_sp[None, :], axis=1), mask=in_c)
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
    meta = dict(BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return (pixel_blocks, groups, B), per_group, meta


@torch.library.custom_op("incseg_fast_triton::structured_attention_forward", mutates_args=())
def structured_attention_forward(v: torch.Tensor, a_ch: torch.Tensor, a_sp: torch.Tensor) -> torch.Tensor:
    _check_structured_attention(v, a_ch, a_sp)
    v, a_ch, a_sp = v.contiguous(), a_ch.contiguous(), a_sp.contiguous()
    B, C, H, W = v.shape
    _, acc_tl = _launch.accumulator_dtype(v.dtype)
    grid, per_group, meta = _geometry(v)
    out = torch.empty_like(v)
    _structured_attention_fwd_kernel[grid](v, a_ch, a_sp, out, C, H * W, per_group, ACC=acc_tl, **meta)
    return out


@structured_attention_forward.register_fake
def _structured_attention_forward_fake(v, a_ch, a_sp):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("incseg_fast_triton::structured_attention_backward", mutates_args=())
def structured_attention_backward(
    grad_out: torch.Tensor, v: torch.Tensor, a_ch: torch.Tensor, a_sp: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_structured_attention(v, a_ch, a_sp)
    if grad_out.shape != v.shape:
        raise ValueError(f"grad_out must have shape {tuple(v.shape)}, got {tuple(grad_out.shape)}")
    grad_out, v, a_ch, a_sp = grad_out.contiguous(), v.contiguous(), a_ch.contiguous(), a_sp.contiguous()
    B, C, H, W = v.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(v.dtype)
    grid, per_group, meta = _geometry(v)
    grad_v = torch.empty_like(v)
    grad_a_sp_parts = v.new_empty((grid[1], B, H, W), dtype=acc_torch)
    grad_a_ch_parts = v.new_empty((B, grid[0], C), dtype=acc_torch)
    _structured_attention_bwd_kernel[grid](
        grad_out, v, a_ch, a_sp, grad_v, grad_a_sp_parts, grad_a_ch_parts, C, H * W, per_group,
        ACC=acc_tl, **meta,
    )
    return grad_v, grad_a_ch_parts.sum(dim=1).to(a_ch.dtype), grad_a_sp_parts.sum(dim=0).to(a_sp.dtype)


@structured_attention_backward.register_fake
def _structured_attention_backward_fake(grad_out, v, a_ch, a_sp):
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(a_ch, memory_format=torch.contiguous_format),
            torch.empty_like(a_sp, memory_format=torch.contiguous_format))


def _structured_attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _structured_attention_backward(ctx, grad_out):
    return structured_attention_backward(grad_out, *ctx.saved_tensors)


structured_attention_forward.register_autograd(
    _structured_attention_backward, setup_context=_structured_attention_setup_context
)


def structured_attention(v, a_ch, a_sp):
    """The backend contract of DEVELOPERS.md: (1 + a_ch ⊗ a_sp) * v in v's dtype."""
    return structured_attention_forward(v, a_ch, a_sp)


# ---------------------------------------------------------------------------------------------
# Attentive distillation (SPEC 3.1):
#   S_f[p] = sum_c f_c^2,  N_f = sqrt(sum_p S_f^2),  Ŝ_f = S_f / N_f (0 where N_f = 0),
#   D = (a Ŝ_f + 1) f - (b Ŝ_g + 1) g,  L = sum D^2 (/ B C H W for "mean").
# When the old model nearly matches the new one (g ≈ f, b ≈ a: right after a step starts) D is a
# small difference of large terms, and float32 products would lose its leading digits. So D is
# formed from differences that are computed directly:
#   D = (f - g)(1 + b Ŝ_g) + f ((a - b) Ŝ_f + b ΔŜ),   ΔŜ = Ŝ_f - Ŝ_g = ΔS/N_f - S_g ΔN/(N_f N_g),
#   ΔS = sum_c (f - g)(f + g),   ΔN = N_f - N_g = sum_p ΔS (S_f + S_g) / (N_f + N_g).
# Forward: pass 1 writes per-group partials of S_f, S_g, ΔS (torch adds them and forms N_f, N_g,
# ΔN); pass 2 writes one partial of sum D^2 per program.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _spatial_attention(spatial_ptr, norms_ptr, b, p, in_image, HW):
    """Per pixel: S_f, S_g, 1/N_f, 1/N_g (0 where N = 0), Ŝ_f, Ŝ_g and ΔŜ = Ŝ_f - Ŝ_g."""
    B = tl.num_programs(2)
    s_f = tl.load(spatial_ptr + b * HW + p, mask=in_image, other=0.0)
    s_g = tl.load(spatial_ptr + (B + b) * HW + p, mask=in_image, other=0.0)
    delta_s = tl.load(spatial_ptr + (2 * B + b) * HW + p, mask=in_image, other=0.0)
    n_f = tl.load(norms_ptr + b)
    n_g = tl.load(norms_ptr + B + b)
    delta_n = tl.load(norms_ptr + 2 * B + b)
    inv_n_f = tl.where(n_f > 0, 1.0 / tl.where(n_f > 0, n_f, 1.0), 0.0)
    inv_n_g = tl.where(n_g > 0, 1.0 / tl.where(n_g > 0, n_g, 1.0), 0.0)
    s_hat_f = s_f * inv_n_f
    s_hat_g = s_g * inv_n_g
    both = (n_f > 0) & (n_g > 0)
    delta_s_hat = tl.where(both, delta_s * inv_n_f - s_g * delta_n * inv_n_f * inv_n_g, s_hat_f - s_hat_g)
    return s_f, s_g, inv_n_f, inv_n_g, s_hat_f, s_hat_g, delta_s_hat


@triton.jit
def _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat):
    """D = (a Ŝ_f + 1) f - (b Ŝ_g + 1) g, written so that nearly equal pairs keep their precision."""
    return (f - g) * (1.0 + b_att[:, None] * s_hat_g[None, :]) + f * (
        (a - b_att)[:, None] * s_hat_f[None, :] + b_att[:, None] * delta_s_hat[None, :])


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
    f_ptr, g_ptr, spatial_part_ptr, C, HW, channels_per_group,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
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
    # Partials laid out (3, groups, B, HW): S_f, S_g, ΔS.
    row = tl.program_id(1) * tl.num_programs(2) + b
    rows_per_map = tl.num_programs(1) * tl.num_programs(2)
    tl.store(spatial_part_ptr + row * HW + p, s_f, mask=in_image)
    tl.store(spatial_part_ptr + (rows_per_map + row) * HW + p, s_g, mask=in_image)
    tl.store(spatial_part_ptr + (2 * rows_per_map + row) * HW + p, delta_s, mask=in_image)


@triton.jit
def _ad_loss_kernel(
    f_ptr, g_ptr, a_ptr, b_ptr, spatial_ptr, norms_ptr, loss_part_ptr, C, HW, channels_per_group,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    _, _, _, _, s_hat_f, s_hat_g, delta_s_hat = _spatial_attention(spatial_ptr, norms_ptr, b, p, in_image, HW)
    total = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c, in_c, offsets, tile_mask = _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C)
        f, g, a, b_att = _load_pair(f_ptr, g_ptr, a_ptr, b_ptr, b, c, in_c, offsets, tile_mask, C, ACC)
        diff = _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat)
        total += tl.sum(diff * diff, axis=0)
    part = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(loss_part_ptr + part, tl.sum(total, axis=0))


# Backward, with w = 2 dL/dloss (/ B C H W for "mean") so that dL/dD = w D:
#   dL/da[c] = sum_p w D Ŝ_f f             dL/db[c] = -sum_p w D Ŝ_g g
#   R_f[p] = dL/dŜ_f = sum_c w D a f        R_g[p] = -sum_c w D b g
# Through Ŝ = S/N with dN/dS_q = S_q/N:  dL/dS_q = R_q/N - S_q (sum_p R_p S_p)/N^3, and
# dS_q/df_c = 2 f_c, so
#   dL/df = w D (a Ŝ_f + 1) + 2 f (R_f/N_f - S_f T_f/N_f^3),   T_f = sum_p R_f S_f,
#   dL/dg = -w D (b Ŝ_g + 1) + 2 g (R_g/N_g - S_g T_g/N_g^3).
# The spatial term needs R over all channels and T over all pixels before any dL/df can be written,
# so it takes a pass of its own (skipped with detach_spatial) writing per-group partials of R;
# torch adds them and forms T.
@triton.jit
def _ad_bwd_spatial_kernel(
    f_ptr, g_ptr, a_ptr, b_ptr, spatial_ptr, norms_ptr, grad_ptr, r_part_ptr, C, HW, channels_per_group,
    divisor, NEED_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    B = tl.num_programs(2)
    w = 2.0 * tl.load(grad_ptr).to(ACC) / divisor
    _, _, _, _, s_hat_f, s_hat_g, delta_s_hat = _spatial_attention(spatial_ptr, norms_ptr, b, p, in_image, HW)
    r_f = tl.zeros([BLOCK_P], dtype=ACC)
    r_g = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c, in_c, offsets, tile_mask = _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C)
        f, g, a, b_att = _load_pair(f_ptr, g_ptr, a_ptr, b_ptr, b, c, in_c, offsets, tile_mask, C, ACC)
        w_diff = w * _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat)
        r_f += tl.sum(w_diff * a[:, None] * f, axis=0)
        if NEED_OLD:
            r_g -= tl.sum(w_diff * b_att[:, None] * g, axis=0)
    # Partials laid out (2, groups, B, HW) like the forward's ((1, ...) without NEED_OLD).
    row = tl.program_id(1) * B + b
    tl.store(r_part_ptr + row * HW + p, r_f, mask=in_image)
    if NEED_OLD:
        tl.store(r_part_ptr + (tl.num_programs(1) * B + row) * HW + p, r_g, mask=in_image)


@triton.jit
def _ad_bwd_kernel(
    f_ptr, g_ptr, a_ptr, b_ptr, spatial_ptr, norms_ptr, grad_ptr, r_ptr, t_ptr,
    grad_f_ptr, grad_g_ptr, grad_a_part_ptr, grad_b_part_ptr, C, HW, channels_per_group, divisor,
    SPATIAL: tl.constexpr, NEED_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b, p, in_image, c_start, c_stop = _program_tile(HW, channels_per_group, C, BLOCK_P)
    B = tl.num_programs(2)
    pixel_part = b * tl.num_programs(0) + tl.program_id(0)
    w = 2.0 * tl.load(grad_ptr).to(ACC) / divisor
    s_f, s_g, inv_n_f, inv_n_g, s_hat_f, s_hat_g, delta_s_hat = _spatial_attention(
        spatial_ptr, norms_ptr, b, p, in_image, HW)
    # Per-pixel factor of f (resp. g) in the spatial term: 2 (R/N - S T/N^3).
    spatial_f = tl.zeros([BLOCK_P], dtype=ACC)
    spatial_g = tl.zeros([BLOCK_P], dtype=ACC)
    if SPATIAL:
        r_f = tl.load(r_ptr + b * HW + p, mask=in_image, other=0.0)
        spatial_f = 2.0 * inv_n_f * (r_f - s_f * tl.load(t_ptr + b) * inv_n_f * inv_n_f)
        if NEED_OLD:
            r_g = tl.load(r_ptr + (B + b) * HW + p, mask=in_image, other=0.0)
            spatial_g = 2.0 * inv_n_g * (r_g - s_g * tl.load(t_ptr + B + b) * inv_n_g * inv_n_g)
    for c0 in range(c_start, c_stop, BLOCK_C):
        c, in_c, offsets, tile_mask = _channel_tile(b, c0, c_stop, p, in_image, C, HW, BLOCK_C)
        f, g, a, b_att = _load_pair(f_ptr, g_ptr, a_ptr, b_ptr, b, c, in_c, offsets, tile_mask, C, ACC)
        weight_f = a[:, None] * s_hat_f[None, :] + 1.0
        weight_g = b_att[:, None] * s_hat_g[None, :] + 1.0
        w_diff = w * _difference(f, g, a, b_att, s_hat_f, s_hat_g, delta_s_hat)
        grad_f = w_diff * weight_f + f * spatial_f[None, :]
        tl.store(grad_f_ptr + offsets, grad_f.to(grad_f_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(grad_a_part_ptr + pixel_part * C + c, tl.sum(w_diff * s_hat_f[None, :] * f, axis=1), mask=in_c)
        if NEED_OLD:
            grad_g = -w_diff * weight_g + g * spatial_g[None, :]
            tl.store(grad_g_ptr + offsets, grad_g.to(grad_g_ptr.dtype.element_ty), mask=tile_mask)
            tl.store(grad_b_part_ptr + pixel_part * C + c, -tl.sum(w_diff * s_hat_g[None, :] * g, axis=1),
                     mask=in_c)


def _check_attentive_distillation(f, g, a, b, reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if f.dim() != 4:
        raise ValueError(f"f must be (B, C, H, W), got shape {tuple(f.shape)}")
    if g.shape != f.shape:
        raise ValueError(f"g must have the shape of f {tuple(f.shape)}, got {tuple(g.shape)}")
    for name, attention in (("a", a), ("b", b)):
        if tuple(attention.shape) != tuple(f.shape[:2]):
            raise ValueError(f"{name} must have shape {tuple(f.shape[:2])}, got {tuple(attention.shape)}")
    _launch.check_device(f, g, a, b)


@torch.library.custom_op("incseg_fast_triton::attentive_distillation_forward", mutates_args=())
def attentive_distillation_forward(
    f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reduction: str, detach_spatial: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, [S_f, S_g, ΔS] (3, B, H, W), [N_f, N_g, ΔN] (3, B)); detach_spatial only matters backward."""
    _check_attentive_distillation(f, g, a, b, reduction)
    f, g, a, b = f.contiguous(), g.contiguous(), a.contiguous(), b.contiguous()
    B, C, H, W = f.shape
    acc_torch, acc_tl = _launch.accumulator_dtype(f.dtype)
    grid, per_group, meta = _geometry(f)

    spatial_parts = f.new_empty((3, grid[1], B, H, W), dtype=acc_torch)
    _ad_spatial_kernel[grid](f, g, spatial_parts, C, H * W, per_group, ACC=acc_tl, **meta)
    spatial = spatial_parts.sum(dim=1)
    norm_f, norm_g = spatial[:2].square().sum(dim=(2, 3)).sqrt()
    norm_sum = norm_f + norm_g
    squares_difference = (spatial[2] * (spatial[0] + spatial[1])).sum(dim=(1, 2))  # N_f^2 - N_g^2
    nonzero = norm_sum > 0
    norm_difference = torch.where(nonzero, squares_difference / torch.where(nonzero, norm_sum, 1.0), 0.0)
    norms = torch.stack([norm_f, norm_g, norm_difference])

    loss_parts = f.new_empty((B, grid[1], grid[0]), dtype=acc_torch)
    _ad_loss_kernel[grid](f, g, a, b, spatial, norms, loss_parts, C, H * W, per_group, ACC=acc_tl, **meta)
    loss = loss_parts.sum()
    if reduction == "mean":
        loss = loss / f.numel()
    return loss, spatial, norms


@attentive_distillation_forward.register_fake
def _attentive_distillation_forward_fake(f, g, a, b, reduction, detach_spatial):
    B, _, H, W = f.shape
    acc_torch, _ = _launch.accumulator_dtype(f.dtype)
    return (f.new_empty((), dtype=acc_torch), f.new_empty((3, B, H, W), dtype=acc_torch),
            f.new_empty((3, B), dtype=acc_torch))


@torch.library.custom_op("incseg_fast_triton::attentive_distillation_backward", mutates_args=())
def attentive_distillation_backward(
    grad: torch.Tensor, f: torch.Tensor, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spatial: torch.Tensor,
    norms: torch.Tensor, reduction: str, detach_spatial: bool, need_old_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/df, dL/dg, dL/da, dL/db); dL/dg and dL/db are empty (0,) tensors unless need_old_grad."""
    _check_attentive_distillation(f, g, a, b, reduction)
    B, C, H, W = f.shape
    if tuple(spatial.shape) != (3, B, H, W) or tuple(norms.shape) != (3, B):
        raise ValueError(f"spatial and norms must have shapes {(3, B, H, W)} and {(3, B)}, "
                         f"got {tuple(spatial.shape)} and {tuple(norms.shape)}")
    _launch.check_device(grad, spatial, norms)
    f, g, a, b = f.contiguous(), g.contiguous(), a.contiguous(), b.contiguous()
    acc_torch, acc_tl = _launch.accumulator_dtype(f.dtype)
    spatial, norms = spatial.to(acc_torch).contiguous(), norms.to(acc_torch).contiguous()
    grad = grad.to(acc_torch).contiguous()
    grid, per_group, meta = _geometry(f)
    meta.update(NEED_OLD=need_old_grad, ACC=acc_tl)
    divisor = f.numel() if reduction == "mean" else 1

    if detach_spatial:
        r = t = spatial  # not read
    else:
        r_parts = f.new_empty((2 if need_old_grad else 1, grid[1], B, H, W), dtype=acc_torch)
        _ad_bwd_spatial_kernel[grid](f, g, a, b, spatial, norms, grad, r_parts, C, H * W, per_group, divisor, **meta)
        r = r_parts.sum(dim=1)
        t = (r * spatial[:r.shape[0]]).sum(dim=(2, 3))

    grad_f = torch.empty_like(f)
    grad_a_parts = f.new_empty((B, grid[0], C), dtype=acc_torch)
    if need_old_grad:
        grad_g = torch.empty_like(g)
        grad_b_parts = f.new_empty((B, grid[0], C), dtype=acc_torch)
    else:
        grad_g = grad_b_parts = f  # not written
    _ad_bwd_kernel[grid](
        f, g, a, b, spatial, norms, grad, r, t, grad_f, grad_g, grad_a_parts, grad_b_parts, C, H * W, per_group,
        divisor, SPATIAL=not detach_spatial, **meta,
    )
    grad_a = grad_a_parts.sum(dim=1).to(a.dtype)
    if not need_old_grad:
        return grad_f, f.new_empty((0,)), grad_a, a.new_empty((0,))
    return grad_f, grad_g, grad_a, grad_b_parts.sum(dim=1).to(b.dtype)


@attentive_distillation_backward.register_fake
def _attentive_distillation_backward_fake(grad, f, g, a, b, spatial, norms, reduction, detach_spatial, need_old_grad):
    grad_f = torch.empty_like(f, memory_format=torch.contiguous_format)
    grad_a = torch.empty_like(a, memory_format=torch.contiguous_format)
    if not need_old_grad:
        return grad_f, f.new_empty((0,)), grad_a, a.new_empty((0,))
    return (grad_f, torch.empty_like(g, memory_format=torch.contiguous_format), grad_a,
            torch.empty_like(b, memory_format=torch.contiguous_format))


def _attentive_distillation_setup_context(ctx, inputs, output):
    f, g, a, b, reduction, detach_spatial = inputs
    _, spatial, norms = output
    ctx.save_for_backward(f, g, a, b, spatial, norms)
    ctx.mark_non_differentiable(spatial, norms)
    ctx.options = (reduction, detach_spatial)


def _attentive_distillation_backward(ctx, grad, _grad_spatial, _grad_norms):
    f, g, a, b, spatial, norms = ctx.saved_tensors
    need_old_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    grad_f, grad_g, grad_a, grad_b = attentive_distillation_backward(
        grad, f, g, a, b, spatial, norms, *ctx.options, need_old_grad
    )
    if not need_old_grad:
        grad_g = grad_b = None
    return grad_f, grad_g, grad_a, grad_b, None, None


attentive_distillation_forward.register_autograd(
    _attentive_distillation_backward, setup_context=_attentive_distillation_setup_context
)


def attentive_distillation(f, g, a, b, *, reduction, detach_spatial):
    """The backend contract of DEVELOPERS.md: mean (or sum) of (AD(f) - AD(g))^2 as float32 (float64)."""
    loss, _, _ = attentive_distillation_forward(f, g, a, b, reduction, bool(detach_spatial))
    return loss
