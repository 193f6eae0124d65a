// Launchers of the Local POD CUDA kernels (bodies and sequences in pod_kernels.cuh). Compiled by
// nvcc without torch: raw pointers, sizes and a stream in, a CUDA error code out.
#include "cuda/launch.cuh"
#include "cuda/pod_kernels.cuh"

namespace incseg {
namespace pod {
namespace {

// One block: per image, l^2 from its warps' partials by a fixed tree, then 1/l and the loss.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) finish_kernel(const FinishStep<acc_t> step) {
  double total = 0;
  for (int64_t n = 0; n < step.batch; ++n) {
    double sum = 0;
    for (int64_t w = threadIdx.x; w < step.row_warps; w += blockDim.x) sum += step.row_squares[n * step.row_warps + w];
    for (int64_t w = threadIdx.x; w < step.column_warps; w += blockDim.x) {
      sum += step.column_squares[n * step.column_warps + w];
    }
    sum = sum_block(sum);
    if (threadIdx.x == 0) total += finish_image(step, n, sum);
  }
  if (threadIdx.x == 0 && !step.per_image) *step.loss = static_cast<acc_t>(total * step.scale);
}

struct DeviceExecutor {
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <typename Kernel>
  void run(const Kernel& kernel, int64_t grid_x, int64_t grid_y) {
    if (error == cudaSuccess) error = launch_on_device(kernel, grid_x, grid_y, stream);
  }

  template <typename acc_t>
  void finish(const FinishStep<acc_t>& step) {
    if (error != cudaSuccess) return;
    finish_kernel<acc_t><<<1, kSumThreads, 0, stream>>>(step);
    error = cudaGetLastError();
  }
};

}  // namespace

template <typename scalar_t>
int launch_local_pod_forward(const ForwardCall<scalar_t>& call, int64_t batch, void* stream) {
  DeviceExecutor ex{static_cast<cudaStream_t>(stream)};
  local_pod_forward_kernels(ex, call, batch);
  return ex.error;
}

template <typename scalar_t>
int launch_local_pod_backward(const GradKernel<scalar_t>& kernel, int64_t batch, void* stream) {
  return launch_on_device(kernel, grad_blocks(kernel.channels, kernel.geometry), batch,
                          static_cast<cudaStream_t>(stream));
}

#define INCSEG_INSTANTIATE_POD_LAUNCHERS(scalar_t)                                               \
  template int launch_local_pod_forward<scalar_t>(const ForwardCall<scalar_t>&, int64_t, void*); \
  template int launch_local_pod_backward<scalar_t>(const GradKernel<scalar_t>&, int64_t, void*);
INCSEG_INSTANTIATE_POD_LAUNCHERS(float)
INCSEG_INSTANTIATE_POD_LAUNCHERS(double)
INCSEG_INSTANTIATE_POD_LAUNCHERS(Half)
INCSEG_INSTANTIATE_POD_LAUNCHERS(BFloat16)
#undef INCSEG_INSTANTIATE_POD_LAUNCHERS

}  // namespace pod
}  // namespace incseg
