#pragma once
// Host side of attentive distillation (MATH.md#ad) and structured attention (MATH.md#sab) shared by
// every device's torch glue: argument checks, the reduction scale, the checks of the state the
// forward saves for the backward, and output allocation. No kernels and nothing CPU-specific:
// CUDA glue includes it too. Schemas and the saved-state layout are in csrc/ops.cpp:
//   spatial    (3, B, H, W)  Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g
//   inv_norm   (2, B)        1/N_f, 1/N_g (0 where N == 0)
//   pixel_grad (2, B, H, W)  P_f = sum_c D a_c f, P_g = sum_c D b_c g; empty unless save_spatial_grad
// all in the accumulation dtype (float32, float64 for float64 features) and contiguous.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <string>

#include "common/teacher_dtype.h"

namespace incseg {
namespace attention {

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64, got ", dt);
}

// f, g (B, C, H, W) non-empty; a, b (B, C); one device. The student's f, a share one float dtype, the
// teacher's g, b f's or the wider one of common/teacher_dtype.h.
inline void check_feature_pair(const at::Tensor& f, const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(f.dim() == 4, "f must be (B, C, H, W), got ", f.sizes());
  TORCH_CHECK(g.sizes() == f.sizes(), "g must have f's shape ", f.sizes(), ", got ", g.sizes());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == f.size(0) && a.size(1) == f.size(1), "a must be (B, C) = (", f.size(0), ", ",
              f.size(1), "), got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), "b must have a's shape ", a.sizes(), ", got ", b.sizes());
  check_float_dtype(f, "f");
  check_teacher_dtype(f.scalar_type(), g.scalar_type(), "f", "g");
  TORCH_CHECK(a.scalar_type() == f.scalar_type() && b.scalar_type() == g.scalar_type(),
              "a must have f's dtype and b g's");
  for (const at::Tensor* t : {&g, &a, &b}) {
    TORCH_CHECK(t->device() == f.device(), "f, g, a, b must be on one device");
  }
  TORCH_CHECK(f.numel() > 0, "attentive_distillation needs non-empty features, got ", f.sizes());
}

// L = scale * sum D^2: 1/(B*C*H*W) for "mean", 1 for "sum".
inline double reduction_scale(c10::string_view reduction, const at::Tensor& f) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "reduction must be 'mean' or 'sum', got '",
              std::string(reduction), "'");
  return reduction == "mean" ? 1.0 / static_cast<double>(f.numel()) : 1.0;
}

// What the forward saves; pixel_grad is empty unless save_spatial_grad.
struct SavedState {
  at::Tensor spatial;
  at::Tensor inv_norm;
  at::Tensor pixel_grad;
};

inline SavedState allocate_saved_state(const at::Tensor& f, bool save_spatial_grad) {
  const auto options = f.options().dtype(at::toOpMathType(f.scalar_type()));
  const int64_t batch = f.size(0), height = f.size(2), width = f.size(3);
  SavedState state;
  state.spatial = at::empty({3, batch, height, width}, options);
  state.inv_norm = at::empty({2, batch}, options);
  state.pixel_grad = save_spatial_grad ? at::empty({2, batch, height, width}, options) : at::empty({0}, options);
  return state;
}

// The backward reads pixel_grad only to chain through the spatial maps into df or dg.
inline bool backward_reads_pixel_grad(bool spatial_chain, const std::array<bool, 4>& output_mask) {
  return spatial_chain && (output_mask[0] || output_mask[1]);
}

// The backward's own arguments: a scalar upstream gradient and the state saved by the forward of
// these f (already checked with check_feature_pair).
inline void check_saved_state(const at::Tensor& f, const at::Tensor& grad_loss, const at::Tensor& spatial,
                              const at::Tensor& inv_norm, const at::Tensor& pixel_grad, bool reads_pixel_grad) {
  const auto acc_dtype = at::toOpMathType(f.scalar_type());
  const int64_t batch = f.size(0), height = f.size(2), width = f.size(3);
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar");
  TORCH_CHECK(spatial.sizes() == at::IntArrayRef({3, batch, height, width}) && spatial.scalar_type() == acc_dtype &&
                  spatial.is_contiguous() && spatial.device() == f.device(),
              "spatial must be the forward's (3, B, H, W) saved maps");
  TORCH_CHECK(inv_norm.sizes() == at::IntArrayRef({2, batch}) && inv_norm.scalar_type() == acc_dtype &&
                  inv_norm.is_contiguous() && inv_norm.device() == f.device(),
              "inv_norm must be the forward's (2, B) saved norms");
  if (reads_pixel_grad) {
    TORCH_CHECK(pixel_grad.sizes() == at::IntArrayRef({2, batch, height, width}) &&
                    pixel_grad.scalar_type() == acc_dtype && pixel_grad.is_contiguous() &&
                    pixel_grad.device() == f.device(),
                "pixel_grad must be the forward's (2, B, H, W) saved pixel gradients (forward with save_spatial_grad)");
  }
}

// Every check of the backward op's arguments. Returns what a device's backward needs from them:
// the reduction's scale and whether pixel_grad is read.
struct BackwardSetup {
  double scale;
  bool reads_pixel_grad;
};

inline BackwardSetup check_backward(const at::Tensor& grad_loss, const at::Tensor& f, const at::Tensor& g,
                                    const at::Tensor& a, const at::Tensor& b, const at::Tensor& spatial,
                                    const at::Tensor& inv_norm, const at::Tensor& pixel_grad,
                                    c10::string_view reduction, bool spatial_chain,
                                    const std::array<bool, 4>& output_mask) {
  check_feature_pair(f, g, a, b);
  const BackwardSetup setup{reduction_scale(reduction, f), backward_reads_pixel_grad(spatial_chain, output_mask)};
  check_saved_state(f, grad_loss, spatial, inv_norm, pixel_grad, setup.reads_pixel_grad);
  return setup;
}

// v (B, C, H, W); a_ch (B, C); a_sp (B, H, W); one float dtype and one device.
inline void check_structured(const at::Tensor& v, const at::Tensor& a_ch, const at::Tensor& a_sp) {
  TORCH_CHECK(v.dim() == 4, "v must be (B, C, H, W), got ", v.sizes());
  TORCH_CHECK(a_ch.dim() == 2 && a_ch.size(0) == v.size(0) && a_ch.size(1) == v.size(1), "a_ch must be (B, C) = (",
              v.size(0), ", ", v.size(1), "), got ", a_ch.sizes());
  TORCH_CHECK(a_sp.dim() == 3 && a_sp.size(0) == v.size(0) && a_sp.size(1) == v.size(2) && a_sp.size(2) == v.size(3),
              "a_sp must be (B, H, W) = (", v.size(0), ", ", v.size(2), ", ", v.size(3), "), got ", a_sp.sizes());
  check_float_dtype(v, "v");
  TORCH_CHECK(a_ch.scalar_type() == v.scalar_type() && a_sp.scalar_type() == v.scalar_type(),
              "v, a_ch, a_sp must share one dtype");
  TORCH_CHECK(a_ch.device() == v.device() && a_sp.device() == v.device(), "v, a_ch, a_sp must be on one device");
}

inline void check_structured_grad(const at::Tensor& grad_out, const at::Tensor& v) {
  TORCH_CHECK(
      grad_out.sizes() == v.sizes() && grad_out.scalar_type() == v.scalar_type() && grad_out.device() == v.device(),
      "grad_out must match v in shape, dtype and device");
}

// A contiguous gradient shaped like `like`, or an empty tensor where the output mask says unwanted.
inline at::Tensor gradient_or_empty(bool wanted, const at::Tensor& like) {
  return wanted ? at::empty_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, like.options());
}

}  // namespace attention
}  // namespace incseg
