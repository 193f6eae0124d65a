#pragma once
// Per-element math of attentive distillation (MATH.md#ad, CAF eq. 5-8) and structured attention
// (MATH.md#sab, CAF eq. 1-4), shared by the CPU kernels and any CUDA kernel.
//
// Notation (per image b, channel c, pixel p; acc_t is float, or double for float64 inputs):
//   s_f = Ŝ_f[b,p], s_g = Ŝ_g[b,p]                       normalised spatial attention
//   D   = (a_c s_f + 1) f - (b_c s_g + 1) g               the attended difference, L = scale * sum D^2
// The kernels call these in their innermost loops over contiguous pixels; they are branch-free
// so that the compiler vectorises those loops.
#include <cmath>

#include "common/macros.h"

namespace incseg {
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

// ---- One-pass forward (float32/bfloat16/float16 features) ----
// With u = f - g, α = a_c f, β = b_c g at one element, D = u + s_f α - s_g β, so at one pixel
//   sum_c D^2         = Σu² + s_f² Σα² + s_g² Σβ² + 2 s_f Σuα - 2 s_g Σuβ - 2 s_f s_g Σαβ
//   P_f = sum_c D α   = Σuα + s_f Σα² - s_g Σαβ
//   P_g = sum_c D β   = Σuβ + s_f Σαβ - s_g Σβ²
// where every Σ runs over the channels. One pass over f, g accumulates these channel sums, plus
// S_f = Σf² and S_g = Σg² (the unnormalised spatial maps); once N and so s_f = S_f / N_f, s_g are
// known, the loss and P follow without reading the features again. The sums are in double: products
// of float32 values are exact there, and the expansion's cancellation (when AD(f) ≈ AD(g)) costs
// eps64 (|AD| / |D|)^2, below the eps32 |AD| / |D| of computing D directly in float32.
struct Moments {
  double ff = 0;  // Σf²  (S_f)
  double gg = 0;  // Σg²  (S_g)
  double uu = 0;  // Σu²
  double aa = 0;  // Σα²
  double bb = 0;  // Σβ²
  double ua = 0;  // Σuα
  double ub = 0;  // Σuβ
  double ab = 0;  // Σαβ

  // Adds one element (one channel): features f, g and channel attentions a_c, b_c.
  HOST_DEVICE void add(double f, double g, double a_c, double b_c);
};

// sum_k x_k y_k over kN elements, in element order.
template <int kN>
HOST_DEVICE double moment_dot(const double (&x)[kN], const double (&y)[kN]) {
  double sum = x[0] * y[0];
  for (int k = 1; k < kN; ++k) sum += x[k] * y[k];
  return sum;
}

// Adds kN elements (channels) of one pixel to its eight sums: features f, g and channel attentions
// a_c, b_c. `Sums` is Moments, or any type with the same eight members (the CPU kernel's refer to
// its per-pixel rows). Each sum gets its elements' products, added together, right after they are
// formed: a vectorised CPU loop then keeps few values live instead of spilling.
template <int kN, typename Sums>
HOST_DEVICE void add_moments(Sums&& m, const double (&f)[kN], const double (&g)[kN], const double (&a_c)[kN],
                             const double (&b_c)[kN]) {
  double u[kN], alpha[kN], beta[kN];
  for (int k = 0; k < kN; ++k) {
    u[k] = f[k] - g[k];
    alpha[k] = a_c[k] * f[k];
    beta[k] = b_c[k] * g[k];
  }
  m.ff += moment_dot(f, f);
  m.gg += moment_dot(g, g);
  m.uu += moment_dot(u, u);
  m.aa += moment_dot(alpha, alpha);
  m.bb += moment_dot(beta, beta);
  m.ua += moment_dot(u, alpha);
  m.ub += moment_dot(u, beta);
  m.ab += moment_dot(alpha, beta);
}

HOST_DEVICE void Moments::add(double f, double g, double a_c, double b_c) {
  const double fs[1] = {f}, gs[1] = {g}, as[1] = {a_c}, bs[1] = {b_c};
  add_moments(*this, fs, gs, as, bs);
}

// 1/N from N^2 = sum_p S^2, and 0 for an all-zero map (where Ŝ is the constant 0). A NaN N^2 (a NaN
// or +inf feature) is not zero: 1/N stays NaN and reaches every Ŝ of the image, as in the reference.
template <typename acc_t>
HOST_DEVICE acc_t inverse_norm(acc_t squared_norm) {
  return squared_norm != acc_t(0) ? acc_t(1) / sqrt(squared_norm) : acc_t(0);
}

// sum_c D^2 at the pixel, from its moments and normalised spatial maps s_f, s_g.
HOST_DEVICE double squared_difference_sum(const Moments& m, double s_f, double s_g) {
  return m.uu + s_f * s_f * m.aa + s_g * s_g * m.bb + 2 * (s_f * m.ua - s_g * m.ub - s_f * s_g * m.ab);
}

// P_f = sum_c D a_c f: dL/dŜ_f at the pixel in units of w (see feature_grad).
HOST_DEVICE double pixel_grad_f(const Moments& m, double s_f, double s_g) { return m.ua + s_f * m.aa - s_g * m.ab; }

// P_g = sum_c D b_c g: -dL/dŜ_g at the pixel in units of w.
HOST_DEVICE double pixel_grad_g(const Moments& m, double s_f, double s_g) { return m.ub + s_f * m.ab - s_g * m.bb; }

// Structured attention: out = (1 + a_ch[c] a_sp[p]) v.
template <typename acc_t>
HOST_DEVICE acc_t structured_attention_value(acc_t v, acc_t a_ch_c, acc_t a_sp_p) {
  return (acc_t(1) + a_ch_c * a_sp_p) * v;
}

}  // namespace attention
}  // namespace incseg
