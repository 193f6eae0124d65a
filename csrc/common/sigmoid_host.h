#pragma once
// Host side of the sigmoid-loss ops (MATH.md#sigmoid-losses) shared by every device's torch glue:
// argument parsing and checks (messages name the argument), and the reduction of the per-pixel
// terms' totals. No kernels and nothing CPU-specific: the CUDA glue includes it too.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/sigmoid_math.h"

namespace incseg {
namespace sigmoid {

inline Reduction parse_reduction(c10::string_view s) {
  if (s == "mean") return Reduction::kMean;
  if (s == "sum") return Reduction::kSum;
  if (s == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'none', got '", s, "'");
}

inline bool parse_skip_ignored(c10::string_view s) {
  if (s == "skip") return true;
  if (s == "negative") return false;
  TORCH_CHECK_VALUE(false, "ignored_pixels must be 'skip' or 'negative', got '", s, "'");
}

// The checked arguments of both ops. H, W is the output resolution (labels, per-pixel losses);
// x is (B, C, h, w) and y (B, Co, yh, yw), equal to H, W without size=.
struct Inputs {
  at::Tensor x, target, y, pos_weight, channel_weight;  // target int64; weights (C,) in acc_dtype
  Layout layout;
  PseudoRule pseudo;
  int64_t ignore_index = 255;
  bool skip_ignored = true;
  Reduction reduction = Reduction::kMean;
  int64_t B = 0, H = 0, W = 0, h = 0, w = 0, yh = 0, yw = 0;
  bool upsample = false;
  at::ScalarType acc_dtype = at::kFloat;
};

inline at::Tensor checked_weight(const std::optional<at::Tensor>& weight, const char* name, const Inputs& in) {
  if (!weight.has_value()) return at::ones({in.layout.C}, in.x.options().dtype(in.acc_dtype));
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == in.layout.C, name, " must be (C,) = (", in.layout.C,
                    "), got ", weight->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), name, " must be floating, got ", weight->scalar_type());
  return weight->to(in.x.device(), in.acc_dtype).contiguous();
}

inline void set_resolutions(Inputs& in, at::OptionalIntArrayRef size) {
  in.h = in.x.size(2);
  in.w = in.x.size(3);
  in.upsample = size.has_value();
  in.H = in.upsample ? (*size)[0] : in.h;
  in.W = in.upsample ? (*size)[1] : in.w;
  if (!in.upsample) return;
  TORCH_CHECK_VALUE(size->size() == 2, "size must be [H, W], got ", *size);
  TORCH_CHECK_VALUE(in.h >= 1 && in.w >= 1 && in.H >= in.h && in.W >= in.w,
                    "size=[H, W] must be at least x's resolution (h, w >= 1; downsampling is not supported), got size=",
                    *size, " for x of shape ", in.x.sizes());
}

inline void check_labels(Inputs& in, const std::optional<at::Tensor>& target) {
  TORCH_CHECK_VALUE(target.has_value(), "target is required with label channels or pseudo-labels");
  const auto lt = target->scalar_type();
  TORCH_CHECK_TYPE(lt == at::kLong || lt == at::kInt || lt == at::kByte, "target must be int64, int32 or uint8, got ",
                   lt);
  TORCH_CHECK_VALUE(target->sizes() == at::IntArrayRef({in.B, in.H, in.W}), "target must be (B, H, W) = (", in.B, ", ",
                    in.H, ", ", in.W, "), got ", target->sizes());
  // int64 values compare with ignore_index as integers (an ignore_index outside the labels' dtype matches none).
  in.target = target->to(at::kLong).contiguous();
  const auto bad = (in.target.lt(0) | in.target.ge(in.layout.C)) & in.target.ne(in.ignore_index);
  TORCH_CHECK_VALUE(!bad.any().item<bool>(), "target has labels outside [0, C=", in.layout.C,
                    ") that are not ignore_index=", in.ignore_index);
}

inline void check_teacher(Inputs& in, const std::optional<at::Tensor>& y) {
  TORCH_CHECK_VALUE(y.has_value(), "y is required with soft-target channels or pseudo-labels");
  TORCH_CHECK_VALUE(y->dim() == 4 && y->size(0) == in.B && y->size(1) >= 1 && y->size(1) <= in.layout.C &&
                        y->size(1) >= in.layout.label_channels_from,
                    "y must be (B, Co, h', w') with max(1, label_channels_from) <= Co <= C, got ", y->sizes());
  TORCH_CHECK_VALUE(in.upsample ? (y->size(2) >= 1 && y->size(3) >= 1 && y->size(2) <= in.H && y->size(3) <= in.W)
                                : (y->size(2) == in.H && y->size(3) == in.W),
                    "y's resolution must be x's (or, with size=, at most [H, W]), got ", y->sizes());
  TORCH_CHECK_TYPE(y->scalar_type() == in.x.scalar_type(), "y must have x's dtype");
  in.y = y->contiguous();
  in.layout.Co = in.y.size(1);
  in.yh = in.y.size(2);
  in.yw = in.y.size(3);
}

inline Inputs check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& target,
                           const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& pos_weight,
                           const std::optional<at::Tensor>& channel_weight, int64_t negative_channels,
                           int64_t label_channels_from, std::optional<double> pseudo_threshold,
                           int64_t pseudo_background, int64_t ignore_index, c10::string_view ignored_pixels,
                           c10::string_view reduction, at::OptionalIntArrayRef size) {
  Inputs in;
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (B, C, h, w), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "x must be float16, bfloat16, float32 or float64, got ", dt);
  in.x = x.contiguous();
  in.acc_dtype = at::toOpMathType(dt);
  in.B = x.size(0);
  in.layout.C = x.size(1);
  in.layout.negative_channels = negative_channels;
  in.layout.label_channels_from = label_channels_from;
  TORCH_CHECK_VALUE(
      0 <= negative_channels && negative_channels <= label_channels_from && label_channels_from <= in.layout.C,
      "need 0 <= negative_channels <= label_channels_from <= C=", in.layout.C, ", got ", negative_channels, ", ",
      label_channels_from);
  in.ignore_index = ignore_index;
  in.skip_ignored = parse_skip_ignored(ignored_pixels);
  in.reduction = parse_reduction(reduction);
  if (pseudo_threshold.has_value()) {
    TORCH_CHECK_VALUE(*pseudo_threshold >= 0 && *pseudo_threshold <= 1, "pseudo_threshold must be in [0, 1], got ",
                      *pseudo_threshold);
    TORCH_CHECK_VALUE(pseudo_background >= 1, "pseudo_background must be >= 1, got ", pseudo_background);
    in.pseudo = PseudoRule{*pseudo_threshold, pseudo_background};
  }
  set_resolutions(in, size);
  const bool labelled = label_channels_from < in.layout.C || in.pseudo.enabled();
  if (labelled) check_labels(in, target);
  if (negative_channels < label_channels_from || in.pseudo.enabled()) check_teacher(in, y);
  in.pos_weight = checked_weight(pos_weight, "pos_weight", in);
  in.channel_weight = checked_weight(channel_weight, "channel_weight", in);
  return in;
}

// The three losses from the totals of the per-pixel terms (float64, summed in a fixed order) and the
// label term's pixel count: "mean" divides the label term by the count (at least 1) and the others by
// B*H*W; returned in the accumulation dtype. Not for "none", whose maps are the losses.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> reduced_losses(const Inputs& in, const at::Tensor& totals,
                                                                     const at::Tensor& label_count) {
  at::Tensor losses = totals;
  if (in.reduction == Reduction::kMean) {
    const double pixels = static_cast<double>(std::max<int64_t>(in.B * in.H * in.W, 1));
    const double counted = static_cast<double>(std::max<int64_t>(label_count.item<int64_t>(), 1));
    losses = totals / at::tensor({counted, pixels, pixels}, totals.options());
  }
  losses = losses.to(in.acc_dtype);
  return {losses[kLabelTerm].clone(), losses[kSoftTerm].clone(), losses[kNegativeTerm].clone()};
}

// The upstream gradients as contiguous acc_dtype tensors of the losses' shape, and each term's
// reduction divisor (1 unless "mean").
struct Upstreams {
  at::Tensor grads[kNumTerms];
  double divisors[kNumTerms];
};

inline Upstreams checked_upstreams(const Inputs& in, const at::Tensor& grad_label, const at::Tensor& grad_soft,
                                   const at::Tensor& grad_negative, const at::Tensor& label_count) {
  const bool maps = in.reduction == Reduction::kNone;
  Upstreams up;
  const at::Tensor* grads[kNumTerms] = {&grad_label, &grad_soft, &grad_negative};
  for (int t = 0; t < kNumTerms; ++t) {
    TORCH_CHECK_VALUE(maps ? grads[t]->sizes() == at::IntArrayRef({in.B, in.H, in.W}) : grads[t]->numel() == 1,
                      "the upstream gradients must have the losses' shape, got ", grads[t]->sizes());
    up.grads[t] = grads[t]->to(in.x.device(), in.acc_dtype).contiguous();
  }
  TORCH_CHECK_VALUE(label_count.numel() == 1 && label_count.scalar_type() == at::kLong,
                    "label_count must be the int64 scalar saved by sigmoid_losses_fwd");
  const bool mean = in.reduction == Reduction::kMean;
  const double pixels = static_cast<double>(std::max<int64_t>(in.B * in.H * in.W, 1));
  up.divisors[kLabelTerm] = mean ? static_cast<double>(std::max<int64_t>(label_count.item<int64_t>(), 1)) : 1.0;
  up.divisors[kSoftTerm] = mean ? pixels : 1.0;
  up.divisors[kNegativeTerm] = mean ? pixels : 1.0;
  return up;
}

}  // namespace sigmoid
}  // namespace incseg
