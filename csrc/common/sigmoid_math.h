#pragma once
// Per-element arithmetic of the sigmoid losses with composed targets (MATH.md#sigmoid-losses),
// shared by the CPU and CUDA kernels: the channel layout, the binary cross-entropy with logits and
// its gradient, SSUL's pseudo-label rule. Scalars only, so that loops over pixels can vectorise.
#include <cmath>
#include <cstdint>

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

template <typename acc_t>
HOST_DEVICE acc_t logistic(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

// log(1 + exp(z)) for every finite z, without overflow or a cut-off.
template <typename acc_t>
HOST_DEVICE acc_t softplus(acc_t z) {
  return (z > acc_t(0) ? z : acc_t(0)) + std::log1p(std::exp(-std::fabs(z)));
}

// MATH.md#sigmoid-bce: BCE with logits x, target tau, positive weight pos (channel weight applied by the caller).
template <typename acc_t>
HOST_DEVICE acc_t bce(acc_t x, acc_t tau, acc_t pos) {
  return (acc_t(1) - tau) * x + (acc_t(1) + (pos - acc_t(1)) * tau) * softplus(-x);
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
