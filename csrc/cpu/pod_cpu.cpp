// Fused CPU kernels of PLOP's Local POD (docs/MATH.md#local-pod).
//
// Work items are (image, channel) planes, NCHW contiguous. Per plane:
// forward   one pass over the rows of new and old: e = (new - old)(new + old) for the row, then for
//           each scale its width-pooled values (sums over each cell's columns) and the running
//           height-pooled sums (a vector add of the row into its row block's accumulators), which
//           live in the plane's slice of pooled_diff itself; then the plane's sum of squares (double).
//           Per image, l^2 = the sum over its channels in channel order; 1/l and the loss follow.
// backward  one pass over the rows: each row's pooled gradient (the sum of common/pod_math.h's
//           pooled_gradient, built for a whole row at once: each width-pooled value spread over its
//           cell's columns, plus the row block's height-pooled values) times 2 new k_n, stored once.
// Every plane writes its own outputs and the per-image sums run in a fixed order: results do not
// depend on the thread count. Nothing feature-sized is allocated besides the gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/pod_host.h"
#include "common/pod_math.h"
#include "cpu/toolkit.h"

namespace incseg {
namespace {

namespace cpu = incseg::cpu;
using at::Tensor;
using cpu::acc_type;
using cpu::load;
using cpu::to_storage;
using pod::Geometry;

// sum_p x[p]^2 in double with independent lanes (vectorisable without reassociation flags).
template <typename acc_t>
INCSEG_FORCE_INLINE double sum_of_squares(const acc_t* __restrict x, int64_t n) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(x[p + l]) * x[p + l];
  }
  double total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; p < n; ++p) total += static_cast<double>(x[p]) * x[p];
  return total;
}

// One plane's pooled differences (`pooled`, g.pooled values) and their sum of squares (`*squares`).
// `row` is scratch for W values.
template <typename scalar_t, typename acc_t>
struct PoolPlane {
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict new_plane, const scalar_t* __restrict old_plane,
                                      const Geometry& g, acc_t* __restrict row, acc_t* __restrict pooled,
                                      double* squares) {
    for (int64_t p = 0; p < g.pooled; ++p) pooled[p] = 0;
    for (int64_t r = 0; r < g.height; ++r) {
      for (int64_t q = 0; q < g.width; ++q) {
        row[q] =
            pod::squared_difference(load<acc_t>(new_plane, r * g.width + q), load<acc_t>(old_plane, r * g.width + q));
      }
      for (int k = 0; k < g.num_scales; ++k) {
        if (r >= g.rows(k)) continue;
        const acc_t inv_w = static_cast<acc_t>(g.inv_cell_w[k]);
        for (int64_t j = 0; j < g.scale[k]; ++j) {
          acc_t sum = 0;
          for (int64_t q = j * g.cell_w[k]; q < (j + 1) * g.cell_w[k]; ++q) sum += row[q];
          pooled[g.width_pooled(k, r, j)] = sum * inv_w;
        }
        acc_t* __restrict column_sums = pooled + g.height_pooled(k, r / g.cell_h[k], 0);
        for (int64_t q = 0; q < g.columns(k); ++q) column_sums[q] += row[q];
      }
    }
    for (int k = 0; k < g.num_scales; ++k) {
      const acc_t inv_h = static_cast<acc_t>(g.inv_cell_h[k]);
      acc_t* __restrict means = pooled + g.height_pooled(k, 0, 0);
      for (int64_t p = 0; p < g.scale[k] * g.columns(k); ++p) means[p] *= inv_h;
    }
    *squares = sum_of_squares(pooled, g.pooled);
  }
};

// One plane's gradient: d_plane = weight * new * (pooled gradient), weight = 2 k_n.
template <typename scalar_t, typename acc_t>
struct SpreadPlane {
  static INCSEG_FORCE_INLINE void run(const scalar_t* __restrict new_plane, const acc_t* __restrict pooled,
                                      const Geometry& g, acc_t weight, acc_t* __restrict row,
                                      scalar_t* __restrict d_plane) {
    for (int64_t r = 0; r < g.height; ++r) {
      for (int64_t q = 0; q < g.width; ++q) row[q] = 0;
      for (int k = 0; k < g.num_scales; ++k) {
        if (r >= g.rows(k)) continue;
        const acc_t inv_w = static_cast<acc_t>(g.inv_cell_w[k]), inv_h = static_cast<acc_t>(g.inv_cell_h[k]);
        const acc_t* __restrict height_means = pooled + g.height_pooled(k, r / g.cell_h[k], 0);
        for (int64_t j = 0; j < g.scale[k]; ++j) {
          const acc_t width_term = pooled[g.width_pooled(k, r, j)] * inv_w;
          for (int64_t q = j * g.cell_w[k]; q < (j + 1) * g.cell_w[k]; ++q) {
            row[q] += width_term + height_means[q] * inv_h;
          }
        }
      }
      for (int64_t q = 0; q < g.width; ++q) {
        d_plane[r * g.width + q] = to_storage<scalar_t>(weight * load<acc_t>(new_plane, r * g.width + q) * row[q]);
      }
    }
  }
};

// Cost of one plane for parallel_over_items.
int64_t plane_cost(const Geometry& g) { return g.height * g.width * (g.num_scales + 1); }

std::tuple<Tensor, Tensor, Tensor> local_pod_forward_cpu(const Tensor& new_in, const Tensor& old_in,
                                                         at::IntArrayRef scales, c10::string_view reduction) {
  const Geometry g = pod::check_forward(new_in, old_in, scales);
  const double scale = pod::reduction_scale(reduction, new_in.size(0));
  const Tensor new_features = new_in.contiguous(), old_features = old_in.contiguous();
  const int64_t batch = new_features.size(0), channels = new_features.size(1), plane = g.height * g.width;
  pod::ForwardOutputs out = pod::allocate_forward(new_features, g, reduction);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, new_features.scalar_type(), "local_pod_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* new_data = new_features.const_data_ptr<scalar_t>();
    const scalar_t* old_data = old_features.const_data_ptr<scalar_t>();
    acc_t* pooled = out.pooled_diff.mutable_data_ptr<acc_t>();
    std::vector<double> plane_squares(batch * channels);
    cpu::parallel_over_items(batch * channels, plane_cost(g), [&](int64_t first, int64_t last) {
      std::vector<acc_t> row(g.width);
      for (int64_t item = first; item < last; ++item) {
        cpu::run_best<PoolPlane<scalar_t, acc_t>>(new_data + item * plane, old_data + item * plane, g, row.data(),
                                                  pooled + item * g.pooled, &plane_squares[item]);
      }
    });
    acc_t* inv_norm = out.inv_norm.mutable_data_ptr<acc_t>();
    acc_t* loss = out.loss.mutable_data_ptr<acc_t>();
    double total = 0;
    for (int64_t n = 0; n < batch; ++n) {
      double squared_length = 0;
      for (int64_t c = 0; c < channels; ++c) squared_length += plane_squares[n * channels + c];
      inv_norm[n] = pod::inverse_length<acc_t>(squared_length);
      const double length = std::sqrt(squared_length);
      if (reduction == "none") loss[n] = static_cast<acc_t>(length);
      total += length;
    }
    if (reduction != "none") *loss = static_cast<acc_t>(total * scale);
  });
  return {out.loss, out.pooled_diff, out.inv_norm};
}

Tensor local_pod_backward_cpu(const Tensor& grad_loss, const Tensor& new_in, const Tensor& pooled_diff,
                              const Tensor& inv_norm, at::IntArrayRef scales, c10::string_view reduction) {
  const auto [g, scale] = pod::check_backward(grad_loss, new_in, pooled_diff, inv_norm, scales, reduction);
  const Tensor new_features = new_in.contiguous();
  const Tensor upstream = pod::upstream_per_image(grad_loss, new_features);
  const int64_t batch = new_features.size(0), channels = new_features.size(1), plane = g.height * g.width;
  Tensor grad = at::empty_like(new_features, at::MemoryFormat::Contiguous);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, new_features.scalar_type(), "local_pod_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* new_data = new_features.const_data_ptr<scalar_t>();
    const acc_t* pooled = pooled_diff.const_data_ptr<acc_t>();
    const acc_t* up = upstream.const_data_ptr<acc_t>();
    const acc_t* inv = inv_norm.const_data_ptr<acc_t>();
    scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
    cpu::parallel_over_items(batch * channels, plane_cost(g), [&](int64_t first, int64_t last) {
      std::vector<acc_t> row(g.width);
      for (int64_t item = first; item < last; ++item) {
        const int64_t n = item / channels;
        const acc_t weight = acc_t(2) * pod::image_weight<acc_t>(scale, up[n], inv[n]);
        cpu::run_best<SpreadPlane<scalar_t, acc_t>>(new_data + item * plane, pooled + item * g.pooled, g, weight,
                                                    row.data(), grad_data + item * plane);
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast, CPU, m) {
  m.impl("local_pod_forward", &incseg::local_pod_forward_cpu);
  m.impl("local_pod_backward", &incseg::local_pod_backward_cpu);
}
