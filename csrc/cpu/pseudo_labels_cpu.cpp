// CPU kernels of PLOP's entropy pseudo-labels (MATH.md#pseudo-labels): the new labels with the
// per-image adaptive factor, and the (class, entropy bin) histogram of the background pixels.
//
// Images are cut into fixed tiles of kTile pixels. Per tile, one pass over the Co channel rows
// (channel loop outside, pixel loop inside, so the pixel loop vectorises) streams each pixel's
// logits through common/pseudo_math.h's EntropyStream, giving k̂ and u per pixel; the labels or the
// histogram follow from them. With size= each channel row of the tile is first interpolated from
// y's four taps into scratch (common/upsample.h), so the upsampled logits are never stored whole.
// Counts are integers: per-tile counts and per-range histograms add up to the same totals in any
// order, so the results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "common/pseudo_host.h"
#include "common/pseudo_math.h"
#include "common/upsample.h"
#include "cpu/toolkit.h"

namespace incseg {
namespace pseudo {
namespace {

using cpu::acc_type;
using cpu::load;

constexpr int64_t kTile = 512;
constexpr cpu::TilePolicy kTiles{kTile, kTile, kTile};

// Per-pixel results of one tile.
template <typename acc_t>
struct TileResult {
  acc_t u[kTile];
  int32_t argmax[kTile];
};

// k̂ and u of n pixels whose channel rows start at rows and lie `stride` elements apart.
template <typename acc_t, typename T>
INCSEG_FORCE_INLINE void stream_tile(const T* rows, int64_t stride, int64_t channels, int64_t n, acc_t inv_log_classes,
                                     TileResult<acc_t>& out) {
  acc_t max[kTile], z[kTile], s[kTile];
  int32_t* __restrict__ argmax = out.argmax;
  for (int64_t p = 0; p < n; ++p) {
    max[p] = load<acc_t>(rows, p);
    z[p] = acc_t(1);
    s[p] = acc_t(0);
    argmax[p] = 0;
  }
  for (int64_t c = 1; c < channels; ++c) {
    const T* __restrict__ row = rows + c * stride;
    for (int64_t p = 0; p < n; ++p) {
      EntropyStream<acc_t> e{max[p], z[p], s[p], argmax[p]};
      e.add(load<acc_t>(row, p), static_cast<int32_t>(c));
      max[p] = e.max;
      z[p] = e.z;
      s[p] = e.s;
      argmax[p] = e.argmax;
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    out.u[p] = EntropyStream<acc_t>{max[p], z[p], s[p], argmax[p]}.normalised_entropy(inv_log_classes);
  }
}

template <typename scalar_t>
struct Args {
  using acc_t = acc_type<scalar_t>;
  const Inputs* in;
  const scalar_t* y;
  cpu::TilePlan plan;
  acc_t inv_log_classes;
  // size=: the taps of every output row and column (empty without size=)
  std::vector<upsample::BasicTap<acc_t>> row_taps, col_taps;
};

// size=: rows[c * kTile + p] = channel c of image b upsampled to pixel p0 + p, in acc_t.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
INCSEG_FORCE_INLINE void upsample_tile(const Args<scalar_t>& a, int64_t b, int64_t p0, int64_t n, acc_t* rows) {
  const Inputs& in = *a.in;
  const int64_t plane = in.yh * in.yw;
  for (int64_t c = 0; c < in.Co; ++c) {
    const scalar_t* __restrict__ src = a.y + (b * in.Co + c) * plane;
    const auto sample = [src](int64_t i) { return load<acc_t>(src, i); };
    for (int64_t p = 0; p < n; ++p) {
      const int64_t pixel = p0 + p;
      rows[c * kTile + p] =
          upsample::bilinear<acc_t>(sample, a.row_taps[pixel / in.W], a.col_taps[pixel % in.W], in.yw);
    }
  }
}

// Every tile of [begin, end): its k̂ and u, handed to consume(tile, result).
template <typename scalar_t, bool kUpsample>
struct EntropyTiles {
  template <typename Consume>
  static INCSEG_FORCE_INLINE void run(const Args<scalar_t>& a, int64_t begin, int64_t end, const Consume& consume) {
    using acc_t = acc_type<scalar_t>;
    const Inputs& in = *a.in;
    TileResult<acc_t> result;
    std::vector<acc_t> rows(kUpsample ? in.Co * kTile : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = a.plan.image(tile), p0 = a.plan.begin(tile), n = a.plan.length(tile);
      if constexpr (kUpsample) {
        upsample_tile(a, b, p0, n, rows.data());
        stream_tile<acc_t>(rows.data(), kTile, in.Co, n, a.inv_log_classes, result);
      } else {
        stream_tile<acc_t>(a.y + b * in.Co * in.HW + p0, in.HW, in.Co, n, a.inv_log_classes, result);
      }
      consume(tile, result);
    }
  }
};

template <typename scalar_t>
Args<scalar_t> make_args(const Inputs& in) {
  using acc_t = acc_type<scalar_t>;
  Args<scalar_t> a{&in,
                   in.y.const_data_ptr<scalar_t>(),
                   cpu::plan_tiles(in.B, in.HW, kTiles),
                   static_cast<acc_t>(in.inv_log_classes()),
                   {},
                   {}};
  if (in.upsample) {
    const acc_t row_scale = upsample::source_scale<acc_t>(in.yh, in.H),
                col_scale = upsample::source_scale<acc_t>(in.yw, in.W);
    for (int64_t r = 0; r < in.H; ++r) a.row_taps.push_back(upsample::tap(r, row_scale, in.yh));
    for (int64_t q = 0; q < in.W; ++q) a.col_taps.push_back(upsample::tap(q, col_scale, in.yw));
  }
  return a;
}

// consume(tile, result) for every tile of [begin, end), in the ISA copy run_best picks.
template <typename scalar_t, typename Consume>
void run_tiles(const Args<scalar_t>& a, int64_t begin, int64_t end, const Consume& consume) {
  if (a.in->upsample) return cpu::run_best<EntropyTiles<scalar_t, true>>(a, begin, end, consume);
  cpu::run_best<EntropyTiles<scalar_t, false>>(a, begin, end, consume);
}

template <typename label_t, typename acc_t>
struct LabelTile {
  const Inputs* in;
  const label_t* labels;
  const acc_t* thresholds;
  int64_t* out;
  int64_t* tile_counts;  // (tiles, 2): confident, background
  cpu::TilePlan plan;

  INCSEG_FORCE_INLINE void operator()(int64_t tile, const TileResult<acc_t>& r) const {
    const int64_t offset = plan.image(tile) * in->HW + plan.begin(tile), n = plan.length(tile);
    int64_t confident_count = 0, background_count = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t label = static_cast<int64_t>(labels[offset + p]);
      const bool background = is_background(label, in->Co, in->ignore_index);
      const bool confident = background && r.u[p] < thresholds[r.argmax[p]];
      out[offset + p] = pseudo_label(label, background, confident, r.argmax[p], in->ignore_index);
      confident_count += confident;
      background_count += background;
    }
    tile_counts[2 * tile] = confident_count;
    tile_counts[2 * tile + 1] = background_count;
  }
};

template <typename label_t, typename acc_t>
struct HistogramTile {
  const Inputs* in;
  const label_t* labels;
  int64_t bins;
  cpu::TilePlan plan;
  int64_t* histogram;  // this range's (Co, bins)

  INCSEG_FORCE_INLINE void operator()(int64_t tile, const TileResult<acc_t>& r) const {
    const int64_t offset = plan.image(tile) * in->HW + plan.begin(tile), n = plan.length(tile);
    for (int64_t p = 0; p < n; ++p) {
      if (is_background(static_cast<int64_t>(labels[offset + p]), in->Co, in->ignore_index)) {
        ++histogram[r.argmax[p] * bins + entropy_bin(r.u[p], bins)];
      }
    }
  }
};

// fn(label_t{}) for the labels' dtype (int64, int32 or uint8; checked by check_inputs).
template <typename Fn>
void with_label_type(const at::Tensor& labels, Fn&& fn) {
  switch (labels.scalar_type()) {
    case at::kLong:
      return fn(int64_t{});
    case at::kInt:
      return fn(int32_t{});
    default:
      return fn(uint8_t{});
  }
}

// The pseudo-labels of in into out (int64 (B, H, W), contiguous; may be in.labels itself: each
// pixel's label is read before its pseudo-label is written); returns the adaptive factor.
at::Tensor pseudo_labels_into(const Inputs& in, const at::Tensor& out) {
  at::Tensor counts = at::zeros({in.B, 2}, in.labels.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.y.scalar_type(), "entropy_pseudo_labels_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Args<scalar_t> a = make_args<scalar_t>(in);
    std::vector<int64_t> tile_counts(2 * a.plan.items);
    with_label_type(in.labels, [&](auto label_tag) {
      using label_t = decltype(label_tag);
      const LabelTile<label_t, acc_t> consume{&in,
                                              in.labels.const_data_ptr<label_t>(),
                                              in.thresholds.const_data_ptr<acc_t>(),
                                              out.mutable_data_ptr<int64_t>(),
                                              tile_counts.data(),
                                              a.plan};
      cpu::parallel_over_items(a.plan.items, in.Co * a.plan.tile,
                               [&](int64_t begin, int64_t end) { run_tiles(a, begin, end, consume); });
    });
    int64_t* per_image = counts.mutable_data_ptr<int64_t>();
    for (int64_t tile = 0; tile < a.plan.items; ++tile) {
      per_image[2 * a.plan.image(tile)] += tile_counts[2 * tile];
      per_image[2 * a.plan.image(tile) + 1] += tile_counts[2 * tile + 1];
    }
  });
  return adaptive_factor(counts);
}

std::tuple<at::Tensor, at::Tensor> entropy_pseudo_labels_cpu(const at::Tensor& y, const at::Tensor& labels,
                                                             const at::Tensor& thresholds, int64_t ignore_index,
                                                             at::OptionalIntArrayRef size) {
  Inputs in = check_inputs(y, labels, ignore_index, size);
  check_thresholds(in, thresholds);
  at::Tensor out = at::empty({in.B, in.H, in.W}, labels.options().dtype(at::kLong));
  at::Tensor factor = pseudo_labels_into(in, out);
  return {out, factor};
}

at::Tensor entropy_pseudo_labels_in_place_cpu(const at::Tensor& y, const at::Tensor& labels,
                                              const at::Tensor& thresholds, int64_t ignore_index,
                                              at::OptionalIntArrayRef size) {
  Inputs in = check_inputs(y, labels, ignore_index, size);
  check_in_place_labels(labels);
  check_thresholds(in, thresholds);
  return pseudo_labels_into(in, labels);
}

at::Tensor entropy_histogram_cpu(const at::Tensor& y, const at::Tensor& labels, int64_t bins, int64_t ignore_index,
                                 at::OptionalIntArrayRef size) {
  const Inputs in = check_inputs(y, labels, ignore_index, size);
  check_bins(bins);
  at::Tensor histogram = at::zeros({in.Co, bins}, labels.options().dtype(at::kLong));
  int64_t* total = histogram.mutable_data_ptr<int64_t>();
  std::mutex merge;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.y.scalar_type(), "entropy_histogram_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Args<scalar_t> a = make_args<scalar_t>(in);
    with_label_type(in.labels, [&](auto label_tag) {
      using label_t = decltype(label_tag);
      const label_t* label_data = in.labels.const_data_ptr<label_t>();
      const auto run_range = [&](int64_t begin, int64_t end) {
        std::vector<int64_t> local(in.Co * bins, 0);
        const HistogramTile<label_t, acc_t> consume{&in, label_data, bins, a.plan, local.data()};
        run_tiles(a, begin, end, consume);
        // Integer counts: adding the ranges' histograms in any order gives the same total.
        const std::lock_guard<std::mutex> lock(merge);
        for (int64_t i = 0; i < in.Co * bins; ++i) total[i] += local[i];
      };
      cpu::parallel_over_items(a.plan.items, in.Co * a.plan.tile, run_range);
    });
  });
  return histogram;
}

}  // namespace
}  // namespace pseudo
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast, CPU, m) {
  m.impl("entropy_pseudo_labels", &incseg::pseudo::entropy_pseudo_labels_cpu);
  m.impl("entropy_pseudo_labels_", &incseg::pseudo::entropy_pseudo_labels_in_place_cpu);
  m.impl("entropy_histogram", &incseg::pseudo::entropy_histogram_cpu);
}
