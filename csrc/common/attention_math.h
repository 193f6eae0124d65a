#pragma once
// Per-element math of attentive distillation (SPEC 3.1, CAF eq. 5-8) and structured attention
// (SPEC 3.2, CAF eq. 1-4), shared by the CPU kernels and any CUDA kernel.
//
// Notation (per image b, channel c, pixel p; acc_t is float, or double for float64 inputs):
//   s_f = Ŝ_f[b,p], s_g = Ŝ_g[b,p]                       normalised spatial attention
//   D   = (a_c s_f + 1) f - (b_c s_g + 1) g               the attended difference, L = scale * sum D^2
// The kernels call these in their innermost loops over contiguous pixels; they are branch-free
// so that the compiler vectorises those loops.
#include "common/macros.h"

namespace incseg_fast {
namespace attention {

// D = AD(f) - AD(g) = (f - g) + s_f a f - s_g b g at one element, rearranged as
//   D = u + s_f (a u + (a - b) g) + (s_f - s_g) b g,   u = f - g,
// with a_minus_b = a - b and s_diff = s_f - s_g (both formed before rounding to acc_t). When the old
// and new models nearly agree (f ≈ g, a ≈ b: the start of an incremental step) every term is small,
// so the rounding error is relative to D itself instead of to f.
template <typename acc_t>
HOST_DEVICE acc_t attended_difference(acc_t f, acc_t g, acc_t a_c, acc_t b_c, acc_t a_minus_b_c, acc_t s_f,
                                      acc_t s_diff) {
  const acc_t u = f - g;
  return u + s_f * (a_c * u + a_minus_b_c * g) + s_diff * (b_c * g);
}

// dL/dS (S the unnormalised spatial map) at one pixel, from G = dL/dŜ there:
// dL/dS_p = (1/N) (G_p - Ŝ_p * sum_q G_q Ŝ_q); `spatial_dot` is that sum for the pixel's image and
// `inv_norm` is 1/N (0 when N == 0, where Ŝ is the constant 0 and no gradient flows through S).
template <typename acc_t>
HOST_DEVICE acc_t spatial_map_grad(acc_t grad_normalised, acc_t s_hat, acc_t spatial_dot, acc_t inv_norm) {
  return inv_norm * (grad_normalised - s_hat * spatial_dot);
}

// dL/df at one element, per unit of w = 2 * scale * upstream (the caller multiplies by w):
// the direct path D (a_c s_f + 1) plus the spatial path (dL/dS_f / w) * dS_f/df, dS_f/df = 2 f.
// `spatial_grad` is spatial_map_grad(...) / w for this pixel (0 when the spatial map is detached).
// L depends on -AD(g), so dL/dg = -w * feature_grad(D, g, b_c, s_g, spatial_grad_g) with
// spatial_grad_g built from sum_c D b_c g (the same way as for f from sum_c D a_c f).
template <typename acc_t>
HOST_DEVICE acc_t feature_grad(acc_t diff, acc_t x, acc_t attention_c, acc_t s_hat, acc_t spatial_grad) {
  return diff * (attention_c * s_hat + acc_t(1)) + acc_t(2) * x * spatial_grad;
}

// Structured attention: out = (1 + a_ch[c] a_sp[p]) v.
template <typename acc_t>
HOST_DEVICE acc_t structured_attention_value(acc_t v, acc_t a_ch_c, acc_t a_sp_p) {
  return (acc_t(1) + a_ch_c * a_sp_p) * v;
}

}  // namespace attention
}  // namespace incseg_fast
