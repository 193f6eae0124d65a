#pragma once
// Per-element arithmetic of the sigmoid losses with composed targets (MATH.md#sigmoid-losses),
// shared by the CPU and CUDA kernels: the channel layout, the binary cross-entropy with logits and
// its gradient, SSUL's pseudo-label rule. Scalars only, so that loops over pixels can vectorise.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/logit_math.h"
#include "common/macros.h"

namespace incseg {
namespace sigmoid {

enum class Reduction : int32_t { kNone = 0, kMean = 1, kSum = 2 };

// The three targets of MATH.md#sigmoid-notation, each with its own output term.
enum Term : int32_t { kLabelTerm = 0, kSoftTerm = 1, kNegativeTerm = 2, kNumTerms = 3 };

// Channels [0, negative_channels) have target 0, [negative_channels, label_channels_from) sigmoid(y_c),
// [label_channels_from, C) the one-hot of the (pseudo-)label.
struct Layout {
  int64_t C = 0;
  int64_t Co = 0;  // the teacher's channels (0 without y)
  int64_t negative_channels = 0;
  int64_t label_channels_from = 0;
  HOST_DEVICE Term term(int64_t c) const {
    return c < negative_channels ? kNegativeTerm : (c < label_channels_from ? kSoftTerm : kLabelTerm);
  }
};

// SSUL's pseudo-labelling (MATH.md#sigmoid-pseudo); enabled when threshold >= 0.
struct PseudoRule {
  double threshold = -1;
  int64_t background = 1;
  HOST_DEVICE bool enabled() const { return threshold >= 0; }
};

// Every function below reads exp(-|z|) <= 1 only, so nothing overflows. In float32 on the host the
// exp and log are logit_math.h's vectorisable lm_exp and lm_log, and the choice between the two
// sides of 0 is a select on the sign bit, not a float compare (which GCC will not if-convert, and
// which would keep the loops calling these scalar).
template <typename acc_t>
HOST_DEVICE acc_t exp_neg_abs(acc_t z) {
  return logit::lm_exp(-std::fabs(z));
}

// `negative` where z has its sign bit set, else `non_negative`.
HOST_DEVICE float by_sign(float z, float negative, float non_negative) {
  const uint32_t sign = 0u - (bits_of(z) >> 31);
  return float_of((sign & bits_of(negative)) | (~sign & bits_of(non_negative)));
}
HOST_DEVICE double by_sign(double z, double negative, double non_negative) {
  return std::signbit(z) ? negative : non_negative;
}

// 1 / v for v in [1, 2], correctly rounded. On the device the float32 division's slow path (for
// operands it never sees here) cost the CUDA gather a register spill; the reciprocal has none.
HOST_DEVICE float reciprocal_1_2(float v) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(v);
#else
  return 1.0f / v;
#endif
}
HOST_DEVICE double reciprocal_1_2(double v) { return 1.0 / v; }

// sigmoid(z) = 1 / (1 + e^-z), from e = exp(-|z|): e / (1 + e) below 0, 1 / (1 + e) above.
template <typename acc_t>
HOST_DEVICE acc_t logistic(acc_t z) {
  const acc_t e = exp_neg_abs(z), inverse = reciprocal_1_2(acc_t(1) + e);
  return by_sign(z, e * inverse, inverse);
}

// log(1 + exp(-x)) = max(-x, 0) + log(1 + exp(-|x|)); max(-x, 0) = (|x| - x) / 2 exactly.
template <typename acc_t>
HOST_DEVICE acc_t softplus_neg(acc_t x) {
  const acc_t e = exp_neg_abs(x);
  if constexpr (std::is_same_v<acc_t, double>) {
    return (std::fabs(x) - x) * 0.5 + std::log1p(e);
  } else {
    // 1 + e rounds e below 6e-8 away: an absolute error below float32's resolution of the loss.
    return (std::fabs(x) - x) * 0.5f + logit::lm_log(1.0f + e);
  }
}

// MATH.md#sigmoid-bce: BCE with logits x, target tau, positive weight pos (channel weight applied by the caller).
template <typename acc_t>
HOST_DEVICE acc_t bce(acc_t x, acc_t tau, acc_t pos) {
  return (acc_t(1) - tau) * x + (acc_t(1) + (pos - acc_t(1)) * tau) * softplus_neg(x);
}

// d bce / dx = (1 - tau) - (1 + (pos - 1) tau) sigmoid(-x).
template <typename acc_t>
HOST_DEVICE acc_t bce_grad(acc_t x, acc_t tau, acc_t pos) {
  return (acc_t(1) - tau) - (acc_t(1) + (pos - acc_t(1)) * tau) * logistic(-x);
}

// The pseudo-label of a pixel with label `label` (valid: not ignore_index) given the teacher's
// maximum `best_score` at channel `best` (-1: none): that class when the rule accepts it, else `label`.
template <typename acc_t>
HOST_DEVICE int64_t pseudo_label(const PseudoRule& rule, int64_t label, bool valid, int64_t best, acc_t best_score) {
  const bool eligible = valid && label < rule.background;
  const bool confident = best >= rule.background && logistic(best_score) >= acc_t(rule.threshold);
  return eligible && confident ? best : label;
}

}  // namespace sigmoid
}  // namespace incseg
