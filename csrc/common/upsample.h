#pragma once
// Bilinear upsampling with align_corners=False (MATH.md#upsampling), as F.interpolate computes it,
// shared by the CPU and CUDA kernels of the logit losses with `size=`.
//
// Output index d of N along an axis of n input samples reads the input at the source coordinate
// s = max((d + 0.5) * n / N - 0.5, 0): samples i0 = floor(s) and i1 = min(i0 + 1, n - 1), with
// weights 1 - l and l, l = s - i0. The scale n / N and s are formed in float (double for float64
// logits) like PyTorch's paths.
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
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

// w * v, and exactly 0 where the weight w is 0: a sample read with weight 0 contributes nothing, so
// that a -inf (masked class), +inf or NaN neighbour there does not make 0 * v = NaN (MATH.md#upsampling).
// The same rule gives the backward's weight-0 terms: a NaN upstream gradient does not reach a sample
// through them. On the host a select on the bits: a float compare would stop the CPU loops vectorising.
HOST_DEVICE float weight_times(float w, float v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return w == 0.0f ? 0.0f : w * v;
#else
  const uint32_t keep = 0u - static_cast<uint32_t>((bits_of(w) & 0x7fffffffu) != 0u);
  return float_of(bits_of(w * v) & keep);
#endif
}
HOST_DEVICE double weight_times(double w, double v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return w == 0.0 ? 0.0 : w * v;
#else
  uint64_t wb, pb;
  const double product = w * v;
  std::memcpy(&wb, &w, sizeof(wb));
  std::memcpy(&pb, &product, sizeof(pb));
  pb &= 0ull - static_cast<uint64_t>((wb & 0x7fffffffffffffffull) != 0ull);
  double out;
  std::memcpy(&out, &pb, sizeof(out));
  return out;
#endif
}

// The value at output (row, col) of one channel plane `plane` (in_h x in_w, row-major).
template <typename acc_t, typename load_t, typename coord_t>
HOST_DEVICE acc_t bilinear(const load_t& plane, const BasicTap<coord_t>& row, const BasicTap<coord_t>& col,
                           int64_t in_w) {
  const acc_t r1 = row.l1, r0 = acc_t(1) - r1, c1 = col.l1, c0 = acc_t(1) - c1;
  const acc_t top =
      weight_times(c0, acc_t(plane(row.i0 * in_w + col.i0))) + weight_times(c1, acc_t(plane(row.i0 * in_w + col.i1)));
  const acc_t bottom =
      weight_times(c0, acc_t(plane(row.i1 * in_w + col.i0))) + weight_times(c1, acc_t(plane(row.i1 * in_w + col.i1)));
  return weight_times(r0, top) + weight_times(r1, bottom);
}

}  // namespace upsample
}  // namespace incseg
