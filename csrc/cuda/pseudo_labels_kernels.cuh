#pragma once
// The CUDA kernels of PLOP's entropy pseudo-labels (MATH.md#pseudo-labels), as HOST_DEVICE bodies
// (common/grid.h): pseudo_labels_kernels.cu launches them on the GPU, pseudo_labels_cuda.cpp also
// runs them on the CPU (the incseg_fast_cuda_emulator namespace). Nothing here includes torch or
// the CUDA runtime.
//
// Layout: one thread per output pixel (block_y = image, consecutive threads on consecutive pixels,
// so each channel row is read coalesced). A thread reads its label first and streams its pixel's
// Co logits (common/pseudo_math.h; with size= each logit interpolated from y's four taps) only
// for a background pixel: the others keep their label and need no logit.
// Labels: the new label per pixel, and the confident and background counts per warp (warp_sum_to),
// which the glue adds per image. Histogram: one integer atomic add per background pixel; integer
// sums do not depend on the order, so the histogram is deterministic.
#include <cstdint>

#include "common/dtype.h"
#include "common/grid.h"
#include "common/macros.h"
#include "common/pseudo_math.h"
#include "common/upsample.h"

namespace incseg {
namespace pseudo {

template <typename scalar_t>
struct PseudoInputs {
  using acc_t = accumulate_t<scalar_t>;
  const scalar_t* y;   // (B, Co, yh, yw)
  const void* labels;  // (B, H, W) of label_bytes-wide integers: int64, int32 or uint8
  int label_bytes;
  int64_t Co, H, W, HW, yh, yw;
  int64_t ignore_index;
  acc_t inv_log_classes;       // 1 / log Co, 0 for Co == 1
  acc_t row_scale, col_scale;  // size=: upsample::source_scale of each axis
};

HOST_DEVICE int64_t read_label(const void* labels, int label_bytes, int64_t i) {
  if (label_bytes == 8) return static_cast<const int64_t*>(labels)[i];
  if (label_bytes == 4) return static_cast<const int32_t*>(labels)[i];
  return static_cast<const uint8_t*>(labels)[i];
}

// k̂ and u of output pixel p of image b.
template <bool kUpsample, typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
HOST_DEVICE void pixel_entropy(const PseudoInputs<scalar_t>& in, int64_t b, int64_t p, acc_t& u, int32_t& argmax) {
  EntropyStream<acc_t> e;
  if constexpr (kUpsample) {
    const auto row = upsample::tap(p / in.W, in.row_scale, in.yh);
    const auto col = upsample::tap(p % in.W, in.col_scale, in.yw);
    const int64_t plane = in.yh * in.yw;
    const scalar_t* first = in.y + b * in.Co * plane;
    const auto channel = [&](int64_t c) {
      const scalar_t* samples = first + c * plane;
      return upsample::bilinear<acc_t>([samples](int64_t i) { return to_accumulate(samples[i]); }, row, col, in.yw);
    };
    e.start(channel(0));
    for (int64_t c = 1; c < in.Co; ++c) e.add(channel(c), static_cast<int32_t>(c));
  } else {
    const scalar_t* logits = in.y + b * in.Co * in.HW + p;
    e.start(to_accumulate(logits[0]));
    for (int64_t c = 1; c < in.Co; ++c) e.add(to_accumulate(logits[c * in.HW]), static_cast<int32_t>(c));
  }
  u = e.normalised_entropy(in.inv_log_classes);
  argmax = e.argmax;
}

// +1 at *slot, atomically on the device (the emulation runs one thread at a time).
HOST_DEVICE void count_one(int64_t* slot) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(slot), 1ull);
#else
  ++*slot;
#endif
}

template <typename scalar_t>
struct LabelCall {
  using acc_t = accumulate_t<scalar_t>;
  PseudoInputs<scalar_t> in;
  bool upsample;
  const acc_t* thresholds;  // (Co,)
  int64_t* out;             // (B, H, W)
  int32_t* warp_counts;     // (warps, 2): confident, background
  int64_t grid_x, grid_y;
};

template <typename scalar_t>
struct HistogramCall {
  PseudoInputs<scalar_t> in;
  bool upsample;
  int64_t bins;
  int64_t* histogram;  // (Co, bins), zeroed
  int64_t grid_x, grid_y;
};

// Threads per block of both kernels, one output pixel each.
constexpr int kPseudoThreads = 256;

template <typename scalar_t, bool kUpsample>
struct PseudoLabelKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kPseudoThreads;
  LabelCall<scalar_t> call;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const PseudoInputs<scalar_t>& in = call.in;
    const int64_t b = index.block_y, p = index.first_pixel(1);
    int32_t confident = 0, background = 0;
    if (p < in.HW) {
      const int64_t i = b * in.HW + p;
      const int64_t label = read_label(in.labels, in.label_bytes, i);
      background = is_background(label, in.Co, in.ignore_index);
      acc_t u = 0;
      int32_t argmax = 0;
      if (background) pixel_entropy<kUpsample>(in, b, p, u, argmax);
      confident = background && u < call.thresholds[argmax];
      call.out[i] = pseudo_label(label, background, confident, argmax, in.ignore_index);
    }
    warp_sum_to(call.warp_counts + 2 * index.warp(), confident, index);
    warp_sum_to(call.warp_counts + 2 * index.warp() + 1, background, index);
  }
};

template <typename scalar_t, bool kUpsample>
struct HistogramKernel {
  using acc_t = accumulate_t<scalar_t>;
  static constexpr int kThreads = kPseudoThreads;
  HistogramCall<scalar_t> call;

  HOST_DEVICE void operator()(const ThreadIndex& index) const {
    const PseudoInputs<scalar_t>& in = call.in;
    const int64_t b = index.block_y, p = index.first_pixel(1);
    if (p >= in.HW || !is_background(read_label(in.labels, in.label_bytes, b * in.HW + p), in.Co, in.ignore_index)) {
      return;
    }
    acc_t u;
    int32_t argmax;
    pixel_entropy<kUpsample>(in, b, p, u, argmax);
    count_one(call.histogram + argmax * call.bins + entropy_bin(u, call.bins));
  }
};

// Blocks of one image's pixels on grid x.
inline int64_t pixel_blocks(int64_t pixels) { return ceil_div(pixels, int64_t(kPseudoThreads)); }

// fn(kernel) with the kernel for the call (launched or emulated by the caller).
template <typename scalar_t, typename Fn>
void with_label_kernel(const LabelCall<scalar_t>& call, Fn&& fn) {
  if (call.upsample) return fn(PseudoLabelKernel<scalar_t, true>{call});
  fn(PseudoLabelKernel<scalar_t, false>{call});
}

template <typename scalar_t, typename Fn>
void with_histogram_kernel(const HistogramCall<scalar_t>& call, Fn&& fn) {
  if (call.upsample) return fn(HistogramKernel<scalar_t, true>{call});
  fn(HistogramKernel<scalar_t, false>{call});
}

// The launchers (pseudo_labels_kernels.cu); they return a cudaError_t as int.
template <typename scalar_t>
int launch_pseudo_labels(const LabelCall<scalar_t>& call, void* stream);
template <typename scalar_t>
int launch_entropy_histogram(const HistogramCall<scalar_t>& call, void* stream);

}  // namespace pseudo
}  // namespace incseg
