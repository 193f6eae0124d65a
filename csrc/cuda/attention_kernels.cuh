#pragma once
// The CUDA kernels of attentive distillation (MATH.md#ad) and structured attention (MATH.md#sab), as
// HOST_DEVICE bodies (common/grid.h), and the order in which each op runs them. attention_kernels.cu
// launches them on the GPU; attention_cuda.cpp also runs them on the CPU, thread by thread
// (incseg_fast_cuda_emulator), so that the tests check them without a GPU. The per-element math is
// common/attention_math.h's, shared with the CPU kernels (csrc/cpu/attention_cpu.cpp, where the
// gradients are derived). Nothing here includes torch or the CUDA runtime.
//
// Layout. Features are (B, C, H*W) contiguous. In a feature pass one thread owns kVec consecutive
// pixels of one image and a range of its channels: consecutive threads own consecutive pixels, so
// every load of a channel row is coalesced, and with kVec > 1 each is one 16-byte pack (the glue
// asks for packs only when H*W is a multiple of kVec and every pointer is aligned for them).
// Channel groups: when an image has too few pixel blocks to fill the GPU (deep features on small
// maps), its channels are split into groups, grid y = (image, group); a pass then writes per-group
// per-pixel partials that a per-pixel kernel adds in group order. The per-pixel kernels (one pixel
// per thread; they read and write a few values per pixel) run on (pixel blocks, B).
//
// Determinism, without floating-point atomics: sums over channels run in channel order within a
// group, then in group order; sums over pixels go to one partial per warp (warp_sum_to, a fixed
// shuffle tree), added in warp order by a second kernel (per image and channel: ChannelSumKernel;
// per image or for the whole loss: the block-level steps, Executor::norms/loss/spatial_dots).
//
// Attentive distillation, forward:
//   float32/bfloat16/float16, ONE pass over f, g: MomentsKernel accumulates per pixel the eight
//     channel sums of attention_math.h's Moments (double); EnergyKernel adds S_f, S_g over groups and
//     gives per-warp partials of N^2; norms() gives 1/N per image; MomentsFinishKernel adds the
//     moments over groups and writes Ŝ, P and per-warp loss partials; loss() the loss.
//   float64, TWO passes (as on the CPU): the moments' cancellation costs eps64 (|AD| / |D|)^2
//     relative to D, already ~1e-10 when the two models differ by 1e-3, no better than the test's
//     float64 tolerance; so D is computed directly. SpatialEnergyKernel (pass 1: S_f, S_g per
//     group), EnergyKernel (S into spatial rows 0, 1, N^2 partials), norms(), NormaliseKernel (Ŝ in
//     place), DirectLossKernel (pass 2: per group Σ_c D^2 and P), DirectFinishKernel, loss().
// Attentive distillation, backward: spatial_dots() gives T = Σ_p P Ŝ per image and side (only when
//   chaining through the spatial maps); FeatureGradKernel reads f, g once, forms dL/dS per pixel
//   (spatial_map_grad), writes df and/or dg and per-warp channel partials for da, db;
//   ChannelSumKernel adds those per (image, channel). The upstream gradient is read on the device.
// Structured attention: StructuredForwardKernel, one pass; StructuredBackwardKernel, one pass writing
//   dv, per-group per-pixel partials of da_sp (GroupSumKernel adds them) and per-warp partials of
//   da_ch (ChannelSumKernel).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/attention_math.h"
#include "common/dtype.h"
#include "common/grid.h"

// The finishing sums' loops (over groups, warps or pixels; trip counts known at run time only) are
// unrolled by 4 on the GPU: four iterations' loads in flight at once; the additions keep their order.
#if defined(__CUDACC__)
#define INCSEG_UNROLL_4 _Pragma("unroll 4")
#else
#define INCSEG_UNROLL_4
#endif

namespace incseg {
namespace attention {

constexpr int kBlockThreads = 128;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;

// Channel groups are no smaller than kMinGroupChannels channels: a group's partials cost about as
// much memory traffic as 18 of its channel rows (float32 moments), so smaller groups would cost
// more than they spread.
constexpr int64_t kMinGroupChannels = 128;
// The blocks of a feature pass the GPU holds at once, for the CPU emulation (which has no GPU to
// ask): an H100's 132 SMs with 4 blocks each.
constexpr int64_t kEmulatedResidentBlocks = 132 * 4;

HOST_DEVICE int64_t min_of(int64_t x, int64_t y) { return x < y ? x : y; }
HOST_DEVICE int64_t max_of(int64_t x, int64_t y) { return x > y ? x : y; }

// The launch geometry shared by every kernel of one op call.
struct AttentionPlan {
  int64_t batch;           // B
  int64_t channels;        // C
  int64_t pixels;          // H*W
  int pixels_per_thread;   // feature passes: 1 or kPackedPixels
  int64_t grid_x;          // feature passes: blocks over one image's pixels
  int64_t groups;          // feature passes: channel groups, grid y = B * groups
  int64_t group_channels;  // channels per group (the last group may have fewer)
  int64_t pixel_grid_x;    // per-pixel kernels (one pixel per thread): blocks over one image

  // Rows of per-warp channel partials per image: the warps of a feature pass over its pixels.
  HOST_DEVICE int64_t pixel_warps() const { return grid_x * kWarpsPerBlock; }
  // Per-warp partials per image of a per-pixel kernel.
  HOST_DEVICE int64_t pixel_kernel_warps() const { return pixel_grid_x * kWarpsPerBlock; }
  int64_t feature_grid_y() const { return batch * groups; }
};

// Channel groups of a feature pass of `blocks` blocks (one group) when the GPU holds `resident` at
// once: none while the pass fills a wave by itself; else, of 1 to `most` groups, the count whose
// waves take least time, ceil(groups * blocks / resident) / groups (a wave's time being that of one
// group's channels), the fewest on a tie. So the grid fills its last wave, where a fixed block count
// left it part empty.
inline int64_t channel_groups(int64_t blocks, int64_t resident, int64_t most) {
  if (blocks >= resident) return 1;
  int64_t best = 1;
  for (int64_t groups = 2; groups <= most; ++groups) {
    if (ceil_div(groups * blocks, resident) * best < ceil_div(best * blocks, resident) * groups) best = groups;
  }
  return best;
}

// B, C, H*W >= 1 and B <= kMaxGridY (the glue checks both). resident_blocks(pixels_per_thread): the
// blocks of the op's feature pass the GPU holds at once (Device::resident_blocks).
template <typename scalar_t, typename ResidentBlocks>
AttentionPlan plan_attention(int64_t batch, int64_t channels, int64_t pixels, bool packs_aligned,
                             ResidentBlocks&& resident_blocks) {
  AttentionPlan plan{};
  plan.batch = batch;
  plan.channels = channels;
  plan.pixels = pixels;
  const bool packed = packs_aligned && pixels % kPackedPixels<scalar_t> == 0;
  plan.pixels_per_thread = packed ? kPackedPixels<scalar_t> : 1;
  plan.grid_x = ceil_div(pixels, int64_t(kBlockThreads) * plan.pixels_per_thread);
  plan.pixel_grid_x = ceil_div(pixels, kBlockThreads);
  const int64_t most = max_of(1, min_of(channels / kMinGroupChannels, kMaxGridY / batch));
  const int64_t wanted = channel_groups(plan.grid_x * batch, resident_blocks(plan.pixels_per_thread), most);
  plan.group_channels = ceil_div(channels, wanted);
  plan.groups = ceil_div(channels, plan.group_channels);
  return plan;
}

// What one thread of a feature pass owns: pixels [pixel, pixel + kVec) of `image` and the channels
// [c_begin, c_end) of its group.
struct FeatureSlice {
  int64_t image;
  int64_t group;
  int64_t c_begin;
  int64_t c_end;
  int64_t pixel;
  int64_t warp_row;  // its warp's row of channel partials: image * pixel_warps + warp in the image
  bool active;       // pixel < H*W; inactive threads still join the warp sums (with 0)
};

template <int kVec>
HOST_DEVICE FeatureSlice feature_slice(const AttentionPlan& plan, const ThreadIndex& index) {
  FeatureSlice s;
  s.image = index.block_y / plan.groups;
  s.group = index.block_y % plan.groups;
  s.c_begin = s.group * plan.group_channels;
  s.c_end = min_of(plan.channels, s.c_begin + plan.group_channels);
  s.pixel = index.first_pixel(kVec);
  s.warp_row = s.image * plan.pixel_warps() + index.block_x * kWarpsPerBlock + index.thread / kWarpSize;
  s.active = s.pixel < plan.pixels;
  return s;
}

// Per-group per-pixel partials are (groups, B, rows, H*W): the first element of (group, image).
HOST_DEVICE int64_t group_rows_offset(const AttentionPlan& plan, int64_t group, int64_t image, int rows) {
  return (group * plan.batch + image) * rows * plan.pixels;
}

// ------------------------------------------------------------------------------------------------
// Attentive distillation: forward
// ------------------------------------------------------------------------------------------------

// teacher_t: g's element type, f's or the wider one of common/teacher_dtype.h (read as acc_t; a wider
// teacher's pack of kVec pixels is two 16-byte loads).
template <typename scalar_t, typename teacher_t>
struct FeaturePair {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* f;   // (B, C, H*W) student features
  const teacher_t* g;  // (B, C, H*W) teacher features
  const acc_t* a;      // (B, C) student channel attention
  const acc_t* b;      // (B, C) teacher channel attention
};

// Rows of the one-pass forward's partials: the fields of Moments.
enum MomentRow : int { kRowFF, kRowGG, kRowUU, kRowAA, kRowBB, kRowUA, kRowUB, kRowAB, kMomentRows };
// float64, pass 1: S_f, S_g (rows kRowFF, kRowGG, as in the moments); pass 2: the direct sums.
constexpr int kEnergyRows = 2;
enum DirectRow : int { kRowLoss, kRowPf, kRowPg, kDirectRows };

template <typename scalar_t>
constexpr int kForwardPartialRows = std::is_same_v<scalar_t, double> ? kDirectRows : kMomentRows;

HOST_DEVICE double moment_row(const Moments& m, int row) {
  switch (row) {
    case kRowFF:
      return m.ff;
    case kRowGG:
      return m.gg;
    case kRowUU:
      return m.uu;
    case kRowAA:
      return m.aa;
    case kRowBB:
      return m.bb;
    case kRowUA:
      return m.ua;
    case kRowUB:
      return m.ub;
    default:
      return m.ab;
  }
}

// m += the moments stored as rows `stride` apart from `rows` (belongs in common/attention_math.h as
// a Moments member: adding two pixels' partial moments).
HOST_DEVICE void add_moment_rows(Moments& m, const double* rows, int64_t stride) {
  m.ff += rows[kRowFF * stride];
  m.gg += rows[kRowGG * stride];
  m.uu += rows[kRowUU * stride];
  m.aa += rows[kRowAA * stride];
  m.bb += rows[kRowBB * stride];
  m.ua += rows[kRowUA * stride];
  m.ub += rows[kRowUB * stride];
  m.ab += rows[kRowAB * stride];
}

// Forward (float32/bfloat16/float16), the one pass over f, g: the Moments of each of the thread's
// kVec pixels over its group's channels (in channel order), stored as that group's partial rows.
template <typename scalar_t, typename teacher_t, int kVec>
struct MomentsKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kBlockThreads;
  FeaturePair<scalar_t, teacher_t> in;  // features and channel attentions
  AttentionPlan plan;                   // grid (grid_x, B * groups)
  double* partial;                      // out: (groups, B, kMomentRows, H*W)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const FeatureSlice s = feature_slice<kVec>(plan, index);
    if (!s.active) return;
    const int64_t first = s.image * plan.channels * plan.pixels + s.pixel;
    Moments m[kVec];
    for (int64_t c = s.c_begin; c < s.c_end; ++c) {
      acc_t fv[kVec], gv[kVec];
      load_pack<kVec>(in.f + first + c * plan.pixels, fv);
      load_pack<kVec>(in.g + first + c * plan.pixels, gv);
      const double a_c = in.a[s.image * plan.channels + c], b_c = in.b[s.image * plan.channels + c];
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) m[i].add(fv[i], gv[i], a_c, b_c);
    }
    double* out = partial + group_rows_offset(plan, s.group, s.image, kMomentRows) + s.pixel;
    INCSEG_UNROLL
    for (int r = 0; r < kMomentRows; ++r) {
      double row[kVec];
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) row[i] = moment_row(m[i], r);
      store_pack<kVec>(out + r * plan.pixels, row);
    }
  }
};

// Forward (float64), pass 1 of 2: S_f = Σ_c f^2 and S_g = Σ_c g^2 over the group's channels.
template <int kVec>
struct SpatialEnergyKernel {
  static constexpr int kThreads = kBlockThreads;
  FeaturePair<double, double> in;  // features (a, b unused)
  AttentionPlan plan;              // grid (grid_x, B * groups)
  double* partial;                 // out: (groups, B, kEnergyRows, H*W)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const FeatureSlice s = feature_slice<kVec>(plan, index);
    if (!s.active) return;
    const int64_t first = s.image * plan.channels * plan.pixels + s.pixel;
    double s_f[kVec] = {}, s_g[kVec] = {};
    for (int64_t c = s.c_begin; c < s.c_end; ++c) {
      double fv[kVec], gv[kVec];
      load_pack<kVec>(in.f + first + c * plan.pixels, fv);
      load_pack<kVec>(in.g + first + c * plan.pixels, gv);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        s_f[i] += fv[i] * fv[i];
        s_g[i] += gv[i] * gv[i];
      }
    }
    double* out = partial + group_rows_offset(plan, s.group, s.image, kEnergyRows) + s.pixel;
    store_pack<kVec>(out + kRowFF * plan.pixels, s_f);
    store_pack<kVec>(out + kRowGG * plan.pixels, s_g);
  }
};

// Forward, per pixel: S_f, S_g added over the groups, and one partial per warp of Σ_p S_f^2 and of
// Σ_p S_g^2 (N^2, added per image by Executor::norms). float64 also keeps S for NormaliseKernel.
template <int kRows>
struct EnergyKernel {
  static constexpr int kThreads = kBlockThreads;
  const double* partial;   // (groups, B, kRows, H*W); rows kRowFF, kRowGG are the groups' S_f, S_g
  AttentionPlan plan;      // grid (pixel_grid_x, B)
  double* square_partial;  // out: (2, B, pixel_kernel_warps) per warp Σ S_f^2, then Σ S_g^2
  double* energy;          // out, float64 only (else null): (2, B, H*W) S_f, S_g

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t image = index.block_y, pixel = index.first_pixel(1);
    double s_f = 0, s_g = 0;
    if (pixel < plan.pixels) {
      INCSEG_UNROLL_4
      for (int64_t group = 0; group < plan.groups; ++group) {
        const double* rows = partial + group_rows_offset(plan, group, image, kRows) + pixel;
        s_f += rows[kRowFF * plan.pixels];
        s_g += rows[kRowGG * plan.pixels];
      }
      if (energy != nullptr) {
        energy[image * plan.pixels + pixel] = s_f;
        energy[(plan.batch + image) * plan.pixels + pixel] = s_g;
      }
    }
    const int64_t side_warps = plan.batch * plan.pixel_kernel_warps();
    warp_sum_to(square_partial + index.warp(), s_f * s_f, index);
    warp_sum_to(square_partial + side_warps + index.warp(), s_g * s_g, index);
  }
};

// Executor::norms: per image and side, N^2 from its warps' partials -> 1/N.
template <typename acc_t>
struct NormStep {
  const double* square_partial;  // (2, B, warps) from EnergyKernel
  int64_t maps;                  // 2 B
  int64_t warps;                 // partials per image and side
  double* inv_exact;             // out: (2, B) 1/N in double, for the per-pixel kernels
  acc_t* inv_norm;               // out: (2, B) the saved 1/N
};

template <typename acc_t>
HOST_DEVICE void write_norm(const NormStep<acc_t>& step, int64_t map, double squared_norm) {
  step.inv_exact[map] = inverse_norm(squared_norm);
  step.inv_norm[map] = static_cast<acc_t>(step.inv_exact[map]);
}

// Forward (float32/bfloat16/float16), per pixel: the moments added over the groups, then Ŝ, P and
// Σ_c D^2 (into one loss partial per warp) from them, without reading the features again.
struct MomentsFinishKernel {
  static constexpr int kThreads = kBlockThreads;
  const double* partial;    // (groups, B, kMomentRows, H*W) from MomentsKernel
  AttentionPlan plan;       // grid (pixel_grid_x, B)
  const double* inv_exact;  // (2, B) 1/N_f, 1/N_g
  float* spatial;           // out: (3, B, H*W) Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g
  float* pixel_grad;        // out: (2, B, H*W) P_f, P_g; null when not saved
  double* loss_partial;     // out: per warp Σ_p Σ_c D^2

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t image = index.block_y, pixel = index.first_pixel(1);
    double loss = 0;
    if (pixel < plan.pixels) {
      Moments m;
      INCSEG_UNROLL_4
      for (int64_t group = 0; group < plan.groups; ++group) {
        add_moment_rows(m, partial + group_rows_offset(plan, group, image, kMomentRows) + pixel, plan.pixels);
      }
      const double s_f = m.ff * inv_exact[image], s_g = m.gg * inv_exact[plan.batch + image];
      const int64_t at = image * plan.pixels + pixel, map = plan.batch * plan.pixels;
      spatial[at] = static_cast<float>(s_f);
      spatial[map + at] = static_cast<float>(s_g);
      spatial[2 * map + at] = static_cast<float>(s_f - s_g);
      loss = squared_difference_sum(m, s_f, s_g);
      if (pixel_grad != nullptr) {
        pixel_grad[at] = static_cast<float>(pixel_grad_f(m, s_f, s_g));
        pixel_grad[map + at] = static_cast<float>(pixel_grad_g(m, s_f, s_g));
      }
    }
    warp_sum_to(loss_partial + index.warp(), loss, index);
  }
};

// Forward (float64), per pixel: spatial rows 0, 1 hold S_f, S_g (EnergyKernel); scaled in place to
// Ŝ, and row 2 = Ŝ_f - Ŝ_g.
struct NormaliseKernel {
  static constexpr int kThreads = kBlockThreads;
  AttentionPlan plan;       // grid (pixel_grid_x, B)
  const double* inv_exact;  // (2, B) 1/N_f, 1/N_g
  double* spatial;          // in: rows 0, 1 = S_f, S_g; out: (3, B, H*W) Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t image = index.block_y, pixel = index.first_pixel(1);
    if (pixel >= plan.pixels) return;
    const int64_t at = image * plan.pixels + pixel, map = plan.batch * plan.pixels;
    const double s_f = spatial[at] * inv_exact[image], s_g = spatial[map + at] * inv_exact[plan.batch + image];
    spatial[at] = s_f;
    spatial[map + at] = s_g;
    spatial[2 * map + at] = s_f - s_g;
  }
};

// Forward (float64), pass 2 of 2: D directly (attended_difference); per pixel Σ_c D^2 and, when P
// is saved, Σ_c D a f and Σ_c D b g over the group's channels.
template <int kVec>
struct DirectLossKernel {
  static constexpr int kThreads = kBlockThreads;
  FeaturePair<double, double> in;  // features and channel attentions
  AttentionPlan plan;              // grid (grid_x, B * groups)
  const double* spatial;           // (3, B, H*W) Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g
  bool with_pixel_grad;            // also the rows kRowPf, kRowPg
  double* partial;                 // out: (groups, B, kDirectRows, H*W)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const FeatureSlice s = feature_slice<kVec>(plan, index);
    if (!s.active) return;
    const int64_t first = s.image * plan.channels * plan.pixels + s.pixel, map = plan.batch * plan.pixels;
    double s_f[kVec], s_diff[kVec], loss[kVec] = {}, p_f[kVec] = {}, p_g[kVec] = {};
    load_pack<kVec>(spatial + s.image * plan.pixels + s.pixel, s_f);
    load_pack<kVec>(spatial + 2 * map + s.image * plan.pixels + s.pixel, s_diff);
    for (int64_t c = s.c_begin; c < s.c_end; ++c) {
      double fv[kVec], gv[kVec];
      load_pack<kVec>(in.f + first + c * plan.pixels, fv);
      load_pack<kVec>(in.g + first + c * plan.pixels, gv);
      const double a_c = in.a[s.image * plan.channels + c], b_c = in.b[s.image * plan.channels + c];
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        const double d = attended_difference(fv[i], gv[i], a_c, b_c, a_c - b_c, s_f[i], s_diff[i]);
        loss[i] += d * d;
        p_f[i] += d * a_c * fv[i];
        p_g[i] += d * b_c * gv[i];
      }
    }
    double* out = partial + group_rows_offset(plan, s.group, s.image, kDirectRows) + s.pixel;
    store_pack<kVec>(out + kRowLoss * plan.pixels, loss);
    if (with_pixel_grad) {
      store_pack<kVec>(out + kRowPf * plan.pixels, p_f);
      store_pack<kVec>(out + kRowPg * plan.pixels, p_g);
    }
  }
};

// Forward (float64), per pixel: DirectLossKernel's rows added over the groups: P, and Σ_c D^2 into
// one loss partial per warp.
struct DirectFinishKernel {
  static constexpr int kThreads = kBlockThreads;
  const double* partial;  // (groups, B, kDirectRows, H*W) from DirectLossKernel
  AttentionPlan plan;     // grid (pixel_grid_x, B)
  double* pixel_grad;     // out: (2, B, H*W) P_f, P_g; null when not saved
  double* loss_partial;   // out: per warp Σ_p Σ_c D^2

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t image = index.block_y, pixel = index.first_pixel(1);
    double loss = 0, p_f = 0, p_g = 0;
    if (pixel < plan.pixels) {
      INCSEG_UNROLL_4
      for (int64_t group = 0; group < plan.groups; ++group) {
        const double* rows = partial + group_rows_offset(plan, group, image, kDirectRows) + pixel;
        loss += rows[kRowLoss * plan.pixels];
        if (pixel_grad != nullptr) {
          p_f += rows[kRowPf * plan.pixels];
          p_g += rows[kRowPg * plan.pixels];
        }
      }
      if (pixel_grad != nullptr) {
        pixel_grad[image * plan.pixels + pixel] = p_f;
        pixel_grad[(plan.batch + image) * plan.pixels + pixel] = p_g;
      }
    }
    warp_sum_to(loss_partial + index.warp(), loss, index);
  }
};

// Executor::loss: the loss partials added in warp order, times the reduction scale.
template <typename acc_t>
struct LossStep {
  const double* loss_partial;  // per warp of the finishing kernel
  int64_t warps;               // how many
  double scale;                // 1/(B*C*H*W) for "mean", 1 for "sum"
  acc_t* loss;                 // out: 0-dim
};

// ------------------------------------------------------------------------------------------------
// Attentive distillation: backward
// ------------------------------------------------------------------------------------------------

// Executor::spatial_dots: T = Σ_p P Ŝ per image and side.
template <typename acc_t>
struct SpatialDotStep {
  const acc_t* spatial;     // (3, B, H*W); map m < 2B of rows 0, 1 is Ŝ of side m / B, image m % B
  const acc_t* pixel_grad;  // (2, B, H*W) P, maps in the same order
  int64_t maps;             // 2 B
  int64_t pixels;           // H*W
  acc_t* spatial_dot;       // out: (2, B)
};

// w = weight_scale * upstream, rounded to acc_t once (as on the CPU); a null upstream counts as 1.
template <typename acc_t>
HOST_DEVICE acc_t upstream_weight(const acc_t* upstream, double weight_scale) {
  return static_cast<acc_t>(upstream != nullptr ? weight_scale * static_cast<double>(*upstream) : weight_scale);
}

// The forward's saved state as the backward pass reads it.
template <typename acc_t>
struct SavedMaps {
  const acc_t* spatial;      // (3, B, H*W) Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g
  const acc_t* inv_norm;     // (2, B) 1/N_f, 1/N_g
  const acc_t* pixel_grad;   // (2, B, H*W) P_f, P_g; null when not chaining through Ŝ
  const acc_t* spatial_dot;  // (2, B) T_f, T_g from spatial_dots; null with pixel_grad
};

// What the backward pass writes: df, dg (null where not wanted) and the channel partials.
template <typename scalar_t, typename teacher_t>
struct FeatureGrads {
  using acc_t = accumulate_t<scalar_t>;
  scalar_t* df;            // (B, C, H*W)
  teacher_t* dg;           // (B, C, H*W), in g's dtype
  acc_t* channel_partial;  // (2, B * pixel_warps, C) per warp Σ_p D Ŝ_f f (for da), then Σ_p D Ŝ_g g (db)
  bool sum_a;              // write side 0 of channel_partial
  bool sum_b;              // write side 1
};

// Per-pixel values of the thread's kVec pixels, loaded once for all its channels.
template <typename acc_t, int kVec>
struct PixelMaps {
  acc_t s_f[kVec] = {};
  acc_t s_g[kVec] = {};
  acc_t s_diff[kVec] = {};
  acc_t sgrad_f[kVec] = {};  // dL/dS_f / w (spatial_map_grad); 0 when not chaining
  acc_t sgrad_g[kVec] = {};  // -dL/dS_g / w
};

// Backward, the one pass over f, g: per element D, then dL/df, dL/dg (feature_grad) and the
// channel sums for da, db over the thread's pixels (one partial per warp and channel).
template <typename scalar_t, typename teacher_t, int kVec>
struct FeatureGradKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kBlockThreads;
  FeaturePair<scalar_t, teacher_t> in;    // features and channel attentions
  AttentionPlan plan;                     // grid (grid_x, B * groups)
  SavedMaps<acc_t> saved;                 // the forward's state
  const acc_t* grad_loss;                 // 0-dim upstream gradient (on the device)
  double weight_scale;                    // 2 * reduction scale: w = weight_scale * grad_loss
  FeatureGrads<scalar_t, teacher_t> out;  // out: df, dg, channel partials

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const FeatureSlice s = feature_slice<kVec>(plan, index);
    if (!s.active) {
      join_channel_sums(s, index);
      return;
    }
    PixelMaps<acc_t, kVec> px;
    load_pixel_maps(s, px);
    const acc_t w = upstream_weight(grad_loss, weight_scale);
    const int64_t row = s.image * plan.channels;
    for (int64_t c = s.c_begin; c < s.c_end; ++c) {
      acc_t sum_a, sum_b;
      channel((row + c) * plan.pixels + s.pixel, in.a[row + c], in.b[row + c], px, w, sum_a, sum_b);
      add_channel_sums(s, c, sum_a, sum_b, index);
    }
  }

  // A thread past the last pixel adds 0 to its warp's channel sums.
  HOST_DEVICE void join_channel_sums(const FeatureSlice& s, const ThreadIndex& index) const {
    for (int64_t c = s.c_begin; c < s.c_end; ++c) add_channel_sums(s, c, acc_t(0), acc_t(0), index);
  }

  HOST_DEVICE void add_channel_sums(const FeatureSlice& s, int64_t c, acc_t sum_a, acc_t sum_b,
                                    const ThreadIndex& index) const {
    acc_t* partial = out.channel_partial + s.warp_row * plan.channels + c;
    if (out.sum_a) warp_sum_to(partial, sum_a, index);
    if (out.sum_b) warp_sum_to(partial + plan.batch * plan.pixel_warps() * plan.channels, sum_b, index);
  }

  HOST_DEVICE void load_pixel_maps(const FeatureSlice& s, PixelMaps<acc_t, kVec>& px) const {
    const int64_t at = s.image * plan.pixels + s.pixel, map = plan.batch * plan.pixels;
    load_pack<kVec>(saved.spatial + at, px.s_f);
    load_pack<kVec>(saved.spatial + map + at, px.s_g);
    load_pack<kVec>(saved.spatial + 2 * map + at, px.s_diff);
    if (saved.pixel_grad == nullptr) return;
    acc_t p_f[kVec], p_g[kVec];
    load_pack<kVec>(saved.pixel_grad + at, p_f);
    load_pack<kVec>(saved.pixel_grad + map + at, p_g);
    const int64_t f_map = s.image, g_map = plan.batch + s.image;
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      px.sgrad_f[i] = spatial_map_grad(p_f[i], px.s_f[i], saved.spatial_dot[f_map], saved.inv_norm[f_map]);
      px.sgrad_g[i] = spatial_map_grad(p_g[i], px.s_g[i], saved.spatial_dot[g_map], saved.inv_norm[g_map]);
    }
  }

  // One channel row of the thread's pixels (element `at` of f, g, df, dg): the feature gradients,
  // and the sums over these pixels of D Ŝ_f f and D Ŝ_g g (for da, db).
  HOST_DEVICE void channel(int64_t at, acc_t a_c, acc_t b_c, const PixelMaps<acc_t, kVec>& px, acc_t w, acc_t& sum_a,
                           acc_t& sum_b) const {
    acc_t fv[kVec], gv[kVec], df[kVec], dg[kVec];
    load_pack<kVec>(in.f + at, fv);
    load_pack<kVec>(in.g + at, gv);
    sum_a = 0;
    sum_b = 0;
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      const acc_t d = attended_difference(fv[i], gv[i], a_c, b_c, a_c - b_c, px.s_f[i], px.s_diff[i]);
      df[i] = w * feature_grad(d, fv[i], a_c, px.s_f[i], px.sgrad_f[i]);
      dg[i] = -w * feature_grad(d, gv[i], b_c, px.s_g[i], px.sgrad_g[i]);
      sum_a += d * px.s_f[i] * fv[i];
      sum_b += d * px.s_g[i] * gv[i];
    }
    if (out.df != nullptr) store_pack<kVec>(out.df + at, df);
    if (out.dg != nullptr) store_pack<kVec>(out.dg + at, dg);
  }
};

// Per (image, channel): the per-warp channel partials of one image added in warp order, times
// sign * w, into a channel attention's gradient (its storage dtype out_t: b's is the teacher's). Also
// structured attention's da_ch.
template <typename scalar_t, typename out_t = scalar_t>
struct ChannelSumKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kBlockThreads;
  const acc_t* partial;    // (B * rows_per_image, C)
  int64_t rows_per_image;  // plan.pixel_warps()
  int64_t channels;        // C; grid (ceil(C / kThreads), B)
  const acc_t* upstream;   // 0-dim upstream gradient, or null (w = weight_scale)
  double weight_scale;     // w = weight_scale * upstream
  acc_t sign;              // +1, or -1 for the teacher side
  out_t* out;              // out: (B, C)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t image = index.block_y, c = index.block_x * kThreads + index.thread;
    if (c >= channels) return;
    const acc_t* column = partial + image * rows_per_image * channels + c;
    acc_t sum = 0;
    INCSEG_UNROLL_4
    for (int64_t row = 0; row < rows_per_image; ++row) sum += column[row * channels];
    out[image * channels + c] = Storage<out_t>::from(sum * (sign * upstream_weight(upstream, weight_scale)));
  }
};

// ------------------------------------------------------------------------------------------------
// Structured attention
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct StructuredInputs {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* v;  // (B, C, H*W)
  const acc_t* a_ch;  // (B, C)
  const acc_t* a_sp;  // (B, H*W)
};

// out = (1 + a_ch a_sp) v over the thread's pixels and its group's channels.
template <typename scalar_t, int kVec>
struct StructuredForwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kBlockThreads;
  StructuredInputs<scalar_t> in;  // v and the attentions
  AttentionPlan plan;             // grid (grid_x, B * groups)
  scalar_t* out;                  // out: (B, C, H*W)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const FeatureSlice s = feature_slice<kVec>(plan, index);
    if (!s.active) return;
    acc_t a_sp[kVec], v[kVec], o[kVec];
    load_pack<kVec>(in.a_sp + s.image * plan.pixels + s.pixel, a_sp);
    for (int64_t c = s.c_begin; c < s.c_end; ++c) {
      const int64_t at = (s.image * plan.channels + c) * plan.pixels + s.pixel;
      const acc_t a_c = in.a_ch[s.image * plan.channels + c];
      load_pack<kVec>(in.v + at, v);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) o[i] = structured_attention_value(v[i], a_c, a_sp[i]);
      store_pack<kVec>(out + at, o);
    }
  }
};

// What the structured backward pass writes; null where not wanted.
template <typename scalar_t>
struct StructuredGrads {
  using acc_t = accumulate_t<scalar_t>;
  scalar_t* dv;            // (B, C, H*W)
  acc_t* spatial_partial;  // (groups, B, H*W) per group Σ_c go v a_ch, for da_sp
  acc_t* channel_partial;  // (B * pixel_warps, C) per warp Σ_p go v a_sp, for da_ch
};

// One pass over (grad_out, v): dv = go (1 + a_ch a_sp) and the partial sums of both attentions' grads.
template <typename scalar_t, int kVec>
struct StructuredBackwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kBlockThreads;
  StructuredInputs<scalar_t> in;  // v and the attentions
  const scalar_t* grad_out;       // (B, C, H*W) upstream gradient
  AttentionPlan plan;             // grid (grid_x, B * groups)
  StructuredGrads<scalar_t> out;  // out: dv, spatial and channel partials

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const FeatureSlice s = feature_slice<kVec>(plan, index);
    acc_t a_sp[kVec] = {}, d_sp[kVec] = {};
    if (s.active) load_pack<kVec>(in.a_sp + s.image * plan.pixels + s.pixel, a_sp);
    for (int64_t c = s.c_begin; c < s.c_end; ++c) {
      const acc_t a_c = in.a_ch[s.image * plan.channels + c];
      acc_t d_ch = 0;
      if (s.active) {
        const int64_t at = (s.image * plan.channels + c) * plan.pixels + s.pixel;
        acc_t go[kVec], v[kVec], dv[kVec];
        load_pack<kVec>(grad_out + at, go);
        load_pack<kVec>(in.v + at, v);
        INCSEG_UNROLL
        for (int i = 0; i < kVec; ++i) {
          const acc_t gv = go[i] * v[i];
          dv[i] = structured_attention_value(go[i], a_c, a_sp[i]);
          d_sp[i] += gv * a_c;
          d_ch += gv * a_sp[i];
        }
        if (out.dv != nullptr) store_pack<kVec>(out.dv + at, dv);
      }
      if (out.channel_partial != nullptr) {
        warp_sum_to(out.channel_partial + s.warp_row * plan.channels + c, d_ch, index);
      }
    }
    if (s.active && out.spatial_partial != nullptr) {
      store_pack<kVec>(out.spatial_partial + (s.group * plan.batch + s.image) * plan.pixels + s.pixel, d_sp);
    }
  }
};

// Per pixel: the groups' partials of da_sp added in group order, into a_sp's storage dtype.
template <typename scalar_t>
struct GroupSumKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kBlockThreads;
  const acc_t* partial;  // (groups, B, H*W)
  AttentionPlan plan;    // grid (pixel_grid_x, B)
  scalar_t* out;         // out: (B, H*W)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t image = index.block_y, pixel = index.first_pixel(1);
    if (pixel >= plan.pixels) return;
    acc_t sum = 0;
    INCSEG_UNROLL_4
    for (int64_t group = 0; group < plan.groups; ++group) {
      sum += partial[(group * plan.batch + image) * plan.pixels + pixel];
    }
    out[image * plan.pixels + pixel] = Storage<scalar_t>::from(sum);
  }
};

// ------------------------------------------------------------------------------------------------
// The ops as sequences of kernels, run by an Executor: HostExecutor below (the emulation) or the
// GPU's (attention_kernels.cu). An Executor runs a kernel body on a grid (`run`) and the block-level
// sums (`norms`, `loss`, `spatial_dots`), in call order.
// ------------------------------------------------------------------------------------------------

// Scratch of the forward, all on the op's device.
struct ForwardScratch {
  double* group_partial;   // (groups, B, kForwardPartialRows, H*W)
  double* square_partial;  // (2, B * pixel_kernel_warps)
  double* inv_exact;       // (2, B)
  double* loss_partial;    // (B * pixel_kernel_warps)
};

template <typename scalar_t, typename teacher_t>
struct ForwardCall {
  using acc_t = accumulate_t<scalar_t>;
  FeaturePair<scalar_t, teacher_t> in;  // features and channel attentions
  AttentionPlan plan;                   // of these features
  double scale;                         // reduction scale
  acc_t* loss;                          // out: 0-dim
  acc_t* spatial;                       // out: (3, B, H*W)
  acc_t* inv_norm;                      // out: (2, B)
  acc_t* pixel_grad;                    // out: (2, B, H*W), or null unless save_spatial_grad
  ForwardScratch scratch;
};

template <typename scalar_t, typename teacher_t, typename Executor>
void one_pass_forward(Executor& ex, const ForwardCall<scalar_t, teacher_t>& call) {
  const AttentionPlan& plan = call.plan;
  const ForwardScratch& scratch = call.scratch;
  with_pixels_per_thread<scalar_t>(plan.pixels_per_thread, [&](auto vec) {
    ex.run(MomentsKernel<scalar_t, teacher_t, decltype(vec)::value>{call.in, plan, scratch.group_partial}, plan.grid_x,
           plan.feature_grid_y());
  });
  ex.run(EnergyKernel<kMomentRows>{scratch.group_partial, plan, scratch.square_partial, nullptr}, plan.pixel_grid_x,
         plan.batch);
  ex.norms(NormStep<float>{scratch.square_partial, 2 * plan.batch, plan.pixel_kernel_warps(), scratch.inv_exact,
                           call.inv_norm});
  ex.run(MomentsFinishKernel{scratch.group_partial, plan, scratch.inv_exact, call.spatial, call.pixel_grad,
                             scratch.loss_partial},
         plan.pixel_grid_x, plan.batch);
}

template <typename Executor>
void two_pass_forward(Executor& ex, const ForwardCall<double, double>& call) {
  const AttentionPlan& plan = call.plan;
  const ForwardScratch& scratch = call.scratch;
  with_pixels_per_thread<double>(plan.pixels_per_thread, [&](auto vec) {
    ex.run(SpatialEnergyKernel<decltype(vec)::value>{call.in, plan, scratch.group_partial}, plan.grid_x,
           plan.feature_grid_y());
  });
  ex.run(EnergyKernel<kEnergyRows>{scratch.group_partial, plan, scratch.square_partial, call.spatial},
         plan.pixel_grid_x, plan.batch);
  ex.norms(NormStep<double>{scratch.square_partial, 2 * plan.batch, plan.pixel_kernel_warps(), scratch.inv_exact,
                            call.inv_norm});
  ex.run(NormaliseKernel{plan, scratch.inv_exact, call.spatial}, plan.pixel_grid_x, plan.batch);
  with_pixels_per_thread<double>(plan.pixels_per_thread, [&](auto vec) {
    ex.run(DirectLossKernel<decltype(vec)::value>{call.in, plan, call.spatial, call.pixel_grad != nullptr,
                                                  scratch.group_partial},
           plan.grid_x, plan.feature_grid_y());
  });
  ex.run(DirectFinishKernel{scratch.group_partial, plan, call.pixel_grad, scratch.loss_partial}, plan.pixel_grid_x,
         plan.batch);
}

template <typename scalar_t, typename teacher_t, typename Executor>
void attentive_distillation_forward_kernels(Executor& ex, const ForwardCall<scalar_t, teacher_t>& call) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    two_pass_forward(ex, call);
  } else {
    one_pass_forward(ex, call);
  }
  ex.loss(LossStep<accumulate_t<scalar_t>>{call.scratch.loss_partial, call.plan.batch * call.plan.pixel_kernel_warps(),
                                           call.scale, call.loss});
}

template <typename scalar_t, typename teacher_t>
struct BackwardCall {
  using acc_t = accumulate_t<scalar_t>;
  FeaturePair<scalar_t, teacher_t> in;    // features and channel attentions
  AttentionPlan plan;                     // of these features
  SavedMaps<acc_t> saved;                 // saved.spatial_dot == spatial_dot (or both null)
  acc_t* spatial_dot;                     // scratch (2, B), written by spatial_dots when chaining through Ŝ
  const acc_t* grad_loss;                 // 0-dim upstream gradient
  double weight_scale;                    // 2 * reduction scale
  FeatureGrads<scalar_t, teacher_t> out;  // df, dg and the channel partials (scratch); sum_a iff da, sum_b iff db
  scalar_t* da;                           // out: (B, C) or null
  teacher_t* db;                          // out: (B, C) or null, in b's (the teacher's) dtype
};

template <typename scalar_t, typename teacher_t, typename Executor>
void attentive_distillation_backward_kernels(Executor& ex, const BackwardCall<scalar_t, teacher_t>& call) {
  using acc_t = accumulate_t<scalar_t>;
  const AttentionPlan& plan = call.plan;
  if (call.saved.pixel_grad != nullptr) {
    ex.spatial_dots(SpatialDotStep<acc_t>{call.saved.spatial, call.saved.pixel_grad, 2 * plan.batch, plan.pixels,
                                          call.spatial_dot});
  }
  with_pixels_per_thread<scalar_t>(plan.pixels_per_thread, [&](auto vec) {
    ex.run(FeatureGradKernel<scalar_t, teacher_t, decltype(vec)::value>{call.in, plan, call.saved, call.grad_loss,
                                                                        call.weight_scale, call.out},
           plan.grid_x, plan.feature_grid_y());
  });
  const int64_t channel_blocks = ceil_div(plan.channels, kBlockThreads);
  const int64_t side = plan.batch * plan.pixel_warps() * plan.channels;
  if (call.out.sum_a) {
    ex.run(ChannelSumKernel<scalar_t>{call.out.channel_partial, plan.pixel_warps(), plan.channels, call.grad_loss,
                                      call.weight_scale, acc_t(1), call.da},
           channel_blocks, plan.batch);
  }
  if (call.out.sum_b) {
    ex.run(ChannelSumKernel<scalar_t, teacher_t>{call.out.channel_partial + side, plan.pixel_warps(), plan.channels,
                                                 call.grad_loss, call.weight_scale, acc_t(-1), call.db},
           channel_blocks, plan.batch);
  }
}

template <typename scalar_t, typename Executor>
void structured_attention_forward_kernels(Executor& ex, const StructuredInputs<scalar_t>& in, const AttentionPlan& plan,
                                          scalar_t* out) {
  with_pixels_per_thread<scalar_t>(plan.pixels_per_thread, [&](auto vec) {
    ex.run(StructuredForwardKernel<scalar_t, decltype(vec)::value>{in, plan, out}, plan.grid_x, plan.feature_grid_y());
  });
}

template <typename scalar_t>
struct StructuredBackwardCall {
  StructuredInputs<scalar_t> in;  // v and the attentions
  const scalar_t* grad_out;       // (B, C, H*W)
  AttentionPlan plan;             // of v
  StructuredGrads<scalar_t> out;  // dv and the partials (scratch)
  scalar_t* da_ch;                // out: (B, C) or null
  scalar_t* da_sp;                // out: (B, H*W) or null
};

template <typename scalar_t, typename Executor>
void structured_attention_backward_kernels(Executor& ex, const StructuredBackwardCall<scalar_t>& call) {
  using acc_t = accumulate_t<scalar_t>;
  const AttentionPlan& plan = call.plan;
  with_pixels_per_thread<scalar_t>(plan.pixels_per_thread, [&](auto vec) {
    ex.run(StructuredBackwardKernel<scalar_t, decltype(vec)::value>{call.in, call.grad_out, plan, call.out},
           plan.grid_x, plan.feature_grid_y());
  });
  if (call.da_ch != nullptr) {
    ex.run(ChannelSumKernel<scalar_t>{call.out.channel_partial, plan.pixel_warps(), plan.channels, nullptr, 1.0,
                                      acc_t(1), call.da_ch},
           ceil_div(plan.channels, kBlockThreads), plan.batch);
  }
  if (call.da_sp != nullptr) {
    ex.run(GroupSumKernel<scalar_t>{call.out.spatial_partial, plan, call.da_sp}, plan.pixel_grid_x, plan.batch);
  }
}

// The emulation: every kernel body thread by thread (run_on_host), the block-level sums in order.
struct HostExecutor {
  template <typename Kernel>
  void run(const Kernel& kernel, int64_t grid_x, int64_t grid_y) {
    run_on_host(kernel, grid_x, grid_y);
  }

  template <typename acc_t>
  void norms(const NormStep<acc_t>& step) {
    for (int64_t map = 0; map < step.maps; ++map) {
      double sum = 0;
      for (int64_t w = 0; w < step.warps; ++w) sum += step.square_partial[map * step.warps + w];
      write_norm(step, map, sum);
    }
  }

  template <typename acc_t>
  void loss(const LossStep<acc_t>& step) {
    double sum = 0;
    for (int64_t w = 0; w < step.warps; ++w) sum += step.loss_partial[w];
    *step.loss = static_cast<acc_t>(sum * step.scale);
  }

  template <typename acc_t>
  void spatial_dots(const SpatialDotStep<acc_t>& step) {
    for (int64_t map = 0; map < step.maps; ++map) {
      double sum = 0;
      for (int64_t p = 0; p < step.pixels; ++p) {
        sum += static_cast<double>(step.pixel_grad[map * step.pixels + p]) * step.spatial[map * step.pixels + p];
      }
      step.spatial_dot[map] = static_cast<acc_t>(sum);
    }
  }
};

// The feature pass of each op, whose occupancy sizes its channel groups (plan_attention).
enum class FeaturePass { kAttentiveForward, kAttentiveBackward, kStructuredForward, kStructuredBackward };

template <typename Kernel>
struct KernelTag {
  using type = Kernel;
};

// fn(KernelTag<Kernel>{}) with the kernel of `pass` that reads the features (float64's forward: its
// second pass, DirectLossKernel, which holds the more registers of its two). teacher_t: the old
// features' dtype of the attentive passes (the structured passes read one dtype).
template <typename scalar_t, typename teacher_t, int kVec, typename Fn>
void with_feature_pass_kernel(FeaturePass pass, Fn&& fn) {
  switch (pass) {
    case FeaturePass::kAttentiveForward:
      if constexpr (std::is_same_v<scalar_t, double>) {
        fn(KernelTag<DirectLossKernel<kVec>>{});
      } else {
        fn(KernelTag<MomentsKernel<scalar_t, teacher_t, kVec>>{});
      }
      return;
    case FeaturePass::kAttentiveBackward:
      fn(KernelTag<FeatureGradKernel<scalar_t, teacher_t, kVec>>{});
      return;
    case FeaturePass::kStructuredForward:
      fn(KernelTag<StructuredForwardKernel<scalar_t, kVec>>{});
      return;
    case FeaturePass::kStructuredBackward:
      fn(KernelTag<StructuredBackwardKernel<scalar_t, kVec>>{});
      return;
  }
}

// The blocks of `pass`'s feature kernel (with_feature_pass_kernel) the current GPU holds at once: its
// SMs times cudaOccupancyMaxActiveBlocksPerMultiprocessor, into *blocks; returns the CUDA error code.
template <typename scalar_t, typename teacher_t>
int resident_feature_blocks(FeaturePass pass, int pixels_per_thread, int64_t* blocks);

// The launchers (attention_kernels.cu): the same sequences on `stream` (a cudaStream_t); each
// returns the CUDA error code of the first failing launch (0: success). No host synchronisation.
template <typename scalar_t, typename teacher_t>
int launch_attentive_distillation_forward(const ForwardCall<scalar_t, teacher_t>& call, void* stream);
template <typename scalar_t, typename teacher_t>
int launch_attentive_distillation_backward(const BackwardCall<scalar_t, teacher_t>& call, void* stream);
template <typename scalar_t>
int launch_structured_attention_forward(const StructuredInputs<scalar_t>& in, const AttentionPlan& plan, scalar_t* out,
                                        void* stream);
template <typename scalar_t>
int launch_structured_attention_backward(const StructuredBackwardCall<scalar_t>& call, void* stream);

}  // namespace attention
}  // namespace incseg
