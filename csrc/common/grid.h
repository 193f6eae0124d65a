#pragma once
// Launch geometry of the CUDA kernels, written so that the same kernel bodies also run on the CPU.
//
// A kernel is a struct with `static constexpr int kThreads` (threads per 1-D block, a multiple of
// the warp size) and a HOST_DEVICE `operator()(const ThreadIndex&) const` that does one thread's
// work. On the GPU, csrc/cuda/launch.cuh launches it on a (grid_x, grid_y) grid of such blocks; on
// the CPU, run_on_host below runs the same body for every block and thread of the same grid, one
// after another, so the kernels' indexing, tails and strides are tested without a GPU (the
// incseg_fast_cuda_emulator namespace, tests/). Bodies that combine values across the threads of a
// warp do it through warp_sum_to, which has a device and a host definition with the same result
// up to rounding. Kernels that need shared memory or barriers are not written this way.
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/macros.h"

namespace incseg {

constexpr int kWarpSize = 32;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y (the kernels put images there)

HOST_DEVICE int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }

// Pixels per thread of the packed kernels: each thread loads its pixels of a channel row as one
// 16-byte pack (4 float32, 8 float16/bfloat16, 2 float64) when H*W is a multiple of that and every
// pointer is 16-byte aligned; else one pixel per thread.
template <typename scalar_t>
constexpr int kPackedPixels = static_cast<int>(16 / sizeof(scalar_t));

// fn(std::integral_constant<int, kVec>{}) for pixels_per_thread = kPackedPixels<scalar_t> or 1: the
// kernels are templates on their pixels per thread.
template <typename scalar_t, typename Fn>
void with_pixels_per_thread(int pixels_per_thread, Fn&& fn) {
  if (pixels_per_thread == kPackedPixels<scalar_t>) {
    std::forward<Fn>(fn)(std::integral_constant<int, kPackedPixels<scalar_t>>{});
  } else {
    std::forward<Fn>(fn)(std::integral_constant<int, 1>{});
  }
}

// Where one thread sits in its launch.
struct ThreadIndex {
  int64_t block_x;
  int64_t block_y;
  int64_t grid_x;
  int thread;         // in [0, block_threads)
  int block_threads;  // a multiple of kWarpSize

  HOST_DEVICE int lane() const { return thread % kWarpSize; }
  // The first pixel of this thread when a block's threads own consecutive runs of pixels_per_thread
  // pixels along grid x (the pixel-major kernels).
  HOST_DEVICE int64_t first_pixel(int pixels_per_thread) const {
    return (block_x * block_threads + thread) * pixels_per_thread;
  }
  // The index of this thread's warp among all warps of the grid (block-major, then warp in block).
  HOST_DEVICE int64_t warp() const {
    return (block_y * grid_x + block_x) * (block_threads / kWarpSize) + thread / kWarpSize;
  }
};

// Number of warps of a (grid_x, grid_y) launch of Kernel: the size of per-warp partial buffers.
template <typename Kernel>
int64_t warps_in_grid(int64_t grid_x, int64_t grid_y) {
  return grid_x * grid_y * (Kernel::kThreads / kWarpSize);
}

// *out = the sum of `value` over the 32 threads of the calling thread's warp. Every thread of the
// warp must call it (with 0 where it has nothing to add). The GPU adds by a shuffle tree; the
// emulation runs a warp's threads in lane order, so lane 0 starts the sum and the others add to it.
template <typename T>
HOST_DEVICE void warp_sum_to(T* out, T value, const ThreadIndex& index) {
#if defined(__CUDA_ARCH__)
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (index.lane() == 0) *out = value;
#else
  *out = index.lane() == 0 ? value : *out + value;
#endif
}

// The CPU emulation of a launch: every thread of every block, in order.
template <typename Kernel>
void run_on_host(const Kernel& kernel, int64_t grid_x, int64_t grid_y) {
  for (int64_t block_y = 0; block_y < grid_y; ++block_y) {
    for (int64_t block_x = 0; block_x < grid_x; ++block_x) {
      for (int thread = 0; thread < Kernel::kThreads; ++thread) {
        kernel(ThreadIndex{block_x, block_y, grid_x, thread, Kernel::kThreads});
      }
    }
  }
}

}  // namespace incseg
