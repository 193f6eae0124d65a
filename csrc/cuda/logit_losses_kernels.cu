// Launchers of the logit-loss CUDA kernels (bodies in logit_losses_kernels.cuh). Compiled by nvcc
// without torch: raw pointers, sizes and a stream in, a CUDA error code out.
#include "cuda/launch.cuh"
#include "cuda/logit_losses_kernels.cuh"

namespace incseg {
namespace logit {
namespace {

// The forward's per-warp partials added up by one block in a fixed order (deterministic).
template <typename scalar_t, typename acc_t = accumulate_t<scalar_t>>
__global__ void __launch_bounds__(kSumThreads)
    finish_forward_kernel(const ForwardBuffers<scalar_t> out, int64_t warps, const ForwardTotals<acc_t> totals) {
  double ce = 0, kd = 0;
  long long valid = 0;
  for (int64_t i = threadIdx.x; i < warps; i += blockDim.x) {
    valid += out.valid_partial[i];
    if (totals.reduce) {
      ce += out.ce_partial[i];
      kd += out.kd_partial[i];
    }
  }
  valid = sum_block(valid);
  if (totals.reduce) {
    ce = sum_block(ce);
    kd = sum_block(kd);
  }
  if (threadIdx.x != 0) return;
  *totals.valid_count = valid;
  if (!totals.reduce) return;
  *totals.ce_loss = static_cast<acc_t>(totals.mean ? ce * ce_mean_scale<double>(valid) : ce);
  *totals.kd_loss = static_cast<acc_t>(totals.mean ? kd * totals.kd_scale : kd);
}

}  // namespace

template <typename scalar_t, typename teacher_t>
int launch_logit_forward(const LogitInputs<scalar_t, teacher_t>& in, const ForwardBuffers<scalar_t>& out,
                         const ForwardTotals<accumulate_t<scalar_t>>& totals, const LaunchPlan& plan, void* stream) {
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  cudaError_t error = cudaSuccess;
  with_forward_kernel(in, out, plan, [&](const auto& kernel) {
    error = launch_on_device(kernel, plan.grid_x, plan.grid_y, cuda_stream);
  });
  if (error != cudaSuccess) return error;
  finish_forward_kernel<scalar_t><<<1, kSumThreads, 0, cuda_stream>>>(out, plan.warps, totals);
  return cudaGetLastError();
}

template <typename scalar_t, typename teacher_t>
int launch_logit_backward(const LogitInputs<scalar_t, teacher_t>& in, const BackwardBuffers<scalar_t>& grad,
                          const LaunchPlan& plan, void* stream) {
  cudaError_t error = cudaSuccess;
  for_each_backward_kernel(in, grad, plan, [&](const auto& kernel, int64_t grid_x) {
    if (error == cudaSuccess) error = launch_on_device(kernel, grid_x, plan.grid_y, static_cast<cudaStream_t>(stream));
  });
  return error;
}

#define INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(scalar_t, teacher_t)                                    \
  template int launch_logit_forward<scalar_t, teacher_t>(                                          \
      const LogitInputs<scalar_t, teacher_t>&, const ForwardBuffers<scalar_t>&,                    \
      const ForwardTotals<accumulate_t<scalar_t>>&, const LaunchPlan&, void*);                     \
  template int launch_logit_backward<scalar_t, teacher_t>(const LogitInputs<scalar_t, teacher_t>&, \
                                                          const BackwardBuffers<scalar_t>&, const LaunchPlan&, void*);
// The teacher in the student's dtype, and in the wider one of common/teacher_dtype.h.
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(float, float)
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(double, double)
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(Half, Half)
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(BFloat16, BFloat16)
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(Half, float)
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(BFloat16, float)
INCSEG_INSTANTIATE_LOGIT_LAUNCHERS(float, double)
#undef INCSEG_INSTANTIATE_LOGIT_LAUNCHERS

}  // namespace logit
}  // namespace incseg
