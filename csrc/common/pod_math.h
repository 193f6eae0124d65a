#pragma once
// Geometry and per-element math of PLOP's Local POD (MATH.md#local-pod), shared by the CPU kernels
// and the CUDA kernel bodies (no torch).
//
// Per image and channel the pooling (in the forward, and again in the backward: nothing of P is
// saved between them) writes the pooled differences P of e = new^2 - old^2, one block per scale k
// (scale s, cells of h x w):
//   width-pooled   P[offset_k + r * s + j]                 r < s h, j < s   (mean of e over the cell's columns)
//   height-pooled  P[offset_k + s * s * h + i * (s w) + q] i < s, q < s w   (mean over the cell's rows)
// Rows from s h on and columns from s w on belong to no cell of scale k (MATH.md#local-pod-remainder).
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace incseg {
namespace pod {

// The most scales one call takes (the geometry is passed to the kernels by value).
constexpr int kMaxScales = 8;

struct Geometry {
  int64_t height = 0;
  int64_t width = 0;
  int num_scales = 0;
  int64_t scale[kMaxScales] = {};
  int64_t cell_h[kMaxScales] = {};
  int64_t cell_w[kMaxScales] = {};
  double inv_cell_h[kMaxScales] = {};  // 1/h and 1/w: kernels multiply (a division is a slow call on the GPU)
  double inv_cell_w[kMaxScales] = {};
  int64_t offset[kMaxScales] = {};  // of scale k's values within a channel's pooled values
  int64_t pooled = 0;               // pooled values per image and channel: sum_s s^2 (h_s + w_s)

  // Rows [0, rows(k)) and columns [0, columns(k)) are pooled at scale k.
  HOST_DEVICE int64_t rows(int k) const { return scale[k] * cell_h[k]; }
  HOST_DEVICE int64_t columns(int k) const { return scale[k] * cell_w[k]; }
  // Where scale k's width-pooled value of row r and column block j lives.
  HOST_DEVICE int64_t width_pooled(int k, int64_t r, int64_t j) const { return offset[k] + r * scale[k] + j; }
  // Where scale k's height-pooled value of row block i and column q lives.
  HOST_DEVICE int64_t height_pooled(int k, int64_t i, int64_t q) const {
    return offset[k] + scale[k] * rows(k) + i * columns(k) + q;
  }
};

// The geometry of (height, width) maps pooled at `scales` (each in [1, min(height, width)]).
inline Geometry make_geometry(int64_t height, int64_t width, const int64_t* scales, int num_scales) {
  Geometry g;
  g.height = height;
  g.width = width;
  g.num_scales = num_scales;
  for (int k = 0; k < num_scales; ++k) {
    g.scale[k] = scales[k];
    g.cell_h[k] = height / scales[k];
    g.cell_w[k] = width / scales[k];
    g.inv_cell_h[k] = 1.0 / static_cast<double>(g.cell_h[k]);
    g.inv_cell_w[k] = 1.0 / static_cast<double>(g.cell_w[k]);
    g.offset[k] = g.pooled;
    g.pooled += scales[k] * (g.rows(k) + g.columns(k));
  }
  return g;
}

// e = new^2 - old^2, as (new - old)(new + old): rounded once, so that it keeps its digits when the
// two models nearly agree (the start of an incremental step).
template <typename acc_t>
HOST_DEVICE acc_t squared_difference(acc_t new_value, acc_t old_value) {
  return (new_value - old_value) * (new_value + old_value);
}

// The pooled-gradient sum of one element (MATH.md#local-pod-gradient, without 2 a k_n):
// sum over the scales whose cells hold (r, q) of P^w / w + P^h / h.
template <typename acc_t>
HOST_DEVICE acc_t pooled_gradient(const Geometry& g, const acc_t* pooled, int64_t r, int64_t q) {
  acc_t sum = 0;
  // Unrolled over every possible scale: constant indices keep the geometry out of GPU local memory.
  INCSEG_UNROLL
  for (int k = 0; k < kMaxScales; ++k) {
    if (k < g.num_scales && r < g.rows(k) && q < g.columns(k)) {
      sum += pooled[g.width_pooled(k, r, q / g.cell_w[k])] * static_cast<acc_t>(g.inv_cell_w[k]) +
             pooled[g.height_pooled(k, r / g.cell_h[k], q)] * static_cast<acc_t>(g.inv_cell_h[k]);
    }
  }
  return sum;
}

// k_n of MATH.md#local-pod-gradient: reduction scale x upstream x 1/l_n.
template <typename acc_t>
HOST_DEVICE acc_t image_weight(double scale, acc_t upstream, acc_t inv_norm) {
  return static_cast<acc_t>(scale) * upstream * inv_norm;
}

// 1/l from l^2, 0 for l == 0 (the norm's zero subgradient); NaN stays NaN.
template <typename acc_t>
HOST_DEVICE acc_t inverse_length(double squared_length) {
  return squared_length != 0 ? static_cast<acc_t>(1.0 / sqrt(squared_length)) : acc_t(0);
}

}  // namespace pod
}  // namespace incseg
