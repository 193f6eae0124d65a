// Launchers of the entropy pseudo-label CUDA kernels (bodies in pseudo_labels_kernels.cuh).
// Compiled by nvcc without torch: raw pointers, sizes and a stream in, a CUDA error code out.
#include "cuda/launch.cuh"
#include "cuda/pseudo_labels_kernels.cuh"

namespace incseg {
namespace pseudo {

template <typename scalar_t>
int launch_pseudo_labels(const LabelCall<scalar_t>& call, void* stream) {
  cudaError_t error = cudaSuccess;
  with_label_kernel(call, [&](const auto& kernel) {
    error = launch_on_device(kernel, call.grid_x, call.grid_y, static_cast<cudaStream_t>(stream));
  });
  return static_cast<int>(error);
}

template <typename scalar_t>
int launch_entropy_histogram(const HistogramCall<scalar_t>& call, void* stream) {
  cudaError_t error = cudaSuccess;
  with_histogram_kernel(call, [&](const auto& kernel) {
    error = launch_on_device(kernel, call.grid_x, call.grid_y, static_cast<cudaStream_t>(stream));
  });
  return static_cast<int>(error);
}

#define INCSEG_INSTANTIATE_PSEUDO_LAUNCHERS(scalar_t)                             \
  template int launch_pseudo_labels<scalar_t>(const LabelCall<scalar_t>&, void*); \
  template int launch_entropy_histogram<scalar_t>(const HistogramCall<scalar_t>&, void*);
INCSEG_INSTANTIATE_PSEUDO_LAUNCHERS(float)
INCSEG_INSTANTIATE_PSEUDO_LAUNCHERS(double)
INCSEG_INSTANTIATE_PSEUDO_LAUNCHERS(Half)
INCSEG_INSTANTIATE_PSEUDO_LAUNCHERS(BFloat16)
#undef INCSEG_INSTANTIATE_PSEUDO_LAUNCHERS

}  // namespace pseudo
}  // namespace incseg
