#pragma once
// Launching a common/grid.h kernel body on the GPU, and the deterministic sums its partials need.
// Device code only: included by the .cu files, compiled by nvcc without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/grid.h"

namespace incseg {

template <typename Kernel>
__global__ void __launch_bounds__(Kernel::kThreads) run_on_device(const Kernel kernel) {
  kernel(ThreadIndex{blockIdx.x, blockIdx.y, gridDim.x, static_cast<int>(threadIdx.x), Kernel::kThreads});
}

// Launches `kernel` on a (grid_x, grid_y) grid on `stream`; returns the launch's error code.
// An empty grid launches nothing.
template <typename Kernel>
cudaError_t launch_on_device(const Kernel& kernel, int64_t grid_x, int64_t grid_y, cudaStream_t stream) {
  if (grid_x == 0 || grid_y == 0) return cudaSuccess;
  run_on_device<Kernel>
      <<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), Kernel::kThreads, 0, stream>>>(kernel);
  return cudaGetLastError();
}

// Threads of the one block that adds up per-warp partials (sum_block).
constexpr int kSumThreads = 1024;

// The sum over a block of one value per thread, by a fixed tree: warp shuffles, then the warps'
// sums through shared memory. Every thread of the block calls it; thread 0 gets the result.
template <typename T>
__device__ T sum_block(T value) {
  __shared__ T warp_sums[kSumThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / kWarpSize ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // warp_sums may be reused by the caller's next sum_block
  return value;
}

}  // namespace incseg
