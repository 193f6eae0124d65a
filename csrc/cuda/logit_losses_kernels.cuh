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
// channel range shifted by its own log-normaliser (channel_factors below).
//
// With size= (MATH.md#upsampling) the losses are those of the bilinear upsampling of x and y to the
// labels' H x W. The forward is the same kernel reading each channel value through UpsampledPixel
// (one output pixel per thread, four low-resolution samples per value) instead of SamePixels. The
// backward computes each output pixel's gradient once, sums it into per-cell corner sums
// (UpsampledCellKernel: columns, then rows), and adds those per element of dL/dx
// (UpsampledGatherKernel), in a fixed order (deterministic, no atomics, nothing of the output's
// size besides the saved statistics).
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/grid.h"
#include "common/logit_math.h"
#include "common/logit_stream.h"
#include "common/upsample.h"

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

// One axis of the bilinear upsampling (common/upsample.h): `in` samples of the logits to `out` of
// the output, coordinates in coord_t (the accumulation type). The scales are formed on the host (a
// division on the device is a slow-path call).
template <typename coord_t>
struct UpsampleAxis {
  int64_t in;
  int64_t out;
  coord_t scale;      // upsample::source_scale(in, out)
  coord_t inv_scale;  // out / in: where the output indices whose taps start at an input sample begin
};

template <typename coord_t>
UpsampleAxis<coord_t> upsample_axis(int64_t in, int64_t out) {
  return UpsampleAxis<coord_t>{in, out, upsample::source_scale<coord_t>(in, out),
                               static_cast<coord_t>(out) / static_cast<coord_t>(in)};
}

// The logits' resolutions when the losses are taken on their upsampling to H x W (size=).
template <typename coord_t>
struct Upsampling {
  UpsampleAxis<coord_t> x_rows, x_cols;  // x (h, w) to (H, W)
  UpsampleAxis<coord_t> y_rows, y_cols;  // y (h', w') to (H, W); unused when kd == none
};

// What both kernels read. Pointers the modes do not use are null. Every per-pixel tensor (labels,
// mask, statistics, loss maps, their upstream gradients) has HW = H * W pixels per image; so do x
// and y, except with `upsampled`, where they have their own resolutions (up). y is in the teacher's
// own element type teacher_t (scalar_t or the wider one of common/teacher_dtype.h), read as acc_t.
template <typename scalar_t, typename teacher_t>
struct LogitInputs {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* x;   // (B, C, HW), or (B, C, h, w) upsampled
  const teacher_t* y;  // (B, Co, HW), or (B, Co, h', w') upsampled; kd != none
  const void* target;  // (B, HW) labels of label_type, ce != none
  LabelType label_type;
  const acc_t* log_gamma;  // (B,), kd == balanced
  const acc_t* mask;       // (B, HW) or null
  acc_t alpha;
  int64_t ignore_index;
  int64_t B, C, Co, HW;
  CeMode ce;
  KdMode kd;
  bool upsampled;
  Upsampling<acc_t> up;  // with upsampled
};

// Where a kernel reads the channel values of a thread's Source::kVec pixels. SamePixels: x and y at
// those pixels, one 16-byte pack per channel row when kVec > 1 (a wider teacher's pack of kVec pixels
// is two or four 16-byte loads: kVec is the student's).
template <typename scalar_t, typename teacher_type, int kPixels>
struct SamePixels {
  using acc_t = accumulate_t<scalar_t>;
  using teacher_t = teacher_type;
  static constexpr int kVec = kPixels;
  const scalar_t* x;   // channel 0 of the first pixel
  const teacher_t* y;  // null without distillation
  int64_t HW;

  HOST_DEVICE static SamePixels at(const LogitInputs<scalar_t, teacher_t>& in, int64_t b, int64_t p0) {
    return SamePixels{in.x + b * in.C * in.HW + p0, in.y != nullptr ? in.y + b * in.Co * in.HW + p0 : nullptr, in.HW};
  }
  HOST_DEVICE void x_at(int64_t c, acc_t (&out)[kVec]) const { load_pack<kVec>(x + c * HW, out); }
  HOST_DEVICE void y_at(int64_t c, acc_t (&out)[kVec]) const { load_pack<kVec>(y + c * HW, out); }
};

// The two taps of one output pixel (row Y, column X) into a plane of `rows` x `cols` samples.
template <typename acc_t>
struct PlaneTaps {
  upsample::BasicTap<acc_t> row;
  upsample::BasicTap<acc_t> col;
  int64_t width;

  HOST_DEVICE static PlaneTaps at(const UpsampleAxis<acc_t>& rows, const UpsampleAxis<acc_t>& cols, int64_t Y,
                                  int64_t X) {
    return PlaneTaps{upsample::tap(Y, rows.scale, rows.in), upsample::tap(X, cols.scale, cols.in), cols.in};
  }
  // The upsampled value of `plane` at the pixel, in acc_t (not rounded to the logits' dtype).
  template <typename scalar_t>
  HOST_DEVICE acc_t sample(const scalar_t* plane) const {
    return upsample::bilinear<acc_t>([plane](int64_t i) { return to_accumulate(plane[i]); }, row, col, width);
  }
};

// UpsampledPixel: x and y upsampled to one output pixel, each value interpolated from four samples.
template <typename scalar_t, typename teacher_type>
struct UpsampledPixel {
  using acc_t = accumulate_t<scalar_t>;
  using teacher_t = teacher_type;
  static constexpr int kVec = 1;
  const scalar_t* x;   // channel 0 of the image
  const teacher_t* y;  // null without distillation
  int64_t x_plane;
  int64_t y_plane;
  PlaneTaps<acc_t> x_taps;
  PlaneTaps<acc_t> y_taps;

  HOST_DEVICE static UpsampledPixel at(const LogitInputs<scalar_t, teacher_t>& in, int64_t b, int64_t p) {
    const Upsampling<acc_t>& up = in.up;
    const int64_t Y = p / up.x_cols.out, X = p % up.x_cols.out;
    const int64_t x_plane = up.x_rows.in * up.x_cols.in, y_plane = up.y_rows.in * up.y_cols.in;
    return UpsampledPixel{in.x + b * in.C * x_plane,
                          in.y != nullptr ? in.y + b * in.Co * y_plane : nullptr,
                          x_plane,
                          y_plane,
                          PlaneTaps<acc_t>::at(up.x_rows, up.x_cols, Y, X),
                          PlaneTaps<acc_t>::at(up.y_rows, up.y_cols, Y, X)};
  }
  HOST_DEVICE void x_at(int64_t c, acc_t (&out)[1]) const { out[0] = x_taps.sample(x + c * x_plane); }
  HOST_DEVICE void y_at(int64_t c, acc_t (&out)[1]) const { out[0] = y_taps.sample(y + c * y_plane); }
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

// Source: SamePixels<scalar_t, teacher_t, kVec> or UpsampledPixel<scalar_t, teacher_t> (where the
// channel values come from).
template <typename scalar_t, typename Source>
struct LogitForwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  static constexpr int kVec = Source::kVec;
  LogitInputs<scalar_t, typename Source::teacher_t> in;
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
    const Source source = Source::at(in, b, p0);
    int64_t label[kVec];
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) label[i] = with_ce ? read_label(in.target, in.label_type, b * in.HW + p0 + i) : -1;

    acc_t xv[kVec], zv[kVec], x0[kVec], x_label[kVec];
    StreamingOldChannels<acc_t> old[kVec];
    StreamingLse<acc_t> fresh[kVec];  // the new channels [Co, C)
    source.x_at(0, x0);
    if (with_kd) source.y_at(0, zv);
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      old[i].start(x0[i], with_kd ? scaled_teacher_logit(in.alpha, zv[i]) : acc_t(0));
      fresh[i] = StreamingLse<acc_t>{neg_inf<acc_t>(), acc_t(0)};
      x_label[i] = label[i] == 0 ? x0[i] : acc_t(0);
    }
    for (int64_t c = 1; c < in.Co; ++c) {
      source.x_at(c, xv);
      if (with_kd) source.y_at(c, zv);
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
      source.x_at(c, xv);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) {
        fresh[i].add(xv[i]);
        x_label[i] = label[i] == c ? xv[i] : x_label[i];
      }
    }

    const KdFactors<acc_t> factors = kd_factors(in.kd, in.kd == KdMode::kBalanced ? in.log_gamma[b] : acc_t(0));
    acc_t stat[kNumStats][kVec], ce_loss[kVec], kd_loss[kVec], mask[kVec];
    if (in.mask != nullptr && with_kd) {
      load_pack<kVec>(in.mask + b * in.HW + p0, mask);
    } else {
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) mask[i] = acc_t(1);
    }
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      // The teacher's terms first: the teacher sums then die before finish_student (TeacherTerms).
      stat[kStatLseTeacher][i] = with_kd ? teacher_lse(old[i].teacher) : acc_t(0);
      const TeacherTerms<acc_t> teacher = with_kd ? teacher_terms(factors, old[i].teacher) : TeacherTerms<acc_t>{};
      const StudentStats<acc_t> s =
          finish_student(old[i].student.max, old[i].student.sum, fresh[i].max, fresh[i].sum, x0[i]);
      stat[kStatLse][i] = s.lse;
      stat[kStatLseOld][i] = s.lse_old;
      stat[kStatLseBg][i] = s.lse_bg;
      kd_loss[i] = with_kd ? mask[i] * kd_pixel_loss(factors, in.Co, s, teacher, old[i].student.max) : acc_t(0);
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
  // With size=: the corner sums of UpsampledCellKernel, (B, C, h, cell_strips, w, kCorners), scratch.
  acc_t* cell_sums;
  int64_t cell_strips;
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

// dL/dx_c of an old channel c in [1, Co) from its logit x and teacher probability q (0 without KD).
template <typename T>
HOST_DEVICE T old_channel_grad(const ChannelFactors<T>& f, int64_t c, T x, T q) {
  return f.old * lm_exp(x - f.lse_old) + f.teacher * q + (f.label == c ? f.target : T(0));
}

// dL/dx_c of a new channel c in [Co, C) from its logit x.
template <typename T>
HOST_DEVICE T new_channel_grad(const ChannelFactors<T>& f, int64_t c, T x) {
  return f.fresh * lm_exp(x - f.lse_bg) + (f.label == c ? f.target : T(0));
}

// What the backward reads for one pixel, in the accumulation type.
template <typename T>
struct PixelInputs {
  T lse, lse_old, lse_bg, lse_q;  // saved statistics (lse_q: 0 without distillation)
  T g_ce, g_kd;                   // upstream gradients, scaled by the reduction
  T mask;                         // 1 without a mask
  T y0;                           // the teacher's background logit (0 without distillation)
  int64_t label;                  // -1 without a CE term
};

// One pixel's backward: grad_coefs' coefficients k, the other channels' factors and q_0.
template <typename T>
struct PixelGradient {
  GradCoefs<T> k;
  ChannelFactors<T> f;
  T q0;
};

template <typename scalar_t, typename teacher_t, typename T>
HOST_DEVICE PixelGradient<T> pixel_gradient(const LogitInputs<scalar_t, teacher_t>& in, const KdFactors<T>& factors,
                                            const PixelInputs<T>& px) {
  const bool with_kd = in.kd != KdMode::kNone, with_ce = in.ce != CeMode::kNone;
  const bool counted = with_ce && px.label != in.ignore_index;
  const bool in_range = px.label >= 0 && px.label < in.C;
  const T ce_weight = !counted ? T(0) : in_range ? px.g_ce : bad_label_loss<T>();
  const T old_label = in.ce == CeMode::kUnbiased && counted && px.label < in.Co ? T(1) : T(0);
  const int32_t channel = counted && in_range ? static_cast<int32_t>(px.label) : -1;
  const T log_q0 = with_kd ? scaled_teacher_logit(in.alpha, px.y0) - px.lse_q : T(0);
  const T q0 = with_kd ? lm_exp(log_q0) : T(0);
  const T g_q0 = with_kd ? weighted_q0(factors, log_q0) : T(0);
  const GradCoefs<T> k = grad_coefs(factors, in.Co, old_label, ce_weight, with_kd ? px.g_kd * px.mask : T(0), q0, g_q0);
  return PixelGradient<T>{k, channel_factors(k, px.lse, px.lse_old, px.lse_bg, with_kd ? px.lse_q : T(0), channel), q0};
}

// The upstream gradients of reductions "mean" and "sum" (one scalar each), scaled by the reduction.
template <typename T>
struct ScalarUpstream {
  T ce;
  T kd;
};

template <typename scalar_t, typename T = accumulate_t<scalar_t>>
HOST_DEVICE ScalarUpstream<T> scalar_upstream(const BackwardBuffers<scalar_t>& grad) {
  return ScalarUpstream<T>{*grad.grad_ce * (grad.ce_mean ? ce_mean_scale<T>(*grad.valid_count) : T(1)),
                           *grad.grad_kd * grad.kd_scale};
}

template <typename scalar_t, typename teacher_t, int kVec>
struct LogitBackwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  LogitInputs<scalar_t, teacher_t> in;
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
    const ScalarUpstream<acc_t> scalar = scalar_upstream(grad);
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      g_ce[i] = scalar.ce;
      g_kd[i] = scalar.kd;
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
    const KdFactors<acc_t> factors = kd_factors(in.kd, in.kd == KdMode::kBalanced ? in.log_gamma[b] : acc_t(0));
    INCSEG_UNROLL
    for (int i = 0; i < kVec; ++i) {
      const int64_t label = with_ce ? read_label(in.target, in.label_type, b * in.HW + p0 + i) : -1;
      const PixelInputs<acc_t> px{lse[i], lse_old[i], lse_bg[i], lse_q[i], g_ce[i], g_kd[i], mask[i], y0[i], label};
      const PixelGradient<acc_t> pg = pixel_gradient(in, factors, px);
      g0[i] = channel0_grad(pg.k, x0[i], pg.q0, lse[i], lse_old[i], lse_bg[i], pg.f.label);
      f[i] = pg.f;
    }
  }

  HOST_DEVICE void pixels(int64_t b, int64_t p0) const {
    const bool with_kd = in.kd != KdMode::kNone;
    const scalar_t* x = in.x + b * in.C * in.HW + p0;
    const teacher_t* y = with_kd ? in.y + b * in.Co * in.HW + p0 : nullptr;
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
        g[i] = old_channel_grad(f[i], c, xv[i], q);
      }
      store_pack<kVec>(gx + c * in.HW, g);
    }
    for (int64_t c = in.Co; c < in.C; ++c) {
      load_pack<kVec>(x + c * in.HW, xv);
      INCSEG_UNROLL
      for (int i = 0; i < kVec; ++i) g[i] = new_channel_grad(f[i], c, xv[i]);
      store_pack<kVec>(gx + c * in.HW, g);
    }
  }
};

// The backward with size= (MATH.md#upsampling): dL/dx at x's own resolution, in two passes.
//
// x_up = U x channel by channel, U the separable bilinear upsampling: x_up[c, Y, X] =
// sum_{i, j} R[Y, i] K[X, j] x[c, i, j] with the tap weights R (rows) and K (columns) of
// common/upsample.h. So dL/dx = U^T dL/dx_up:
//   dL/dx[c, i, j] = sum_{Y, X} R[Y, i] K[X, j] G[c, Y, X],   G[c, p] = dL/dx_up[c, p],
// and G at output pixel p is the per-pixel gradient of MATH.md#logit-backward evaluated at x_up[:, p]
// and y_up[:, p]: per channel, a function of p's saved statistics, label, mask and upstream gradients,
// of x_up[c, p] and (c < Co) y_up[c, p] only.
//
// The output pixels whose taps start at the same sample (I, J) (row tap i0 = I, column tap j0 = J)
// form a cell: they all read the four samples (I, J), (I, J1), (I1, J), (I1, J1) of x (I1, J1 the
// second taps, clamped at the border), so their G only ever reaches those four elements.
// UpsampledCellKernel: one thread per (cell, strip of kStripRows of its rows, the last strip taking
// the rest) and group of kCellChannels channels. Per row it mixes each channel's four samples along
// the rows once (y's too when y is at x's resolution); per pixel it computes G once (the per-pixel
// coefficients once per channel group, each value one mix along the column tap); it sums K0 G and
// K1 G along the row (columns first) and adds those, times R0 and R1, into the cell's four corner
// sums (rows second). UpsampledGatherKernel: one thread per element of dL/dx adds the corner sums
// of the (up to 2 x 2) cells that reach it, strip by strip, in a fixed order. No atomics, no shared
// memory: dL/dx is bitwise the same run to run. Weight-0 taps contribute nothing
// (upsample::weight_times).
template <typename scalar_t>
constexpr int kCellChannels = std::is_same_v<scalar_t, double> ? 4 : 8;
constexpr int kStripRows = 4;
constexpr int kCorners = 4;  // (row tap, column tap): 2 * r + s

// The first output index of the cell of input sample i, i.e. the first d whose tap starts at or after
// i: 0 for i == 0 (where s is clamped at 0), axis.out for i == axis.in. For 0 < i < in, the tap's
// s(d) = (d + 0.5) * scale - 0.5 reaches i at d = (i + 0.5) / scale - 0.5; the search starts one
// below that bound (for its rounding) and steps to the exact first index by the very taps the
// kernels use.
template <typename coord_t>
HOST_DEVICE int64_t cell_begin(const UpsampleAxis<coord_t>& axis, int64_t i) {
  if (i == 0) return 0;
  if (i >= axis.in) return axis.out;
  const coord_t d = (static_cast<coord_t>(i) + coord_t(0.5)) * axis.inv_scale - coord_t(0.5);
  int64_t first = d < coord_t(1) ? 0 : static_cast<int64_t>(d) - 1;
  while (first < axis.out && upsample::tap(first, axis.scale, axis.in).i0 < i) ++first;
  return first;
}

// The input sample that corner tap `second` (0: i0, 1: i1) of cell i reads.
HOST_DEVICE int64_t corner_sample(int64_t i, int second, int64_t in) { return second && i + 1 < in ? i + 1 : i; }

// Strips of kStripRows rows per row cell, enough for a cell of ceil(out / in) rows; the last strip of a
// cell also takes any rows beyond (the first cell, s < 1, has about 1.5 out / in).
inline int64_t cell_strips(int64_t in, int64_t out) { return ceil_div(ceil_div(out, in), kStripRows); }

// Which channels a launch of UpsampledCellKernel covers: the old ones [0, Co), with y read at x's
// cells (y at x's resolution, or no distillation) or sampled per pixel (y at its own resolution), or
// the new ones [Co, C). Separate kernels, so that a group's channels take one code path.
enum class CellChannels { kOldOnCells, kOldSampled, kNew };

template <typename scalar_t, typename teacher_t, CellChannels kRange>
struct UpsampledCellKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  static constexpr int kChannels = kCellChannels<scalar_t>;
  static constexpr bool kOld = kRange != CellChannels::kNew;
  LogitInputs<scalar_t, teacher_t> in;
  BackwardBuffers<scalar_t> grad;

  // Blocks along grid x: (channel group of the range) x (blocks over the h * strips * w strips,
  // column cells fastest); images along grid y.
  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const UpsampleAxis<acc_t>& rows = in.up.x_rows;
    const UpsampleAxis<acc_t>& cols = in.up.x_cols;
    const int64_t items = rows.in * grad.cell_strips * cols.in;
    const int64_t item_blocks = ceil_div(items, kThreads);
    const int64_t q = (index.block_x % item_blocks) * kThreads + index.thread;
    if (q >= items) return;
    const int64_t b = index.block_y, c0 = (kOld ? 0 : in.Co) + index.block_x / item_blocks * kChannels;
    const int64_t c_end = kOld ? in.Co : in.C;
    const int64_t I = q / (grad.cell_strips * cols.in), strip = q / cols.in % grad.cell_strips, J = q % cols.in;
    const int64_t row_begin = cell_begin(rows, I) + strip * kStripRows, row_cell_end = cell_begin(rows, I + 1);
    const bool last = strip + 1 == grad.cell_strips;
    const int64_t row_end = !last && row_begin + kStripRows < row_cell_end ? row_begin + kStripRows : row_cell_end;
    acc_t corner[kChannels][kCorners] = {};
    if (row_begin < row_end) add_strip(b, J, row_begin, row_end, c0, c_end, corner);
    acc_t* out = grad.cell_sums + ((b * in.C + c0) * items + q) * kCorners;
    const int64_t channel_stride = items * kCorners;
    INCSEG_UNROLL
    for (int k = 0; k < kChannels; ++k) {
      if (c0 + k < c_end) store_pack<kCorners>(out + k * channel_stride, corner[k]);
    }
  }

  // One output row's values of x (and of y on x's cells) in a cell's two columns, per channel.
  struct CellRow {
    acc_t x[kChannels][2];
    acc_t y[kChannels][2];
  };

  // corner[k][2 r + s] += R_r K_s G[c0 + k] over the strip's rows [row_begin, row_end) of column cell J;
  // channels c0 + k >= c_end are computed on zeros and not stored.
  HOST_DEVICE void add_strip(int64_t b, int64_t J, int64_t row_begin, int64_t row_end, int64_t c0, int64_t c_end,
                             acc_t (&corner)[kChannels][kCorners]) const {
    const Upsampling<acc_t>& up = in.up;
    const int64_t col_begin = cell_begin(up.x_cols, J), col_end = cell_begin(up.x_cols, J + 1);
    const int64_t J1 = corner_sample(J, 1, up.x_cols.in), x_plane = up.x_rows.in * up.x_cols.in;
    const ScalarUpstream<acc_t> scalar = grad.per_pixel ? ScalarUpstream<acc_t>{} : scalar_upstream(grad);
    const KdFactors<acc_t> factors = kd_factors(in.kd, in.kd == KdMode::kBalanced ? in.log_gamma[b] : acc_t(0));
    const scalar_t* x = in.x + b * in.C * x_plane;
    const teacher_t* y = in.kd != KdMode::kNone ? in.y + b * in.Co * x_plane : nullptr;
    for (int64_t Y = row_begin; Y < row_end; ++Y) {
      const upsample::BasicTap<acc_t> row = upsample::tap(Y, up.x_rows.scale, up.x_rows.in);
      // Each channel's samples in the cell's two columns, mixed along the rows (rows first, as the
      // CPU kernels): a pixel's value is then one mix along its column tap.
      CellRow cell{};
      INCSEG_UNROLL
      for (int k = 0; k < kChannels; ++k) {
        const int64_t c = c0 + k;
        if (c >= c_end) continue;
        cell.x[k][0] = row_mix(x + c * x_plane, row, J);
        cell.x[k][1] = row_mix(x + c * x_plane, row, J1);
        if (kRange == CellChannels::kOldOnCells && y != nullptr) {
          cell.y[k][0] = row_mix(y + c * x_plane, row, J);
          cell.y[k][1] = row_mix(y + c * x_plane, row, J1);
        }
      }
      acc_t left[kChannels] = {}, right[kChannels] = {};  // sum over the row of K0 G, K1 G
      for (int64_t X = col_begin; X < col_end; ++X) {
        const upsample::BasicTap<acc_t> col = upsample::tap(X, up.x_cols.scale, up.x_cols.in);
        acc_t g[kChannels];
        pixel_grads(b, Y, X, col, c0, c_end, cell, scalar, factors, g);
        INCSEG_UNROLL
        for (int k = 0; k < kChannels; ++k) {
          left[k] += upsample::weight_times(acc_t(1) - col.l1, g[k]);
          right[k] += upsample::weight_times(col.l1, g[k]);
        }
      }
      INCSEG_UNROLL
      for (int k = 0; k < kChannels; ++k) {
        corner[k][0] += upsample::weight_times(acc_t(1) - row.l1, left[k]);
        corner[k][1] += upsample::weight_times(acc_t(1) - row.l1, right[k]);
        corner[k][2] += upsample::weight_times(row.l1, left[k]);
        corner[k][3] += upsample::weight_times(row.l1, right[k]);
      }
    }
  }

  // The samples of column j of `plane` (x's resolution; x or the teacher's y) that `row` reads, mixed
  // by its weights in acc_t.
  template <typename plane_t>
  HOST_DEVICE acc_t row_mix(const plane_t* plane, const upsample::BasicTap<acc_t>& row, int64_t j) const {
    const int64_t w = in.up.x_cols.in;
    return upsample::weight_times(acc_t(1) - row.l1, acc_t(to_accumulate(plane[row.i0 * w + j]))) +
           upsample::weight_times(row.l1, acc_t(to_accumulate(plane[row.i1 * w + j])));
  }

  // The value at a pixel whose column tap is `col`, from its row's two mixed columns.
  HOST_DEVICE static acc_t column_mix(const acc_t (&v)[2], const upsample::BasicTap<acc_t>& col) {
    return upsample::weight_times(acc_t(1) - col.l1, v[0]) + upsample::weight_times(col.l1, v[1]);
  }

  // g[k] = G[c0 + k] at output pixel (Y, X), whose column tap into x is `col` (its row's values in
  // `cell`).
  HOST_DEVICE void pixel_grads(int64_t b, int64_t Y, int64_t X, const upsample::BasicTap<acc_t>& col, int64_t c0,
                               int64_t c_end, const CellRow& cell, const ScalarUpstream<acc_t>& scalar,
                               const KdFactors<acc_t>& factors, acc_t (&g)[kChannels]) const {
    const bool with_kd = in.kd != KdMode::kNone, with_ce = in.ce != CeMode::kNone;
    const Upsampling<acc_t>& up = in.up;
    const int64_t p = Y * up.x_cols.out + X, pixel = b * in.HW + p;
    const acc_t* stats = grad.stats + b * kNumStats * in.HW + p;
    const int64_t y_plane = up.y_rows.in * up.y_cols.in;
    const teacher_t* y = with_kd ? in.y + b * in.Co * y_plane : nullptr;
    const PlaneTaps<acc_t> y_taps = PlaneTaps<acc_t>::at(up.y_rows, up.y_cols, Y, X);
    const PixelInputs<acc_t> px{stats[kStatLse * in.HW],
                                stats[kStatLseOld * in.HW],
                                stats[kStatLseBg * in.HW],
                                with_kd ? stats[kStatLseTeacher * in.HW] : acc_t(0),
                                grad.per_pixel ? grad.grad_ce[pixel] : scalar.ce,
                                grad.per_pixel ? grad.grad_kd[pixel] : scalar.kd,
                                in.mask != nullptr && with_kd ? in.mask[pixel] : acc_t(1),
                                with_kd ? y_taps.sample(y) : acc_t(0),
                                with_ce ? read_label(in.target, in.label_type, pixel) : -1};
    const PixelGradient<acc_t> pg = pixel_gradient(in, factors, px);
    INCSEG_UNROLL
    for (int k = 0; k < kChannels; ++k) {
      const int64_t c = c0 + k;
      const acc_t xc = column_mix(cell.x[k], col);
      if (!kOld) {
        g[k] = new_channel_grad(pg.f, c, xc);
      } else if (k == 0 && c == 0) {
        g[k] = channel0_grad(pg.k, xc, pg.q0, px.lse, px.lse_old, px.lse_bg, pg.f.label);
      } else {
        acc_t q = acc_t(0);
        if (with_kd) {
          const int64_t read = c < c_end ? c : c_end - 1;  // past the range: a valid row, not stored
          const acc_t yc =
              kRange == CellChannels::kOldOnCells ? column_mix(cell.y[k], col) : y_taps.sample(y + read * y_plane);
          q = lm_exp(scaled_teacher_logit(in.alpha, yc) - pg.f.lse_teacher);
        }
        g[k] = old_channel_grad(pg.f, c, xc, q);
      }
    }
  }
};

// dL/dx[c, i, j]: the corner sums of the cells that reach element (i, j), in a fixed order: row cell
// I = i - 1 (its second row tap reads i) then I = i (its first tap, and its second at the last row),
// each strip by strip, and in each the column cells likewise (corner_sums); rounded once to scalar_t.
template <typename scalar_t, typename teacher_t>
struct UpsampledGatherKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  LogitInputs<scalar_t, teacher_t> in;
  BackwardBuffers<scalar_t> grad;

  // One thread per element of dL/dx of one image (grid x), images along grid y.
  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t h = in.up.x_rows.in, w = in.up.x_cols.in;
    const int64_t q = index.first_pixel(1);
    if (q >= in.C * h * w) return;
    const int64_t b = index.block_y, c = q / (h * w), i = q / w % h, j = q % w;
    const int64_t cell_row = grad.cell_strips * w * kCorners;
    const acc_t* sums = grad.cell_sums + (b * in.C + c) * h * cell_row;
    acc_t total = 0;
    if (i > 0) total = corner_sums(sums + (i - 1) * cell_row, 1, j, w, total);
    total = corner_sums(sums + i * cell_row, 0, j, w, total);
    if (i + 1 == h) total = corner_sums(sums + i * cell_row, 1, j, w, total);
    grad.grad_x[b * in.C * h * w + q] = Storage<scalar_t>::from(total);
  }

  // total plus, over the strips of one row cell (`cell`), the corner sums of row tap r that reach
  // column j: column cell j - 1's second tap, then cell j's first (and its second at the last column).
  HOST_DEVICE acc_t corner_sums(const acc_t* cell, int r, int64_t j, int64_t w, acc_t total) const {
    for (int64_t strip = 0; strip < grad.cell_strips; ++strip) {
      const acc_t* row = cell + strip * w * kCorners + 2 * r;
      if (j > 0) total += row[(j - 1) * kCorners + 1];
      total += row[j * kCorners];
      if (j + 1 == w) total += row[j * kCorners + 1];
    }
    return total;
  }
};

// The launch of a kernel (all have 128-thread blocks) and the number of its warps (the forward's
// per-warp partials). Without size=, both kernels put blocks over one image's pixels on grid x,
// images on grid y, and 1 or kPackedPixels pixels (common/grid.h) on each thread. With size=, the
// forward has one output pixel per thread; the backward's UpsampledCellKernel puts (channel group,
// block of strips) on grid x, for the old channels (grid_x), then the new ones (new_cells_grid_x),
// and UpsampledGatherKernel blocks of dL/dx's elements (gather_grid_x).
struct LaunchPlan {
  int pixels_per_thread;
  int64_t grid_x;
  int64_t grid_y;
  int64_t warps;
  int64_t new_cells_grid_x = 0;
  int64_t gather_grid_x = 0;
  int64_t cell_strips = 0;  // strips per row cell (cell_strips)
  int64_t cell_sums = 0;    // the scratch of the corner sums, in accumulation-type values
};

template <typename scalar_t>
LaunchPlan plan_launch(int64_t batch, int64_t pixels, bool aligned_16_bytes) {
  using Kernel = LogitForwardKernel<scalar_t, SamePixels<scalar_t, scalar_t, 1>>;
  const int vec = aligned_16_bytes && pixels % kPackedPixels<scalar_t> == 0 ? kPackedPixels<scalar_t> : 1;
  const int64_t grid_x = ceil_div(pixels, int64_t(Kernel::kThreads) * vec);
  return LaunchPlan{vec, grid_x, batch, warps_in_grid<Kernel>(grid_x, batch)};
}

template <typename scalar_t, typename teacher_t>
LaunchPlan plan_forward(const LogitInputs<scalar_t, teacher_t>& in, bool aligned_16_bytes) {
  return plan_launch<scalar_t>(in.B, in.HW, aligned_16_bytes && !in.upsampled);
}

template <typename scalar_t, typename teacher_t>
LaunchPlan plan_backward(const LogitInputs<scalar_t, teacher_t>& in, bool aligned_16_bytes) {
  if (!in.upsampled) return plan_launch<scalar_t>(in.B, in.HW, aligned_16_bytes);
  using Kernel = UpsampledCellKernel<scalar_t, teacher_t, CellChannels::kNew>;
  const int64_t h = in.up.x_rows.in, w = in.up.x_cols.in, strips = cell_strips(h, in.up.x_rows.out);
  const int64_t item_blocks = ceil_div(h * strips * w, int64_t(Kernel::kThreads));
  const int64_t grid_x = item_blocks * ceil_div(in.Co, int64_t(Kernel::kChannels));
  const int64_t new_grid_x = item_blocks * ceil_div(in.C - in.Co, int64_t(Kernel::kChannels));
  const int64_t gather_grid_x = ceil_div(in.C * h * w, int64_t(UpsampledGatherKernel<scalar_t, teacher_t>::kThreads));
  return LaunchPlan{1,          grid_x,        in.B,   warps_in_grid<Kernel>(grid_x, in.B),
                    new_grid_x, gather_grid_x, strips, in.B * in.C * h * strips * w * kCorners};
}

// fn(kernel) with the forward kernel for the inputs and the plan (launched or emulated by the caller).
template <typename scalar_t, typename teacher_t, typename Fn>
void with_forward_kernel(const LogitInputs<scalar_t, teacher_t>& in, const ForwardBuffers<scalar_t>& out,
                         const LaunchPlan& plan, Fn&& fn) {
  if (in.upsampled) {
    fn(LogitForwardKernel<scalar_t, UpsampledPixel<scalar_t, teacher_t>>{in, out});
    return;
  }
  with_pixels_per_thread<scalar_t>(plan.pixels_per_thread, [&](auto vec) {
    fn(LogitForwardKernel<scalar_t, SamePixels<scalar_t, teacher_t, decltype(vec)::value>>{in, out});
  });
}

// fn(kernel, grid_x) for each backward kernel of the inputs and the plan, in launch order (grid y:
// plan.grid_y).
template <typename scalar_t, typename teacher_t, typename Fn>
void for_each_backward_kernel(const LogitInputs<scalar_t, teacher_t>& in, const BackwardBuffers<scalar_t>& grad,
                              const LaunchPlan& plan, Fn&& fn) {
  if (in.upsampled) {
    const bool y_on_cells =
        in.kd == KdMode::kNone || (in.up.y_rows.in == in.up.x_rows.in && in.up.y_cols.in == in.up.x_cols.in);
    if (y_on_cells) {
      fn(UpsampledCellKernel<scalar_t, teacher_t, CellChannels::kOldOnCells>{in, grad}, plan.grid_x);
    } else {
      fn(UpsampledCellKernel<scalar_t, teacher_t, CellChannels::kOldSampled>{in, grad}, plan.grid_x);
    }
    fn(UpsampledCellKernel<scalar_t, teacher_t, CellChannels::kNew>{in, grad}, plan.new_cells_grid_x);
    fn(UpsampledGatherKernel<scalar_t, teacher_t>{in, grad}, plan.gather_grid_x);
    return;
  }
  with_pixels_per_thread<scalar_t>(plan.pixels_per_thread, [&](auto vec) {
    fn(LogitBackwardKernel<scalar_t, teacher_t, decltype(vec)::value>{in, grad}, plan.grid_x);
  });
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
template <typename scalar_t, typename teacher_t>
int launch_logit_forward(const LogitInputs<scalar_t, teacher_t>& in, const ForwardBuffers<scalar_t>& out,
                         const ForwardTotals<accumulate_t<scalar_t>>& totals, const LaunchPlan& plan, void* stream);
template <typename scalar_t, typename teacher_t>
int launch_logit_backward(const LogitInputs<scalar_t, teacher_t>& in, const BackwardBuffers<scalar_t>& grad,
                          const LaunchPlan& plan, void* stream);

}  // namespace logit
}  // namespace incseg
