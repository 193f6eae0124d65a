// Fused CPU kernels for the logit losses (docs/MATH.md#logit-losses): incseg_fast::logit_losses_fwd / logit_losses_bwd.
// One op covers ce in {unbiased, plain, none} x kd in {unbiased, balanced, plain, none} x
// reduction in {mean, sum, none}; the per-pixel math lives in common/logit_math.h.
//
// Layout and tiling. Inputs are NCHW contiguous (anything else is made contiguous first, one
// copy of that tensor). For a fixed pixel the C channels are H*W apart, so the kernels work on a
// tile of kTile contiguous pixels of one image and loop over channels outside a loop over the
// tile's pixels: the pixel loop is what the compiler vectorises, and the per-pixel accumulators
// (a few arrays of kTile values) live in L1. A tile's C*kTile logits (42 KiB at C=21, 300 KiB at
// C=151 in float32) stay in L1/L2 between the two passes below, so each logit is fetched from
// memory once. Each channel pass also prefetches the next tile's row (see prefetch_next_tile).
// Tiles are fixed (cpu::plan_tiles with kTiles) and run on cpu::parallel_over_items; per-tile
// partial sums are kept in double and added up in tile order afterwards, so results depend neither
// on the schedule nor on the thread count.
//
// Forward, per tile:
//   pass 1  maxima: max_old over [0, Co), max_new over [Co, C), max_y of alpha*y over [0, Co).
//   pass 2  shifted exp-sums of x over both ranges and of alpha*y, plus the teacher-weighted
//           sum of x (TeacherSums); one exp per logit and per teacher logit.
//   finish  per pixel: lse, lse_old, lse_bg, lse_q and the two losses.
// Scheme: the backward recomputes from saved per-pixel statistics. The forward saves
// stats (B, 4, H, W) = (lse, lse_old, lse_bg, lse_q) in the accumulation dtype (16 bytes per
// pixel in float32, vs 4*C for the logits) and the number of non-ignored pixels; the backward
// then needs one pass: it reads x, y, t, mask once and writes dL/dx once, computing
// p_c = exp(x_c - lse) and the other exponentials directly from the statistics. No
// logits-sized temporary exists besides dL/dx itself.
//
// Backward, per tile: per-pixel gradient coefficients (logit_math.h grad_coefs, which has the
// derivation), then one pass over the channels evaluating logit_grad. The old-set and
// background-set exponentials are folded into the coefficient of p_c (the "factored" form, see
// backward_tile) unless a pixel's probability mass there is too small for that to be exact; the
// direct form computes only the exponentials the modes need (template flags kOld, kBg, kTeacher).
//
// Vectorisation. The hot loops are plain C++ over the tile's pixels calling inline functions,
// and exp is logit_math.h's polynomial, so GCC vectorises them at -O3 without -ffast-math. Each
// tile loop is a kernel struct that cpu::run_best compiles for baseline x86-64, AVX2 and AVX-512
// (cpu/toolkit.h; INCSEG_CPU_ISA caps the choice). Host-side checks and shapes: common/logit_host.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/logit_host.h"
#include "common/logit_math.h"
#include "common/teacher_dtype.h"
#include "common/upsample.h"
#include "cpu/toolkit.h"

namespace incseg {
namespace {

using cpu::acc_type;
using cpu::load;
using cpu::to_storage;
using logit::CeMode;
using logit::Inputs;
using logit::KdMode;
using logit::Reduction;

// Pixels per tile: 2 KiB channel rows (float32) give the memory system runs long enough to stream,
// while the dozen per-pixel arrays of a tile (24 KiB) still sit in L1 and the tile itself in L2.
// Every tile but an image's last has exactly kTile pixels (prefetch_next_tile relies on it).
constexpr int64_t kTile = 512;
constexpr cpu::TilePolicy kTiles{kTile, kTile, kTile};

// Labels of one tile as int64, whatever the stored label dtype (per pixel, not per logit).
void read_labels(const at::Tensor& target, int64_t offset, int64_t n, int64_t* out) {
  switch (target.scalar_type()) {
    case at::kLong: {
      const int64_t* t = target.const_data_ptr<int64_t>() + offset;
      for (int64_t p = 0; p < n; ++p) out[p] = t[p];
      break;
    }
    case at::kInt: {
      const int32_t* t = target.const_data_ptr<int32_t>() + offset;
      for (int64_t p = 0; p < n; ++p) out[p] = t[p];
      break;
    }
    default: {
      const uint8_t* t = target.const_data_ptr<uint8_t>() + offset;
      for (int64_t p = 0; p < n; ++p) out[p] = t[p];
      break;
    }
  }
}

[[noreturn]] C10_NOINLINE void fail_label(int64_t t, int64_t C) {
  TORCH_CHECK_VALUE(false, "target has label ", t, " outside [0, ", C, ") that is not ignore_index");
}

inline void check_label(int64_t t, int64_t C) {
  if (C10_UNLIKELY(t < 0 || t >= C)) fail_label(t, C);
}

// Channel rows of a tile are H*W apart, so each tile touches C short runs of memory that the
// hardware prefetcher barely learns; every pass over a channel row therefore also prefetches the
// same row of the next tile (the kTile values right after it). Prefetches never fault.
template <typename T>
INCSEG_FORCE_INLINE void prefetch_next_tile(const T* row, bool for_write = false) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = kTile; i < 2 * kTile; i += kLine) {
    if (for_write) {
      __builtin_prefetch(row + i, 1);
    } else {
      __builtin_prefetch(row + i, 0);
    }
  }
#endif
}

// a == b ? v : 0 by masking v's bits: GCC turns a select (or a bool-to-float factor) feeding
// float arithmetic into a branch it then will not vectorise under -ftrapping-math.
template <typename T>
INCSEG_FORCE_INLINE T keep_if_equal(int32_t a, int32_t b, T v) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= Bits(0) - static_cast<Bits>(a == b);
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <typename scalar_t, typename teacher_t>
struct FwdArgs {
  using acc_t = acc_type<scalar_t>;
  const Inputs* in;
  const scalar_t* x;
  const teacher_t* y;      // the teacher in its own dtype (common/teacher_dtype.h)
  const acc_t* log_gamma;  // (B,), kd == balanced
  const acc_t* mask;
  acc_t alpha;
  int64_t ignore_index;
  cpu::TilePlan plan;
  acc_t* stats;
  acc_t* ce_map;  // per-pixel losses for reduction "none", else null
  acc_t* kd_map;
  double* tile_ce;
  double* tile_kd;
  int64_t* tile_valid;
};

// The logits of one tile's pixels as the tile math reads them: channel c of pixel p at
// x[c * stride + p] (and y likewise). row_t and teacher_row_t are the logits' dtypes for the logits
// in place (stride H*W) and acc_t for a tile's upsampled logits in scratch rows (stride kTile, see
// upsample_tile).
template <typename row_t, typename teacher_row_t = row_t>
struct TileRows {
  const row_t* x;
  const teacher_row_t* y;  // null without distillation
  int64_t stride;
};

// The forward of `tile` (image b, output pixels [p0, p0 + n)) from its logits `rows`.
template <bool kWithKd, typename scalar_t, typename teacher_t, typename row_t, typename teacher_row_t>
INCSEG_FORCE_INLINE void forward_pixels(const FwdArgs<scalar_t, teacher_t>& a, int64_t tile,
                                        const TileRows<row_t, teacher_row_t>& rows) {
  using acc_t = acc_type<scalar_t>;
  const Inputs& in = *a.in;
  const int64_t C = in.C, Co = in.Co, HW = in.HW, stride = rows.stride;
  const int64_t b = a.plan.image(tile), p0 = a.plan.begin(tile);
  // n <= kTile always (kTiles); saying so bounds the vector loops for the compiler (~4% faster).
  const int64_t n = std::min(kTile, a.plan.length(tile));
  const row_t* __restrict__ xb = rows.x;
  const teacher_row_t* __restrict__ yb = rows.y;
  const acc_t alpha = a.alpha;
  const acc_t plain_kd = in.kd == KdMode::kPlain ? acc_t(1) : acc_t(0);

  acc_t max_old[kTile], max_new[kTile], sum_old[kTile], sum_new[kTile];
  acc_t max_y[kTile], e0[kTile], sum_rest[kTile], weighted[kTile];

  // Pass 1: maxima.
  prefetch_next_tile(xb);
  for (int64_t p = 0; p < n; ++p) max_old[p] = load<acc_t>(xb, p);
  for (int64_t c = 1; c < Co; ++c) {
    const row_t* __restrict__ xc = xb + c * stride;
    prefetch_next_tile(xc);
    for (int64_t p = 0; p < n; ++p) max_old[p] = logit::lm_max(max_old[p], load<acc_t>(xc, p));
  }
  for (int64_t p = 0; p < n; ++p) max_new[p] = logit::neg_inf<acc_t>();
  for (int64_t c = Co; c < C; ++c) {
    const row_t* __restrict__ xc = xb + c * stride;
    prefetch_next_tile(xc);
    for (int64_t p = 0; p < n; ++p) max_new[p] = logit::lm_max(max_new[p], load<acc_t>(xc, p));
  }
  if (kWithKd) {
    prefetch_next_tile(yb);
    for (int64_t p = 0; p < n; ++p) max_y[p] = alpha * load<acc_t>(yb, p);
    for (int64_t c = 1; c < Co; ++c) {
      const teacher_row_t* __restrict__ yc = yb + c * stride;
      prefetch_next_tile(yc);
      for (int64_t p = 0; p < n; ++p) max_y[p] = logit::lm_max(max_y[p], alpha * load<acc_t>(yc, p));
    }
  }

  // Pass 2: shifted exp-sums (channel 0 starts the old-range sums).
  for (int64_t p = 0; p < n; ++p) {
    const acc_t x0 = load<acc_t>(xb, p);
    sum_old[p] = logit::lm_exp(x0 - max_old[p]);
    if (kWithKd) {
      const acc_t e = logit::lm_exp(alpha * load<acc_t>(yb, p) - max_y[p]);
      e0[p] = e;
      sum_rest[p] = acc_t(0);
      weighted[p] = plain_kd * e * (x0 - max_old[p]);
    }
  }
  // Channels go in pairs: one update of the per-pixel accumulators per two rows.
  int64_t c = 1;
  for (; c + 1 < Co; c += 2) {
    const row_t* __restrict__ xc = xb + c * stride;
    const row_t* __restrict__ xd = xc + stride;
    if (kWithKd) {
      const teacher_row_t* __restrict__ yc = yb + c * stride;
      const teacher_row_t* __restrict__ yd = yc + stride;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t xv = load<acc_t>(xc, p) - max_old[p];
        const acc_t xw = load<acc_t>(xd, p) - max_old[p];
        sum_old[p] += logit::lm_exp(xv) + logit::lm_exp(xw);
        const acc_t e = logit::lm_exp(alpha * load<acc_t>(yc, p) - max_y[p]);
        const acc_t f = logit::lm_exp(alpha * load<acc_t>(yd, p) - max_y[p]);
        sum_rest[p] += e + f;
        weighted[p] += e * xv + f * xw;
      }
    } else {
      for (int64_t p = 0; p < n; ++p) {
        sum_old[p] += logit::lm_exp(load<acc_t>(xc, p) - max_old[p]) + logit::lm_exp(load<acc_t>(xd, p) - max_old[p]);
      }
    }
  }
  if (c < Co) {
    const row_t* __restrict__ xc = xb + c * stride;
    if (kWithKd) {
      const teacher_row_t* __restrict__ yc = yb + c * stride;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t xv = load<acc_t>(xc, p) - max_old[p];
        sum_old[p] += logit::lm_exp(xv);
        const acc_t e = logit::lm_exp(alpha * load<acc_t>(yc, p) - max_y[p]);
        sum_rest[p] += e;
        weighted[p] += e * xv;
      }
    } else {
      for (int64_t p = 0; p < n; ++p) sum_old[p] += logit::lm_exp(load<acc_t>(xc, p) - max_old[p]);
    }
  }
  for (int64_t p = 0; p < n; ++p) sum_new[p] = acc_t(0);
  for (c = Co; c + 1 < C; c += 2) {
    const row_t* __restrict__ xc = xb + c * stride;
    const row_t* __restrict__ xd = xc + stride;
    for (int64_t p = 0; p < n; ++p) {
      sum_new[p] += logit::lm_exp(load<acc_t>(xc, p) - max_new[p]) + logit::lm_exp(load<acc_t>(xd, p) - max_new[p]);
    }
  }
  if (c < C) {
    const row_t* __restrict__ xc = xb + c * stride;
    for (int64_t p = 0; p < n; ++p) sum_new[p] += logit::lm_exp(load<acc_t>(xc, p) - max_new[p]);
  }

  // Finish: per-pixel statistics (vectorised; a few logs and exps per pixel, not per logit).
  acc_t* __restrict__ stats = a.stats + b * logit::kNumStats * HW + p0;
  acc_t* __restrict__ lse = stats + logit::kStatLse * HW;
  acc_t* __restrict__ lse_old = stats + logit::kStatLseOld * HW;
  acc_t* __restrict__ lse_bg = stats + logit::kStatLseBg * HW;
  acc_t* __restrict__ lse_q = stats + logit::kStatLseTeacher * HW;
  for (int64_t p = 0; p < n; ++p) {
    const auto s = logit::finish_student(max_old[p], sum_old[p], max_new[p], sum_new[p], load<acc_t>(xb, p));
    lse[p] = s.lse;
    lse_old[p] = s.lse_old;
    lse_bg[p] = s.lse_bg;
  }
  acc_t kd_loss[kTile];
  if (kWithKd) {
    const auto factors = logit::kd_factors(in.kd, in.kd == KdMode::kBalanced ? a.log_gamma[b] : acc_t(0));
    for (int64_t p = 0; p < n; ++p) {
      const logit::TeacherSums<acc_t> ts{max_y[p], e0[p], sum_rest[p], weighted[p], alpha * load<acc_t>(yb, p)};
      const logit::StudentStats<acc_t> s{lse[p], lse_old[p], lse_bg[p]};
      lse_q[p] = logit::teacher_lse(ts);
      kd_loss[p] = logit::kd_pixel_loss(factors, Co, s, logit::teacher_terms(factors, ts), max_old[p]);
    }
    if (a.mask) {
      const acc_t* __restrict__ mask = a.mask + b * HW + p0;
      for (int64_t p = 0; p < n; ++p) kd_loss[p] *= mask[p];
    }
  } else {
    for (int64_t p = 0; p < n; ++p) {
      lse_q[p] = acc_t(0);
      kd_loss[p] = acc_t(0);
    }
  }

  // Cross-entropy: labels and a gather of x_t (scalar, per pixel).
  acc_t ce_loss[kTile];
  int64_t valid = 0;
  if (in.ce != CeMode::kNone) {
    int64_t labels[kTile];
    read_labels(in.target, b * HW + p0, n, labels);
    for (int64_t p = 0; p < n; ++p) {
      const int64_t t = labels[p];
      ce_loss[p] = acc_t(0);
      if (t != a.ignore_index) {
        check_label(t, C);
        const logit::StudentStats<acc_t> s{lse[p], lse_old[p], lse_bg[p]};
        ce_loss[p] = logit::ce_pixel_loss(in.ce, t, Co, s, load<acc_t>(xb + t * stride, p));
        ++valid;
      }
    }
  } else {
    for (int64_t p = 0; p < n; ++p) ce_loss[p] = acc_t(0);
  }

  if (a.ce_map) {
    std::copy(ce_loss, ce_loss + n, a.ce_map + b * HW + p0);
    std::copy(kd_loss, kd_loss + n, a.kd_map + b * HW + p0);
  }
  double ce_total = 0.0, kd_total = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    ce_total += static_cast<double>(ce_loss[p]);
    kd_total += static_cast<double>(kd_loss[p]);
  }
  a.tile_ce[tile] = ce_total;
  a.tile_kd[tile] = kd_total;
  a.tile_valid[tile] = valid;
}

// ------------------------------------------------------------------------------------------
// size=: the logits bilinearly upsampled on the fly (MATH.md#upsampling, common/upsample.h)
// ------------------------------------------------------------------------------------------

// The upsampling is separable: an output row r mixes two input rows, m = (1 - l_r) x[i0] + l_r x[i1]
// (in_w values per channel, cheap), and then each output column q mixes two values of m,
// (1 - l_q) m[j0] + l_q m[j1]: two loads from m (in L1) per output value, not four. It is the same
// bilinear weight per sample as upsample::bilinear, with the two axes taken in the other order
// (results differ from F.interpolate's by rounding only).

// The column taps of one plane geometry (in_w samples to W columns), for every output column,
// and the runs of output columns that read the same pair of samples: run j is the columns
// [run_begin[j], run_begin[j + 1]) whose j0 == j (j0 never decreases with q).
template <typename acc_t>
struct ColumnTaps {
  std::vector<int32_t> j0, j1;
  std::vector<acc_t> c0, c1;  // weights of j0 and j1
  std::vector<int64_t> run_begin;

  ColumnTaps(int64_t in_w, int64_t W) : j0(W), j1(W), c0(W), c1(W), run_begin(in_w + 1, W) {
    const acc_t scale = upsample::source_scale<acc_t>(in_w, W);
    for (int64_t q = W - 1; q >= 0; --q) {
      const auto tap = upsample::tap(q, scale, in_w);
      j0[q] = static_cast<int32_t>(tap.i0);
      j1[q] = static_cast<int32_t>(tap.i1);
      c1[q] = tap.l1;
      c0[q] = acc_t(1) - tap.l1;
      run_begin[tap.i0] = q;
    }
    for (int64_t j = in_w - 1; j >= 0; --j) run_begin[j] = std::min(run_begin[j], run_begin[j + 1]);
  }
};

// One plane geometry of the upsampling: channels planes of in_h x in_w, their column taps.
template <typename scalar_t, typename acc_t>
struct UpsampledPlanes {
  const scalar_t* planes;  // channel 0 of the image
  int64_t channels, in_h, in_w;
  const ColumnTaps<acc_t>* cols;
};

// rows[c * kTile + p] = channel c upsampled to pixel p of the tile (output pixels [p0, p0 + n) of
// an image with W columns), in acc_t (not rounded to the logits' dtype). mix: in_w scratch values.
template <typename scalar_t, typename acc_t>
INCSEG_FORCE_INLINE void upsample_tile(const UpsampledPlanes<scalar_t, acc_t>& src, int64_t H, int64_t W, int64_t p0,
                                       int64_t n, acc_t* __restrict__ mix, acc_t* rows) {
  const int64_t plane = src.in_h * src.in_w;
  const acc_t row_scale = upsample::source_scale<acc_t>(src.in_h, H);
  const int32_t* __restrict__ j0 = src.cols->j0.data();
  const int32_t* __restrict__ j1 = src.cols->j1.data();
  const acc_t* __restrict__ c0 = src.cols->c0.data();
  const acc_t* __restrict__ c1 = src.cols->c1.data();
  for (int64_t done = 0; done < n;) {  // one output row's part of the tile at a time
    const int64_t r = (p0 + done) / W, q0 = (p0 + done) % W, len = std::min(n - done, W - q0);
    const auto tap = upsample::tap(r, row_scale, src.in_h);
    const acc_t r1 = tap.l1, r0 = acc_t(1) - r1;
    const int64_t j_first = j0[q0], j_last = j1[q0 + len - 1];
    for (int64_t c = 0; c < src.channels; ++c) {
      const scalar_t* __restrict__ top = src.planes + c * plane + tap.i0 * src.in_w;
      const scalar_t* __restrict__ bottom = src.planes + c * plane + tap.i1 * src.in_w;
      for (int64_t j = j_first; j <= j_last; ++j)
        mix[j] = upsample::weight_times(r0, load<acc_t>(top, j)) + upsample::weight_times(r1, load<acc_t>(bottom, j));
      acc_t* __restrict__ out = rows + c * kTile + done;
      for (int64_t q = q0; q < q0 + len; ++q)
        out[q - q0] = upsample::weight_times(c0[q], mix[j0[q]]) + upsample::weight_times(c1[q], mix[j1[q]]);
    }
    done += len;
  }
}

// One thread's scratch for upsampled tiles: the tile's logits (C rows of x, Co of y, kTile each),
// the column taps and, in the backward, dL/dx_up of the tile (C rows) and an output row's column
// sums (C x w).
template <typename acc_t>
struct UpsampleScratch {
  std::vector<acc_t> x, y, grad, column_sums, mix;
  ColumnTaps<acc_t> x_cols, y_cols;
  UpsampleScratch(const Inputs& in, bool backward)
      : x(in.C * kTile),
        y(in.kd != KdMode::kNone ? in.Co * kTile : 0),
        grad(backward ? in.C * kTile : 0),
        column_sums(backward ? in.C * in.w : 0),
        mix(std::max(in.w, in.yw)),
        x_cols(in.w, in.W),
        y_cols(in.kd != KdMode::kNone ? in.yw : 0, in.kd != KdMode::kNone ? in.W : 0) {}

  // Interpolates the tile (image b, output pixels [p0, p0 + n)) of x and, with distillation, y.
  template <typename scalar_t, typename teacher_t>
  void fill(const Inputs& in, const scalar_t* x_all, const teacher_t* y_all, int64_t b, int64_t p0, int64_t n) {
    const UpsampledPlanes<scalar_t, acc_t> xs{x_all + b * in.C * in.h * in.w, in.C, in.h, in.w, &x_cols};
    upsample_tile(xs, in.H, in.W, p0, n, mix.data(), x.data());
    if (!y.empty()) {
      const UpsampledPlanes<teacher_t, acc_t> ys{y_all + b * in.Co * in.yh * in.yw, in.Co, in.yh, in.yw, &y_cols};
      upsample_tile(ys, in.H, in.W, p0, n, mix.data(), y.data());
    }
  }
  TileRows<acc_t> rows() const { return {x.data(), y.empty() ? nullptr : y.data(), kTile}; }
};

template <typename scalar_t, typename teacher_t, bool kWithKd>
INCSEG_FORCE_INLINE void forward_tile(const FwdArgs<scalar_t, teacher_t>& a, int64_t tile) {
  const Inputs& in = *a.in;
  const int64_t b = a.plan.image(tile), p0 = a.plan.begin(tile);
  const TileRows<scalar_t, teacher_t> rows{a.x + b * in.C * in.HW + p0,
                                           kWithKd ? a.y + b * in.Co * in.HW + p0 : nullptr, in.HW};
  forward_pixels<kWithKd>(a, tile, rows);
}

template <typename scalar_t, typename teacher_t, bool kWithKd>
struct ForwardTiles {
  static INCSEG_FORCE_INLINE void run(const FwdArgs<scalar_t, teacher_t>& a, int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) forward_tile<scalar_t, teacher_t, kWithKd>(a, tile);
  }
};

// size=: each tile's logits are interpolated into scratch rows, then the same tile math runs on them.
template <typename scalar_t, typename teacher_t, bool kWithKd>
struct UpsampledForwardTiles {
  static INCSEG_FORCE_INLINE void run(const FwdArgs<scalar_t, teacher_t>& a, int64_t begin, int64_t end) {
    const Inputs& in = *a.in;
    UpsampleScratch<acc_type<scalar_t>> scratch(in, /*backward=*/false);
    for (int64_t tile = begin; tile < end; ++tile) {
      scratch.fill(in, a.x, a.y, a.plan.image(tile), a.plan.begin(tile), a.plan.length(tile));
      forward_pixels<kWithKd>(a, tile, scratch.rows());
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logit_losses_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& log_gamma, const std::optional<at::Tensor>& mask, int64_t old_classes,
    c10::string_view ce, c10::string_view kd, double alpha, int64_t ignore_index, c10::string_view reduction,
    at::OptionalIntArrayRef size) {
  const Inputs in = logit::check_inputs(x, target, y, log_gamma, mask, old_classes, ce, kd, reduction, size);
  const logit::ForwardTensors out = logit::allocate_forward_outputs(in);
  const cpu::TilePlan plan = cpu::plan_tiles(in.B, in.HW, kTiles);
  std::vector<double> tile_ce(plan.items), tile_kd(plan.items);
  std::vector<int64_t> tile_valid(plan.items);

  dispatch_student_teacher(x.scalar_type(), in.teacher_dtype, "logit_losses_fwd_cpu", [&](auto* x_type, auto* y_type) {
    using scalar_t = std::remove_pointer_t<decltype(x_type)>;
    using teacher_t = std::remove_pointer_t<decltype(y_type)>;
    using acc_t = acc_type<scalar_t>;
    FwdArgs<scalar_t, teacher_t> a;
    a.in = &in;
    a.x = in.x.const_data_ptr<scalar_t>();
    a.y = in.kd != KdMode::kNone ? in.y.const_data_ptr<teacher_t>() : nullptr;
    a.log_gamma = in.log_gamma.defined() ? in.log_gamma.const_data_ptr<acc_t>() : nullptr;
    a.mask = in.mask.defined() ? in.mask.const_data_ptr<acc_t>() : nullptr;
    a.alpha = static_cast<acc_t>(alpha);
    a.ignore_index = ignore_index;
    a.plan = plan;
    a.stats = out.stats.mutable_data_ptr<acc_t>();
    a.ce_map = out.ce_map.defined() ? out.ce_map.mutable_data_ptr<acc_t>() : nullptr;
    a.kd_map = out.kd_map.defined() ? out.kd_map.mutable_data_ptr<acc_t>() : nullptr;
    a.tile_ce = tile_ce.data();
    a.tile_kd = tile_kd.data();
    a.tile_valid = tile_valid.data();
    cpu::parallel_over_items(plan.items, (in.C + in.Co) * plan.tile, [&](int64_t begin, int64_t end) {
      const bool with_kd = in.kd != KdMode::kNone;
      if (in.upsample && with_kd) return cpu::run_best<UpsampledForwardTiles<scalar_t, teacher_t, true>>(a, begin, end);
      if (with_kd) return cpu::run_best<ForwardTiles<scalar_t, teacher_t, true>>(a, begin, end);
      if constexpr (std::is_same_v<scalar_t, teacher_t>) {  // without distillation the teacher dtype is x's
        if (in.upsample) return cpu::run_best<UpsampledForwardTiles<scalar_t, scalar_t, false>>(a, begin, end);
        cpu::run_best<ForwardTiles<scalar_t, scalar_t, false>>(a, begin, end);
      }
    });
  });

  double ce_total = 0.0, kd_total = 0.0;
  int64_t valid = 0;
  for (int64_t i = 0; i < plan.items; ++i) {
    ce_total += tile_ce[i];
    kd_total += tile_kd[i];
    valid += tile_valid[i];
  }
  at::Tensor valid_count = at::scalar_tensor(valid, x.options().dtype(at::kLong));
  if (in.reduction == Reduction::kNone) return {out.ce_map, out.kd_map, out.stats, valid_count};
  if (in.reduction == Reduction::kMean) ce_total *= logit::ce_mean_scale<double>(valid);
  kd_total *= logit::kd_scale(in);
  const auto acc_options = x.options().dtype(in.acc_dtype);
  return {at::scalar_tensor(ce_total, acc_options), at::scalar_tensor(kd_total, acc_options), out.stats, valid_count};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

template <typename scalar_t, typename teacher_t>
struct BwdArgs {
  using acc_t = acc_type<scalar_t>;
  const Inputs* in;
  const scalar_t* x;
  const teacher_t* y;      // the teacher in its own dtype
  const acc_t* log_gamma;  // (B,), kd == balanced
  const acc_t* mask;
  const acc_t* stats;
  const acc_t* grad_ce;  // upstream gradients, already scaled for "mean"
  const acc_t* grad_kd;
  int64_t grad_ce_stride;  // 1 for a (B, H, W) map, 0 for a scalar
  int64_t grad_kd_stride;
  acc_t alpha;
  int64_t ignore_index;
  cpu::TilePlan plan;
  scalar_t* grad_x;
};

// What the channel passes of one backward tile read: the tile's rows and its per-pixel arrays.
// row_t, teacher_row_t as in TileRows: dL/dx_c of pixel p goes to gb[c * stride + p].
template <typename row_t, typename teacher_row_t>
struct BwdTileView {
  using acc_t = acc_type<row_t>;
  const row_t* xb;
  const teacher_row_t* yb;
  row_t* gb;
  const acc_t *lse, *lse_old, *lse_bg, *lse_q;
  const acc_t *full, *old_set, *bg_set, *teacher, *target, *extra0;
  const acc_t *full0, *full_old, *full_new;  // factored coefficients of p_c per channel range
  const int32_t* label;
  int64_t n, C, Co, stride;
  acc_t alpha;
};

// dL/dx_c at pixel p of a tile (see logit_math.h grad_coefs / logit_grad). Direct form: the
// old-set and background-set exponentials computed from x; factored form: folded into
// factored_full (the coefficient of p_c for this channel's range).
template <bool kFactored, bool kOld, bool kBg, typename scalar_t, typename teacher_row_t,
          typename acc_t = acc_type<scalar_t>>
INCSEG_FORCE_INLINE acc_t channel_grad(const BwdTileView<scalar_t, teacher_row_t>& v, int64_t p, acc_t xv, acc_t q,
                                       bool in_old, bool in_bg, int32_t c, const acc_t* __restrict__ factored_full) {
  const acc_t p_full = logit::lm_exp(xv - v.lse[p]);
  acc_t g;
  if (kFactored) {
    g = factored_full[p] * p_full + v.teacher[p] * q;
  } else {
    const logit::GradCoefs<acc_t> k{v.full[p], v.old_set[p], v.bg_set[p], v.teacher[p], acc_t(0), v.target[p]};
    const acc_t p_old = kOld && in_old ? logit::lm_exp(xv - v.lse_old[p]) : acc_t(0);
    const acc_t p_bg = kBg && in_bg ? logit::lm_exp(xv - v.lse_bg[p]) : acc_t(0);
    g = logit::logit_grad(k, p_full, p_old, p_bg, q);
  }
  return g + keep_if_equal(v.label[p], c, v.target[p]);
}

// One pass over the tile's channels writing dL/dx: channel 0, the old channels [1, Co) (with the
// teacher term), the new channels [Co, C).
template <bool kFactored, bool kOld, bool kBg, bool kTeacher, typename scalar_t, typename teacher_row_t>
INCSEG_FORCE_INLINE void backward_channels(const BwdTileView<scalar_t, teacher_row_t>& v) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = v.n, stride = v.stride;
  const acc_t* __restrict__ lse_q = v.lse_q;
  const acc_t* __restrict__ extra0 = v.extra0;
  prefetch_next_tile(v.xb);
  prefetch_next_tile(v.gb, true);
  for (int64_t p = 0; p < n; ++p) {
    const acc_t g = channel_grad<kFactored, kOld, kBg>(v, p, load<acc_t>(v.xb, p), acc_t(0), true, true, 0, v.full0);
    v.gb[p] = to_storage<scalar_t>(g + extra0[p]);
  }
  for (int64_t c = 1; c < v.Co; ++c) {
    const scalar_t* __restrict__ xc = v.xb + c * stride;
    scalar_t* __restrict__ gc = v.gb + c * stride;
    prefetch_next_tile(xc);
    prefetch_next_tile(gc, true);
    const int32_t cf = static_cast<int32_t>(c);
    if (kTeacher) {
      const teacher_row_t* __restrict__ yc = v.yb + c * stride;
      prefetch_next_tile(yc);
      for (int64_t p = 0; p < n; ++p) {
        const acc_t q = logit::lm_exp(v.alpha * load<acc_t>(yc, p) - lse_q[p]);
        gc[p] = to_storage<scalar_t>(
            channel_grad<kFactored, kOld, kBg>(v, p, load<acc_t>(xc, p), q, true, false, cf, v.full_old));
      }
    } else {
      for (int64_t p = 0; p < n; ++p) {
        gc[p] = to_storage<scalar_t>(
            channel_grad<kFactored, kOld, kBg>(v, p, load<acc_t>(xc, p), acc_t(0), true, false, cf, v.full_old));
      }
    }
  }
  for (int64_t c = v.Co; c < v.C; ++c) {
    const scalar_t* __restrict__ xc = v.xb + c * stride;
    scalar_t* __restrict__ gc = v.gb + c * stride;
    prefetch_next_tile(xc);
    prefetch_next_tile(gc, true);
    const int32_t cf = static_cast<int32_t>(c);
    for (int64_t p = 0; p < n; ++p) {
      gc[p] = to_storage<scalar_t>(
          channel_grad<kFactored, kOld, kBg>(v, p, load<acc_t>(xc, p), acc_t(0), false, true, cf, v.full_new));
    }
  }
}

// dL/dx of image b's output pixels [p0, p0 + n), n <= kTile, from their logits `rows` into
// grad[c * rows.stride + p].
template <bool kOld, bool kBg, bool kTeacher, typename scalar_t, typename teacher_t, typename row_t,
          typename teacher_row_t>
INCSEG_FORCE_INLINE void backward_pixels(const BwdArgs<scalar_t, teacher_t>& a, int64_t b, int64_t p0, int64_t n,
                                         const TileRows<row_t, teacher_row_t>& rows, row_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const Inputs& in = *a.in;
  const int64_t C = in.C, Co = in.Co, HW = in.HW;
  n = std::min(kTile, n);  // bounds the vector loops for the compiler (~4% faster)
  const row_t* __restrict__ xb = rows.x;
  const teacher_row_t* __restrict__ yb = rows.y;
  row_t* __restrict__ gb = grad;
  const acc_t* __restrict__ stats = a.stats + b * logit::kNumStats * HW + p0;
  const acc_t* __restrict__ lse = stats + logit::kStatLse * HW;
  const acc_t* __restrict__ lse_old = stats + logit::kStatLseOld * HW;
  const acc_t* __restrict__ lse_bg = stats + logit::kStatLseBg * HW;
  const acc_t* __restrict__ lse_q = stats + logit::kStatLseTeacher * HW;
  const acc_t alpha = a.alpha;

  // Per-pixel coefficients: labels, checks and the CE upstream gradient per pixel (scalar),
  // then q_0 and grad_coefs (vectorised).
  acc_t full[kTile], old_set[kTile], bg_set[kTile], teacher[kTile], target[kTile], extra0[kTile];
  acc_t g_ce[kTile], old_label[kTile], g_kd[kTile];
  int32_t label[kTile];
  if (in.ce != CeMode::kNone) {
    int64_t labels[kTile];
    read_labels(in.target, b * HW + p0, n, labels);
    for (int64_t p = 0; p < n; ++p) {
      const int64_t t = labels[p];
      const bool valid = t != a.ignore_index;
      if (valid) check_label(t, C);
      label[p] = valid ? static_cast<int32_t>(t) : -1;  // -1 never equals a channel
      g_ce[p] = valid ? a.grad_ce[(b * HW + p0 + p) * a.grad_ce_stride] : acc_t(0);
      old_label[p] = in.ce == CeMode::kUnbiased && valid && t < Co ? acc_t(1) : acc_t(0);
    }
  } else {
    for (int64_t p = 0; p < n; ++p) {
      label[p] = -1;
      g_ce[p] = acc_t(0);
      old_label[p] = acc_t(0);
    }
  }
  if (kTeacher) {
    for (int64_t p = 0; p < n; ++p) g_kd[p] = a.grad_kd[(b * HW + p0 + p) * a.grad_kd_stride];
    if (a.mask) {
      const acc_t* __restrict__ mask = a.mask + b * HW + p0;
      for (int64_t p = 0; p < n; ++p) g_kd[p] *= mask[p];
    }
  } else {
    for (int64_t p = 0; p < n; ++p) g_kd[p] = acc_t(0);
  }
  const auto factors = logit::kd_factors(in.kd, in.kd == KdMode::kBalanced ? a.log_gamma[b] : acc_t(0));
  for (const acc_t* row : {lse, lse_old, lse_bg, lse_q}) prefetch_next_tile(row);
  if (kTeacher) prefetch_next_tile(yb);
  for (int64_t p = 0; p < n; ++p) {
    const acc_t log_q0 = kTeacher ? alpha * load<acc_t>(yb, p) - lse_q[p] : acc_t(0);
    const acc_t q0 = kTeacher ? logit::lm_exp(log_q0) : acc_t(0);
    const acc_t g_q0 = kTeacher ? logit::weighted_q0(factors, log_q0) : acc_t(0);
    const auto k = logit::grad_coefs(factors, Co, old_label[p], g_ce[p], g_kd[p], q0, g_q0);
    full[p] = k.full;
    old_set[p] = k.old_set;
    bg_set[p] = k.bg_set;
    teacher[p] = k.teacher;
    target[p] = k.target;
    extra0[p] = k.teacher0 * q0;  // plain KD's q_0 term at channel 0
  }

  // Factored form: exp(x_c - lse_old) = p_c exp(lse - lse_old) and likewise for lse_bg, so the
  // per-pixel factors fold into one coefficient of p_c per channel range and each logit needs one
  // exp (plus one per teacher logit) instead of up to three. It needs p_c to be a normal float
  // wherever those terms matter; a tile whose old or background set holds less than e^-kMaxLogRatio
  // of some pixel's probability mass, or whose folded coefficients overflow, takes the direct form.
  constexpr acc_t kMaxLogRatio = 40;
  acc_t full0[kTile], full_old[kTile], full_new[kTile];
  int32_t too_far = 0;  // an integer OR: GCC does not vectorise a float max reduction
  for (int64_t p = 0; p < n; ++p) {
    const acc_t log_ratio_old = kOld ? lse[p] - lse_old[p] : acc_t(0);
    const acc_t log_ratio_bg = kBg ? lse[p] - lse_bg[p] : acc_t(0);
    too_far |= static_cast<int32_t>(!(log_ratio_old <= kMaxLogRatio && log_ratio_bg <= kMaxLogRatio));
    const acc_t old_term = kOld ? old_set[p] * logit::lm_exp(log_ratio_old) : acc_t(0);
    const acc_t bg_term = kBg ? bg_set[p] * logit::lm_exp(log_ratio_bg) : acc_t(0);
    full0[p] = full[p] + old_term + bg_term;
    full_old[p] = full[p] + old_term;
    full_new[p] = full[p] + bg_term;
    // A folded coefficient can overflow where the direct form's terms do not (a huge gamma): v - v
    // is 0 exactly for finite v and NaN for an infinity.
    const acc_t folded_check = (full0[p] - full0[p]) + (full_old[p] - full_old[p]) + (full_new[p] - full_new[p]);
    too_far |= static_cast<int32_t>(!(folded_check == acc_t(0)));
  }
  const BwdTileView<row_t, teacher_row_t> view{
      xb,     yb,     gb,    lse,      lse_old,  lse_bg, lse_q, full, old_set, bg_set,      teacher,
      target, extra0, full0, full_old, full_new, label,  n,     C,    Co,      rows.stride, alpha};
  // The form is chosen per tile, outside the pixel loops (which must stay branch-free to vectorise).
  if (!too_far) {
    backward_channels<true, kOld, kBg, kTeacher>(view);
  } else {
    backward_channels<false, kOld, kBg, kTeacher>(view);
  }
}

template <typename scalar_t, typename teacher_t, bool kOld, bool kBg, bool kTeacher>
INCSEG_FORCE_INLINE void backward_tile(const BwdArgs<scalar_t, teacher_t>& a, int64_t tile) {
  const Inputs& in = *a.in;
  const int64_t b = a.plan.image(tile), p0 = a.plan.begin(tile);
  const int64_t offset = b * in.C * in.HW + p0;
  const TileRows<scalar_t, teacher_t> rows{a.x + offset, kTeacher ? a.y + b * in.Co * in.HW + p0 : nullptr, in.HW};
  backward_pixels<kOld, kBg, kTeacher>(a, b, p0, a.plan.length(tile), rows, a.grad_x + offset);
}

template <typename scalar_t, typename teacher_t, bool kOld, bool kBg, bool kTeacher>
struct BackwardTiles {
  static INCSEG_FORCE_INLINE void run(const BwdArgs<scalar_t, teacher_t>& a, int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) backward_tile<scalar_t, teacher_t, kOld, kBg, kTeacher>(a, tile);
  }
};

// Kernel<scalar_t, teacher_t, kOld, kBg, kTeacher>::run(a, args...) with the exponential families the
// modes need (see grad_coefs): exp(x - lse_old) for unbiased CE and plain KD, exp(x - lse_bg) and q for
// unbiased/balanced KD, q for plain KD.
template <template <typename, typename, bool, bool, bool> class Kernel, typename scalar_t, typename teacher_t,
          typename... Args>
void run_for_modes(const BwdArgs<scalar_t, teacher_t>& a, const Args&... args) {
  const Inputs& in = *a.in;
  const bool old_set = in.ce == CeMode::kUnbiased || in.kd == KdMode::kPlain;
  const bool bg_set = in.kd == KdMode::kUnbiased || in.kd == KdMode::kBalanced;
  const bool teacher = in.kd != KdMode::kNone;
  if (bg_set && old_set) return cpu::run_best<Kernel<scalar_t, teacher_t, true, true, true>>(a, args...);
  if (bg_set) return cpu::run_best<Kernel<scalar_t, teacher_t, false, true, true>>(a, args...);
  if (teacher) return cpu::run_best<Kernel<scalar_t, teacher_t, true, false, true>>(a, args...);  // plain KD
  if constexpr (std::is_same_v<scalar_t, teacher_t>) {  // without distillation the teacher dtype is x's
    if (old_set) return cpu::run_best<Kernel<scalar_t, scalar_t, true, false, false>>(a, args...);
    cpu::run_best<Kernel<scalar_t, scalar_t, false, false, false>>(a, args...);
  }
}

// ---- size=: the backward gathered at the logits' own resolution (MATH.md#upsampling) ----
//
// Per channel x_up = R x Cᵀ, with R (H x h) and Cᵀ's transpose (W x w) the bilinear weights, two
// per output row or column (upsample::tap). So dL/dx = Rᵀ G C for G = dL/dx_up, and G[c, p] is a
// function of pixel p's saved stats, x_up, y_up, label, mask and upstream gradient only: exactly
// what backward_pixels computes, run on a tile's upsampled rows (UpsampleScratch). Each output row
// of G is reduced over its columns into column_sums (C x w), then added, weighted by its two row
// taps, to two rows of dL/dx. No full-resolution tensor exists: the scratch is per thread.
//
// Determinism: an image's output rows are cut into bands fixed by the shapes alone (RowBands).
// Band k alone writes dL/dx rows [kL, (k+1)L), summing its output rows in order; the bottom taps
// of its last output rows may reach row (k+1)L, the next band's, and that share goes to the band's
// own carry row, added afterwards in band order (finish_upsampled_grad). Every element is thus
// summed in one fixed order, whatever the thread count.

// Band k of an image holds the output rows whose top tap i0 lies in [kL, (k+1)L): a contiguous
// range of rows, since i0 grows with the row.
struct RowBands {
  int64_t low_rows = 1;            // L
  int64_t count = 0;               // bands per image
  std::vector<int64_t> first_row;  // the output row where band k starts; count + 1 entries
};

template <typename acc_t>
RowBands plan_row_bands(const Inputs& in) {
  constexpr int64_t kBandsPerImage = 8;  // work items for the threads; each band costs one carry row
  RowBands bands;
  bands.low_rows = (in.h + kBandsPerImage - 1) / kBandsPerImage;
  bands.count = (in.h + bands.low_rows - 1) / bands.low_rows;
  bands.first_row.assign(bands.count + 1, in.H);
  const acc_t scale = upsample::source_scale<acc_t>(in.h, in.H);
  for (int64_t r = in.H - 1; r >= 0; --r) bands.first_row[upsample::tap(r, scale, in.h).i0 / bands.low_rows] = r;
  for (int64_t k = bands.count - 1; k >= 0; --k)
    bands.first_row[k] = std::min(bands.first_row[k], bands.first_row[k + 1]);
  return bands;
}

template <typename acc_t>
struct UpsampledGrad {
  acc_t* grad;   // (B, C, h, w): dL/dx in acc_t (grad_x itself for float32 and float64 logits)
  acc_t* carry;  // (B, bands, C, w)
  const RowBands* bands;
};

template <typename scalar_t, typename teacher_t, bool kOld, bool kBg, bool kTeacher>
struct UpsampledBackwardBands {
  using acc_t = acc_type<scalar_t>;

  static INCSEG_FORCE_INLINE void run(const BwdArgs<scalar_t, teacher_t>& a, const UpsampledGrad<acc_t>& out,
                                      int64_t begin, int64_t end) {
    UpsampleScratch<acc_t> scratch(*a.in, /*backward=*/true);
    const int64_t count = out.bands->count;
    for (int64_t item = begin; item < end; ++item) band(a, out, scratch, item / count, item % count);
  }

  // column_sums[c * w + j] = sum over the columns q of output row r of C[q, j] G[c, r, q].
  static INCSEG_FORCE_INLINE void sum_output_row(const BwdArgs<scalar_t, teacher_t>& a, UpsampleScratch<acc_t>& scratch,
                                                 int64_t b, int64_t r) {
    const Inputs& in = *a.in;
    std::fill(scratch.column_sums.begin(), scratch.column_sums.end(), acc_t(0));
    for (int64_t col0 = 0; col0 < in.W; col0 += kTile) {
      const int64_t n = std::min(kTile, in.W - col0), p0 = r * in.W + col0;
      scratch.fill(in, a.x, a.y, b, p0, n);
      backward_pixels<kOld, kBg, kTeacher>(a, b, p0, n, scratch.rows(), scratch.grad.data());
      reduce_columns(scratch, in, col0, n);
    }
  }

  // column_sums[c * w + j] += the chunk's G weighted by the column taps, one run of columns that
  // read the same pair of samples at a time (two sums in registers per run).
  static INCSEG_FORCE_INLINE void reduce_columns(UpsampleScratch<acc_t>& scratch, const Inputs& in, int64_t col0,
                                                 int64_t n) {
    const ColumnTaps<acc_t>& cols = scratch.x_cols;
    for (int64_t c = 0; c < in.C; ++c) {
      const acc_t* __restrict__ g = scratch.grad.data() + c * kTile;
      acc_t* __restrict__ sums = scratch.column_sums.data() + c * in.w;
      for (int64_t q = col0; q < col0 + n;) {
        const int64_t j = cols.j0[q], end = std::min(cols.run_begin[j + 1], col0 + n);
        acc_t s0 = 0, s1 = 0;
        for (int64_t k = q; k < end; ++k) {
          s0 += upsample::weight_times(cols.c0[k], g[k - col0]);
          s1 += upsample::weight_times(cols.c1[k], g[k - col0]);
        }
        sums[j] += s0;
        sums[cols.j1[q]] += s1;
        q = end;
      }
    }
  }

  // Band k of image b: dL/dx rows [kL, (k+1)L) and the band's carry row.
  static INCSEG_FORCE_INLINE void band(const BwdArgs<scalar_t, teacher_t>& a, const UpsampledGrad<acc_t>& out,
                                       UpsampleScratch<acc_t>& scratch, int64_t b, int64_t k) {
    const Inputs& in = *a.in;
    const RowBands& bands = *out.bands;
    const int64_t C = in.C, w = in.w, plane = in.h * in.w;
    const int64_t lo = k * bands.low_rows, hi = std::min(lo + bands.low_rows, in.h);
    acc_t* grad = out.grad + b * C * plane;
    acc_t* carry = out.carry + (b * bands.count + k) * C * w;
    for (int64_t c = 0; c < C; ++c) std::fill(grad + c * plane + lo * w, grad + c * plane + hi * w, acc_t(0));
    std::fill(carry, carry + C * w, acc_t(0));
    const acc_t row_scale = upsample::source_scale<acc_t>(in.h, in.H);
    for (int64_t r = bands.first_row[k]; r < bands.first_row[k + 1]; ++r) {
      sum_output_row(a, scratch, b, r);
      const auto tap = upsample::tap(r, row_scale, in.h);
      const acc_t r1 = tap.l1, r0 = acc_t(1) - r1;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* __restrict__ sums = scratch.column_sums.data() + c * w;
        acc_t* top = grad + c * plane + tap.i0 * w;
        acc_t* bottom = tap.i1 < hi ? grad + c * plane + tap.i1 * w : carry + c * w;
        for (int64_t j = 0; j < w; ++j) top[j] += upsample::weight_times(r0, sums[j]);
        for (int64_t j = 0; j < w; ++j) bottom[j] += upsample::weight_times(r1, sums[j]);
      }
    }
  }
};

// Adds each band's carry row to the first row of the next band, in band order, and rounds dL/dx to
// the logits' dtype where it was accumulated in acc_t; one (image, channel) plane per work item.
template <typename scalar_t, typename acc_t>
void finish_upsampled_grad(const Inputs& in, const UpsampledGrad<acc_t>& out, scalar_t* grad_x) {
  const RowBands& bands = *out.bands;
  const int64_t plane = in.h * in.w, w = in.w;
  cpu::parallel_over_items(in.B * in.C, plane, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / in.C, c = item % in.C;
      acc_t* grad = out.grad + item * plane;
      for (int64_t k = 0; k + 1 < bands.count; ++k) {
        const acc_t* carry = out.carry + ((b * bands.count + k) * in.C + c) * w;
        acc_t* row = grad + (k + 1) * bands.low_rows * w;
        for (int64_t j = 0; j < w; ++j) row[j] += carry[j];
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t i = 0; i < plane; ++i) grad_x[item * plane + i] = to_storage<scalar_t>(grad[i]);
      }
    }
  });
}

template <typename scalar_t, typename teacher_t>
void run_upsampled_backward(const BwdArgs<scalar_t, teacher_t>& a, at::Tensor& grad_x) {
  using acc_t = acc_type<scalar_t>;
  const Inputs& in = *a.in;
  const RowBands bands = plan_row_bands<acc_t>(in);
  const auto acc_options = grad_x.options().dtype(in.acc_dtype);
  at::Tensor grad = std::is_same_v<scalar_t, acc_t> ? grad_x : at::empty(grad_x.sizes(), acc_options);
  at::Tensor carry = at::empty({in.B, bands.count, in.C, in.w}, acc_options);
  const UpsampledGrad<acc_t> out{grad.mutable_data_ptr<acc_t>(), carry.mutable_data_ptr<acc_t>(), &bands};
  const int64_t band_cost = (in.C + in.Co) * in.W * (in.H + bands.count - 1) / bands.count;
  cpu::parallel_over_items(in.B * bands.count, band_cost, [&](int64_t begin, int64_t end) {
    run_for_modes<UpsampledBackwardBands>(a, out, begin, end);
  });
  finish_upsampled_grad(in, out, grad_x.mutable_data_ptr<scalar_t>());
}

at::Tensor logit_losses_bwd_cpu(const at::Tensor& grad_ce, const at::Tensor& grad_kd, const at::Tensor& x,
                                const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
                                const std::optional<at::Tensor>& log_gamma, const std::optional<at::Tensor>& mask,
                                const at::Tensor& stats, const at::Tensor& valid_count, int64_t old_classes,
                                c10::string_view ce, c10::string_view kd, double alpha, int64_t ignore_index,
                                c10::string_view reduction, at::OptionalIntArrayRef size) {
  const Inputs in = logit::check_inputs(x, target, y, log_gamma, mask, old_classes, ce, kd, reduction, size);
  logit::check_backward(in, grad_ce, grad_kd, stats, valid_count);
  const bool per_pixel = in.reduction == Reduction::kNone;
  // The CPU may read valid_count on the host (a device backend must not: see logit_host.h).
  const double ce_scale =
      in.reduction == Reduction::kMean ? logit::ce_mean_scale<double>(valid_count.item<int64_t>()) : 1.0;
  // Upstream gradients are per-pixel sized at most; scaling them here keeps the kernel's loop simple.
  const at::Tensor g_ce = (grad_ce.to(in.acc_dtype) * ce_scale).contiguous();
  const at::Tensor g_kd = (grad_kd.to(in.acc_dtype) * logit::kd_scale(in)).contiguous();
  const at::Tensor stats_c = stats.contiguous();
  at::Tensor grad_x = at::empty_like(in.x, at::MemoryFormat::Contiguous);
  const cpu::TilePlan plan = cpu::plan_tiles(in.B, in.HW, kTiles);

  dispatch_student_teacher(x.scalar_type(), in.teacher_dtype, "logit_losses_bwd_cpu", [&](auto* x_type, auto* y_type) {
    using scalar_t = std::remove_pointer_t<decltype(x_type)>;
    using teacher_t = std::remove_pointer_t<decltype(y_type)>;
    using acc_t = acc_type<scalar_t>;
    if (in.ce == CeMode::kNone && in.kd == KdMode::kNone) {
      grad_x.zero_();
      return;
    }
    BwdArgs<scalar_t, teacher_t> a;
    a.in = &in;
    a.x = in.x.const_data_ptr<scalar_t>();
    a.y = in.kd != KdMode::kNone ? in.y.const_data_ptr<teacher_t>() : nullptr;
    a.log_gamma = in.log_gamma.defined() ? in.log_gamma.const_data_ptr<acc_t>() : nullptr;
    a.mask = in.mask.defined() ? in.mask.const_data_ptr<acc_t>() : nullptr;
    a.stats = stats_c.const_data_ptr<acc_t>();
    a.grad_ce = g_ce.const_data_ptr<acc_t>();
    a.grad_kd = g_kd.const_data_ptr<acc_t>();
    a.grad_ce_stride = per_pixel ? 1 : 0;
    a.grad_kd_stride = per_pixel ? 1 : 0;
    a.alpha = static_cast<acc_t>(alpha);
    a.ignore_index = ignore_index;
    a.plan = plan;
    a.grad_x = grad_x.mutable_data_ptr<scalar_t>();
    if (in.upsample) return run_upsampled_backward(a, grad_x);
    cpu::parallel_over_items(plan.items, (in.C + in.Co) * plan.tile,
                             [&](int64_t begin, int64_t end) { run_for_modes<BackwardTiles>(a, begin, end); });
  });
  return grad_x;
}

}  // namespace
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast, CPU, m) {
  m.impl("logit_losses_fwd", &incseg::logit_losses_fwd_cpu);
  m.impl("logit_losses_bwd", &incseg::logit_losses_bwd_cpu);
}
