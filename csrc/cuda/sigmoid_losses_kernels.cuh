#pragma once
// CUDA kernel bodies of the sigmoid losses with composed targets (MATH.md#sigmoid-losses), as
// common/grid.h structs: the GPU runs them through cuda/launch.cuh, the CPU emulation through
// run_on_host (csrc/cuda/sigmoid_losses_cuda.cpp). No torch here.
//
// Forward: one thread per output pixel forms the pixel's (pseudo-)label, walks the channels composing
// each target as it reads the logit, and writes the three per-pixel terms; the glue adds them up in a
// fixed order. Backward without size=: one thread per output pixel writes dL/dx of every channel.
// With size=: a gather, one thread per element (i, j) of x's plane: it visits the output pixels whose
// taps read (i, j), recomputes each one's label and gradient, and accumulates R K G for every channel
// into dL/dx (float32, float64 for float64 x), which only it writes: no atomics, a fixed order.
#include <cstdint>

#include "common/dtype.h"
#include "common/grid.h"
#include "common/sigmoid_math.h"
#include "common/upsample.h"

namespace incseg {
namespace sigmoid {

template <typename scalar_t>
struct KernelArgs {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* x = nullptr;            // (B, C, h, w)
  const scalar_t* y = nullptr;            // (B, Co, yh, yw) or null
  const int64_t* target = nullptr;        // (B, H, W) or null
  const acc_t* pos_weight = nullptr;      // (C,)
  const acc_t* channel_weight = nullptr;  // (C,)
  Layout layout;
  PseudoRule pseudo;
  int64_t ignore_index = 255;
  int64_t B = 0, H = 0, W = 0, h = 0, w = 0, yh = 0, yw = 0;
  // With size=: upsample::source_scale of each axis, computed once on the host (a division per
  // value read cost the gather a spill around the division's slow path).
  acc_t x_row_scale = 1, x_col_scale = 1, y_row_scale = 1, y_col_scale = 1;
  // The gather's reader windows along x's axes (first_reader): out / in, and a bound on the readers.
  acc_t x_row_inverse_scale = 1, x_col_inverse_scale = 1;
  int64_t x_row_readers = 1, x_col_readers = 1;
  bool upsample = false;
  bool skip_ignored = true;
};

// The value of channel plane `plane` (in_h x in_w) at output pixel (r, q): its own pixel, or with
// size= the bilinear upsampling (common/upsample.h) in the accumulation type.
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE acc_t value_at(const KernelArgs<scalar_t>& a, const scalar_t* plane, int64_t in_h, int64_t in_w,
                           acc_t row_scale, acc_t col_scale, int64_t r, int64_t q) {
  if (!a.upsample) return static_cast<acc_t>(to_accumulate(plane[r * a.W + q]));
  const auto rows = upsample::tap<acc_t>(r, row_scale, in_h);
  const auto cols = upsample::tap<acc_t>(q, col_scale, in_w);
  const auto at = [plane](int64_t i) { return static_cast<acc_t>(to_accumulate(plane[i])); };
  return upsample::bilinear<acc_t>(at, rows, cols, in_w);
}

template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE acc_t x_at(const KernelArgs<scalar_t>& a, int64_t b, int64_t c, int64_t r, int64_t q) {
  return value_at(a, a.x + (b * a.layout.C + c) * a.h * a.w, a.h, a.w, a.x_row_scale, a.x_col_scale, r, q);
}

template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE acc_t y_at(const KernelArgs<scalar_t>& a, int64_t b, int64_t c, int64_t r, int64_t q) {
  return value_at(a, a.y + (b * a.layout.Co + c) * a.yh * a.yw, a.yh, a.yw, a.y_row_scale, a.y_col_scale, r, q);
}

// A pixel's label after pseudo-labelling (MATH.md#sigmoid-pseudo) and whether it is not ignored.
struct PixelLabel {
  int64_t label;
  bool valid;
};

template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE PixelLabel pixel_label(const KernelArgs<scalar_t>& a, int64_t b, int64_t r, int64_t q) {
  if (a.target == nullptr) return {0, true};
  const int64_t label = a.target[(b * a.H + r) * a.W + q];
  const bool valid = label != a.ignore_index;
  if (!a.pseudo.enabled()) return {label, valid};
  acc_t best_score = 0;
  int64_t best = -1;
  for (int64_t c = 0; c < a.layout.Co; ++c) {
    const acc_t v = y_at(a, b, c, r, q);
    if (best < 0 || v > best_score) {  // strict: the first maximum wins, as torch.max
      best_score = v;
      best = c;
    }
  }
  return {pseudo_label(a.pseudo, label, valid, best, best_score), valid};
}

// The composed target of channel c at the pixel (MATH.md#sigmoid-notation).
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE acc_t target_at(const KernelArgs<scalar_t>& a, const PixelLabel& pixel, int64_t b, int64_t c, int64_t r,
                            int64_t q) {
  switch (a.layout.term(c)) {
    case kNegativeTerm:
      return acc_t(0);
    case kSoftTerm:
      return logistic(y_at(a, b, c, r, q));
    default:
      return pixel.valid && pixel.label == c ? acc_t(1) : acc_t(0);
  }
}

// One value per term, chosen without indexing by a run-time term (an indexed array would live in
// local memory, the stack, on the GPU).
template <typename acc_t>
struct PerTerm {
  acc_t label = 0, soft = 0, negative = 0;
  HOST_DEVICE acc_t& operator[](Term t) { return t == kLabelTerm ? label : (t == kSoftTerm ? soft : negative); }
  HOST_DEVICE acc_t operator[](Term t) const { return t == kLabelTerm ? label : (t == kSoftTerm ? soft : negative); }
};

// The three per-pixel terms (B, H, W), in the accumulation type.
template <typename acc_t>
struct TermMaps {
  acc_t* term[kNumTerms];
};

template <typename scalar_t>
struct SigmoidForwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  KernelArgs<scalar_t> a;
  TermMaps<acc_t> out;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t p = index.first_pixel(1), b = index.block_y;
    if (p >= a.H * a.W) return;
    const int64_t r = p / a.W, q = p % a.W;
    const PixelLabel pixel = pixel_label(a, b, r, q);
    PerTerm<acc_t> terms;
    for (int64_t c = 0; c < a.layout.C; ++c) {
      const acc_t tau = target_at(a, pixel, b, c, r, q);
      terms[a.layout.term(c)] += a.channel_weight[c] * bce(x_at(a, b, c, r, q), tau, a.pos_weight[c]);
    }
    if (a.skip_ignored && !pixel.valid) terms.label = 0;
    const int64_t at = b * a.H * a.W + p;
    out.term[kLabelTerm][at] = terms.label;
    out.term[kSoftTerm][at] = terms.soft;
    out.term[kNegativeTerm][at] = terms.negative;
  }
};

// The upstream gradient of each term, divided by its reduction divisor: maps (B, H, W) or scalars.
template <typename acc_t>
struct UpstreamGrads {
  const acc_t* grad[kNumTerms];
  acc_t inverse_divisor[kNumTerms];
  bool per_pixel = false;
};

// dL/d x_up of channel c at output pixel (r, q), given the pixel's label and its term scales.
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE acc_t pixel_gradient(const KernelArgs<scalar_t>& a, const PixelLabel& pixel, const PerTerm<acc_t>& scale,
                                 int64_t b, int64_t c, int64_t r, int64_t q) {
  const acc_t tau = target_at(a, pixel, b, c, r, q);
  return scale[a.layout.term(c)] * a.channel_weight[c] * bce_grad(x_at(a, b, c, r, q), tau, a.pos_weight[c]);
}

template <typename acc_t>
HOST_DEVICE PerTerm<acc_t> term_scales(const UpstreamGrads<acc_t>& up, bool counted, int64_t pixel) {
  const int64_t at = up.per_pixel ? pixel : 0;
  PerTerm<acc_t> scale;
  scale.label = counted ? up.grad[kLabelTerm][at] * up.inverse_divisor[kLabelTerm] : acc_t(0);
  scale.soft = up.grad[kSoftTerm][at] * up.inverse_divisor[kSoftTerm];
  scale.negative = up.grad[kNegativeTerm][at] * up.inverse_divisor[kNegativeTerm];
  return scale;
}

template <typename scalar_t>
struct SigmoidBackwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  KernelArgs<scalar_t> a;
  UpstreamGrads<acc_t> up;
  scalar_t* grad_x;  // (B, C, H, W)

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t p = index.first_pixel(1), b = index.block_y, HW = a.H * a.W;
    if (p >= HW) return;
    const int64_t r = p / a.W, q = p % a.W;
    const PixelLabel pixel = pixel_label(a, b, r, q);
    const PerTerm<acc_t> scale = term_scales(up, !a.skip_ignored || pixel.valid, b * HW + p);
    for (int64_t c = 0; c < a.layout.C; ++c) {
      grad_x[(b * a.layout.C + c) * HW + p] = Storage<scalar_t>::from(pixel_gradient(a, pixel, scale, b, c, r, q));
    }
  }
};

// The output indices that read input sample i along an axis upsampled by out / in = inverse_scale lie in
// [first_reader, first_reader + readers) with readers = ceil(2 out / in) + 3 (host_readers): in exact
// arithmetic the readers d satisfy d >= (i - 0.5) inverse_scale - 0.5, and one less covers the rounding
// of that float expression (no integer division: on the GPU it is a called routine, and the registers
// saved around it spilled). Indices in the window that do not read i get weight 0 from tap_weight.
template <typename acc_t>
HOST_DEVICE int64_t first_reader(int64_t i, acc_t inverse_scale) {
  const acc_t d = (static_cast<acc_t>(i) - acc_t(0.5)) * inverse_scale - acc_t(0.5);
  return d < acc_t(1) ? 0 : static_cast<int64_t>(d) - 1;
}
inline int64_t host_readers(int64_t in, int64_t out) { return (2 * out + in - 1) / in + 3; }

template <typename coord_t>
HOST_DEVICE coord_t tap_weight(const upsample::BasicTap<coord_t>& tap, int64_t i) {
  return (tap.i0 == i ? coord_t(1) - tap.l1 : coord_t(0)) + (tap.i1 == i ? tap.l1 : coord_t(0));
}

template <typename scalar_t>
struct SigmoidUpsampledBackwardKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = 128;
  KernelArgs<scalar_t> a;
  UpstreamGrads<acc_t> up;
  acc_t* grad_x;  // (B, C, h, w), zeroed by the glue

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const int64_t e = index.first_pixel(1), b = index.block_y, plane = a.h * a.w;
    if (e >= plane) return;
    const int64_t i = e / a.w, j = e % a.w;
    const int64_t first_row = first_reader(i, a.x_row_inverse_scale),
                  first_col = first_reader(j, a.x_col_inverse_scale);
    const int64_t row_end = first_row + a.x_row_readers, col_end = first_col + a.x_col_readers;
    for (int64_t r = first_row; r < row_end && r < a.H; ++r) {
      const acc_t row_weight = tap_weight(upsample::tap<acc_t>(r, a.x_row_scale, a.h), i);
      if (row_weight == acc_t(0)) continue;
      for (int64_t q = first_col; q < col_end && q < a.W; ++q) {
        const acc_t weight = row_weight * tap_weight(upsample::tap<acc_t>(q, a.x_col_scale, a.w), j);
        if (weight == acc_t(0)) continue;
        const PixelLabel pixel = pixel_label(a, b, r, q);
        const PerTerm<acc_t> scale = term_scales(up, !a.skip_ignored || pixel.valid, (b * a.H + r) * a.W + q);
        for (int64_t c = 0; c < a.layout.C; ++c) {
          grad_x[(b * a.layout.C + c) * plane + e] += weight * pixel_gradient(a, pixel, scale, b, c, r, q);
        }
      }
    }
  }
};

// Launchers (sigmoid_losses_kernels.cu): raw pointers, sizes and a stream in, a CUDA error code out.
template <typename scalar_t>
int launch_sigmoid_forward(const KernelArgs<scalar_t>& a, const TermMaps<accumulate_t<scalar_t>>& out, void* stream);
template <typename scalar_t>
int launch_sigmoid_backward(const KernelArgs<scalar_t>& a, const UpstreamGrads<accumulate_t<scalar_t>>& up,
                            scalar_t* grad_x, accumulate_t<scalar_t>* upsampled_grad_x, void* stream);

}  // namespace sigmoid
}  // namespace incseg
