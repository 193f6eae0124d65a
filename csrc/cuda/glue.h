#pragma once
// What the torch glue of every CUDA kernel family shares: torch's element types as the kernels'
// (common/dtype.h), pointers and alignment checks, the grid's batch limit, and the two Devices a
// glue template runs its kernels on: HostDevice (the CPU emulation, always built) and
// CudaDeviceBase (the GPU, with INCSEG_WITH_CUDA).
#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

#include "common/dtype.h"
#include "common/grid.h"

#if defined(INCSEG_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace incseg {
namespace glue {

// torch's element types as the kernels' (same size and bits).
template <typename T>
struct KernelType {
  using type = T;
};
template <>
struct KernelType<at::Half> {
  using type = Half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = BFloat16;
};

// A tensor's elements as the kernels' type; null for an undefined tensor.
template <typename T>
const typename KernelType<T>::type* kernel_data(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const typename KernelType<T>::type*>(t.const_data_ptr<T>()) : nullptr;
}

// An output's elements as the kernels' type; null for an empty (unwanted) output.
template <typename T>
typename KernelType<T>::type* mutable_kernel_data(const at::Tensor& t) {
  return t.numel() > 0 ? reinterpret_cast<typename KernelType<T>::type*>(t.mutable_data_ptr<T>()) : nullptr;
}

// An accumulation-dtype tensor's data, or null for an empty (unwanted) one.
template <typename acc_t>
acc_t* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.mutable_data_ptr<acc_t>() : nullptr;
}

// Whether every defined tensor's data starts on a multiple of `bytes` (the packed loads need 16).
inline bool aligned_to(size_t bytes, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % bytes != 0) return false;
  }
  return true;
}

// The kernels put images on the grid's y axis.
inline void check_batch(int64_t batch, const char* name) {
  TORCH_CHECK_VALUE(batch <= kMaxGridY, name, " has batch size ", batch, "; the CUDA kernels take at most ", kMaxGridY,
                    " images per call");
}

// The CPU emulation: no device to select.
struct HostDevice {
  struct NoGuard {};
  static NoGuard guard(const at::Tensor&) { return {}; }
};

#if defined(INCSEG_WITH_CUDA)
// The GPU: the op's device selected, its current stream, every launch's error code checked.
struct CudaDeviceBase {
  static c10::cuda::CUDAGuard guard(const at::Tensor& t) { return c10::cuda::CUDAGuard(t.device()); }
  static void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static void check(int error) { C10_CUDA_CHECK(static_cast<cudaError_t>(error)); }
};
#endif

}  // namespace glue
}  // namespace incseg
