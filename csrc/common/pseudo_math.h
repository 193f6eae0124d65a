#pragma once
// Per-pixel arithmetic of PLOP's entropy pseudo-labels (MATH.md#pseudo-labels), shared by the CPU
// and CUDA kernels: one streaming pass over a pixel's Co old-model logits gives the predicted class
// k̂ (the first maximum) and the entropy H = log Z - S / Z (MATH.md#pseudo-kernels), from which the
// new label, the confidence and the histogram bin follow. Scalars only, so that the CPU kernels'
// loops over a tile of pixels vectorise.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/logit_math.h"
#include "common/macros.h"

namespace incseg {
namespace pseudo {

// `a` where `take_a`, else `b`. On the host by a select on the bits: GCC will not if-convert a float
// select under -ftrapping-math for AVX2 (it does with AVX-512's masks), which left the AVX2 copy of
// the CPU tile loop scalar (tools/isa_check.py); on the device a plain select.
template <typename T>
HOST_DEVICE T select(bool take_a, T a, T b) {
#if defined(__CUDA_ARCH__)
  return take_a ? a : b;
#else
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  Bits a_bits, b_bits;
  std::memcpy(&a_bits, &a, sizeof(T));
  std::memcpy(&b_bits, &b, sizeof(T));
  const Bits mask = Bits(0) - static_cast<Bits>(take_a);
  a_bits = (a_bits & mask) | (b_bits & ~mask);
  std::memcpy(&a, &a_bits, sizeof(T));
  return a;
#endif
}

// Floor of a logit's distance below the running maximum inside S (MATH.md#pseudo-kernels): a -inf
// logit adds exp(-inf) * -1e4 = 0 instead of 0 * inf.
template <typename T>
HOST_DEVICE T floored_gap(T gap) {
  return select(gap < T(-1e4), T(-1e4), gap);
}

// The running state of one pixel: maximum, its channel, Z = sum exp(v - max), S = sum exp(v - max) (v - max).
template <typename T>
struct EntropyStream {
  T max;
  T z;
  T s;
  int32_t argmax;

  HOST_DEVICE void start(T v) {
    max = v;
    z = T(1);
    s = T(0);
    argmax = 0;
  }

  // Channel c >= 1 with logit v: one exponential, exp(-|v - max|) (MATH.md#pseudo-kernels). Only a
  // strictly larger v (or a NaN) raises the maximum, so the first of equal logits stays the argmax
  // (torch.argmax's lowest index); v == max (-inf == -inf included) adds the term 1 without inf - inf.
  HOST_DEVICE void add(T v, int32_t c) {
    const T d = v - max;
    const bool raised = (d > T(0)) | (v != v);
    const T e = select(v == max, T(1), logit::lm_exp(select(raised, -d, d)));
    const T rescale = select(raised, e, T(1));
    const T term = select(raised, T(1), e);
    // When the maximum rises every earlier (v_c - max) shrinks by d, and the new channel's own gap is 0.
    const T shift = select(raised, floored_gap(-d), T(0));
    const T gap = select(raised, T(0), floored_gap(d));
    s = rescale * (s + shift * z) + term * gap;
    z = rescale * z + term;
    max = select(raised, v, max);
    argmax ^= (argmax ^ c) & (int32_t(0) - static_cast<int32_t>(raised));
  }

  // u = H / log Co in [0, 1] (up to rounding): inv_log_classes = 1 / log Co, 0 for Co == 1.
  HOST_DEVICE T normalised_entropy(T inv_log_classes) const { return (logit::lm_log(z) - s / z) * inv_log_classes; }
};

// Background: an old class or background label (t < Co) that is not the ignore label.
HOST_DEVICE bool is_background(int64_t label, int64_t old_classes, int64_t ignore_index) {
  return label < old_classes && label != ignore_index;
}

// The new label of one pixel (MATH.md#pseudo-labels): k̂ where confident, ignore_index where background
// but not confident, the label itself elsewhere.
HOST_DEVICE int64_t pseudo_label(int64_t label, bool background, bool confident, int32_t argmax, int64_t ignore_index) {
  return !background ? label : (confident ? int64_t(argmax) : ignore_index);
}

// min(floor(u * bins), bins - 1), and 0 below 0 (rounding can leave u a hair under 0) or for a NaN u.
template <typename T>
HOST_DEVICE int64_t entropy_bin(T u, int64_t bins) {
  const T scaled = u * static_cast<T>(bins);
  if (!(scaled > T(0))) return 0;
  return scaled >= static_cast<T>(bins - 1) ? bins - 1 : static_cast<int64_t>(scaled);
}

}  // namespace pseudo
}  // namespace incseg
