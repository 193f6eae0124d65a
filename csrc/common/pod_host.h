#pragma once
// Host side of Local POD (MATH.md#local-pod) shared by every device's torch glue: argument checks,
// the geometry, the reduction, the saved state's checks and allocation. Schemas and the saved
// state's layout: csrc/ops.cpp and common/pod_math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <string>

#include "common/pod_math.h"

namespace incseg {
namespace pod {

// new, old (B, C, H, W) non-empty, one float dtype and device; scales valid for (H, W).
inline Geometry check_forward(const at::Tensor& new_features, const at::Tensor& old_features, at::IntArrayRef scales) {
  TORCH_CHECK(new_features.dim() == 4, "new must be (B, C, H, W), got ", new_features.sizes());
  TORCH_CHECK(old_features.sizes() == new_features.sizes(), "old must have new's shape ", new_features.sizes(),
              ", got ", old_features.sizes());
  const auto dt = new_features.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "new must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(old_features.scalar_type() == dt && old_features.device() == new_features.device(),
              "new and old must share one dtype and device");
  TORCH_CHECK(new_features.numel() > 0, "local_pod needs non-empty features, got ", new_features.sizes());
  const int64_t height = new_features.size(2), width = new_features.size(3);
  TORCH_CHECK(!scales.empty() && static_cast<int64_t>(scales.size()) <= kMaxScales, "scales must hold 1 to ",
              kMaxScales, " values, got ", scales.size());
  for (const int64_t s : scales) {
    TORCH_CHECK(s >= 1 && s <= height && s <= width, "every scale must be in [1, min(H, W)] = [1, ",
                std::min(height, width), "], got ", s);
  }
  return make_geometry(height, width, scales.data(), static_cast<int>(scales.size()));
}

// "mean" divides the sum of the per-image distances by B; "sum" and "none" by 1.
inline double reduction_scale(c10::string_view reduction, int64_t batch) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "reduction must be 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
  return reduction == "mean" ? 1.0 / static_cast<double>(batch) : 1.0;
}

// What the forward returns: the loss and the saved state, in the accumulation dtype.
struct ForwardOutputs {
  at::Tensor loss;      // 0-dim, or (B,) for "none"
  at::Tensor inv_norm;  // (B,)
};

inline ForwardOutputs allocate_forward(const at::Tensor& new_features, c10::string_view reduction) {
  const auto options = new_features.options().dtype(at::toOpMathType(new_features.scalar_type()));
  const int64_t batch = new_features.size(0);
  return {reduction == "none" ? at::empty({batch}, options) : at::empty({}, options), at::empty({batch}, options)};
}

// The pooled differences (B, C, pooled) of the devices that pool a whole batch at once, in the
// accumulation dtype: scratch of one forward or backward call.
inline at::Tensor allocate_pooled(const at::Tensor& new_features, const Geometry& g) {
  const auto options = new_features.options().dtype(at::toOpMathType(new_features.scalar_type()));
  return at::empty({new_features.size(0), new_features.size(1), g.pooled}, options);
}

// Every check of the backward's arguments; returns the geometry and the reduction's scale.
struct BackwardSetup {
  Geometry geometry;
  double scale;
};

inline BackwardSetup check_backward(const at::Tensor& grad_loss, const at::Tensor& new_features,
                                    const at::Tensor& old_features, const at::Tensor& inv_norm, at::IntArrayRef scales,
                                    c10::string_view reduction) {
  const Geometry g = check_forward(new_features, old_features, scales);
  const int64_t batch = new_features.size(0);
  const double scale = reduction_scale(reduction, batch);
  const auto acc = at::toOpMathType(new_features.scalar_type());
  TORCH_CHECK(reduction == "none" ? grad_loss.sizes() == at::IntArrayRef({batch}) : grad_loss.numel() == 1,
              "grad_loss must be shaped like the loss");
  TORCH_CHECK(inv_norm.sizes() == at::IntArrayRef({batch}) && inv_norm.scalar_type() == acc &&
                  inv_norm.is_contiguous() && inv_norm.device() == new_features.device(),
              "inv_norm must be the forward's (B,) saved inverse distances");
  return {g, scale};
}

// The upstream gradient per image on new's device, in the accumulation dtype: (B,) for "none",
// else the scalar repeated.
inline at::Tensor upstream_per_image(const at::Tensor& grad_loss, const at::Tensor& new_features) {
  const auto acc = at::toOpMathType(new_features.scalar_type());
  return grad_loss.to(new_features.device(), acc).reshape({-1}).expand({new_features.size(0)}).contiguous();
}

}  // namespace pod
}  // namespace incseg
