// Fused CPU kernels of PLOP's Local POD (docs/MATH.md#local-pod).
//
// Work items are (image, channel) planes, NCHW contiguous. The rows (and the columns) of a plane are
// cut at every scale's cell boundaries into segments (Segments): inside one segment every element
// belongs to the same cell of each scale, or to none. Per plane:
// pool      one pass over the rows of new and old: e = (new - old)(new + old) for the row, added to
//           the row segment's column sums (one vector add per element) and summed per column segment
//           (lane sums); each scale's width-pooled value of the row is the sum of its cell's column
//           segments, and at the end of a row segment its column sums are added to the height-pooled
//           sums of each scale's cell. P (common/pod_math.h's layout) lives in per-thread scratch.
// forward   pool, then the plane's sum of P^2 (double). Per image, l^2 = the sum over its channels in
//           channel order; 1/l and the loss follow. Nothing is saved but 1/l per image.
// backward  pool again (the same function: the same P as the forward's, bit for bit), then one pass
//           over the rows: the row segment's height terms (sum over scales of P^h / h, once per
//           segment) plus the row's width term of each column segment (sum of P^w / w), times
//           2 k_n new, stored once. The plane was just read by pool, so the second read hits cache.
// Every plane writes its own outputs and the per-image sums run in a fixed order: results do not
// depend on the thread count or the ISA copy. Nothing feature-sized is allocated besides the gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
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

// One axis cut at every scale's cell boundaries and at the end of its cells.
struct Segments {
  std::vector<int64_t> bounds;  // segment t is [bounds[t], bounds[t + 1])
  std::vector<int64_t> cells;   // cells[k * count() + t]: scale k's cell holding segment t, -1 past its cells
  int64_t count() const { return static_cast<int64_t>(bounds.size()) - 1; }
  int64_t cell(int k, int64_t t) const { return cells[k * count() + t]; }
};

Segments cut_axis(int64_t length, const int64_t* cell_size, const Geometry& g) {
  Segments axis;
  axis.bounds = {0, length};
  for (int k = 0; k < g.num_scales; ++k) {
    for (int64_t i = 0; i <= g.scale[k]; ++i) axis.bounds.push_back(i * cell_size[k]);
  }
  std::sort(axis.bounds.begin(), axis.bounds.end());
  axis.bounds.erase(std::unique(axis.bounds.begin(), axis.bounds.end()), axis.bounds.end());
  for (int k = 0; k < g.num_scales; ++k) {
    for (int64_t t = 0; t < axis.count(); ++t) {
      const bool pooled = axis.bounds[t] < g.scale[k] * cell_size[k];
      axis.cells.push_back(pooled ? axis.bounds[t] / cell_size[k] : -1);
    }
  }
  return axis;
}

// The geometry and both axes' segments; per-thread scratch of scratch_size() accumulators.
struct Plan {
  Geometry geometry;
  Segments rows, columns;
  explicit Plan(const Geometry& g)
      : geometry(g), rows(cut_axis(g.height, g.cell_h, g)), columns(cut_axis(g.width, g.cell_w, g)) {}
  int64_t scratch_size() const { return geometry.pooled + 2 * geometry.width + columns.count(); }
};

// sum_p x[p] (in double for the squares below) with independent lanes: vectorisable without
// reassociation flags, and the same order in every ISA copy.
template <typename sum_t, bool kSquare, typename acc_t>
INCSEG_FORCE_INLINE sum_t lane_sum(const acc_t* __restrict x, int64_t n) {
  constexpr int64_t kLanes = 8;
  sum_t lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += kSquare ? static_cast<sum_t>(x[p + l]) * x[p + l] : x[p + l];
  }
  sum_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; p < n; ++p) total += kSquare ? static_cast<sum_t>(x[p]) * x[p] : x[p];
  return total;
}

// One plane's pooled differences into `pooled` (g.pooled values); `scratch` holds W + W + (column
// segments) accumulators: e of the row, the row segment's column sums, the row's column-segment sums.
template <typename scalar_t, typename acc_t>
INCSEG_FORCE_INLINE void pool_plane(const scalar_t* __restrict new_plane, const scalar_t* __restrict old_plane,
                                    const Plan& plan, acc_t* __restrict scratch, acc_t* __restrict pooled) {
  const Geometry& g = plan.geometry;
  const Segments &rows = plan.rows, &columns = plan.columns;
  acc_t* __restrict row = scratch;
  acc_t* __restrict segment_columns = scratch + g.width;
  acc_t* __restrict column_segments = scratch + 2 * g.width;
  std::fill(pooled, pooled + g.pooled, acc_t(0));
  for (int64_t t = 0; t < rows.count(); ++t) {
    std::fill(segment_columns, segment_columns + g.width, acc_t(0));
    for (int64_t r = rows.bounds[t]; r < rows.bounds[t + 1]; ++r) {
      const scalar_t* __restrict a = new_plane + r * g.width;
      const scalar_t* __restrict b = old_plane + r * g.width;
      for (int64_t q = 0; q < g.width; ++q) {
        const acc_t e = pod::squared_difference(load<acc_t>(a, q), load<acc_t>(b, q));
        row[q] = e;
        segment_columns[q] += e;
      }
      for (int64_t u = 0; u < columns.count(); ++u) {
        column_segments[u] = lane_sum<acc_t, false>(row + columns.bounds[u], columns.bounds[u + 1] - columns.bounds[u]);
      }
      for (int k = 0; k < g.num_scales; ++k) {
        if (r >= g.rows(k)) continue;
        acc_t* __restrict width_sums = pooled + g.width_pooled(k, r, 0);
        for (int64_t u = 0; u < columns.count(); ++u) {
          if (columns.cell(k, u) >= 0) width_sums[columns.cell(k, u)] += column_segments[u];
        }
        const acc_t inv_w = static_cast<acc_t>(g.inv_cell_w[k]);
        for (int64_t j = 0; j < g.scale[k]; ++j) width_sums[j] *= inv_w;
      }
    }
    for (int k = 0; k < g.num_scales; ++k) {
      if (rows.cell(k, t) < 0) continue;
      acc_t* __restrict height_sums = pooled + g.height_pooled(k, rows.cell(k, t), 0);
      for (int64_t q = 0; q < g.columns(k); ++q) height_sums[q] += segment_columns[q];
    }
  }
  for (int k = 0; k < g.num_scales; ++k) {
    const acc_t inv_h = static_cast<acc_t>(g.inv_cell_h[k]);
    acc_t* __restrict means = pooled + g.height_pooled(k, 0, 0);
    for (int64_t p = 0; p < g.scale[k] * g.columns(k); ++p) means[p] *= inv_h;
  }
}

// One plane's gradient from its pooled values: d_plane = weight * new * (sum over the scales whose
// cells hold the element of P^w / w + P^h / h), weight = 2 k_n. `scratch`: W + (column segments).
template <typename scalar_t, typename acc_t>
INCSEG_FORCE_INLINE void spread_plane(const scalar_t* __restrict new_plane, const acc_t* __restrict pooled,
                                      const Plan& plan, acc_t weight, acc_t* __restrict scratch,
                                      scalar_t* __restrict d_plane) {
  const Geometry& g = plan.geometry;
  const Segments &rows = plan.rows, &columns = plan.columns;
  acc_t* __restrict height_terms = scratch;
  acc_t* __restrict width_terms = scratch + g.width;
  for (int64_t t = 0; t < rows.count(); ++t) {
    std::fill(height_terms, height_terms + g.width, acc_t(0));
    for (int k = 0; k < g.num_scales; ++k) {
      if (rows.cell(k, t) < 0) continue;
      const acc_t inv_h = static_cast<acc_t>(g.inv_cell_h[k]);
      const acc_t* __restrict means = pooled + g.height_pooled(k, rows.cell(k, t), 0);
      for (int64_t q = 0; q < g.columns(k); ++q) height_terms[q] += means[q] * inv_h;
    }
    for (int64_t r = rows.bounds[t]; r < rows.bounds[t + 1]; ++r) {
      std::fill(width_terms, width_terms + columns.count(), acc_t(0));
      for (int k = 0; k < g.num_scales; ++k) {
        if (r >= g.rows(k)) continue;
        const acc_t inv_w = static_cast<acc_t>(g.inv_cell_w[k]);
        const acc_t* __restrict means = pooled + g.width_pooled(k, r, 0);
        for (int64_t u = 0; u < columns.count(); ++u) {
          if (columns.cell(k, u) >= 0) width_terms[u] += means[columns.cell(k, u)] * inv_w;
        }
      }
      const scalar_t* __restrict a = new_plane + r * g.width;
      scalar_t* __restrict d = d_plane + r * g.width;
      for (int64_t u = 0; u < columns.count(); ++u) {
        const acc_t width_term = width_terms[u];
        for (int64_t q = columns.bounds[u]; q < columns.bounds[u + 1]; ++q) {
          d[q] = to_storage<scalar_t>(weight * load<acc_t>(a, q) * (height_terms[q] + width_term));
        }
      }
    }
  }
}

// The forward of one plane: its pooled values and their sum of squares.
template <typename scalar_t, typename acc_t>
struct ForwardPlane {
  static INCSEG_FORCE_INLINE void run(const scalar_t* new_plane, const scalar_t* old_plane, const Plan& plan,
                                      acc_t* scratch, acc_t* pooled, double* squares) {
    pool_plane(new_plane, old_plane, plan, scratch, pooled);
    *squares = lane_sum<double, true>(pooled, plan.geometry.pooled);
  }
};

// The backward of one plane: its pooled values again, then its gradient.
template <typename scalar_t, typename acc_t>
struct GradPlane {
  static INCSEG_FORCE_INLINE void run(const scalar_t* new_plane, const scalar_t* old_plane, const Plan& plan,
                                      acc_t weight, acc_t* scratch, acc_t* pooled, scalar_t* d_plane) {
    pool_plane(new_plane, old_plane, plan, scratch, pooled);
    spread_plane(new_plane, pooled, plan, weight, scratch, d_plane);
  }
};

// Cost of one plane for parallel_over_items.
int64_t plane_cost(const Geometry& g) { return g.height * g.width * 4; }

std::tuple<Tensor, Tensor> local_pod_forward_cpu(const Tensor& new_in, const Tensor& old_in, at::IntArrayRef scales,
                                                 c10::string_view reduction) {
  const Plan plan(pod::check_forward(new_in, old_in, scales));
  const Geometry& g = plan.geometry;
  const double scale = pod::reduction_scale(reduction, new_in.size(0));
  const Tensor new_features = new_in.contiguous(), old_features = old_in.contiguous();
  const int64_t batch = new_features.size(0), channels = new_features.size(1), plane = g.height * g.width;
  pod::ForwardOutputs out = pod::allocate_forward(new_features, reduction);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, new_features.scalar_type(), "local_pod_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* new_data = new_features.const_data_ptr<scalar_t>();
    const scalar_t* old_data = old_features.const_data_ptr<scalar_t>();
    std::vector<double> plane_squares(batch * channels);
    cpu::parallel_over_items(batch * channels, plane_cost(g), [&](int64_t first, int64_t last) {
      std::vector<acc_t> scratch(plan.scratch_size());
      for (int64_t item = first; item < last; ++item) {
        cpu::run_best<ForwardPlane<scalar_t, acc_t>>(new_data + item * plane, old_data + item * plane, plan,
                                                     scratch.data() + g.pooled, scratch.data(), &plane_squares[item]);
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
  return {out.loss, out.inv_norm};
}

Tensor local_pod_backward_cpu(const Tensor& grad_loss, const Tensor& new_in, const Tensor& old_in,
                              const Tensor& inv_norm, at::IntArrayRef scales, c10::string_view reduction) {
  const auto [geometry, scale] = pod::check_backward(grad_loss, new_in, old_in, inv_norm, scales, reduction);
  const Plan plan(geometry);
  const Geometry& g = plan.geometry;
  const Tensor new_features = new_in.contiguous(), old_features = old_in.contiguous();
  const Tensor upstream = pod::upstream_per_image(grad_loss, new_features);
  const int64_t channels = new_features.size(1), plane = g.height * g.width;
  Tensor grad = at::empty_like(new_features, at::MemoryFormat::Contiguous);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, new_features.scalar_type(), "local_pod_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* new_data = new_features.const_data_ptr<scalar_t>();
    const scalar_t* old_data = old_features.const_data_ptr<scalar_t>();
    const acc_t* up = upstream.const_data_ptr<acc_t>();
    const acc_t* inv = inv_norm.const_data_ptr<acc_t>();
    scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
    cpu::parallel_over_items(new_features.size(0) * channels, 2 * plane_cost(g), [&](int64_t first, int64_t last) {
      std::vector<acc_t> scratch(plan.scratch_size());
      for (int64_t item = first; item < last; ++item) {
        const int64_t n = item / channels;
        const acc_t weight = acc_t(2) * pod::image_weight<acc_t>(scale, up[n], inv[n]);
        cpu::run_best<GradPlane<scalar_t, acc_t>>(new_data + item * plane, old_data + item * plane, plan, weight,
                                                  scratch.data() + g.pooled, scratch.data(), grad_data + item * plane);
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
