#pragma once
// CUDA kernel bodies of PLOP's Local POD (MATH.md#local-pod) and their kernel sequences, written
// as common/grid.h kernels so that the same bodies run on the CPU (incseg_fast_cuda_emulator).
//
// forward   RowPoolKernel     one thread per (image, channel, row): the row's width-pooled means at
//                             every scale (reading the row once per scale, from cache after the first)
//           ColumnPoolKernel  one thread per (image, channel, column): the column's height-pooled
//                             means (consecutive threads read consecutive columns: coalesced)
//           both write P (common/pod_math.h's layout) and one partial of sum P^2 per warp
//           finish            one block: per image l^2 from its warps' partials (a fixed tree),
//                             1/l, and the loss (the per-image l, or their mean or sum)
// backward  the forward's sequence again into scratch P (the same P, bit for bit; only 1/l is saved),
//           GradKernel        then one thread per element: 2 k_n new * pooled_gradient, stored once
// No atomics: every sum has one fixed order.
#include <cstdint>

#include "common/dtype.h"
#include "common/grid.h"
#include "common/pod_math.h"

namespace incseg {
namespace pod {

template <typename scalar_t>
struct Inputs {
  const scalar_t* new_features;
  const scalar_t* old_features;
  int64_t channels;
  Geometry geometry;
};

// The means of e over `cells` consecutive cells of `cell` elements along one line of a plane (a
// row: stride 1, or a column: stride W), stored `out_stride` apart; returns their sum of squares.
// The row and the column pool kernels share it.
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE double pool_line(const scalar_t* a, const scalar_t* b, int64_t stride, int64_t cells, int64_t cell,
                             acc_t inv_cell, acc_t* out, int64_t out_stride) {
  double squares = 0;
  for (int64_t j = 0; j < cells; ++j) {
    acc_t sum = 0;
    for (int64_t p = j * cell; p < (j + 1) * cell; ++p) {
      sum += squared_difference(static_cast<acc_t>(to_accumulate(a[p * stride])),
                                static_cast<acc_t>(to_accumulate(b[p * stride])));
    }
    const acc_t mean = sum * inv_cell;
    out[j * out_stride] = mean;
    squares += static_cast<double>(mean) * mean;
  }
  return squares;
}

template <typename scalar_t>
struct RowPoolKernel {
  static constexpr int kThreads = 256;
  using acc_t = accumulate_t<scalar_t>;
  Inputs<scalar_t> in;
  acc_t* pooled;
  double* warp_squares;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const Geometry& g = in.geometry;
    const int64_t row = index.first_pixel(1);  // channel * height + r
    double squares = 0;
    if (row < in.channels * g.height) {
      const int64_t plane = index.block_y * in.channels + row / g.height, r = row % g.height;
      const scalar_t* a = in.new_features + (plane * g.height + r) * g.width;
      const scalar_t* b = in.old_features + (plane * g.height + r) * g.width;
      acc_t* out = pooled + plane * g.pooled;
      INCSEG_UNROLL
      for (int k = 0; k < kMaxScales; ++k) {
        if (k >= g.num_scales || r >= g.rows(k)) continue;
        squares += pool_line(a, b, 1, g.scale[k], g.cell_w[k], static_cast<acc_t>(g.inv_cell_w[k]),
                             out + g.width_pooled(k, r, 0), 1);
      }
    }
    warp_sum_to(warp_squares + index.warp(), squares, index);
  }
};

template <typename scalar_t>
struct ColumnPoolKernel {
  static constexpr int kThreads = 256;
  using acc_t = accumulate_t<scalar_t>;
  Inputs<scalar_t> in;
  acc_t* pooled;
  double* warp_squares;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const Geometry& g = in.geometry;
    const int64_t column = index.first_pixel(1);  // channel * width + q
    double squares = 0;
    if (column < in.channels * g.width) {
      const int64_t plane = index.block_y * in.channels + column / g.width, q = column % g.width;
      const scalar_t* a = in.new_features + plane * g.height * g.width + q;
      const scalar_t* b = in.old_features + plane * g.height * g.width + q;
      acc_t* out = pooled + plane * g.pooled;
      INCSEG_UNROLL
      for (int k = 0; k < kMaxScales; ++k) {
        if (k >= g.num_scales || q >= g.columns(k)) continue;
        squares += pool_line(a, b, g.width, g.scale[k], g.cell_h[k], static_cast<acc_t>(g.inv_cell_h[k]),
                             out + g.height_pooled(k, 0, q), g.columns(k));
      }
    }
    warp_sum_to(warp_squares + index.warp(), squares, index);
  }
};

// The per-image sums: image n's partials are row_squares[n * row_warps, (n + 1) * row_warps) and
// likewise for the columns (the pool kernels put images on the grid's y axis).
template <typename acc_t>
struct FinishStep {
  const double* row_squares;
  int64_t row_warps;
  const double* column_squares;
  int64_t column_warps;
  int64_t batch;
  double scale;
  bool per_image;  // reduction "none": loss holds each image's l
  acc_t* loss;
  acc_t* inv_norm;
};

// Writes image n's 1/l (and l for "none"); returns l.
template <typename acc_t>
HOST_DEVICE double finish_image(const FinishStep<acc_t>& step, int64_t n, double squared_length) {
  step.inv_norm[n] = inverse_length<acc_t>(squared_length);
  const double length = sqrt(squared_length);
  if (step.per_image) step.loss[n] = static_cast<acc_t>(length);
  return length;
}

template <typename scalar_t>
struct ForwardCall {
  using acc_t = accumulate_t<scalar_t>;
  Inputs<scalar_t> in;
  acc_t* pooled;
  double* row_squares;
  double* column_squares;
  FinishStep<acc_t> finish;
};

// Grids (x, y = batch) of the two pool kernels.
inline int64_t row_blocks(int64_t channels, const Geometry& g) {
  return ceil_div(channels * g.height, RowPoolKernel<float>::kThreads);
}
inline int64_t column_blocks(int64_t channels, const Geometry& g) {
  return ceil_div(channels * g.width, ColumnPoolKernel<float>::kThreads);
}

template <typename Executor, typename scalar_t>
void local_pod_forward_kernels(Executor& ex, const ForwardCall<scalar_t>& call, int64_t batch) {
  ex.run(RowPoolKernel<scalar_t>{call.in, call.pooled, call.row_squares},
         row_blocks(call.in.channels, call.in.geometry), batch);
  ex.run(ColumnPoolKernel<scalar_t>{call.in, call.pooled, call.column_squares},
         column_blocks(call.in.channels, call.in.geometry), batch);
  ex.finish(call.finish);
}

template <typename scalar_t>
struct GradKernel {
  static constexpr int kThreads = 256;
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* new_features;
  const acc_t* pooled;
  const acc_t* upstream;  // (B,)
  const acc_t* inv_norm;  // (B,)
  double scale;
  int64_t channels;
  Geometry geometry;
  scalar_t* grad;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const Geometry& g = geometry;
    const int64_t plane_size = g.height * g.width;
    const int64_t element = index.first_pixel(1);  // channel * H * W + r * W + q
    if (element >= channels * plane_size) return;
    const int64_t n = index.block_y, c = element / plane_size, p = element % plane_size;
    const int64_t offset = n * channels * plane_size + element;
    const acc_t weight = acc_t(2) * image_weight<acc_t>(scale, upstream[n], inv_norm[n]);
    const acc_t spread = pooled_gradient(g, pooled + (n * channels + c) * g.pooled, p / g.width, p % g.width);
    const acc_t value = static_cast<acc_t>(to_accumulate(new_features[offset]));
    grad[offset] = Storage<scalar_t>::from(weight * value * spread);
  }
};

inline int64_t grad_blocks(int64_t channels, const Geometry& g) {
  return ceil_div(channels * g.height * g.width, GradKernel<float>::kThreads);
}

// The CPU emulation of the sequences: every thread in order, and the finish step's host twin.
struct HostExecutor {
  template <typename Kernel>
  void run(const Kernel& kernel, int64_t grid_x, int64_t grid_y) {
    run_on_host(kernel, grid_x, grid_y);
  }

  template <typename acc_t>
  void finish(const FinishStep<acc_t>& step) {
    double total = 0;
    for (int64_t n = 0; n < step.batch; ++n) {
      double squared_length = 0;
      for (int64_t w = 0; w < step.row_warps; ++w) squared_length += step.row_squares[n * step.row_warps + w];
      for (int64_t w = 0; w < step.column_warps; ++w) squared_length += step.column_squares[n * step.column_warps + w];
      total += finish_image(step, n, squared_length);
    }
    if (!step.per_image) *step.loss = static_cast<acc_t>(total * step.scale);
  }
};

// The launchers (pod_kernels.cu): the same sequences on `stream` (a cudaStream_t); each returns the
// CUDA error code of the first failing launch (0: success).
template <typename scalar_t>
int launch_local_pod_forward(const ForwardCall<scalar_t>& call, int64_t batch, void* stream);
template <typename scalar_t>
int launch_local_pod_backward(const GradKernel<scalar_t>& kernel, int64_t batch, void* stream);

}  // namespace pod
}  // namespace incseg
