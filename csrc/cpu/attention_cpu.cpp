// Fused CPU kernels for attentive distillation (SPEC 3.1) and structured attention (SPEC 3.2).
//
// Layout: NCHW contiguous (other layouts are made contiguous first). For one image and channel the
// H*W pixels are contiguous, so every hot loop runs over a contiguous run of pixels ("chunk") and
// the channel loop sits outside it: the compiler vectorises the pixel loop, and per-pixel
// accumulators for a chunk (at most kMaxChunk pixels) stay in L1. Work items are (image, chunk)
// pairs, spread over threads with at::parallel_for; per-chunk partial sums are reduced afterwards
// in a fixed order, so for a given thread count the results do not depend on scheduling.
//
// Arithmetic is in acc_t (float; double for float64 inputs), except the one-pass forward's per-pixel
// sums, which are double for every dtype (below). The hot loops are compiled twice,
// for baseline x86-64 and for AVX2+FMA, and the AVX2 copy runs when the CPU has it (no -march flag).
//
// ---- Attentive distillation: passes over the features ----
// forward, float32/bfloat16/float16 inputs: ONE pass over f, g.
//   With u = f - g, α = a_c f, β = b_c g (per element) and s_f, s_g the normalised maps,
//   D = u + s_f α - s_g β, so per pixel
//     sum_c D^2       = Σu² + s_f² Σα² + s_g² Σβ² + 2 s_f Σuα - 2 s_g Σuβ - 2 s_f s_g Σαβ
//     P_f = Σ_c D α   = Σuα + s_f Σα² - s_g Σαβ          P_g = Σ_c D β = Σuβ + s_f Σαβ - s_g Σβ²
//   The pass accumulates S_f = Σf², S_g = Σg² and these six channel sums per pixel; then a tiny step
//   gets N per image, Ŝ, the loss and P from them, without reading the features again. The sums are
//   in double: products of float32 values are exact there, and the cancellation of the expansion
//   (when AD(f) ≈ AD(g)) costs eps64 * (|AD| / |D|)^2, below the eps32 * |AD| / |D| that computing D
//   directly in float32 costs, for any |D| / |AD| above ~1e-9.
// forward, float64 inputs: TWO passes (the expansion would lose precision against a float64 result).
//   pass 1  reads f, g: S_f[p] = sum_c f^2, S_g likewise; tiny: N = sqrt(sum_p S^2), Ŝ = S / N.
//   pass 2  reads f, g: L = scale * sum D^2, and P_f[p] = sum_c D a_c f, P_g[p] = sum_c D b_c g.
// In both, Ŝ = 0 where N == 0; P is computed only when the spatial map will be differentiated
// (dL/dŜ_f = w P_f, dL/dŜ_g = -w P_g below).
// backward tiny     per image T = sum_p P Ŝ, and per pixel (units of w) dL/dS = (1/N)(P - Ŝ T).
//          pass     reads f, g once, writes df and/or dg once, and per-chunk channel sums for da, db;
//                   specialised on which of the four gradients are wanted.
// Saved between forward and backward: Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g (formed before rounding, see
// attended_difference), P_f, P_g (B*H*W each) and 1/N (B each). Temporaries are per pixel (the
// one-pass forward's eight sums) or per chunk and channel; nothing feature-sized is allocated besides
// the gradients themselves.
//
// Gradient derivation (scale = 1/(B*C*H*W) for "mean", 1 for "sum"; `up` = upstream gradient;
// w = 2 * scale * up, so dL/dD = w D):
//   AD(f) = (a Ŝ_f + 1) f, Ŝ_f = S_f / N_f, S_f = sum_c f^2, N_f = sqrt(sum_q S_f[q]^2).
//   dL/da_c     = w sum_p D Ŝ_f f                            dL/db_c = -w sum_p D Ŝ_g g
//   G_p := dL/dŜ_f[p] = w sum_c D a_c f = w P_f[p]
//   dŜ_p/dS_q  = (δ_pq - Ŝ_p Ŝ_q) / N   =>   dL/dS_p = (1/N)(G_p - Ŝ_p sum_q G_q Ŝ_q) = w (1/N)(P_p - Ŝ_p T)
//   dS_p/df_c  = 2 f_c
//   dL/df_c     = w [ D (a_c Ŝ_f + 1) + 2 f_c (1/N)(P_f - Ŝ_f T_f) ]
//   dL/dg_c     = -w [ D (b_c Ŝ_g + 1) + 2 g_c (1/N)(P_g - Ŝ_g T_g) ]
//   Where N == 0 the image is all zeros, Ŝ is the constant 0 and 1/N is taken as 0 (so is 2 f).
//   detach_spatial drops the (1/N)(...) terms.
//
// ---- Structured attention ----
// forward  out = (1 + a_ch[c] a_sp[p]) v, one pass.
// backward one pass over (grad_out, v): dv = grad_out (1 + a_ch a_sp); da_sp[p] = sum_c grad_out v a_ch
//          (per-pixel accumulators of the chunk); da_ch[c] = sum_p grad_out v a_sp (per-chunk partials).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <vector>

#include "common/attention_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define INCSEG_HAVE_AVX2_VARIANT 1
#define INCSEG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define INCSEG_HAVE_AVX2_VARIANT 0
#endif
#if defined(__GNUC__)
#define INCSEG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define INCSEG_ALWAYS_INLINE inline
#endif

namespace incseg_fast {
namespace {

using at::Tensor;
using attention::attended_difference;
using attention::feature_grad;
using attention::spatial_map_grad;
using attention::structured_attention_value;

constexpr int64_t kMaxChunk = 1024;  // pixels per work item: 4 KiB of float per channel row
constexpr int64_t kChunkAlign = 16;

// INCSEG_CPU_BASELINE=1 forces the baseline copies (so that tests can check them on an AVX2 machine).
bool cpu_has_avx2() {
#if INCSEG_HAVE_AVX2_VARIANT
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("INCSEG_CPU_BASELINE") == nullptr;
  return has;
#else
  return false;
#endif
}

// Work items: (image, pixel chunk). Enough chunks per image to keep every thread busy.
struct PixelChunks {
  int64_t pixels = 0;
  int64_t chunk = 0;      // pixels per chunk (the last chunk of an image may be shorter)
  int64_t per_image = 0;  // chunks per image
  int64_t image(int64_t item) const { return item / per_image; }
  int64_t begin(int64_t item) const { return (item % per_image) * chunk; }
  int64_t length(int64_t item) const { return std::min(chunk, pixels - begin(item)); }
};

PixelChunks plan_chunks(int64_t batch, int64_t pixels) {
  constexpr int64_t kMinChunk = 64;
  PixelChunks plan;
  plan.pixels = pixels;
  if (pixels == 0) return plan;  // no work items
  int64_t per_image = (pixels + kMaxChunk - 1) / kMaxChunk;
  const int64_t threads = at::get_num_threads();
  while (batch * per_image < threads && pixels / (2 * per_image) >= kMinChunk) per_image *= 2;
  plan.chunk = (pixels + per_image - 1) / per_image;
  plan.chunk = std::min(kMaxChunk, (plan.chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign);
  plan.per_image = (pixels + plan.chunk - 1) / plan.chunk;
  return plan;
}

// Sum with kLanes independent accumulators: vectorisable without reassociation flags.
template <typename acc_t>
INCSEG_ALWAYS_INLINE acc_t sum_lanes(const acc_t* __restrict x, int64_t n) {
  constexpr int64_t kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[p + l];
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; p < n; ++p) total += x[p];
  return total;
}

// ------------------------------------------------------------------------------------------------
// Hot loops over one chunk, each a struct with an always_inline `run` so that run_best() can compile
// it once for baseline x86-64 and once for AVX2+FMA. `stride` is H*W (the distance between channel rows).
// ------------------------------------------------------------------------------------------------

template <typename Kernel, typename... Args>
void run_baseline(Args... args) {
  Kernel::run(args...);
}
#if INCSEG_HAVE_AVX2_VARIANT
template <typename Kernel, typename... Args>
INCSEG_TARGET_AVX2 void run_avx2(Args... args) {
  Kernel::run(args...);
}
#endif
template <typename Kernel, typename... Args>
void run_best(Args... args) {
#if INCSEG_HAVE_AVX2_VARIANT
  if (cpu_has_avx2()) return run_avx2<Kernel>(args...);
#endif
  run_baseline<Kernel>(args...);
}

// Pass 1: s_f[p] = sum_c f^2, s_g[p] = sum_c g^2; four channel rows per sweep of the accumulators.
template <typename scalar_t, typename acc_t>
struct SpatialEnergyChunk {
  static INCSEG_ALWAYS_INLINE void run(const scalar_t* __restrict f, const scalar_t* __restrict g,
                                       int64_t channels, int64_t stride, int64_t n, acc_t* __restrict s_f,
                                       acc_t* __restrict s_g) {
    for (int64_t p = 0; p < n; ++p) {
      s_f[p] = 0;
      s_g[p] = 0;
    }
    int64_t c = 0;
    for (; c + 4 <= channels; c += 4) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fa = f0[p], fb = f0[p + stride], fc = f0[p + 2 * stride], fd = f0[p + 3 * stride];
        const acc_t ga = g0[p], gb = g0[p + stride], gc = g0[p + 2 * stride], gd = g0[p + 3 * stride];
        s_f[p] += (fa * fa + fb * fb) + (fc * fc + fd * fd);
        s_g[p] += (ga * ga + gb * gb) + (gc * gc + gd * gd);
      }
    }
    for (; c < channels; ++c) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fa = f0[p], ga = g0[p];
        s_f[p] += fa * fa;
        s_g[p] += ga * ga;
      }
    }
  }
};

// One-pass forward (non-float64 inputs): per-pixel channel sums in double,
// Σf², Σg², Σu², Σα², Σβ², Σuα, Σuβ, Σαβ   (u = f - g, α = a_c f, β = b_c g).
enum Moment : int64_t { kEnergyF, kEnergyG, kUU, kAA, kBB, kUA, kUB, kAB, kMoments };

template <typename scalar_t>
struct MomentsChunk {
  // The eight accumulator rows are separate restrict parameters, which lets the compiler vectorise.
  static INCSEG_ALWAYS_INLINE void run(const scalar_t* __restrict f, const scalar_t* __restrict g,
                                       const float* __restrict a, const float* __restrict b, int64_t channels,
                                       int64_t stride, int64_t n, double* __restrict ff, double* __restrict gg,
                                       double* __restrict uu, double* __restrict aa, double* __restrict bb,
                                       double* __restrict ua, double* __restrict ub, double* __restrict ab) {
    for (int64_t p = 0; p < n; ++p) {
      ff[p] = gg[p] = uu[p] = aa[p] = bb[p] = ua[p] = ub[p] = ab[p] = 0;
    }
    // Two channels per sweep: the eight accumulator rows are the loop's memory traffic.
    int64_t c = 0;
    for (; c + 2 <= channels; c += 2) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      const double a0 = a[c], b0 = b[c], a1 = a[c + 1], b1 = b[c + 1];
      for (int64_t p = 0; p < n; ++p) {
        const double fv0 = static_cast<float>(f0[p]), gv0 = static_cast<float>(g0[p]);
        const double fv1 = static_cast<float>(f0[p + stride]), gv1 = static_cast<float>(g0[p + stride]);
        const double u0 = fv0 - gv0, alpha0 = a0 * fv0, beta0 = b0 * gv0;
        const double u1 = fv1 - gv1, alpha1 = a1 * fv1, beta1 = b1 * gv1;
        ff[p] += fv0 * fv0 + fv1 * fv1;
        gg[p] += gv0 * gv0 + gv1 * gv1;
        uu[p] += u0 * u0 + u1 * u1;
        aa[p] += alpha0 * alpha0 + alpha1 * alpha1;
        bb[p] += beta0 * beta0 + beta1 * beta1;
        ua[p] += u0 * alpha0 + u1 * alpha1;
        ub[p] += u0 * beta0 + u1 * beta1;
        ab[p] += alpha0 * beta0 + alpha1 * beta1;
      }
    }
    for (; c < channels; ++c) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      const double a_c = a[c], b_c = b[c];
      for (int64_t p = 0; p < n; ++p) {
        const double fv = static_cast<float>(f0[p]), gv = static_cast<float>(g0[p]);
        const double u = fv - gv, alpha = a_c * fv, beta = b_c * gv;
        ff[p] += fv * fv;
        gg[p] += gv * gv;
        uu[p] += u * u;
        aa[p] += alpha * alpha;
        bb[p] += beta * beta;
        ua[p] += u * alpha;
        ub[p] += u * beta;
        ab[p] += alpha * beta;
      }
    }
  }
};

// Pass 2: per-pixel sum_c D^2 into `loss`, and (kPixelGrad) P_f = sum_c D a_c f, P_g = sum_c D b_c g.
template <typename scalar_t, typename acc_t, bool kPixelGrad>
struct LossChunk {
  static INCSEG_ALWAYS_INLINE void run(const scalar_t* __restrict f, const scalar_t* __restrict g,
                                       const acc_t* __restrict a, const acc_t* __restrict b,
                                       const acc_t* __restrict a_minus_b, int64_t channels, int64_t stride,
                                       int64_t n, const acc_t* __restrict s_f, const acc_t* __restrict s_diff,
                                       acc_t* __restrict loss,
                                       acc_t* __restrict p_f, acc_t* __restrict p_g) {
    for (int64_t p = 0; p < n; ++p) loss[p] = 0;
    if (kPixelGrad) {
      for (int64_t p = 0; p < n; ++p) {
        p_f[p] = 0;
        p_g[p] = 0;
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      const acc_t a_c = a[c], b_c = b[c], ab_c = a_minus_b[c];
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fv = f0[p], gv = g0[p];
        const acc_t d = attended_difference(fv, gv, a_c, b_c, ab_c, s_f[p], s_diff[p]);
        loss[p] += d * d;
        if (kPixelGrad) {
          p_f[p] += d * a_c * fv;
          p_g[p] += d * b_c * gv;
        }
      }
    }
  }
};

// Backward pass over a chunk, specialised on the wanted gradients (bits of kOutputs: kWantDF, ...):
// df, dg rows, and per-channel sums chan_a[c] = sum_p D Ŝ_f f, chan_b[c] = sum_p D Ŝ_g g (through the
// one-row buffers row_a, row_b).
enum OutputBit : int { kWantDF = 1, kWantDG = 2, kWantDA = 4, kWantDB = 8 };

template <typename scalar_t, typename acc_t, int kOutputs>
struct FeatureGradChunk {
  static INCSEG_ALWAYS_INLINE void run(const scalar_t* __restrict f, const scalar_t* __restrict g,
                                       const acc_t* __restrict a, const acc_t* __restrict b,
                                       const acc_t* __restrict a_minus_b, int64_t channels, int64_t stride,
                                       int64_t n, const acc_t* __restrict s_f, const acc_t* __restrict s_g,
                                       const acc_t* __restrict s_diff, const acc_t* __restrict sgrad_f,
                                       const acc_t* __restrict sgrad_g, acc_t w, scalar_t* __restrict df,
                                       scalar_t* __restrict dg, acc_t* __restrict row_a, acc_t* __restrict row_b,
                                       acc_t* __restrict chan_a, acc_t* __restrict chan_b) {
    constexpr bool kDF = kOutputs & kWantDF, kDG = kOutputs & kWantDG;
    constexpr bool kDA = kOutputs & kWantDA, kDB = kOutputs & kWantDB;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      scalar_t* __restrict df0 = kDF ? df + c * stride : nullptr;
      scalar_t* __restrict dg0 = kDG ? dg + c * stride : nullptr;
      const acc_t a_c = a[c], b_c = b[c], ab_c = a_minus_b[c];
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fv = f0[p], gv = g0[p];
        const acc_t d = attended_difference(fv, gv, a_c, b_c, ab_c, s_f[p], s_diff[p]);
        if (kDF) df0[p] = static_cast<scalar_t>(w * feature_grad(d, fv, a_c, s_f[p], sgrad_f[p]));
        if (kDG) dg0[p] = static_cast<scalar_t>(-w * feature_grad(d, gv, b_c, s_g[p], sgrad_g[p]));
        if (kDA) row_a[p] = d * s_f[p] * fv;
        if (kDB) row_b[p] = d * s_g[p] * gv;
      }
      if (kDA) chan_a[c] = sum_lanes(row_a, n);
      if (kDB) chan_b[c] = sum_lanes(row_b, n);
    }
  }
};

// Calls fn(std::integral_constant<int, mask>) for the runtime `mask` in [kFirst, 16).
template <int kFirst, typename Fn>
void with_output_mask(int mask, Fn&& fn) {
  if constexpr (kFirst < 16) {
    if (mask == kFirst) return fn(std::integral_constant<int, kFirst>{});
    with_output_mask<kFirst + 1>(mask, std::forward<Fn>(fn));
  }
}

template <typename scalar_t, typename acc_t>
struct StructuredForwardRow {
  static INCSEG_ALWAYS_INLINE void run(const scalar_t* __restrict v, acc_t a_ch_c, const acc_t* __restrict a_sp,
                                       int64_t n, scalar_t* __restrict out) {
    for (int64_t p = 0; p < n; ++p) {
      out[p] = static_cast<scalar_t>(structured_attention_value(static_cast<acc_t>(v[p]), a_ch_c, a_sp[p]));
    }
  }
};

// dv (rows advance by dv_stride; 0 with a one-row scratch discards it), d_sp[p] = sum_c go v a_ch,
// chan[c] = sum_p go v a_sp (through the one-row buffer `row`).
template <typename scalar_t, typename acc_t>
struct StructuredBackwardChunk {
  static INCSEG_ALWAYS_INLINE void run(const scalar_t* __restrict go, const scalar_t* __restrict v,
                                       const acc_t* __restrict a_ch, const acc_t* __restrict a_sp,
                                       int64_t channels, int64_t stride, int64_t n, scalar_t* __restrict dv,
                                       int64_t dv_stride, acc_t* __restrict d_sp, acc_t* __restrict row,
                                       acc_t* __restrict chan) {
    for (int64_t p = 0; p < n; ++p) d_sp[p] = 0;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* __restrict go0 = go + c * stride;
      const scalar_t* __restrict v0 = v + c * stride;
      scalar_t* __restrict dv0 = dv + c * dv_stride;
      const acc_t a_c = a_ch[c];
      for (int64_t p = 0; p < n; ++p) {
        const acc_t gov = static_cast<acc_t>(go0[p]);
        const acc_t gv = gov * static_cast<acc_t>(v0[p]);
        dv0[p] = static_cast<scalar_t>(structured_attention_value(gov, a_c, a_sp[p]));
        d_sp[p] += gv * a_c;
        row[p] = gv * a_sp[p];
      }
      chan[c] = sum_lanes(row, n);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Operators
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

void check_float_dtype(const Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64, got ", dt);
}

double reduction_scale(c10::string_view reduction, const Tensor& f) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "reduction must be 'mean' or 'sum', got '",
              std::string(reduction), "'");
  return reduction == "mean" ? 1.0 / static_cast<double>(f.numel()) : 1.0;
}

void check_feature_pair(const Tensor& f, const Tensor& g, const Tensor& a, const Tensor& b) {
  TORCH_CHECK(f.dim() == 4, "f must be (B, C, H, W), got ", f.sizes());
  TORCH_CHECK(g.sizes() == f.sizes(), "g must have f's shape ", f.sizes(), ", got ", g.sizes());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == f.size(0) && a.size(1) == f.size(1), "a must be (B, C) = (",
              f.size(0), ", ", f.size(1), "), got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), "b must have a's shape ", a.sizes(), ", got ", b.sizes());
  check_float_dtype(f, "f");
  for (const Tensor* t : {&g, &a, &b}) {
    TORCH_CHECK(t->scalar_type() == f.scalar_type(), "f, g, a, b must share one dtype");
  }
  TORCH_CHECK(f.numel() > 0, "attentive_distillation needs non-empty features, got ", f.sizes());
}

// Views of the forward's outputs for one dtype: Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g, 1/N, and P (null unless saved).
template <typename acc_t>
struct ForwardOutputs {
  acc_t* s_f;
  acc_t* s_g;
  acc_t* s_diff;
  acc_t* inv_f;
  acc_t* inv_g;
  acc_t* p_f;
  acc_t* p_g;
};

template <typename acc_t>
acc_t inverse_norm(acc_t sum_of_squares) {
  return sum_of_squares > 0 ? acc_t(1) / std::sqrt(sum_of_squares) : acc_t(0);
}

// float32/bfloat16/float16: one pass (see the top of the file). Returns sum_p sum_c D^2.
template <typename scalar_t>
double forward_squared_sum(const scalar_t* f, const scalar_t* g, const float* a, const float* b,
                           const float* /* a_minus_b: the moments do not need it */,
                           int64_t batch, int64_t channels, int64_t pixels, const ForwardOutputs<float>& out) {
  const PixelChunks plan = plan_chunks(batch, pixels);
  const int64_t items = batch * plan.per_image;
  // The eight per-pixel channel sums, image-major: (B, kMoments, H*W).
  std::unique_ptr<double[]> moments(new double[batch * kMoments * pixels]);  // every row is written before use
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
      const int64_t offset = img * channels * pixels + p0;
      double* m = moments.get() + img * kMoments * pixels + p0;
      run_best<MomentsChunk<scalar_t>>(f + offset, g + offset, a + img * channels, b + img * channels, channels,
                                       pixels, n, m + kEnergyF * pixels, m + kEnergyG * pixels, m + kUU * pixels,
                                       m + kAA * pixels, m + kBB * pixels, m + kUA * pixels, m + kUB * pixels,
                                       m + kAB * pixels);
    }
  });
  // Per image: N, then Ŝ, the loss and P from the moments (tiny next to the pass above).
  std::vector<double> loss_partial(batch);
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    for (int64_t img = first; img < last; ++img) {
      const double* m = moments.get() + img * kMoments * pixels;
      const double *ff = m + kEnergyF * pixels, *gg = m + kEnergyG * pixels, *uu = m + kUU * pixels;
      const double *aa = m + kAA * pixels, *bb = m + kBB * pixels, *ua = m + kUA * pixels;
      const double *ub = m + kUB * pixels, *ab = m + kAB * pixels;
      double sum_f = 0, sum_g = 0;
      for (int64_t p = 0; p < pixels; ++p) {
        sum_f += ff[p] * ff[p];
        sum_g += gg[p] * gg[p];
      }
      const double inv_f = inverse_norm(sum_f), inv_g = inverse_norm(sum_g);
      out.inv_f[img] = static_cast<float>(inv_f);
      out.inv_g[img] = static_cast<float>(inv_g);
      const int64_t base = img * pixels;
      double total = 0;
      for (int64_t p = 0; p < pixels; ++p) {
        const double sf = ff[p] * inv_f, sg = gg[p] * inv_g;
        out.s_f[base + p] = static_cast<float>(sf);
        out.s_g[base + p] = static_cast<float>(sg);
        out.s_diff[base + p] = static_cast<float>(sf - sg);
        total += uu[p] + sf * sf * aa[p] + sg * sg * bb[p] + 2 * (sf * ua[p] - sg * ub[p] - sf * sg * ab[p]);
        if (out.p_f != nullptr) {
          out.p_f[base + p] = static_cast<float>(ua[p] + sf * aa[p] - sg * ab[p]);
          out.p_g[base + p] = static_cast<float>(ub[p] + sf * ab[p] - sg * bb[p]);
        }
      }
      loss_partial[img] = total;
    }
  });
  double total = 0;
  for (const double partial : loss_partial) total += partial;
  return total;
}

// float64: two passes over the features (see the top of the file). Returns sum_p sum_c D^2.
double forward_squared_sum(const double* f, const double* g, const double* a, const double* b,
                           const double* a_minus_b, int64_t batch, int64_t channels, int64_t pixels,
                           const ForwardOutputs<double>& out) {
  const PixelChunks plan = plan_chunks(batch, pixels);
  const int64_t items = batch * plan.per_image;
  const int64_t image_size = channels * pixels;
  // Pass 1: unnormalised spatial maps and per-chunk sums of their squares.
  std::vector<double> energy_f(items), energy_g(items);
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
      double* s_f = out.s_f + img * pixels + p0;
      double* s_g = out.s_g + img * pixels + p0;
      run_best<SpatialEnergyChunk<double, double>>(f + img * image_size + p0, g + img * image_size + p0, channels,
                                                   pixels, n, s_f, s_g);
      double sum_f = 0, sum_g = 0;
      for (int64_t p = 0; p < n; ++p) {
        sum_f += s_f[p] * s_f[p];
        sum_g += s_g[p] * s_g[p];
      }
      energy_f[item] = sum_f;
      energy_g[item] = sum_g;
    }
  });
  for (int64_t img = 0; img < batch; ++img) {
    double sum_f = 0, sum_g = 0;
    for (int64_t k = 0; k < plan.per_image; ++k) {
      sum_f += energy_f[img * plan.per_image + k];
      sum_g += energy_g[img * plan.per_image + k];
    }
    out.inv_f[img] = inverse_norm(sum_f);
    out.inv_g[img] = inverse_norm(sum_g);
  }
  // Pass 2: normalise the chunk's spatial maps, then the loss (and P_f, P_g) over its pixels.
  std::vector<double> loss_partial(items);
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    std::vector<double> loss_px(plan.chunk);
    for (int64_t item = first; item < last; ++item) {
      const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
      double* s_f = out.s_f + img * pixels + p0;
      double* s_g = out.s_g + img * pixels + p0;
      double* s_diff = out.s_diff + img * pixels + p0;
      for (int64_t p = 0; p < n; ++p) {
        s_f[p] *= out.inv_f[img];
        s_g[p] *= out.inv_g[img];
        s_diff[p] = s_f[p] - s_g[p];
      }
      const int64_t offset = img * image_size + p0;
      double* p_f = out.p_f != nullptr ? out.p_f + img * pixels + p0 : nullptr;
      double* p_g = out.p_g != nullptr ? out.p_g + img * pixels + p0 : nullptr;
      auto launch = [&](auto kernel) {
        run_best<decltype(kernel)>(f + offset, g + offset, a + img * channels, b + img * channels,
                                   a_minus_b + img * channels, channels, pixels, n, s_f, s_diff, loss_px.data(),
                                   p_f, p_g);
      };
      if (p_f != nullptr) {
        launch(LossChunk<double, double, true>{});
      } else {
        launch(LossChunk<double, double, false>{});
      }
      loss_partial[item] = sum_lanes(loss_px.data(), n);
    }
  });
  double total = 0;
  for (const double partial : loss_partial) total += partial;
  return total;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_distillation_forward_cpu(const Tensor& f_in, const Tensor& g_in,
                                                                              const Tensor& a_in, const Tensor& b_in,
                                                                              c10::string_view reduction,
                                                                              bool save_spatial_grad) {
  check_feature_pair(f_in, g_in, a_in, b_in);
  const double scale = reduction_scale(reduction, f_in);
  const Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = f.size(0), channels = f.size(1), pixels = f.size(2) * f.size(3);
  const auto acc_dtype = f.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = f.options().dtype(acc_dtype);
  const Tensor a = a_in.to(acc_dtype).contiguous(), b = b_in.to(acc_dtype).contiguous();
  const Tensor a_minus_b = a - b;
  Tensor spatial = at::empty({3, batch, f.size(2), f.size(3)}, acc_options);
  Tensor inv_norm = at::empty({2, batch}, acc_options);
  Tensor pixel_grad = save_spatial_grad ? at::empty({2, batch, f.size(2), f.size(3)}, acc_options)
                                        : at::empty({0}, acc_options);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "attentive_distillation_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    ForwardOutputs<acc_t> out;
    out.s_f = spatial.data_ptr<acc_t>();
    out.s_g = out.s_f + batch * pixels;
    out.s_diff = out.s_g + batch * pixels;
    out.inv_f = inv_norm.data_ptr<acc_t>();
    out.inv_g = out.inv_f + batch;
    out.p_f = save_spatial_grad ? pixel_grad.data_ptr<acc_t>() : nullptr;
    out.p_g = save_spatial_grad ? out.p_f + batch * pixels : nullptr;
    total = forward_squared_sum(f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), a.data_ptr<acc_t>(),
                                b.data_ptr<acc_t>(), a_minus_b.data_ptr<acc_t>(), batch, channels, pixels, out);
  });
  Tensor loss = at::full({}, total * scale, acc_options);
  return {loss, spatial, inv_norm, pixel_grad};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_distillation_backward_cpu(
    const Tensor& grad_loss, const Tensor& f_in, const Tensor& g_in, const Tensor& a_in, const Tensor& b_in,
    const Tensor& spatial, const Tensor& inv_norm, const Tensor& pixel_grad, c10::string_view reduction,
    bool spatial_chain, std::array<bool, 4> output_mask) {
  check_feature_pair(f_in, g_in, a_in, b_in);
  const double scale = reduction_scale(reduction, f_in);
  const Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = f.size(0), channels = f.size(1), height = f.size(2), width = f.size(3);
  const int64_t pixels = height * width;
  const auto acc_dtype = f.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar");
  TORCH_CHECK(spatial.sizes() == at::IntArrayRef({3, batch, height, width}) && spatial.scalar_type() == acc_dtype &&
                  spatial.is_contiguous(),
              "spatial must be the forward's (3, B, H, W) saved maps");
  TORCH_CHECK(inv_norm.sizes() == at::IntArrayRef({2, batch}) && inv_norm.scalar_type() == acc_dtype &&
                  inv_norm.is_contiguous(),
              "inv_norm must be the forward's (2, B) saved norms");
  const bool need_features = output_mask[0] || output_mask[1];
  const bool need_channels = output_mask[2] || output_mask[3];
  const bool use_pixel_grad = spatial_chain && need_features;
  if (use_pixel_grad) {
    TORCH_CHECK(pixel_grad.sizes() == at::IntArrayRef({2, batch, height, width}) &&
                    pixel_grad.scalar_type() == acc_dtype &&
                    pixel_grad.is_contiguous(),
                "pixel_grad must be the forward's (2, B, H, W) saved pixel gradients (forward with save_spatial_grad)");
  }
  const Tensor a = a_in.to(acc_dtype).contiguous(), b = b_in.to(acc_dtype).contiguous();
  const Tensor a_minus_b = a - b;
  Tensor df = output_mask[0] ? at::empty_like(f) : at::empty({0}, f.options());
  Tensor dg = output_mask[1] ? at::empty_like(g) : at::empty({0}, g.options());
  Tensor da = at::empty({0}, a_in.options()), db = at::empty({0}, b_in.options());
  if (!need_features && !need_channels) return {df, dg, da, db};

  const PixelChunks plan = plan_chunks(batch, pixels);
  const int64_t items = batch * plan.per_image;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "attentive_distillation_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t w = static_cast<acc_t>(2.0 * scale * grad_loss.item<double>());
    const acc_t* s_f_all = spatial.data_ptr<acc_t>();
    const acc_t* s_g_all = s_f_all + batch * pixels;
    const acc_t* s_diff_all = s_g_all + batch * pixels;
    const acc_t* inv_norms = inv_norm.data_ptr<acc_t>();  // (2, B): the f side, then the g side

    // dL/dS per pixel in units of w (zeros when the spatial map is detached).
    std::vector<acc_t> sgrad(use_pixel_grad ? 2 * batch * pixels : pixels, acc_t(0));  // one shared zero row
    if (use_pixel_grad) {
      const acc_t* pg_all = pixel_grad.data_ptr<acc_t>();
      at::parallel_for(0, 2 * batch, 1, [&](int64_t first, int64_t last) {
        for (int64_t map = first; map < last; ++map) {  // map = side * batch + image
          const acc_t* s_hat = s_f_all + map * pixels;
          const acc_t* pg = pg_all + map * pixels;
          acc_t dot = 0;
          for (int64_t p = 0; p < pixels; ++p) dot += pg[p] * s_hat[p];
          const acc_t inv = inv_norms[map];
          acc_t* out = sgrad.data() + map * pixels;
          for (int64_t p = 0; p < pixels; ++p) out[p] = spatial_map_grad(pg[p], s_hat[p], dot, inv);
        }
      });
    }
    const acc_t* sgrad_f_all = sgrad.data();
    const acc_t* sgrad_g_all = use_pixel_grad ? sgrad.data() + batch * pixels : sgrad.data();
    const int64_t sgrad_image_stride = use_pixel_grad ? pixels : 0;

    const scalar_t* f_ptr = f.data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
    const acc_t* a_ptr = a.data_ptr<acc_t>();
    const acc_t* b_ptr = b.data_ptr<acc_t>();
    const int64_t image_size = channels * pixels;
    std::vector<acc_t> chan_partial(need_channels ? 2 * items * channels : 0);

    const int output_bits = (output_mask[0] ? kWantDF : 0) | (output_mask[1] ? kWantDG : 0) |
                            (output_mask[2] ? kWantDA : 0) | (output_mask[3] ? kWantDB : 0);
    at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
      std::vector<acc_t> rows(need_channels ? 2 * plan.chunk : 0);
      for (int64_t item = first; item < last; ++item) {
        const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
        const int64_t offset = img * image_size + p0;
        acc_t* chan = need_channels ? chan_partial.data() + 2 * item * channels : nullptr;
        with_output_mask<1>(output_bits, [&](auto bits) {
          run_best<FeatureGradChunk<scalar_t, acc_t, decltype(bits)::value>>(
              f_ptr + offset, g_ptr + offset, a_ptr + img * channels, b_ptr + img * channels,
              a_minus_b.data_ptr<acc_t>() + img * channels, channels, pixels, n, s_f_all + img * pixels + p0,
              s_g_all + img * pixels + p0, s_diff_all + img * pixels + p0,
              sgrad_f_all + img * sgrad_image_stride + p0, sgrad_g_all + img * sgrad_image_stride + p0, w,
              output_mask[0] ? df.data_ptr<scalar_t>() + offset : nullptr,
              output_mask[1] ? dg.data_ptr<scalar_t>() + offset : nullptr, rows.data(),
              need_channels ? rows.data() + plan.chunk : nullptr,
              chan, chan + (need_channels ? channels : 0));
        });
      }
    });

    if (need_channels) {
      // da = w sum_p D Ŝ_f f, db = -w sum_p D Ŝ_g g: add the chunk partials in order.
      Tensor da_acc = at::zeros({batch, channels}, a.options());
      Tensor db_acc = at::zeros({batch, channels}, b.options());
      acc_t* da_ptr = da_acc.data_ptr<acc_t>();
      acc_t* db_ptr = db_acc.data_ptr<acc_t>();
      for (int64_t item = 0; item < items; ++item) {
        const acc_t* chan = chan_partial.data() + 2 * item * channels;
        acc_t* da_row = da_ptr + plan.image(item) * channels;
        acc_t* db_row = db_ptr + plan.image(item) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          da_row[c] += chan[c];
          db_row[c] += chan[channels + c];
        }
      }
      if (output_mask[2]) da = (da_acc * w).to(a_in.scalar_type());
      if (output_mask[3]) db = (db_acc * (-w)).to(b_in.scalar_type());
    }
  });
  return {df, dg, da, db};
}

void check_structured(const Tensor& v, const Tensor& a_ch, const Tensor& a_sp) {
  TORCH_CHECK(v.dim() == 4, "v must be (B, C, H, W), got ", v.sizes());
  TORCH_CHECK(a_ch.dim() == 2 && a_ch.size(0) == v.size(0) && a_ch.size(1) == v.size(1), "a_ch must be (B, C) = (",
              v.size(0), ", ", v.size(1), "), got ", a_ch.sizes());
  TORCH_CHECK(a_sp.dim() == 3 && a_sp.size(0) == v.size(0) && a_sp.size(1) == v.size(2) && a_sp.size(2) == v.size(3),
              "a_sp must be (B, H, W) = (", v.size(0), ", ", v.size(2), ", ", v.size(3), "), got ", a_sp.sizes());
  check_float_dtype(v, "v");
  TORCH_CHECK(a_ch.scalar_type() == v.scalar_type() && a_sp.scalar_type() == v.scalar_type(),
              "v, a_ch, a_sp must share one dtype");
}

Tensor structured_attention_cpu(const Tensor& v_in, const Tensor& a_ch_in, const Tensor& a_sp_in) {
  check_structured(v_in, a_ch_in, a_sp_in);
  const Tensor v = v_in.contiguous();
  const int64_t batch = v.size(0), channels = v.size(1), pixels = v.size(2) * v.size(3);
  const auto acc_dtype = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor a_ch = a_ch_in.to(acc_dtype).contiguous(), a_sp = a_sp_in.to(acc_dtype).contiguous();
  Tensor out = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "structured_attention", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();
    const acc_t* a_ch_ptr = a_ch.data_ptr<acc_t>();
    const acc_t* a_sp_ptr = a_sp.data_ptr<acc_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(pixels, 1));
    at::parallel_for(0, batch * channels, grain, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        run_best<StructuredForwardRow<scalar_t, acc_t>>(v_ptr + row * pixels, a_ch_ptr[row],
                                                        a_sp_ptr + (row / channels) * pixels, pixels,
                                                        out_ptr + row * pixels);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> structured_attention_backward_cpu(const Tensor& grad_out_in, const Tensor& v_in,
                                                                     const Tensor& a_ch_in, const Tensor& a_sp_in,
                                                                     std::array<bool, 3> output_mask) {
  check_structured(v_in, a_ch_in, a_sp_in);
  TORCH_CHECK(grad_out_in.sizes() == v_in.sizes() && grad_out_in.scalar_type() == v_in.scalar_type(),
              "grad_out must match v in shape and dtype");
  const Tensor v = v_in.contiguous(), grad_out = grad_out_in.contiguous();
  const int64_t batch = v.size(0), channels = v.size(1), pixels = v.size(2) * v.size(3);
  const auto acc_dtype = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor a_ch = a_ch_in.to(acc_dtype).contiguous(), a_sp = a_sp_in.to(acc_dtype).contiguous();
  Tensor dv = output_mask[0] ? at::empty_like(v) : at::empty({0}, v.options());
  Tensor d_ch = at::empty({0}, a_ch_in.options()), d_sp = at::empty({0}, a_sp_in.options());
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dv, d_ch, d_sp};

  const PixelChunks plan = plan_chunks(batch, pixels);
  const int64_t items = batch * plan.per_image;
  Tensor d_sp_acc = at::empty({batch, v.size(2), v.size(3)}, a_sp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "structured_attention_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* go_ptr = grad_out.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();
    const acc_t* a_ch_ptr = a_ch.data_ptr<acc_t>();
    const acc_t* a_sp_ptr = a_sp.data_ptr<acc_t>();
    acc_t* d_sp_ptr = d_sp_acc.data_ptr<acc_t>();
    const int64_t image_size = channels * pixels;
    std::vector<acc_t> chan_partial(items * channels);
    at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
      std::vector<acc_t> row(plan.chunk);
      std::vector<scalar_t> discard(output_mask[0] ? 0 : plan.chunk);
      for (int64_t item = first; item < last; ++item) {
        const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
        const int64_t offset = img * image_size + p0;
        scalar_t* dv0 = output_mask[0] ? dv.data_ptr<scalar_t>() + offset : discard.data();
        run_best<StructuredBackwardChunk<scalar_t, acc_t>>(
            go_ptr + offset, v_ptr + offset, a_ch_ptr + img * channels, a_sp_ptr + img * pixels + p0, channels,
            pixels, n, dv0, output_mask[0] ? pixels : int64_t(0), d_sp_ptr + img * pixels + p0, row.data(),
            chan_partial.data() + item * channels);
      }
    });
    if (output_mask[1]) {
      Tensor d_ch_acc = at::zeros({batch, channels}, a_ch.options());
      acc_t* d_ch_ptr = d_ch_acc.data_ptr<acc_t>();
      for (int64_t item = 0; item < items; ++item) {
        acc_t* out = d_ch_ptr + plan.image(item) * channels;
        const acc_t* chan = chan_partial.data() + item * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] += chan[c];
      }
      d_ch = d_ch_acc.to(a_ch_in.scalar_type());
    }
  });
  if (output_mask[2]) d_sp = d_sp_acc.to(a_sp_in.scalar_type());
  return {dv, d_ch, d_sp};
}

}  // namespace
}  // namespace incseg_fast

TORCH_LIBRARY_IMPL(incseg_fast, CPU, m) {
  m.impl("attentive_distillation_forward", &incseg_fast::attentive_distillation_forward_cpu);
  m.impl("attentive_distillation_backward", &incseg_fast::attentive_distillation_backward_cpu);
  m.impl("structured_attention", &incseg_fast::structured_attention_cpu);
  m.impl("structured_attention_backward", &incseg_fast::structured_attention_backward_cpu);
}
