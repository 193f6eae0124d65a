#pragma once
// Bilinear upsampling with align_corners=False (MATH.md#upsampling), as F.interpolate computes it,
// shared by the CPU and CUDA kernels of the logit losses with `size=`.
//
// Output index d of N along an axis of n input samples reads the input at the source coordinate
// s = max((d + 0.5) * n / N - 0.5, 0): samples i0 = floor(s) and i1 = min(i0 + 1, n - 1), with
// weights 1 - l and l, l = s - i0. The scale n / N and s are formed in float (double for float64
// logits) like PyTorch's paths.
#include <cstdint>

#include "common/macros.h"

namespace incseg {
namespace upsample {

// The two input samples an output index reads and the weight of the second one, in coord_t: float
// for float16/bfloat16/float32 logits and double for float64 ones, as PyTorch computes the source
// coordinate in the logits' accumulation type (float taps would cost float64 results ~1e-7).
template <typename coord_t>
struct BasicTap {
  int64_t i0;
  int64_t i1;
  coord_t l1;  // weight of i1; i0 weighs 1 - l1
};
using Tap = BasicTap<float>;

template <typename coord_t = float>
HOST_DEVICE coord_t source_scale(int64_t in_size, int64_t out_size) {
  return static_cast<coord_t>(in_size) / static_cast<coord_t>(out_size);
}

template <typename coord_t>
HOST_DEVICE BasicTap<coord_t> tap(int64_t out_index, coord_t scale, int64_t in_size) {
  coord_t s = scale * (static_cast<coord_t>(out_index) + coord_t(0.5)) - coord_t(0.5);
  s = s < coord_t(0) ? coord_t(0) : s;
  const int64_t i0 = static_cast<int64_t>(s);
  const int64_t i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  return {i0, i1, s - static_cast<coord_t>(i0)};
}

// The value at output (row, col) of one channel plane `plane` (in_h x in_w, row-major).
template <typename acc_t, typename load_t, typename coord_t>
HOST_DEVICE acc_t bilinear(const load_t& plane, const BasicTap<coord_t>& row, const BasicTap<coord_t>& col,
                           int64_t in_w) {
  const acc_t r1 = row.l1, r0 = acc_t(1) - r1, c1 = col.l1, c0 = acc_t(1) - c1;
  const acc_t top = c0 * acc_t(plane(row.i0 * in_w + col.i0)) + c1 * acc_t(plane(row.i0 * in_w + col.i1));
  const acc_t bottom = c0 * acc_t(plane(row.i1 * in_w + col.i0)) + c1 * acc_t(plane(row.i1 * in_w + col.i1));
  return r0 * top + r1 * bottom;
}

}  // namespace upsample
}  // namespace incseg
