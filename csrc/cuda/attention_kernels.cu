// Launchers of the attention CUDA kernels (bodies and kernel sequences in attention_kernels.cuh).
// Compiled by nvcc without torch: raw pointers, sizes and a stream in, a CUDA error code out.
#include "cuda/attention_kernels.cuh"
#include "cuda/launch.cuh"

namespace incseg {
namespace attention {
namespace {

// One block per image and side: its N^2 from the per-warp partials (a fixed tree), then 1/N.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) norm_kernel(const NormStep<acc_t> step) {
  const int64_t map = blockIdx.x;
  double sum = 0;
  INCSEG_UNROLL_4
  for (int64_t w = threadIdx.x; w < step.warps; w += blockDim.x) sum += step.square_partial[map * step.warps + w];
  sum = sum_block(sum);
  if (threadIdx.x == 0) write_norm(step, map, sum);
}

// One block: the loss partials added by a fixed tree, times the reduction scale.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) loss_kernel(const LossStep<acc_t> step) {
  double sum = 0;
  INCSEG_UNROLL_4
  for (int64_t w = threadIdx.x; w < step.warps; w += blockDim.x) sum += step.loss_partial[w];
  sum = sum_block(sum);
  if (threadIdx.x == 0) *step.loss = static_cast<acc_t>(sum * step.scale);
}

// One block per image and side: T = Σ_p P Ŝ by a fixed tree.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) spatial_dot_kernel(const SpatialDotStep<acc_t> step) {
  const int64_t map = blockIdx.x;
  const acc_t* p = step.pixel_grad + map * step.pixels;
  const acc_t* s = step.spatial + map * step.pixels;
  double sum = 0;
  INCSEG_UNROLL_4
  for (int64_t i = threadIdx.x; i < step.pixels; i += blockDim.x) sum += static_cast<double>(p[i]) * s[i];
  sum = sum_block(sum);
  if (threadIdx.x == 0) step.spatial_dot[map] = static_cast<acc_t>(sum);
}

// Runs a kernel sequence on one stream; after the first failed launch it launches nothing more.
struct DeviceExecutor {
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <typename Kernel>
  void run(const Kernel& kernel, int64_t grid_x, int64_t grid_y) {
    if (error == cudaSuccess) error = launch_on_device(kernel, grid_x, grid_y, stream);
  }

  template <typename acc_t>
  void norms(const NormStep<acc_t>& step) {
    if (error != cudaSuccess) return;
    norm_kernel<acc_t><<<static_cast<unsigned>(step.maps), kSumThreads, 0, stream>>>(step);
    error = cudaGetLastError();
  }

  template <typename acc_t>
  void loss(const LossStep<acc_t>& step) {
    if (error != cudaSuccess) return;
    loss_kernel<acc_t><<<1, kSumThreads, 0, stream>>>(step);
    error = cudaGetLastError();
  }

  template <typename acc_t>
  void spatial_dots(const SpatialDotStep<acc_t>& step) {
    if (error != cudaSuccess) return;
    spatial_dot_kernel<acc_t><<<static_cast<unsigned>(step.maps), kSumThreads, 0, stream>>>(step);
    error = cudaGetLastError();
  }
};

}  // namespace

template <typename scalar_t, typename teacher_t>
int resident_feature_blocks(FeaturePass pass, int pixels_per_thread, int64_t* blocks) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  with_pixels_per_thread<scalar_t>(pixels_per_thread, [&](auto vec) {
    with_feature_pass_kernel<scalar_t, teacher_t, decltype(vec)::value>(pass, [&](auto tag) {
      using Kernel = typename decltype(tag)::type;
      if (error == cudaSuccess) {
        error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, run_on_device<Kernel>, Kernel::kThreads, 0);
      }
    });
  });
  *blocks = static_cast<int64_t>(sms) * per_sm;
  return error;
}

template <typename scalar_t, typename teacher_t>
int launch_attentive_distillation_forward(const ForwardCall<scalar_t, teacher_t>& call, void* stream) {
  DeviceExecutor ex{static_cast<cudaStream_t>(stream)};
  attentive_distillation_forward_kernels(ex, call);
  return ex.error;
}

template <typename scalar_t, typename teacher_t>
int launch_attentive_distillation_backward(const BackwardCall<scalar_t, teacher_t>& call, void* stream) {
  DeviceExecutor ex{static_cast<cudaStream_t>(stream)};
  attentive_distillation_backward_kernels(ex, call);
  return ex.error;
}

template <typename scalar_t>
int launch_structured_attention_forward(const StructuredInputs<scalar_t>& in, const AttentionPlan& plan, scalar_t* out,
                                        void* stream) {
  DeviceExecutor ex{static_cast<cudaStream_t>(stream)};
  structured_attention_forward_kernels(ex, in, plan, out);
  return ex.error;
}

template <typename scalar_t>
int launch_structured_attention_backward(const StructuredBackwardCall<scalar_t>& call, void* stream) {
  DeviceExecutor ex{static_cast<cudaStream_t>(stream)};
  structured_attention_backward_kernels(ex, call);
  return ex.error;
}

#define INCSEG_INSTANTIATE_ATTENTION_LAUNCHERS(scalar_t)                                                              \
  template int launch_structured_attention_forward<scalar_t>(const StructuredInputs<scalar_t>&, const AttentionPlan&, \
                                                             scalar_t*, void*);                                       \
  template int launch_structured_attention_backward<scalar_t>(const StructuredBackwardCall<scalar_t>&, void*);
// Attentive distillation: the teacher (g, b) in the student's dtype or the wider one of common/teacher_dtype.h.
#define INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(scalar_t, teacher_t)                                               \
  template int resident_feature_blocks<scalar_t, teacher_t>(FeaturePass, int, int64_t*);                             \
  template int launch_attentive_distillation_forward<scalar_t, teacher_t>(const ForwardCall<scalar_t, teacher_t>&,   \
                                                                          void*);                                    \
  template int launch_attentive_distillation_backward<scalar_t, teacher_t>(const BackwardCall<scalar_t, teacher_t>&, \
                                                                           void*);
INCSEG_INSTANTIATE_ATTENTION_LAUNCHERS(float)
INCSEG_INSTANTIATE_ATTENTION_LAUNCHERS(double)
INCSEG_INSTANTIATE_ATTENTION_LAUNCHERS(Half)
INCSEG_INSTANTIATE_ATTENTION_LAUNCHERS(BFloat16)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(float, float)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(double, double)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(Half, Half)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(BFloat16, BFloat16)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(Half, float)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(BFloat16, float)
INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS(float, double)
#undef INCSEG_INSTANTIATE_DISTILLATION_LAUNCHERS
#undef INCSEG_INSTANTIATE_ATTENTION_LAUNCHERS

}  // namespace attention
}  // namespace incseg
