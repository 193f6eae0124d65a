#pragma once
// The CUDA kernels of the logit losses (docs/KERNELS.md), as HOST_DEVICE bodies (common/grid.h):
// logit_losses_kernels.cu launches them on the GPU, logit_losses_cuda.cpp also runs them on the
// CPU (the incseg_fast_cuda_emulator namespace) so that the tests check them without a GPU.
// Nothing here includes torch or the CUDA runtime.
//
// Layout. One thread owns kVec consecutive pixels of one image (block_y = image); consecutive
// threads own consecutive pixels, so every load of a channel row is coalesced, and with kVec > 1
// each thread loads its pixels of a row as one 16-byte pack (the launcher picks kVec > 1 only
// when H*W is a multiple of kVec and every pointer is 16-byte aligned; else kVec = 1).
//
// Forward: one pass over the channels, each logit read once (common/logit_stream.h keeps the
// running maxima and rescaled sums), then the per-pixel statistics and losses of
// common/logit_math.h. Reduced losses and the valid-pixel count go to one partial per warp,
// added up in a fixed order by a second kernel (deterministic, no atomics).
// Backward: the per-pixel gradient coefficients of logit_math.h (grad_coefs), then one pass over
// the channels writing dL/dx with one exponential per logit (plus one per teacher logit), each
// channel range shifted by its own log-normaliser (set_factors below).
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/grid.h"
#include "common/logit_math.h"
#include "common/logit_stream.h"

namespace incseg {
namespace logit {

enum class LabelType : int32_t { kInt64 = 0, kInt32 = 1, kUInt8 = 2 };

HOST_DEVICE int64_t read_label(const void* target, LabelType type, int64_t i) {
  switch (type) {
    case LabelType::kInt32:
      return static_cast<const int32_t*>(target)[i];
    case LabelType::kUInt8:
      return static_cast<const uint8_t*>(target)[i];
    default:
      return static_cast<const int64_t*>(target)[i];
  }
}

// What both kernels read. Pointers the modes do not use are null.
template <typename scalar_t>
struct LogitInputs {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* x;   // (B, C, HW)
  const scalar_t* y;   // (B, Co, HW), kd != none
  const void* target;  // (B, HW) labels of label_type, ce != none
  LabelType label_type;
  const acc_t* gamma;  // (B,), kd == balanced
  const acc_t* mask;   // (B, HW) or null
  acc_t alpha;
  int64_t ignore_index;
  int64_t B, C, Co, HW;
  CeMode ce;
  KdMode kd;
};

template <typename scalar_t>
struct ForwardBuffers {
  using acc_t = accumulate_t<scalar_t>;
  acc_t* stats;   // (B, kNumStats, HW)
  acc_t* ce_map;  // (B, HW) per-pixel losses for reduction "none", else null
  acc_t* kd_map;
  acc_t* ce_partial;  // one per warp of the launch
  acc_t* kd_partial;
  int32_t* valid_partial;
};

// A label outside [0, C) that is not ignore_index (the public API rejects those before any
// kernel): the pixel's CE term is NaN, so a direct op call can neither read out of bounds nor
// return a plausible wrong loss.
template <typename acc_t>
HOST_DEVICE acc_t bad_label_loss() {
  return acc_t(0) / acc_t(0);
}

template <typename scalar_t, int kVec>
struct LogitForwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  LogitInputs<scalar_t> in;
  ForwardBuffers<scalar_t> out;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t b = index.block_y;
    const int64_t p0 = index.first_pixel(kVec);
    acc_t ce_sum = 0, kd_sum = 0;
    int32_t valid = 0;
    if (p0 < in.HW) pixels(b, p0, ce_sum, kd_sum, valid);
    if (out.ce_partial != nullptr) {
      warp_sum_to(out.ce_partial + index.warp(), ce_sum, index);
      warp_sum_to(out.kd_partial + index.warp(), kd_sum, index);
    }
    warp_sum_to(out.valid_partial + index.warp(), valid, index);
  }

  // Pixels [p0, p0 + kVec) of image b (all inside the image: H*W is a multiple of kVec).
  HOST_DEVICE void pixels(int64_t b, int64_t p0, acc_t& ce_sum, acc_t& kd_sum, int32_t& valid) const {
    const bool with_kd = in.kd != KdMode::kNone, with_ce = in.ce != CeMode::kNone;
    const acc_t plain = in.kd == KdMode::kPlain ? acc_t(1) : acc_t(0);
    const scalar_t* x = in.x + b * in.C * in.HW + p0;
    const scalar_t* y = with_kd ? in.y + b * in.Co * in.HW + p0 : nullptr;
    int64_t label[kVec];
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) label[i] = with_ce ? read_label(in.target, in.label_type, b * in.HW + p0 + i) : -1;

    acc_t xv[kVec], zv[kVec], x0[kVec], x_label[kVec];
    StreamingOldChannels<acc_t> old[kVec];
    StreamingLse<acc_t> fresh[kVec];  // the new channels [Co, C)
    load_pack<kVec>(x, x0);
    if (with_kd) load_pack<kVec>(y, zv);
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      old[i].start(x0[i], with_kd ? scaled_teacher_logit(in.alpha, zv[i]) : acc_t(0));
      fresh[i] = StreamingLse<acc_t>{neg_inf<acc_t>(), acc_t(0)};
      x_label[i] = label[i] == 0 ? x0[i] : acc_t(0);
    }
    for (int64_t c = 1; c < in.Co; ++c) {
      load_pack<kVec>(x + c * in.HW, xv);
      if (with_kd) load_pack<kVec>(y + c * in.HW, zv);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        if (with_kd) {
          old[i].add(xv[i], scaled_teacher_logit(in.alpha, zv[i]), plain);
        } else {
          old[i].student.add(xv[i]);
        }
        x_label[i] = label[i] == c ? xv[i] : x_label[i];
      }
    }
    for (int64_t c = in.Co; c < in.C; ++c) {
      load_pack<kVec>(x + c * in.HW, xv);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        fresh[i].add(xv[i]);
        x_label[i] = label[i] == c ? xv[i] : x_label[i];
      }
    }

    const KdFactors<acc_t> factors = kd_factors(in.kd, in.kd == KdMode::kBalanced ? in.gamma[b] : acc_t(1));
    acc_t stat[kNumStats][kVec], ce_loss[kVec], kd_loss[kVec], mask[kVec];
    if (in.mask != nullptr && with_kd) {
      load_pack<kVec>(in.mask + b * in.HW + p0, mask);
    } else {
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) mask[i] = acc_t(1);
    }
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      const StudentStats<acc_t> s =
          finish_student(old[i].student.max, old[i].student.sum, fresh[i].max, fresh[i].sum, x0[i]);
      stat[kStatLse][i] = s.lse;
      stat[kStatLseOld][i] = s.lse_old;
      stat[kStatLseBg][i] = s.lse_bg;
      stat[kStatLseTeacher][i] = with_kd ? teacher_lse(old[i].teacher) : acc_t(0);
      kd_loss[i] = with_kd ? mask[i] * kd_pixel_loss(factors, in.Co, s, old[i].teacher, old[i].student.max) : acc_t(0);
      const bool counted = with_ce && label[i] != in.ignore_index;
      const bool in_range = label[i] >= 0 && label[i] < in.C;
      ce_loss[i] = !counted   ? acc_t(0)
                   : in_range ? ce_pixel_loss(in.ce, label[i], in.Co, s, x_label[i])
                              : bad_label_loss<acc_t>();
      valid += counted ? 1 : 0;
      ce_sum += ce_loss[i];
      kd_sum += kd_loss[i];
    }
    acc_t* stats = out.stats + b * kNumStats * in.HW + p0;
    INCSEG_UNROLL
    for (int r = 0; r < kNumStats; ++r) store_pack<kVec>(stats + r * in.HW, stat[r]);
    if (out.ce_map != nullptr) {
      store_pack<kVec>(out.ce_map + b * in.HW + p0, ce_loss);
      store_pack<kVec>(out.kd_map + b * in.HW + p0, kd_loss);
    }
  }
};

// The backward's upstream gradients: per-pixel maps (reduction "none") or one scalar each. The CE
// scalar is divided on the device by max(valid_count, 1) for "mean"; the KD scalar by kd_scale.
template <typename scalar_t>
struct BackwardBuffers {
  using acc_t = accumulate_t<scalar_t>;
  const acc_t* stats;          // (B, kNumStats, HW) saved by the forward
  const int64_t* valid_count;  // 0-dim
  const acc_t* grad_ce;        // (B, HW) or 0-dim
  const acc_t* grad_kd;
  bool per_pixel;
  bool ce_mean;
  acc_t kd_scale;    // 1/(B*H*W) for "mean", else 1
  scalar_t* grad_x;  // out: (B, C, HW)
};

// What the channel loops of the backward need per pixel, from grad_coefs' coefficients k. Every
// channel range is shifted by its own log-normaliser, and exp(x_c - lse) = exp(x_c - s) exp(s - lse)
// folds the full-softmax term into the range's factor (exp(s - lse) <= 1: nothing overflows), so
// each logit costs one exponential (plus one per teacher logit):
//   c in [1, Co):  old * exp(x_c - lse_old) + teacher * q_c      (+ target at c == label)
//   c in [Co, C):  fresh * exp(x_c - lse_bg)                     (+ target at c == label)
// Channel 0, in both sets, is computed from its three exponentials (channel0_grad).
template <typename T>
struct ChannelFactors {
  T old;
  T fresh;
  T teacher;
  T target;
  T lse_old;
  T lse_bg;
  T lse_teacher;
  int32_t label;  // -1 when the pixel has no CE term: never equals a channel
};

template <typename T>
HOST_DEVICE ChannelFactors<T> channel_factors(const GradCoefs<T>& k, T lse, T lse_old, T lse_bg, T lse_teacher,
                                              int32_t label) {
  return ChannelFactors<T>{k.old_set + k.full * lm_exp(lse_old - lse),
                           k.bg_set + k.full * lm_exp(lse_bg - lse),
                           k.teacher,
                           k.target,
                           lse_old,
                           lse_bg,
                           lse_teacher,
                           label};
}

template <typename T>
HOST_DEVICE T channel0_grad(const GradCoefs<T>& k, T x0, T q0, T lse, T lse_old, T lse_bg, int32_t label) {
  return k.full * lm_exp(x0 - lse) + k.old_set * lm_exp(x0 - lse_old) + k.bg_set * lm_exp(x0 - lse_bg) +
         k.teacher0 * q0 + (label == 0 ? k.target : T(0));
}

template <typename scalar_t, int kVec>
struct LogitBackwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  LogitInputs<scalar_t> in;
  BackwardBuffers<scalar_t> grad;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t b = index.block_y;
    const int64_t p0 = index.first_pixel(kVec);
    if (p0 < in.HW) pixels(b, p0);
  }

  // The CE and KD upstream gradients of pixel p0 + i (before labels and masks).
  HOST_DEVICE void upstream(int64_t b, int64_t p0, acc_t (&g_ce)[kVec], acc_t (&g_kd)[kVec]) const {
    if (grad.per_pixel) {
      load_pack<kVec>(grad.grad_ce + b * in.HW + p0, g_ce);
      load_pack<kVec>(grad.grad_kd + b * in.HW + p0, g_kd);
      return;
    }
    const acc_t ce = *grad.grad_ce * (grad.ce_mean ? ce_mean_scale<acc_t>(*grad.valid_count) : acc_t(1));
    const acc_t kd = *grad.grad_kd * grad.kd_scale;
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      g_ce[i] = ce;
      g_kd[i] = kd;
    }
  }

  // Channel 0's gradient and the factors of the other channels, per pixel.
  HOST_DEVICE void prologue(int64_t b, int64_t p0, acc_t (&g0)[kVec], ChannelFactors<acc_t> (&f)[kVec]) const {
    const bool with_kd = in.kd != KdMode::kNone, with_ce = in.ce != CeMode::kNone;
    const acc_t* stats = grad.stats + b * kNumStats * in.HW + p0;
    acc_t lse[kVec], lse_old[kVec], lse_bg[kVec], g_ce[kVec], g_kd[kVec], mask[kVec], x0[kVec];
    acc_t lse_q[kVec] = {}, y0[kVec] = {};  // read only with a distillation term
    load_pack<kVec>(stats + kStatLse * in.HW, lse);
    load_pack<kVec>(stats + kStatLseOld * in.HW, lse_old);
    load_pack<kVec>(stats + kStatLseBg * in.HW, lse_bg);
    load_pack<kVec>(in.x + b * in.C * in.HW + p0, x0);
    if (with_kd) {
      load_pack<kVec>(stats + kStatLseTeacher * in.HW, lse_q);
      load_pack<kVec>(in.y + b * in.Co * in.HW + p0, y0);
    }
    upstream(b, p0, g_ce, g_kd);
    if (in.mask != nullptr && with_kd) {
      load_pack<kVec>(in.mask + b * in.HW + p0, mask);
    } else {
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) mask[i] = acc_t(1);
    }
    const KdFactors<acc_t> factors = kd_factors(in.kd, in.kd == KdMode::kBalanced ? in.gamma[b] : acc_t(1));
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      const int64_t label = with_ce ? read_label(in.target, in.label_type, b * in.HW + p0 + i) : -1;
      const bool counted = with_ce && label != in.ignore_index;
      const bool in_range = label >= 0 && label < in.C;
      const acc_t ce_weight = !counted ? acc_t(0) : in_range ? g_ce[i] : bad_label_loss<acc_t>();
      const acc_t old_label = in.ce == CeMode::kUnbiased && counted && label < in.Co ? acc_t(1) : acc_t(0);
      const int32_t channel = counted && in_range ? static_cast<int32_t>(label) : -1;
      const acc_t q0 = with_kd ? lm_exp(scaled_teacher_logit(in.alpha, y0[i]) - lse_q[i]) : acc_t(0);
      const GradCoefs<acc_t> k =
          grad_coefs(factors, in.Co, old_label, ce_weight, with_kd ? g_kd[i] * mask[i] : acc_t(0), q0);
      g0[i] = channel0_grad(k, x0[i], q0, lse[i], lse_old[i], lse_bg[i], channel);
      f[i] = channel_factors(k, lse[i], lse_old[i], lse_bg[i], with_kd ? lse_q[i] : acc_t(0), channel);
    }
  }

  HOST_DEVICE void pixels(int64_t b, int64_t p0) const {
    const bool with_kd = in.kd != KdMode::kNone;
    const scalar_t* x = in.x + b * in.C * in.HW + p0;
    const scalar_t* y = with_kd ? in.y + b * in.Co * in.HW + p0 : nullptr;
    scalar_t* gx = grad.grad_x + b * in.C * in.HW + p0;
    ChannelFactors<acc_t> f[kVec];
    acc_t g[kVec], xv[kVec], z[kVec];
    prologue(b, p0, g, f);
    store_pack<kVec>(gx, g);
    for (int64_t c = 1; c < in.Co; ++c) {
      load_pack<kVec>(x + c * in.HW, xv);
      if (with_kd) load_pack<kVec>(y + c * in.HW, z);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        const acc_t q = with_kd ? lm_exp(scaled_teacher_logit(in.alpha, z[i]) - f[i].lse_teacher) : acc_t(0);
        g[i] = f[i].old * lm_exp(xv[i] - f[i].lse_old) + f[i].teacher * q + (f[i].label == c ? f[i].target : acc_t(0));
      }
      store_pack<kVec>(gx + c * in.HW, g);
    }
    for (int64_t c = in.Co; c < in.C; ++c) {
      load_pack<kVec>(x + c * in.HW, xv);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        g[i] = f[i].fresh * lm_exp(xv[i] - f[i].lse_bg) + (f[i].label == c ? f[i].target : acc_t(0));
      }
      store_pack<kVec>(gx + c * in.HW, g);
    }
  }
};

// The launch of either kernel (both have 128-thread blocks): blocks over one image's pixels (x),
// images (y), pixels per thread (1 or kPackedPixels, common/grid.h), and the number of warps
// (per-warp partials).
struct LaunchPlan {
  int pixels_per_thread;
  int64_t grid_x;
  int64_t grid_y;
  int64_t warps;
};

template <typename scalar_t>
LaunchPlan plan_launch(int64_t batch, int64_t pixels, bool aligned_16_bytes) {
  using Kernel = LogitForwardKernel<scalar_t, 1>;
  const int vec = aligned_16_bytes && pixels % kPackedPixels<scalar_t> == 0 ? kPackedPixels<scalar_t> : 1;
  const int64_t grid_x = ceil_div(pixels, int64_t(Kernel::kThreads) * vec);
  return LaunchPlan{vec, grid_x, batch, warps_in_grid<Kernel>(grid_x, batch)};
}

// What the second forward kernel writes from the per-warp partials.
template <typename acc_t>
struct ForwardTotals {
  bool reduce;  // "mean" or "sum": write ce_loss and kd_loss
  bool mean;
  double kd_scale;
  acc_t* ce_loss;  // 0-dim
  acc_t* kd_loss;
  int64_t* valid_count;  // 0-dim, always
};

// The forward's partial sums (one per warp) added in index order: the reduced losses and the count.
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
void finish_forward_on_host(const ForwardBuffers<scalar_t>& out, int64_t warps, const ForwardTotals<acc_t>& totals) {
  double ce = 0, kd = 0;
  int64_t valid = 0;
  for (int64_t i = 0; i < warps; ++i) {
    valid += out.valid_partial[i];
    if (totals.reduce) {
      ce += out.ce_partial[i];
      kd += out.kd_partial[i];
    }
  }
  *totals.valid_count = valid;
  if (!totals.reduce) return;
  *totals.ce_loss = static_cast<acc_t>(totals.mean ? ce * ce_mean_scale<double>(valid) : ce);
  *totals.kd_loss = static_cast<acc_t>(totals.mean ? kd * totals.kd_scale : kd);
}

// The launchers (logit_losses_kernels.cu): the kernels on `stream` (a cudaStream_t), returning the
// CUDA error code of the launches (0: success). No host synchronisation.
template <typename scalar_t>
int launch_logit_forward(const LogitInputs<scalar_t>& in, const ForwardBuffers<scalar_t>& out,
                         const ForwardTotals<accumulate_t<scalar_t>>& totals, const LaunchPlan& plan, void* stream);
template <typename scalar_t>
int launch_logit_backward(const LogitInputs<scalar_t>& in, const BackwardBuffers<scalar_t>& grad,
                          const LaunchPlan& plan, void* stream);

}  // namespace logit
}  // namespace incseg
