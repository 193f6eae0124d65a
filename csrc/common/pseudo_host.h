#pragma once
// Host side of the entropy pseudo-label ops (MATH.md#pseudo-labels) shared by every device's torch
// glue: argument checks, resolutions, outputs and the adaptive factor from the pixel counts. No
// kernels and nothing CPU-specific: the CUDA glue includes it too.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace incseg {
namespace pseudo {

// The checked inputs, contiguous. y is (B, Co, yh, yw); labels and outputs are (B, H, W): without
// size= (yh, yw) == (H, W), with size=[H, W] y is upsampled to it on the fly (MATH.md#upsampling).
struct Inputs {
  at::Tensor y, labels, thresholds;
  int64_t B = 0, Co = 0, H = 0, W = 0, HW = 0, yh = 0, yw = 0;
  bool upsample = false;
  int64_t ignore_index = 255;
  at::ScalarType acc_dtype = at::kFloat;  // float32, float64 for float64 y

  // 1 / log Co, and 0 for Co == 1 (one class: u = 0).
  double inv_log_classes() const { return Co > 1 ? 1.0 / std::log(static_cast<double>(Co)) : 0.0; }
};

inline Inputs check_inputs(const at::Tensor& y, const at::Tensor& labels, int64_t ignore_index,
                           at::OptionalIntArrayRef size) {
  Inputs in;
  TORCH_CHECK_VALUE(y.dim() == 4, "y must be (B, Co, h, w), got ", y.sizes());
  const auto dt = y.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "y must be float16, bfloat16, float32 or float64, got ", dt);
  in.acc_dtype = at::toOpMathType(dt);
  in.B = y.size(0);
  in.Co = y.size(1);
  in.yh = y.size(2);
  in.yw = y.size(3);
  TORCH_CHECK_VALUE(in.Co >= 1 && in.Co <= INT32_MAX, "y must have at least one channel, got ", y.sizes());
  in.upsample = size.has_value();
  if (in.upsample) {
    TORCH_CHECK_VALUE(size->size() == 2, "size must be [H, W], got ", *size);
    in.H = (*size)[0];
    in.W = (*size)[1];
    TORCH_CHECK_VALUE(in.yh >= 1 && in.yw >= 1 && in.H >= in.yh && in.W >= in.yw,
                      "size=[H, W] must be at least y's resolution (h, w) >= 1 (no downsampling), got size=", *size,
                      " for y of shape ", y.sizes());
  } else {
    in.H = in.yh;
    in.W = in.yw;
  }
  in.HW = in.H * in.W;
  const auto lt = labels.scalar_type();
  TORCH_CHECK_TYPE(lt == at::kLong || lt == at::kInt || lt == at::kByte, "labels must be int64, int32 or uint8, got ",
                   lt);
  TORCH_CHECK_VALUE(labels.dim() == 3 && labels.size(0) == in.B && labels.size(1) == in.H && labels.size(2) == in.W,
                    "labels must be (B, H, W) = (", in.B, ", ", in.H, ", ", in.W, "), got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == y.device(), "labels must be on y's device");
  in.y = y.contiguous();
  in.labels = labels.contiguous();
  in.ignore_index = ignore_index;
  return in;
}

inline void check_thresholds(Inputs& in, const at::Tensor& thresholds) {
  TORCH_CHECK_VALUE(thresholds.dim() == 1 && thresholds.size(0) == in.Co, "thresholds must be (Co,) = (", in.Co,
                    "), got ", thresholds.sizes());
  TORCH_CHECK_TYPE(thresholds.scalar_type() == at::kFloat, "thresholds must be float32, got ",
                   thresholds.scalar_type());
  TORCH_CHECK_VALUE(thresholds.device() == in.y.device(), "thresholds must be on y's device");
  in.thresholds = thresholds.to(in.acc_dtype).contiguous();
}

// The in-place form writes the pseudo-labels into labels itself: int64 (the labels' dtype) and
// contiguous (check_inputs' contiguous() would otherwise write into a copy).
inline void check_in_place_labels(const at::Tensor& labels) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64 to take the pseudo-labels in place, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.is_contiguous(), "labels must be contiguous to take the pseudo-labels in place");
}

inline void check_bins(int64_t bins) {
  TORCH_CHECK_VALUE(bins >= 1 && bins <= INT32_MAX, "bins must be in [1, 2^31), got ", bins);
}

// PLOP's classif_adaptive_factor from the per-image counts (B, 2) int64 = (confident, background):
// the ratio in float64, rounded once to float32 (MATH.md#pseudo-labels).
inline at::Tensor adaptive_factor(const at::Tensor& counts) {
  const at::Tensor c = counts.to(at::kDouble);
  return (c.select(1, 0) / (c.select(1, 1) + 1e-6)).to(at::kFloat);
}

}  // namespace pseudo
}  // namespace incseg
