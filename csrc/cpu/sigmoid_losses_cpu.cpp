// CPU kernels of the sigmoid losses with composed targets (MATH.md#sigmoid-losses).
//
// Work goes by output rows: a row's labels (and pseudo-labels) are formed once, then each channel's
// logits are read (bilinearly upsampled on the fly with size=) into a row buffer and its target is
// composed there: 0, sigmoid(y_c) or the one-hot of the label. No tensor of x's size is allocated
// besides dL/dx. The forward keeps per-row partial sums and adds them in row order; the backward
// writes each row of dL/dx (without size=) or gathers it per image and channel block, rows in
// order (with size=), so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <vector>

#include "common/sigmoid_host.h"
#include "common/upsample.h"
#include "cpu/toolkit.h"

namespace incseg {
namespace {

using sigmoid::Inputs;
using sigmoid::kLabelTerm;
using sigmoid::kNegativeTerm;
using sigmoid::kNumTerms;
using sigmoid::kSoftTerm;
using sigmoid::Layout;
using sigmoid::PseudoRule;
using sigmoid::Reduction;

// ------------------------------------------------------------------------------------------------
// Row machinery shared by the forward and the backward
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Rows {
  using acc_t = cpu::acc_type<scalar_t>;
  using coord_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using Tap = upsample::BasicTap<coord_t>;

  const scalar_t* x = nullptr;
  const scalar_t* y = nullptr;
  const int64_t* target = nullptr;
  const acc_t* pos_weight = nullptr;
  const acc_t* channel_weight = nullptr;
  Layout layout;
  PseudoRule pseudo;
  int64_t ignore_index = 0, B = 0, H = 0, W = 0, h = 0, w = 0, yh = 0, yw = 0;
  bool skip_ignored = true, upsample = false;
  std::vector<Tap> x_rows, x_cols, y_rows, y_cols;  // taps of each output row and column (size=)

  explicit Rows(const Inputs& in)
      : x(in.x.data_ptr<scalar_t>()),
        y(in.y.defined() ? in.y.data_ptr<scalar_t>() : nullptr),
        target(in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr),
        pos_weight(in.pos_weight.data_ptr<acc_t>()),
        channel_weight(in.channel_weight.data_ptr<acc_t>()),
        layout(in.layout),
        pseudo(in.pseudo),
        ignore_index(in.ignore_index),
        B(in.B),
        H(in.H),
        W(in.W),
        h(in.h),
        w(in.w),
        yh(in.yh),
        yw(in.yw),
        skip_ignored(in.skip_ignored),
        upsample(in.upsample) {
    if (!upsample) return;
    x_rows = taps(in.h, H);
    x_cols = taps(in.w, W);
    if (y != nullptr) {
      y_rows = taps(yh, H);
      y_cols = taps(yw, W);
    }
  }

  static std::vector<Tap> taps(int64_t in_size, int64_t out_size) {
    std::vector<Tap> out(out_size);
    const coord_t scale = upsample::source_scale<coord_t>(in_size, out_size);
    for (int64_t d = 0; d < out_size; ++d) out[d] = upsample::tap<coord_t>(d, scale, in_size);
    return out;
  }

  // Row r of one channel plane (in_h x in_w), at the output resolution, into out[W].
  INCSEG_FORCE_INLINE void load_row(const scalar_t* plane, int64_t in_w, const std::vector<Tap>& rows,
                                    const std::vector<Tap>& cols, int64_t r, acc_t* out) const {
    if (!upsample) {
      const scalar_t* row = plane + r * W;
      for (int64_t q = 0; q < W; ++q) out[q] = cpu::load<acc_t>(row, q);
      return;
    }
    const auto at = [plane](int64_t i) { return cpu::load<acc_t>(plane, i); };
    for (int64_t q = 0; q < W; ++q) out[q] = upsample::bilinear<acc_t>(at, rows[r], cols[q], in_w);
  }

  INCSEG_FORCE_INLINE void x_row(int64_t b, int64_t c, int64_t r, acc_t* out) const {
    load_row(x + (b * layout.C + c) * h * w, w, x_rows, x_cols, r, out);
  }
  INCSEG_FORCE_INLINE void y_row(int64_t b, int64_t c, int64_t r, acc_t* out) const {
    load_row(y + (b * layout.Co + c) * yh * yw, yw, y_rows, y_cols, r, out);
  }

  // Per-pixel scratch of one row.
  struct Scratch {
    std::vector<int64_t> label, best;
    std::vector<uint8_t> valid;
    std::vector<acc_t> values, teacher, best_score;
    explicit Scratch(int64_t W) : label(W), best(W), valid(W), values(W), teacher(W), best_score(W) {}
  };

  // The row's labels after pseudo-labelling (MATH.md#sigmoid-pseudo) and which are not ignored.
  INCSEG_FORCE_INLINE void labels(int64_t b, int64_t r, Scratch& s) const {
    if (target == nullptr) return;
    const int64_t* row = target + (b * H + r) * W;
    for (int64_t q = 0; q < W; ++q) {
      s.label[q] = row[q];
      s.valid[q] = row[q] != ignore_index;
    }
    if (!pseudo.enabled()) return;
    for (int64_t q = 0; q < W; ++q) {
      s.best[q] = -1;
      s.best_score[q] = -std::numeric_limits<acc_t>::infinity();
    }
    for (int64_t c = 0; c < layout.Co; ++c) {
      y_row(b, c, r, s.teacher.data());
      for (int64_t q = 0; q < W; ++q) {
        if (s.teacher[q] > s.best_score[q]) {  // strict: the first maximum wins, as torch.max
          s.best_score[q] = s.teacher[q];
          s.best[q] = c;
        }
      }
    }
    for (int64_t q = 0; q < W; ++q) {
      s.label[q] = sigmoid::pseudo_label(pseudo, s.label[q], s.valid[q] != 0, s.best[q], s.best_score[q]);
    }
  }

  // Whether pixel q counts in the label term.
  INCSEG_FORCE_INLINE bool counted(const Scratch& s, int64_t q) const { return !skip_ignored || s.valid[q] != 0; }

  // The targets of channel c over the row into s.teacher (0, sigmoid(y_c) or the one-hot).
  INCSEG_FORCE_INLINE void targets(int64_t b, int64_t c, int64_t r, Scratch& s) const {
    const auto term = layout.term(c);
    if (term == kNegativeTerm) {
      for (int64_t q = 0; q < W; ++q) s.teacher[q] = acc_t(0);
    } else if (term == kSoftTerm) {
      y_row(b, c, r, s.teacher.data());
      for (int64_t q = 0; q < W; ++q) s.teacher[q] = sigmoid::logistic(s.teacher[q]);
    } else {
      for (int64_t q = 0; q < W; ++q) s.teacher[q] = s.valid[q] != 0 && s.label[q] == c ? acc_t(1) : acc_t(0);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// Rows [begin, end) of the B*H output rows: per-row sums of the three terms and of counted pixels,
// and the per-pixel maps when maps[0] is not null.
struct ForwardRows {
  template <typename scalar_t>
  static INCSEG_FORCE_INLINE void run(const Rows<scalar_t>& rows, int64_t begin, int64_t end,
                                      cpu::acc_type<scalar_t>* row_sums, int64_t* row_counts,
                                      cpu::acc_type<scalar_t>* const* maps) {
    using acc_t = cpu::acc_type<scalar_t>;
    const int64_t W = rows.W;
    typename Rows<scalar_t>::Scratch s(W);
    std::vector<acc_t> terms(kNumTerms * W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / rows.H, r = item % rows.H;
      rows.labels(b, r, s);
      std::fill(terms.begin(), terms.end(), acc_t(0));
      for (int64_t c = 0; c < rows.layout.C; ++c) {
        rows.x_row(b, c, r, s.values.data());
        rows.targets(b, c, r, s);
        const acc_t pos = rows.pos_weight[c], weight = rows.channel_weight[c];
        acc_t* term = terms.data() + rows.layout.term(c) * W;
        for (int64_t q = 0; q < W; ++q) term[q] += weight * sigmoid::bce(s.values[q], s.teacher[q], pos);
      }
      int64_t count = 0;
      for (int64_t q = 0; q < W; ++q) {
        const bool counted = rows.target == nullptr || rows.counted(s, q);
        count += counted ? 1 : 0;
        if (!counted) terms[kLabelTerm * W + q] = acc_t(0);
      }
      row_counts[item] = count;
      for (int t = 0; t < kNumTerms; ++t) {
        acc_t sum = 0;
        for (int64_t q = 0; q < W; ++q) sum += terms[t * W + q];
        row_sums[item * kNumTerms + t] = sum;
        if (maps[0] != nullptr) std::copy_n(terms.data() + t * W, W, maps[t] + item * W);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_losses_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& channel_weight,
    int64_t negative_channels, int64_t label_channels_from, std::optional<double> pseudo_threshold,
    int64_t pseudo_background, int64_t ignore_index, c10::string_view ignored_pixels, c10::string_view reduction,
    at::OptionalIntArrayRef size) {
  const Inputs in =
      sigmoid::check_inputs(x, target, y, pos_weight, channel_weight, negative_channels, label_channels_from,
                            pseudo_threshold, pseudo_background, ignore_index, ignored_pixels, reduction, size);
  const auto options = in.x.options().dtype(in.acc_dtype);
  const int64_t items = in.B * in.H;
  at::Tensor row_sums = at::zeros({items, kNumTerms}, options);
  at::Tensor row_counts = at::zeros({items}, in.x.options().dtype(at::kLong));
  std::vector<at::Tensor> maps;
  if (in.reduction == Reduction::kNone) {
    for (int t = 0; t < kNumTerms; ++t) maps.push_back(at::empty({in.B, in.H, in.W}, options));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "sigmoid_losses_fwd_cpu", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const Rows<scalar_t> rows(in);
    acc_t* map_ptrs[kNumTerms] = {nullptr, nullptr, nullptr};
    for (size_t t = 0; t < maps.size(); ++t) map_ptrs[t] = maps[t].data_ptr<acc_t>();
    acc_t* sums = row_sums.data_ptr<acc_t>();
    int64_t* counts = row_counts.data_ptr<int64_t>();
    const int64_t cost = in.layout.C * in.W * (in.upsample ? 4 : 1);
    cpu::parallel_over_items(items, cost, [&](int64_t begin, int64_t end) {
      cpu::run_best<ForwardRows>(rows, begin, end, sums, counts, static_cast<acc_t* const*>(map_ptrs));
    });
  });
  // Rows added in order (float64 for the totals): the same result for every thread count.
  const at::Tensor totals = row_sums.to(at::kDouble).sum(0);
  const at::Tensor label_count = row_counts.sum();
  if (in.reduction == Reduction::kNone) return {maps[0], maps[1], maps[2], label_count};
  const auto [label, soft, negative] = sigmoid::reduced_losses(in, totals, label_count);
  return {label, soft, negative, label_count};
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// The upstream gradient of each term at pixel (b, r, q), with the mean's scale: a scalar per term
// (stride 0) or a map.
template <typename acc_t>
struct Upstream {
  const acc_t* grad[kNumTerms];
  int64_t stride[kNumTerms];  // 0 for a scalar
  acc_t scale[kNumTerms];
  INCSEG_FORCE_INLINE acc_t at(int t, int64_t pixel) const { return scale[t] * grad[t][pixel * stride[t]]; }
};

// dL/dx of channels [c_lo, c_hi) on output row r of image b, before the transpose of the
// upsampling: g[(c - c_lo) * W + q].
template <typename scalar_t>
INCSEG_FORCE_INLINE void gradient_row(const Rows<scalar_t>& rows, const Upstream<cpu::acc_type<scalar_t>>& up,
                                      int64_t b, int64_t r, int64_t c_lo, int64_t c_hi,
                                      typename Rows<scalar_t>::Scratch& s, cpu::acc_type<scalar_t>* pixel_scale,
                                      cpu::acc_type<scalar_t>* g) {
  using acc_t = cpu::acc_type<scalar_t>;
  const int64_t W = rows.W, row_start = (b * rows.H + r) * W;
  rows.labels(b, r, s);
  for (int t = 0; t < kNumTerms; ++t) {
    for (int64_t q = 0; q < W; ++q) pixel_scale[t * W + q] = up.at(t, row_start + q);
  }
  if (rows.target != nullptr) {
    for (int64_t q = 0; q < W; ++q) {
      if (!rows.counted(s, q)) pixel_scale[kLabelTerm * W + q] = acc_t(0);
    }
  }
  for (int64_t c = c_lo; c < c_hi; ++c) {
    rows.x_row(b, c, r, s.values.data());
    rows.targets(b, c, r, s);
    const acc_t pos = rows.pos_weight[c], weight = rows.channel_weight[c];
    const acc_t* scale = pixel_scale + rows.layout.term(c) * W;
    acc_t* out = g + (c - c_lo) * W;
    for (int64_t q = 0; q < W; ++q) out[q] = scale[q] * weight * sigmoid::bce_grad(s.values[q], s.teacher[q], pos);
  }
}

// Without size=: output rows [begin, end), every channel, written straight into dL/dx.
struct BackwardRows {
  template <typename scalar_t>
  static INCSEG_FORCE_INLINE void run(const Rows<scalar_t>& rows, const Upstream<cpu::acc_type<scalar_t>>& up,
                                      int64_t begin, int64_t end, scalar_t* dx) {
    using acc_t = cpu::acc_type<scalar_t>;
    const int64_t W = rows.W, C = rows.layout.C;
    typename Rows<scalar_t>::Scratch s(W);
    std::vector<acc_t> pixel_scale(kNumTerms * W), g(C * W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / rows.H, r = item % rows.H;
      gradient_row(rows, up, b, r, 0, C, s, pixel_scale.data(), g.data());
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* out = dx + ((b * C + c) * rows.H + r) * W;
        for (int64_t q = 0; q < W; ++q) out[q] = cpu::to_storage<scalar_t>(g[c * W + q]);
      }
    }
  }
};

constexpr int64_t kChannelBlock = 8;

// With size=: items (image, block of kChannelBlock channels); every output row in order, its
// gradient gathered back to x's resolution (MATH.md#upsampling: dL/dx = R^T G C per channel).
struct BackwardUpsampled {
  template <typename scalar_t>
  static INCSEG_FORCE_INLINE void run(const Rows<scalar_t>& rows, const Upstream<cpu::acc_type<scalar_t>>& up,
                                      int64_t begin, int64_t end, scalar_t* dx) {
    using acc_t = cpu::acc_type<scalar_t>;
    const int64_t W = rows.W, C = rows.layout.C, h = rows.h, w = rows.w;
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    typename Rows<scalar_t>::Scratch s(W);
    std::vector<acc_t> pixel_scale(kNumTerms * W), g(kChannelBlock * W), columns(w), plane(kChannelBlock * h * w);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c_lo = (item % blocks) * kChannelBlock;
      const int64_t c_hi = std::min(C, c_lo + kChannelBlock);
      std::fill(plane.begin(), plane.end(), acc_t(0));
      for (int64_t r = 0; r < rows.H; ++r) {
        gradient_row(rows, up, b, r, c_lo, c_hi, s, pixel_scale.data(), g.data());
        const auto& row_tap = rows.x_rows[r];
        const acc_t r1 = row_tap.l1, r0 = acc_t(1) - r1;
        for (int64_t c = 0; c < c_hi - c_lo; ++c) {
          std::fill(columns.begin(), columns.end(), acc_t(0));
          for (int64_t q = 0; q < W; ++q) {
            const auto& col = rows.x_cols[q];
            const acc_t c1 = col.l1, value = g[c * W + q];
            columns[col.i0] += (acc_t(1) - c1) * value;
            columns[col.i1] += c1 * value;
          }
          acc_t* top = plane.data() + (c * h + row_tap.i0) * w;
          acc_t* bottom = plane.data() + (c * h + row_tap.i1) * w;
          for (int64_t j = 0; j < w; ++j) top[j] += r0 * columns[j];
          for (int64_t j = 0; j < w; ++j) bottom[j] += r1 * columns[j];
        }
      }
      scalar_t* out = dx + (b * C + c_lo) * h * w;
      for (int64_t i = 0; i < (c_hi - c_lo) * h * w; ++i) out[i] = cpu::to_storage<scalar_t>(plane[i]);
    }
  }
};

at::Tensor sigmoid_losses_bwd_cpu(const at::Tensor& grad_label, const at::Tensor& grad_soft,
                                  const at::Tensor& grad_negative, const at::Tensor& x,
                                  const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
                                  const std::optional<at::Tensor>& pos_weight,
                                  const std::optional<at::Tensor>& channel_weight, const at::Tensor& label_count,
                                  int64_t negative_channels, int64_t label_channels_from,
                                  std::optional<double> pseudo_threshold, int64_t pseudo_background,
                                  int64_t ignore_index, c10::string_view ignored_pixels, c10::string_view reduction,
                                  at::OptionalIntArrayRef size) {
  const Inputs in =
      sigmoid::check_inputs(x, target, y, pos_weight, channel_weight, negative_channels, label_channels_from,
                            pseudo_threshold, pseudo_background, ignore_index, ignored_pixels, reduction, size);
  const bool maps = in.reduction == Reduction::kNone;
  const sigmoid::Upstreams upstream = sigmoid::checked_upstreams(in, grad_label, grad_soft, grad_negative, label_count);
  at::Tensor dx = at::empty_like(in.x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "sigmoid_losses_bwd_cpu", [&] {
    using acc_t = cpu::acc_type<scalar_t>;
    const Rows<scalar_t> rows(in);
    Upstream<acc_t> up{};
    for (int t = 0; t < kNumTerms; ++t) {
      up.grad[t] = upstream.grads[t].data_ptr<acc_t>();
      up.stride[t] = maps ? 1 : 0;
      up.scale[t] = static_cast<acc_t>(1.0 / upstream.divisors[t]);
    }
    scalar_t* out = dx.data_ptr<scalar_t>();
    if (!in.upsample) {
      cpu::parallel_over_items(in.B * in.H, in.layout.C * in.W, [&](int64_t begin, int64_t end) {
        cpu::run_best<BackwardRows>(rows, up, begin, end, out);
      });
    } else {
      const int64_t blocks = (in.layout.C + kChannelBlock - 1) / kChannelBlock;
      cpu::parallel_over_items(in.B * blocks, kChannelBlock * in.H * in.W * 4, [&](int64_t begin, int64_t end) {
        cpu::run_best<BackwardUpsampled>(rows, up, begin, end, out);
      });
    }
  });
  return dx;
}

}  // namespace
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast, CPU, m) {
  m.impl("sigmoid_losses_fwd", &incseg::sigmoid_losses_fwd_cpu);
  m.impl("sigmoid_losses_bwd", &incseg::sigmoid_losses_bwd_cpu);
}
