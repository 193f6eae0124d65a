// Launchers of the sigmoid-loss CUDA kernels (bodies in sigmoid_losses_kernels.cuh). Compiled by nvcc
// without torch: raw pointers, sizes and a stream in, a CUDA error code out.
#include "cuda/launch.cuh"
#include "cuda/sigmoid_losses_kernels.cuh"

namespace incseg {
namespace sigmoid {

template <typename scalar_t>
int launch_sigmoid_forward(const KernelArgs<scalar_t>& a, const TermMaps<accumulate_t<scalar_t>>& out, void* stream) {
  using Kernel = SigmoidForwardKernel<scalar_t>;
  return launch_on_device(Kernel{a, out}, ceil_div(a.H * a.W, Kernel::kThreads), a.B,
                          static_cast<cudaStream_t>(stream));
}

template <typename scalar_t>
int launch_sigmoid_backward(const KernelArgs<scalar_t>& a, const UpstreamGrads<accumulate_t<scalar_t>>& up,
                            scalar_t* grad_x, accumulate_t<scalar_t>* upsampled_grad_x, void* stream) {
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (!a.upsample) {
    using Kernel = SigmoidBackwardKernel<scalar_t>;
    return launch_on_device(Kernel{a, up, grad_x}, ceil_div(a.H * a.W, Kernel::kThreads), a.B, cuda_stream);
  }
  using Kernel = SigmoidUpsampledBackwardKernel<scalar_t>;
  return launch_on_device(Kernel{a, up, upsampled_grad_x}, ceil_div(a.h * a.w, Kernel::kThreads), a.B, cuda_stream);
}

#define INCSEG_INSTANTIATE_SIGMOID_LAUNCHERS(scalar_t)                                                                \
  template int launch_sigmoid_forward<scalar_t>(const KernelArgs<scalar_t>&, const TermMaps<accumulate_t<scalar_t>>&, \
                                                void*);                                                               \
  template int launch_sigmoid_backward<scalar_t>(const KernelArgs<scalar_t>&,                                         \
                                                 const UpstreamGrads<accumulate_t<scalar_t>>&, scalar_t*,             \
                                                 accumulate_t<scalar_t>*, void*);
INCSEG_INSTANTIATE_SIGMOID_LAUNCHERS(float)
INCSEG_INSTANTIATE_SIGMOID_LAUNCHERS(double)
INCSEG_INSTANTIATE_SIGMOID_LAUNCHERS(Half)
INCSEG_INSTANTIATE_SIGMOID_LAUNCHERS(BFloat16)
#undef INCSEG_INSTANTIATE_SIGMOID_LAUNCHERS

}  // namespace sigmoid
}  // namespace incseg
