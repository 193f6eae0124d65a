// Fused CPU kernels for attentive distillation (docs/MATH.md#ad) and structured attention (docs/MATH.md#sab).
//
// Layout: NCHW contiguous (other layouts are made contiguous first). For one image and channel the
// H*W pixels are contiguous, so every hot loop runs over a tile of contiguous pixels and the channel
// loop sits outside it: the compiler vectorises the pixel loop, and per-pixel accumulators for a
// tile (at most 1024 pixels, kTiles) stay in L1. Work items are (image, tile) pairs of a
// cpu::TilePlan, run on cpu::parallel_over_items; per-tile partial sums are reduced afterwards in
// item order, so for a given thread count (which can cut images finer) results do not depend on
// scheduling.
//
// Arithmetic is in acc_t (float; double for float64 inputs), except the one-pass forward's per-pixel
// moments, which are double for every dtype (below). Each hot loop is a kernel struct that
// cpu::run_best compiles for baseline x86-64, AVX2 and AVX-512 (cpu/toolkit.h; INCSEG_CPU_ISA caps
// the choice). Host-side checks and saved-state shapes: common/attention_host.h.
//
// ---- Attentive distillation: passes over the features ----
// forward, float32/bfloat16/float16 inputs: ONE pass over f, g.
//   The pass accumulates per pixel the eight channel sums of attention_math.h's Moments
//   (S_f = Σf², S_g = Σg² and six sums whose combinations give sum_c D^2 and P for any s_f, s_g);
//   then a tiny step gets N per image, Ŝ, the loss and P from them (squared_difference_sum,
//   pixel_grad_f, pixel_grad_g), without reading the features again.
// forward, float64 inputs: TWO passes (the expansion would lose precision against a float64 result).
//   pass 1  reads f, g: S_f[p] = sum_c f^2, S_g likewise; tiny: N = sqrt(sum_p S^2), Ŝ = S / N.
//   pass 2  reads f, g: L = scale * sum D^2, and P_f[p] = sum_c D a_c f, P_g[p] = sum_c D b_c g.
// In both, Ŝ = 0 where N == 0; P is computed only when the spatial map will be differentiated
// (dL/dŜ_f = w P_f, dL/dŜ_g = -w P_g below).
// backward tiny     per image T = sum_p P Ŝ, and per pixel (units of w) dL/dS = (1/N)(P - Ŝ T).
//          pass     reads f, g once, writes df and/or dg once, and per-tile channel sums for da, db;
//                   specialised on which of the four gradients are wanted.
// Saved between forward and backward: Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g (formed before rounding, see
// attended_difference), P_f, P_g (B*H*W each) and 1/N (B each). Temporaries are per pixel (the
// one-pass forward's eight sums) or per tile and channel; nothing feature-sized is allocated besides
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
//          (per-pixel accumulators of the tile); da_ch[c] = sum_p grad_out v a_sp (per-tile partials).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "common/attention_host.h"
#include "common/attention_math.h"
#include "cpu/toolkit.h"

namespace incseg {
namespace {

namespace cpu = incseg::cpu;
using at::Tensor;
using attention::add_moments;
using attention::attended_difference;
using attention::feature_grad;
using attention::inverse_norm;
using attention::Moments;
using attention::spatial_map_grad;
using attention::structured_attention_value;
using cpu::acc_type;
using cpu::load;
using cpu::to_storage;

// Tiles of at most 1024 pixels (4 KiB of float per channel row), cut down to 64 when the batch has
// fewer tiles than threads; multiples of 16 pixels keep rows aligned for the vector loops.
constexpr cpu::TilePolicy kTiles{1024, 64, 16};

// Pure streams (a load or two and a store per element) stop at AVX2 for float32/float64, whose
// 512-bit copies measured slower (cpu::widest_isa); 16-bit types gain from converting 16 at a time.
template <typename scalar_t>
constexpr cpu::Isa kStreamWidestIsa = sizeof(scalar_t) == 2 ? cpu::Isa::kAvx512 : cpu::Isa::kAvx2;

// Sum with kLanes independent accumulators: vectorisable without reassociation flags.
template <typename acc_t>
INCSEG_FORCE_INLINE acc_t sum_lanes(const acc_t* __restrict x, int64_t n) {
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
// Hot loops over one tile, each a struct with a force-inlined `run` for cpu::run_best. `stride` is
// H*W (the distance between channel rows).
// ------------------------------------------------------------------------------------------------

// Pass 1: s_f[p] = sum_c f^2, s_g[p] = sum_c g^2; four channel rows per sweep of the accumulators.
template <typename scalar_t, typename acc_t>
struct SpatialEnergyTile {
  static constexpr cpu::Isa kWidestIsa = kStreamWidestIsa<scalar_t>;
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict f, const scalar_t* __restrict g, int64_t channels,
                                      int64_t stride, int64_t n, acc_t* __restrict s_f, acc_t* __restrict s_g) {
    for (int64_t p = 0; p < n; ++p) {
      s_f[p] = 0;
      s_g[p] = 0;
    }
    int64_t c = 0;
    for (; c + 4 <= channels; c += 4) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fa = load<acc_t>(f0, p), fb = load<acc_t>(f0, p + stride);
        const acc_t fc = load<acc_t>(f0, p + 2 * stride), fd = load<acc_t>(f0, p + 3 * stride);
        const acc_t ga = load<acc_t>(g0, p), gb = load<acc_t>(g0, p + stride);
        const acc_t gc = load<acc_t>(g0, p + 2 * stride), gd = load<acc_t>(g0, p + 3 * stride);
        s_f[p] += (fa * fa + fb * fb) + (fc * fc + fd * fd);
        s_g[p] += (ga * ga + gb * gb) + (gc * gc + gd * gd);
      }
    }
    for (; c < channels; ++c) {
      const scalar_t* __restrict f0 = f + c * stride;
      const scalar_t* __restrict g0 = g + c * stride;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fa = load<acc_t>(f0, p), ga = load<acc_t>(g0, p);
        s_f[p] += fa * fa;
        s_g[p] += ga * ga;
      }
    }
  }
};

// One-pass forward (non-float64 inputs): the eight per-pixel Moments sums in double, stored as
// eight rows (B, kMomentRows, H*W) so that the pixel loops vectorise.
enum MomentRow : int64_t { kFF, kGG, kUU, kAA, kBB, kUA, kUB, kAB, kMomentRows };

// One pixel's eight sums where they live, in the rows (the Sums of attention::add_moments).
struct MomentRefs {
  double &ff, &gg, &uu, &aa, &bb, &ua, &ub, &ab;
};

// Adds kChannels consecutive channel rows to each pixel's moments. The eight accumulator rows are
// the loop's memory traffic, so several channels go per sweep.
template <int kChannels, typename scalar_t, typename teacher_t>
INCSEG_FORCE_INLINE void add_moment_rows(const scalar_t* __restrict f, const teacher_t* __restrict g, const float* a,
                                         const float* b, int64_t stride, int64_t n, double* __restrict ff,
                                         double* __restrict gg, double* __restrict uu, double* __restrict aa,
                                         double* __restrict bb, double* __restrict ua, double* __restrict ub,
                                         double* __restrict ab) {
  double a_k[kChannels], b_k[kChannels];
  for (int k = 0; k < kChannels; ++k) {
    a_k[k] = a[k];
    b_k[k] = b[k];
  }
  // Through MomentRefs the compiler can no longer tell the eight rows apart (restrict does not
  // carry into struct members); each row element is touched by its own pixel only, so:
#pragma GCC ivdep
  for (int64_t p = 0; p < n; ++p) {
    double f_k[kChannels], g_k[kChannels];
    for (int k = 0; k < kChannels; ++k) {
      f_k[k] = load<float>(f, p + k * stride);
      g_k[k] = load<float>(g, p + k * stride);
    }
    add_moments(MomentRefs{ff[p], gg[p], uu[p], aa[p], bb[p], ua[p], ub[p], ab[p]}, f_k, g_k, a_k, b_k);
  }
}

// `moments` is the tile's first accumulator row; like the channel rows they are `stride` apart.
// teacher_t: g's element type, f's or the wider one of common/teacher_dtype.h, read as float.
template <typename scalar_t, typename teacher_t>
struct MomentsTile {
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict f, const teacher_t* __restrict g,
                                      const float* __restrict a, const float* __restrict b, int64_t channels,
                                      int64_t stride, int64_t n, double* __restrict moments) {
    double* __restrict ff = moments + kFF * stride;
    double* __restrict gg = moments + kGG * stride;
    double* __restrict uu = moments + kUU * stride;
    double* __restrict aa = moments + kAA * stride;
    double* __restrict bb = moments + kBB * stride;
    double* __restrict ua = moments + kUA * stride;
    double* __restrict ub = moments + kUB * stride;
    double* __restrict ab = moments + kAB * stride;
    for (int64_t p = 0; p < n; ++p) {
      ff[p] = gg[p] = uu[p] = aa[p] = bb[p] = ua[p] = ub[p] = ab[p] = 0;
    }
    int64_t c = 0;
    for (; c + 2 <= channels; c += 2) {
      add_moment_rows<2>(f + c * stride, g + c * stride, a + c, b + c, stride, n, ff, gg, uu, aa, bb, ua, ub, ab);
    }
    if (c < channels) {
      add_moment_rows<1>(f + c * stride, g + c * stride, a + c, b + c, stride, n, ff, gg, uu, aa, bb, ua, ub, ab);
    }
  }
};

// Pass 2: per-pixel sum_c D^2 into `loss`, and (kPixelGrad) P_f = sum_c D a_c f, P_g = sum_c D b_c g.
template <typename scalar_t, typename acc_t, bool kPixelGrad>
struct LossTile {
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict f, const scalar_t* __restrict g,
                                      const acc_t* __restrict a, const acc_t* __restrict b,
                                      const acc_t* __restrict a_minus_b, int64_t channels, int64_t stride, int64_t n,
                                      const acc_t* __restrict s_f, const acc_t* __restrict s_diff,
                                      acc_t* __restrict loss, acc_t* __restrict p_f, acc_t* __restrict p_g) {
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
        const acc_t fv = load<acc_t>(f0, p), gv = load<acc_t>(g0, p);
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

// Backward pass over a tile, specialised on the wanted gradients (bits of kOutputs: kWantDF, ...):
// df, dg rows, and per-channel sums chan_a[c] = sum_p D Ŝ_f f, chan_b[c] = sum_p D Ŝ_g g (through the
// one-row buffers row_a, row_b).
enum OutputBit : int { kWantDF = 1, kWantDG = 2, kWantDA = 4, kWantDB = 8 };

template <typename scalar_t, typename teacher_t, typename acc_t, int kOutputs>
struct FeatureGradTile {
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict f, const teacher_t* __restrict g,
                                      const acc_t* __restrict a, const acc_t* __restrict b,
                                      const acc_t* __restrict a_minus_b, int64_t channels, int64_t stride, int64_t n,
                                      const acc_t* __restrict s_f, const acc_t* __restrict s_g,
                                      const acc_t* __restrict s_diff, const acc_t* __restrict sgrad_f,
                                      const acc_t* __restrict sgrad_g, acc_t w, scalar_t* __restrict df,
                                      teacher_t* __restrict dg, acc_t* __restrict row_a, acc_t* __restrict row_b,
                                      acc_t* __restrict chan_a, acc_t* __restrict chan_b) {
    constexpr bool kDF = kOutputs & kWantDF, kDG = kOutputs & kWantDG;
    constexpr bool kDA = kOutputs & kWantDA, kDB = kOutputs & kWantDB;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* __restrict f0 = f + c * stride;
      const teacher_t* __restrict g0 = g + c * stride;
      scalar_t* __restrict df0 = kDF ? df + c * stride : nullptr;
      teacher_t* __restrict dg0 = kDG ? dg + c * stride : nullptr;
      const acc_t a_c = a[c], b_c = b[c], ab_c = a_minus_b[c];
      for (int64_t p = 0; p < n; ++p) {
        const acc_t fv = load<acc_t>(f0, p), gv = load<acc_t>(g0, p);
        const acc_t d = attended_difference(fv, gv, a_c, b_c, ab_c, s_f[p], s_diff[p]);
        if (kDF) df0[p] = to_storage<scalar_t>(w * feature_grad(d, fv, a_c, s_f[p], sgrad_f[p]));
        if (kDG) dg0[p] = to_storage<teacher_t>(-w * feature_grad(d, gv, b_c, s_g[p], sgrad_g[p]));
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
  static constexpr cpu::Isa kWidestIsa = kStreamWidestIsa<scalar_t>;
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict v, acc_t a_ch_c, const acc_t* __restrict a_sp,
                                      int64_t n, scalar_t* __restrict out) {
    for (int64_t p = 0; p < n; ++p) {
      out[p] = to_storage<scalar_t>(structured_attention_value(load<acc_t>(v, p), a_ch_c, a_sp[p]));
    }
  }
};

// dv (rows advance by dv_stride; 0 with a one-row scratch discards it), d_sp[p] = sum_c go v a_ch,
// chan[c] = sum_p go v a_sp (through the one-row buffer `row`).
template <typename scalar_t, typename acc_t>
struct StructuredBackwardTile {
  static constexpr cpu::Isa kWidestIsa = kStreamWidestIsa<scalar_t>;
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict go, const scalar_t* __restrict v,
                                      const acc_t* __restrict a_ch, const acc_t* __restrict a_sp, int64_t channels,
                                      int64_t stride, int64_t n, scalar_t* __restrict dv, int64_t dv_stride,
                                      acc_t* __restrict d_sp, acc_t* __restrict row, acc_t* __restrict chan) {
    for (int64_t p = 0; p < n; ++p) d_sp[p] = 0;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* __restrict go0 = go + c * stride;
      const scalar_t* __restrict v0 = v + c * stride;
      scalar_t* __restrict dv0 = dv + c * dv_stride;
      const acc_t a_c = a_ch[c];
      for (int64_t p = 0; p < n; ++p) {
        const acc_t gov = load<acc_t>(go0, p);
        const acc_t gv = gov * load<acc_t>(v0, p);
        dv0[p] = to_storage<scalar_t>(structured_attention_value(gov, a_c, a_sp[p]));
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

// One image's moment rows (kMomentRows rows of `pixels`) -> its N, Ŝ and P in `out`; returns the
// image's sum_p sum_c D^2.
double finish_image(const double* rows, int64_t pixels, int64_t img, const ForwardOutputs<float>& out) {
  const double* ff = rows + kFF * pixels;
  const double* gg = rows + kGG * pixels;
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
    const Moments m{ff[p],
                    gg[p],
                    rows[kUU * pixels + p],
                    rows[kAA * pixels + p],
                    rows[kBB * pixels + p],
                    rows[kUA * pixels + p],
                    rows[kUB * pixels + p],
                    rows[kAB * pixels + p]};
    const double sf = m.ff * inv_f, sg = m.gg * inv_g;
    out.s_f[base + p] = static_cast<float>(sf);
    out.s_g[base + p] = static_cast<float>(sg);
    out.s_diff[base + p] = static_cast<float>(sf - sg);
    total += attention::squared_difference_sum(m, sf, sg);
    if (out.p_f != nullptr) {
      out.p_f[base + p] = static_cast<float>(attention::pixel_grad_f(m, sf, sg));
      out.p_g[base + p] = static_cast<float>(attention::pixel_grad_g(m, sf, sg));
    }
  }
  return total;
}

// float32/bfloat16/float16: one pass (see the top of the file). Returns sum_p sum_c D^2.
template <typename scalar_t, typename teacher_t>
double forward_squared_sum(const scalar_t* f, const teacher_t* g, const float* a, const float* b,
                           const float* /* a_minus_b: the moments do not need it */, int64_t batch, int64_t channels,
                           int64_t pixels, const ForwardOutputs<float>& out) {
  const cpu::TilePlan plan = cpu::plan_tiles(batch, pixels, kTiles);
  // The moments of every pixel, image-major: (B, kMomentRows, H*W); every row is written before use.
  std::unique_ptr<double[]> moments(new double[batch * kMomentRows * pixels]);
  cpu::parallel_over_items(plan.items, channels * plan.tile, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
      const int64_t offset = img * channels * pixels + p0;
      cpu::run_best<MomentsTile<scalar_t, teacher_t>>(f + offset, g + offset, a + img * channels, b + img * channels,
                                                      channels, pixels, n,
                                                      moments.get() + img * kMomentRows * pixels + p0);
    }
  });
  // Per image: N, then Ŝ, the loss and P from the moments (tiny next to the pass above).
  std::vector<double> loss_partial(batch);
  cpu::parallel_over_items(batch, kMomentRows * pixels, [&](int64_t first, int64_t last) {
    for (int64_t img = first; img < last; ++img) {
      loss_partial[img] = finish_image(moments.get() + img * kMomentRows * pixels, pixels, img, out);
    }
  });
  double total = 0;
  for (const double partial : loss_partial) total += partial;
  return total;
}

// float64: two passes over the features (see the top of the file). Returns sum_p sum_c D^2.
double forward_squared_sum(const double* f, const double* g, const double* a, const double* b, const double* a_minus_b,
                           int64_t batch, int64_t channels, int64_t pixels, const ForwardOutputs<double>& out) {
  const cpu::TilePlan plan = cpu::plan_tiles(batch, pixels, kTiles);
  const int64_t image_size = channels * pixels;
  // Pass 1: unnormalised spatial maps and per-tile sums of their squares.
  std::vector<double> energy_f(plan.items), energy_g(plan.items);
  cpu::parallel_over_items(plan.items, channels * plan.tile, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
      double* s_f = out.s_f + img * pixels + p0;
      double* s_g = out.s_g + img * pixels + p0;
      cpu::run_best<SpatialEnergyTile<double, double>>(f + img * image_size + p0, g + img * image_size + p0, channels,
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
    for (int64_t k = 0; k < plan.tiles_per_image; ++k) {
      sum_f += energy_f[img * plan.tiles_per_image + k];
      sum_g += energy_g[img * plan.tiles_per_image + k];
    }
    out.inv_f[img] = inverse_norm(sum_f);
    out.inv_g[img] = inverse_norm(sum_g);
  }
  // Pass 2: normalise the tile's spatial maps, then the loss (and P_f, P_g) over its pixels.
  std::vector<double> loss_partial(plan.items);
  cpu::parallel_over_items(plan.items, channels * plan.tile, [&](int64_t first, int64_t last) {
    std::vector<double> loss_px(plan.tile);
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
        cpu::run_best<decltype(kernel)>(f + offset, g + offset, a + img * channels, b + img * channels,
                                        a_minus_b + img * channels, channels, pixels, n, s_f, s_diff, loss_px.data(),
                                        p_f, p_g);
      };
      if (p_f != nullptr) {
        launch(LossTile<double, double, true>{});
      } else {
        launch(LossTile<double, double, false>{});
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
  attention::check_feature_pair(f_in, g_in, a_in, b_in);
  const double scale = attention::reduction_scale(reduction, f_in);
  const Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = f.size(0), channels = f.size(1), pixels = f.size(2) * f.size(3);
  const auto acc_dtype = at::toOpMathType(f.scalar_type());
  const Tensor a = a_in.to(acc_dtype).contiguous(), b = b_in.to(acc_dtype).contiguous();
  const Tensor a_minus_b = a - b;
  const attention::SavedState state = attention::allocate_saved_state(f, save_spatial_grad);
  double total = 0;
  dispatch_student_teacher(
      f.scalar_type(), g.scalar_type(), "attentive_distillation_forward", [&](auto* f_type, auto* g_type) {
        using scalar_t = std::remove_pointer_t<decltype(f_type)>;
        using acc_t = acc_type<scalar_t>;
        ForwardOutputs<acc_t> out;
        out.s_f = state.spatial.data_ptr<acc_t>();
        out.s_g = out.s_f + batch * pixels;
        out.s_diff = out.s_g + batch * pixels;
        out.inv_f = state.inv_norm.data_ptr<acc_t>();
        out.inv_g = out.inv_f + batch;
        out.p_f = save_spatial_grad ? state.pixel_grad.data_ptr<acc_t>() : nullptr;
        out.p_g = save_spatial_grad ? out.p_f + batch * pixels : nullptr;
        total = forward_squared_sum(f.data_ptr<scalar_t>(), g.data_ptr<std::remove_pointer_t<decltype(g_type)>>(),
                                    a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), a_minus_b.data_ptr<acc_t>(), batch,
                                    channels, pixels, out);
      });
  // Rounded to the loss dtype here: c10 refuses a finite double above FLT_MAX, where the float loss is +inf.
  const double value = acc_dtype == at::kFloat ? static_cast<double>(static_cast<float>(total * scale)) : total * scale;
  Tensor loss = at::full({}, value, f.options().dtype(acc_dtype));
  return {loss, state.spatial, state.inv_norm, state.pixel_grad};
}

// Per-tile partial sums (plan.items rows of `width`) added into per-image rows (B, width) in item
// order, so that the result does not depend on which thread ran which tile.
template <typename acc_t>
Tensor sum_tile_partials(const cpu::TilePlan& plan, const std::vector<acc_t>& partials, int64_t batch, int64_t width,
                         const at::TensorOptions& options) {
  Tensor sums = at::zeros({batch, width}, options);
  acc_t* out = sums.data_ptr<acc_t>();
  for (int64_t item = 0; item < plan.items; ++item) {
    acc_t* row = out + plan.image(item) * width;
    const acc_t* partial = partials.data() + item * width;
    for (int64_t k = 0; k < width; ++k) row[k] += partial[k];
  }
  return sums;
}

// dL/dS per pixel in units of w, (2, B, H*W) for the f then the g side, from the saved Ŝ (the first
// two rows of `spatial`), P and 1/N; or one row of zeros when the spatial chain is off.
template <typename acc_t>
std::vector<acc_t> spatial_grads(const Tensor& spatial, const Tensor& inv_norm, const Tensor& pixel_grad,
                                 bool reads_pixel_grad, int64_t batch, int64_t pixels) {
  if (!reads_pixel_grad) return std::vector<acc_t>(pixels, acc_t(0));
  std::vector<acc_t> grads(2 * batch * pixels);
  const acc_t* s_hat_all = spatial.data_ptr<acc_t>();
  const acc_t* pg_all = pixel_grad.data_ptr<acc_t>();
  const acc_t* inv_norms = inv_norm.data_ptr<acc_t>();
  cpu::parallel_over_items(2 * batch, 3 * pixels, [&](int64_t first, int64_t last) {
    for (int64_t map = first; map < last; ++map) {  // map = side * batch + image
      const acc_t* s_hat = s_hat_all + map * pixels;
      const acc_t* pg = pg_all + map * pixels;
      acc_t dot = 0;
      for (int64_t p = 0; p < pixels; ++p) dot += pg[p] * s_hat[p];
      acc_t* out = grads.data() + map * pixels;
      for (int64_t p = 0; p < pixels; ++p) out[p] = spatial_map_grad(pg[p], s_hat[p], dot, inv_norms[map]);
    }
  });
  return grads;
}

// What the backward pass reads and writes, in contiguous tensors of the op's dtypes.
struct BackwardTensors {
  Tensor f, g, a, b, a_minus_b;  // a, b, a_minus_b in the accumulation dtype
  Tensor spatial, inv_norm, pixel_grad;
  Tensor df, dg;  // empty unless wanted
};

// One pass over f, g writing the wanted df, dg; returns the channel sums (B, 2C) = sum_p D Ŝ_f f,
// then sum_p D Ŝ_g g (undefined unless da or db is wanted).
template <typename scalar_t, typename teacher_t>
Tensor feature_grad_pass(const BackwardTensors& t, bool reads_pixel_grad, double w_in,
                         const std::array<bool, 4>& output_mask) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = t.f.size(0), channels = t.f.size(1), pixels = t.f.size(2) * t.f.size(3);
  const bool need_channels = output_mask[2] || output_mask[3];
  const acc_t w = static_cast<acc_t>(w_in);
  const acc_t* s_f = t.spatial.data_ptr<acc_t>();
  const acc_t* s_g = s_f + batch * pixels;
  const acc_t* s_diff = s_g + batch * pixels;
  const std::vector<acc_t> sgrad =
      spatial_grads<acc_t>(t.spatial, t.inv_norm, t.pixel_grad, reads_pixel_grad, batch, pixels);
  const acc_t* sgrad_f = sgrad.data();
  const acc_t* sgrad_g = reads_pixel_grad ? sgrad_f + batch * pixels : sgrad_f;
  const int64_t sgrad_image_stride = reads_pixel_grad ? pixels : 0;  // the zero row serves every image

  const cpu::TilePlan plan = cpu::plan_tiles(batch, pixels, kTiles);
  const int64_t image_size = channels * pixels;
  std::vector<acc_t> chan_partial(need_channels ? plan.items * 2 * channels : 0);
  const int output_bits = (output_mask[0] ? kWantDF : 0) | (output_mask[1] ? kWantDG : 0) |
                          (output_mask[2] ? kWantDA : 0) | (output_mask[3] ? kWantDB : 0);
  cpu::parallel_over_items(plan.items, channels * plan.tile, [&](int64_t first, int64_t last) {
    std::vector<acc_t> rows(need_channels ? 2 * plan.tile : 0);
    for (int64_t item = first; item < last; ++item) {
      const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
      const int64_t offset = img * image_size + p0, pixel = img * pixels + p0;
      const int64_t sgrad_pixel = img * sgrad_image_stride + p0;
      acc_t* chan = need_channels ? chan_partial.data() + item * 2 * channels : nullptr;
      with_output_mask<1>(output_bits, [&](auto bits) {
        cpu::run_best<FeatureGradTile<scalar_t, teacher_t, acc_t, decltype(bits)::value>>(
            t.f.data_ptr<scalar_t>() + offset, t.g.data_ptr<teacher_t>() + offset,
            t.a.data_ptr<acc_t>() + img * channels, t.b.data_ptr<acc_t>() + img * channels,
            t.a_minus_b.data_ptr<acc_t>() + img * channels, channels, pixels, n, s_f + pixel, s_g + pixel,
            s_diff + pixel, sgrad_f + sgrad_pixel, sgrad_g + sgrad_pixel, w,
            output_mask[0] ? t.df.data_ptr<scalar_t>() + offset : nullptr,
            output_mask[1] ? t.dg.data_ptr<teacher_t>() + offset : nullptr, rows.data(),
            need_channels ? rows.data() + plan.tile : nullptr, chan, chan + (need_channels ? channels : 0));
      });
    }
  });
  if (!need_channels) return Tensor();
  return sum_tile_partials(plan, chan_partial, batch, 2 * channels, t.a.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_distillation_backward_cpu(
    const Tensor& grad_loss, const Tensor& f_in, const Tensor& g_in, const Tensor& a_in, const Tensor& b_in,
    const Tensor& spatial, const Tensor& inv_norm, const Tensor& pixel_grad, c10::string_view reduction,
    bool spatial_chain, std::array<bool, 4> output_mask) {
  const auto [scale, reads_pixel_grad] = attention::check_backward(grad_loss, f_in, g_in, a_in, b_in, spatial, inv_norm,
                                                                   pixel_grad, reduction, spatial_chain, output_mask);
  const auto acc_dtype = at::toOpMathType(f_in.scalar_type());
  BackwardTensors t;
  t.f = f_in.contiguous();
  t.g = g_in.contiguous();
  t.a = a_in.to(acc_dtype).contiguous();
  t.b = b_in.to(acc_dtype).contiguous();
  t.a_minus_b = t.a - t.b;
  t.spatial = spatial;
  t.inv_norm = inv_norm;
  t.pixel_grad = pixel_grad;
  t.df = attention::gradient_or_empty(output_mask[0], t.f);
  t.dg = attention::gradient_or_empty(output_mask[1], t.g);
  Tensor da = at::empty({0}, a_in.options()), db = at::empty({0}, b_in.options());
  if (!output_mask[0] && !output_mask[1] && !output_mask[2] && !output_mask[3]) return {t.df, t.dg, da, db};

  // dL/dD = w D; w is rounded to acc_t once, for the kernel and the channel sums alike.
  const double w = 2.0 * scale * grad_loss.item<double>();
  Tensor channel_sums;
  dispatch_student_teacher(
      t.f.scalar_type(), t.g.scalar_type(), "attentive_distillation_backward", [&](auto* f_type, auto* g_type) {
        channel_sums =
            feature_grad_pass<std::remove_pointer_t<decltype(f_type)>, std::remove_pointer_t<decltype(g_type)>>(
                t, reads_pixel_grad, w, output_mask);
      });
  // da = w sum_p D Ŝ_f f, db = -w sum_p D Ŝ_g g.
  const int64_t channels = t.f.size(1);
  const Tensor w_acc = at::scalar_tensor(w, t.a.options());
  if (output_mask[2]) da = (channel_sums.narrow(1, 0, channels) * w_acc).to(a_in.scalar_type());
  if (output_mask[3]) db = (channel_sums.narrow(1, channels, channels) * -w_acc).to(b_in.scalar_type());
  return {t.df, t.dg, da, db};
}

Tensor structured_attention_cpu(const Tensor& v_in, const Tensor& a_ch_in, const Tensor& a_sp_in) {
  attention::check_structured(v_in, a_ch_in, a_sp_in);
  const Tensor v = v_in.contiguous();
  const int64_t batch = v.size(0), channels = v.size(1), pixels = v.size(2) * v.size(3);
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  const Tensor a_ch = a_ch_in.to(acc_dtype).contiguous(), a_sp = a_sp_in.to(acc_dtype).contiguous();
  Tensor out = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "structured_attention", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* v_ptr = v.data_ptr<scalar_t>();
    const acc_t* a_ch_ptr = a_ch.data_ptr<acc_t>();
    const acc_t* a_sp_ptr = a_sp.data_ptr<acc_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    // Items are (image, channel) rows: one read and one write per pixel.
    cpu::parallel_over_items(batch * channels, 2 * pixels, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        cpu::run_best<StructuredForwardRow<scalar_t, acc_t>>(
            v_ptr + row * pixels, a_ch_ptr[row], a_sp_ptr + (row / channels) * pixels, pixels, out_ptr + row * pixels);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> structured_attention_backward_cpu(const Tensor& grad_out_in, const Tensor& v_in,
                                                                     const Tensor& a_ch_in, const Tensor& a_sp_in,
                                                                     std::array<bool, 3> output_mask) {
  attention::check_structured(v_in, a_ch_in, a_sp_in);
  attention::check_structured_grad(grad_out_in, v_in);
  const Tensor v = v_in.contiguous(), grad_out = grad_out_in.contiguous();
  const int64_t batch = v.size(0), channels = v.size(1), pixels = v.size(2) * v.size(3);
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  const Tensor a_ch = a_ch_in.to(acc_dtype).contiguous(), a_sp = a_sp_in.to(acc_dtype).contiguous();
  Tensor dv = attention::gradient_or_empty(output_mask[0], v);
  Tensor d_ch = at::empty({0}, a_ch_in.options()), d_sp = at::empty({0}, a_sp_in.options());
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dv, d_ch, d_sp};

  const cpu::TilePlan plan = cpu::plan_tiles(batch, pixels, kTiles);
  Tensor d_sp_acc = at::empty({batch, v.size(2), v.size(3)}, a_sp.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "structured_attention_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t image_size = channels * pixels;
    std::vector<acc_t> chan_partial(plan.items * channels);
    cpu::parallel_over_items(plan.items, 3 * channels * plan.tile, [&](int64_t first, int64_t last) {
      std::vector<acc_t> row(plan.tile);
      std::vector<scalar_t> discard(output_mask[0] ? 0 : plan.tile);
      for (int64_t item = first; item < last; ++item) {
        const int64_t img = plan.image(item), p0 = plan.begin(item), n = plan.length(item);
        const int64_t offset = img * image_size + p0;
        scalar_t* dv0 = output_mask[0] ? dv.data_ptr<scalar_t>() + offset : discard.data();
        cpu::run_best<StructuredBackwardTile<scalar_t, acc_t>>(
            grad_out.data_ptr<scalar_t>() + offset, v.data_ptr<scalar_t>() + offset,
            a_ch.data_ptr<acc_t>() + img * channels, a_sp.data_ptr<acc_t>() + img * pixels + p0, channels, pixels, n,
            dv0, output_mask[0] ? pixels : int64_t(0), d_sp_acc.data_ptr<acc_t>() + img * pixels + p0, row.data(),
            chan_partial.data() + item * channels);
      }
    });
    if (output_mask[1]) {
      d_ch = sum_tile_partials(plan, chan_partial, batch, channels, a_ch.options()).to(a_ch_in.scalar_type());
    }
  });
  if (output_mask[2]) d_sp = d_sp_acc.to(a_sp_in.scalar_type());
  return {dv, d_ch, d_sp};
}

}  // namespace
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast, CPU, m) {
  m.impl("attentive_distillation_forward", &incseg::attentive_distillation_forward_cpu);
  m.impl("attentive_distillation_backward", &incseg::attentive_distillation_backward_cpu);
  m.impl("structured_attention", &incseg::structured_attention_cpu);
  m.impl("structured_attention_backward", &incseg::structured_attention_backward_cpu);
}
