#pragma once
// Host side of the logit-loss ops (MATH.md#logit-losses) shared by every device's torch glue: mode parsing,
// argument checks, output shapes and allocation, reduction scales. No kernels and nothing
// CPU-specific (no OpenMP, no cpu/toolkit.h): CUDA glue includes it too.
//
// Reduction scales. "sum" scales by 1. KD's "mean" divides by B*H*W, known on the host
// (kd_scale). CE's "mean" divides by valid_count, the number of non-ignored pixels, which only the
// forward knows: it stays a (device) tensor, and kernels divide by max(valid_count, 1) where they
// read it (logit_math.h ce_mean_scale), so no device-to-host sync is needed. With no valid pixel
// every per-pixel CE term is 0, so the loss and its gradient are 0.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/logit_math.h"
#include "common/teacher_dtype.h"

namespace incseg {
namespace logit {

inline CeMode parse_ce(c10::string_view s) {
  if (s == "unbiased") return CeMode::kUnbiased;
  if (s == "plain") return CeMode::kPlain;
  if (s == "none") return CeMode::kNone;
  TORCH_CHECK_VALUE(false, "ce must be one of 'unbiased', 'plain', 'none', got '", s, "'");
}

inline KdMode parse_kd(c10::string_view s) {
  if (s == "unbiased") return KdMode::kUnbiased;
  if (s == "balanced") return KdMode::kBalanced;
  if (s == "plain") return KdMode::kPlain;
  if (s == "none") return KdMode::kNone;
  TORCH_CHECK_VALUE(false, "kd must be one of 'unbiased', 'balanced', 'plain', 'none', got '", s, "'");
}

inline Reduction parse_reduction(c10::string_view s) {
  if (s == "mean") return Reduction::kMean;
  if (s == "sum") return Reduction::kSum;
  if (s == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'none', got '", s, "'");
}

// The checked inputs of either op, contiguous, on x's device. target is defined iff ce != none,
// y iff kd != none, in x's dtype or the wider one of common/teacher_dtype.h (read in its own, no
// copy); log_gamma (balanced KD) and mask are converted to acc_dtype.
// Resolutions: H, W (HW = H*W pixels) is the output resolution, that of target, mask, the
// per-pixel losses and stats. x is (B, C, h, w) and y (B, Co, yh, yw); without size= all three
// equal H, W, and with size=[H, W] (upsample) x and y are bilinearly upsampled to H, W on the fly
// (MATH.md#upsampling).
struct Inputs {
  at::Tensor x, target, y, log_gamma, mask;
  int64_t B = 0, C = 0, Co = 0, H = 0, W = 0, HW = 0;
  int64_t h = 0, w = 0, yh = 0, yw = 0;
  bool upsample = false;
  CeMode ce = CeMode::kNone;
  KdMode kd = KdMode::kNone;
  Reduction reduction = Reduction::kMean;
  at::ScalarType acc_dtype = at::kFloat;      // float32, float64 for float64 x
  at::ScalarType teacher_dtype = at::kFloat;  // y's dtype; x's without distillation
};

// (B, H, W): the shape of target, mask and of per-pixel losses.
inline std::vector<int64_t> pixel_shape(const Inputs& in) { return {in.B, in.H, in.W}; }

inline at::Tensor checked_target(const at::Tensor& x, const std::optional<at::Tensor>& target, at::IntArrayRef pixels) {
  TORCH_CHECK_VALUE(target.has_value(), "target is required when ce != 'none'");
  const auto lt = target->scalar_type();
  TORCH_CHECK_TYPE(lt == at::kLong || lt == at::kInt || lt == at::kByte, "target must be int64, int32 or uint8, got ",
                   lt);
  TORCH_CHECK_VALUE(target->sizes() == pixels, "target must be (B, H, W) = ", pixels, ", got ", target->sizes());
  TORCH_CHECK_VALUE(target->device() == x.device(), "target must be on x's device");
  return target->contiguous();
}

inline at::Tensor checked_teacher(const Inputs& in, const std::optional<at::Tensor>& y) {
  TORCH_CHECK_VALUE(y.has_value(), "y is required when kd != 'none'");
  TORCH_CHECK_VALUE(y->dim() == 4 && y->size(0) == in.B && y->size(1) == in.Co, "y must be (B, old_classes, ",
                    in.upsample ? "h', w'" : "H, W", ") with B=", in.B, ", old_classes=", in.Co, ", got ", y->sizes());
  if (in.upsample) {
    TORCH_CHECK_VALUE(y->size(2) >= 1 && y->size(3) >= 1 && y->size(2) <= in.H && y->size(3) <= in.W,
                      "y must have a resolution (h', w') with 1 <= h' <= H, 1 <= w' <= W for size=[H, W] = [", in.H,
                      ", ", in.W, "] (downsampling is not supported), got ", y->sizes());
  } else {
    TORCH_CHECK_VALUE(y->size(2) == in.H && y->size(3) == in.W, "y must be (B, old_classes, H, W) = (", in.B, ", ",
                      in.Co, ", ", in.H, ", ", in.W, "), got ", y->sizes());
  }
  check_teacher_dtype(in.x.scalar_type(), y->scalar_type(), "x", "y");
  TORCH_CHECK_VALUE(y->device() == in.x.device(), "y must be on x's device");
  return y->contiguous();
}

inline at::Tensor checked_mask(const Inputs& in, const at::Tensor& mask) {
  const auto pixels = pixel_shape(in);
  TORCH_CHECK_VALUE(mask.sizes() == at::IntArrayRef(pixels), "mask must be (B, H, W) = ", at::IntArrayRef(pixels),
                    ", got ", mask.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(mask.scalar_type()), "mask must be floating, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == in.x.device(), "mask must be on x's device");
  return mask.to(in.acc_dtype).contiguous();
}

// log gamma of balanced KD (MATH.md#bkd-gamma): the log, since gamma itself overflows float32 for a
// teacher whose pooled logits favour a class by ~89 or more.
inline at::Tensor checked_log_gamma(const Inputs& in, const std::optional<at::Tensor>& log_gamma) {
  TORCH_CHECK_VALUE(log_gamma.has_value(), "log_gamma is required when kd == 'balanced'");
  TORCH_CHECK_VALUE(log_gamma->dim() == 1 && log_gamma->size(0) == in.B, "log_gamma must be (B,) = (", in.B, "), got ",
                    log_gamma->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(log_gamma->scalar_type()), "log_gamma must be floating, got ",
                   log_gamma->scalar_type());
  TORCH_CHECK_VALUE(log_gamma->device() == in.x.device(), "log_gamma must be on x's device");
  return log_gamma->to(in.acc_dtype).contiguous();
}

// The output resolution: size=[H, W] when given (checked against x's h, w), else x's own.
inline void set_resolutions(Inputs& in, const at::Tensor& x, at::OptionalIntArrayRef size) {
  in.h = x.size(2);
  in.w = x.size(3);
  in.upsample = size.has_value();
  if (!in.upsample) {
    in.H = in.h;
    in.W = in.w;
    return;
  }
  TORCH_CHECK_VALUE(size->size() == 2, "size must be [H, W], got ", *size);
  in.H = (*size)[0];
  in.W = (*size)[1];
  TORCH_CHECK_VALUE(in.H >= 1 && in.W >= 1, "size must be [H, W] with H, W >= 1, got ", *size);
  TORCH_CHECK_VALUE(in.h >= 1 && in.w >= 1, "size= needs x with a resolution h, w >= 1, got x of shape ", x.sizes());
  TORCH_CHECK_VALUE(in.H >= in.h && in.W >= in.w, "size=[H, W] must not be smaller than x's resolution (", in.h, ", ",
                    in.w, "): downsampling is not supported, got size=", *size);
}

// The arguments both ops share, checked; messages name the argument.
inline Inputs check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& target,
                           const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& log_gamma,
                           const std::optional<at::Tensor>& mask, int64_t old_classes, c10::string_view ce,
                           c10::string_view kd, c10::string_view reduction, at::OptionalIntArrayRef size) {
  Inputs in;
  in.ce = parse_ce(ce);
  in.kd = parse_kd(kd);
  in.reduction = parse_reduction(reduction);
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be (B, C, ", size.has_value() ? "h, w" : "H, W", "), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "x must be float16, bfloat16, float32 or float64, got ", dt);
  in.acc_dtype = at::toOpMathType(dt);
  in.B = x.size(0);
  in.C = x.size(1);
  set_resolutions(in, x, size);
  in.HW = in.H * in.W;
  in.Co = old_classes;
  TORCH_CHECK_VALUE(1 <= old_classes && old_classes <= in.C, "old_classes must be in [1, C=", in.C, "], got ",
                    old_classes);
  in.x = x.contiguous();
  in.teacher_dtype = dt;
  if (in.ce != CeMode::kNone) in.target = checked_target(x, target, pixel_shape(in));
  if (in.kd != KdMode::kNone) {
    in.y = checked_teacher(in, y);
    in.teacher_dtype = in.y.scalar_type();
    in.yh = in.y.size(2);
    in.yw = in.y.size(3);
    if (mask.has_value()) in.mask = checked_mask(in, *mask);
  }
  if (in.kd == KdMode::kBalanced) in.log_gamma = checked_log_gamma(in, log_gamma);
  return in;
}

// () for "mean" and "sum", (B, H, W) for "none": the shape of each loss and of its upstream gradient.
inline std::vector<int64_t> loss_shape(const Inputs& in) {
  return in.reduction == Reduction::kNone ? pixel_shape(in) : std::vector<int64_t>{};
}

// (B, kNumStats, H, W): the per-pixel statistics the forward saves for the backward.
inline std::vector<int64_t> stats_shape(const Inputs& in) { return {in.B, kNumStats, in.H, in.W}; }

// The backward's own arguments: upstream gradients of the loss shape, the forward's saved state.
inline void check_backward(const Inputs& in, const at::Tensor& grad_ce, const at::Tensor& grad_kd,
                           const at::Tensor& stats, const at::Tensor& valid_count) {
  const auto losses = loss_shape(in);
  TORCH_CHECK_VALUE(grad_ce.sizes() == at::IntArrayRef(losses), "grad_ce must have the loss shape ",
                    at::IntArrayRef(losses), ", got ", grad_ce.sizes());
  TORCH_CHECK_VALUE(grad_kd.sizes() == at::IntArrayRef(losses), "grad_kd must have the loss shape ",
                    at::IntArrayRef(losses), ", got ", grad_kd.sizes());
  for (const at::Tensor* grad : {&grad_ce, &grad_kd}) {
    TORCH_CHECK_VALUE(grad->device() == in.x.device(), "grad_ce and grad_kd must be on x's device");
  }
  const auto saved = stats_shape(in);
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef(saved) && stats.scalar_type() == in.acc_dtype,
                    "stats must be the (B, ", kNumStats, ", H, W) ", in.acc_dtype,
                    " statistics saved by logit_losses_fwd, got ", stats.sizes(), " ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.device() == in.x.device(), "stats must be on x's device");
  TORCH_CHECK_VALUE(valid_count.numel() == 1 && valid_count.scalar_type() == at::kLong,
                    "valid_count must be the int64 scalar saved by logit_losses_fwd, got ", valid_count.sizes(), " ",
                    valid_count.scalar_type());
  TORCH_CHECK_VALUE(valid_count.device() == in.x.device(), "valid_count must be on x's device");
}

// Scale of the KD term for the reduction: 1/(B*H*W) for "mean", else 1. (CE: see the top of the file.)
inline double kd_scale(const Inputs& in) {
  return in.reduction == Reduction::kMean ? 1.0 / static_cast<double>(in.B * in.HW) : 1.0;
}

// What the forward writes besides the two reduced losses: the saved statistics and, for
// reduction "none", the per-pixel losses (undefined otherwise).
struct ForwardTensors {
  at::Tensor stats;
  at::Tensor ce_map;
  at::Tensor kd_map;
};

inline ForwardTensors allocate_forward_outputs(const Inputs& in) {
  const auto options = in.x.options().dtype(in.acc_dtype);
  ForwardTensors out;
  out.stats = at::empty(stats_shape(in), options);
  if (in.reduction == Reduction::kNone) {
    out.ce_map = at::empty(pixel_shape(in), options);
    out.kd_map = at::empty(pixel_shape(in), options);
  }
  return out;
}

}  // namespace logit
}  // namespace incseg
