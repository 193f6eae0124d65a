// Torch glue of the Local POD CUDA kernels (MATH.md#local-pod): TORCH_LIBRARY_IMPL(incseg_fast, CUDA)
// when built with CUDA, and always TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU), which runs the
// same kernel bodies on the CPU, thread by thread. Checks and the outputs' allocation are shared
// with the CPU kernels (common/pod_host.h); scratch (P, per-warp partials) lives on the op's device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common/pod_host.h"
#include "cuda/glue.h"
#include "cuda/pod_kernels.cuh"

namespace incseg {
namespace pod {
namespace {

using at::Tensor;
using glue::kernel_data;
using glue::KernelType;
using glue::mutable_kernel_data;

struct HostEmulation : glue::HostDevice {
  template <typename scalar_t>
  static void forward(const ForwardCall<scalar_t>& call, int64_t batch) {
    HostExecutor ex;
    local_pod_forward_kernels(ex, call, batch);
  }
  template <typename scalar_t>
  static void backward(const GradKernel<scalar_t>& kernel, int64_t batch) {
    run_on_host(kernel, grad_blocks(kernel.channels, kernel.geometry), batch);
  }
};

#if defined(INCSEG_WITH_CUDA)
struct CudaDevice : glue::CudaDeviceBase {
  template <typename scalar_t>
  static void forward(const ForwardCall<scalar_t>& call, int64_t batch) {
    check(launch_local_pod_forward(call, batch, stream()));
  }
  template <typename scalar_t>
  static void backward(const GradKernel<scalar_t>& kernel, int64_t batch) {
    check(launch_local_pod_backward(kernel, batch, stream()));
  }
};
#endif

// Per-warp partials of the pool kernels: (grid x blocks) x (warps per block) per image.
constexpr int64_t kWarpsPerBlock = RowPoolKernel<float>::kThreads / kWarpSize;

// Runs the pool kernels and the finish step over contiguous features: returns the pooled
// differences (scratch of this call) and writes the loss and 1/l into `out`.
template <typename Device>
Tensor pool(const Tensor& new_features, const Tensor& old_features, const Geometry& g, double scale,
            c10::string_view reduction, const ForwardOutputs& out) {
  const int64_t batch = new_features.size(0), channels = new_features.size(1);
  Tensor pooled = allocate_pooled(new_features, g);
  const int64_t row_warps = row_blocks(channels, g) * kWarpsPerBlock;
  const int64_t column_warps = column_blocks(channels, g) * kWarpsPerBlock;
  const auto doubles = new_features.options().dtype(at::kDouble);
  Tensor row_squares = at::empty({batch * row_warps}, doubles);
  Tensor column_squares = at::empty({batch * column_warps}, doubles);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, new_features.scalar_type(), "local_pod_pool", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    const Inputs<k_scalar_t> in{kernel_data<scalar_t>(new_features), kernel_data<scalar_t>(old_features), channels, g};
    const FinishStep<acc_t> finish{row_squares.const_data_ptr<double>(),
                                   row_warps,
                                   column_squares.const_data_ptr<double>(),
                                   column_warps,
                                   batch,
                                   scale,
                                   reduction == "none",
                                   out.loss.mutable_data_ptr<acc_t>(),
                                   out.inv_norm.mutable_data_ptr<acc_t>()};
    Device::forward(
        ForwardCall<k_scalar_t>{in, pooled.mutable_data_ptr<acc_t>(), row_squares.mutable_data_ptr<double>(),
                                column_squares.mutable_data_ptr<double>(), finish},
        batch);
  });
  return pooled;
}

template <typename Device>
std::tuple<Tensor, Tensor> local_pod_forward(const Tensor& new_in, const Tensor& old_in, at::IntArrayRef scales,
                                             c10::string_view reduction) {
  const Geometry g = check_forward(new_in, old_in, scales);
  const double scale = reduction_scale(reduction, new_in.size(0));
  glue::check_batch(new_in.size(0), "new");
  [[maybe_unused]] auto device_guard = Device::guard(new_in);
  const Tensor new_features = new_in.contiguous();
  const ForwardOutputs out = allocate_forward(new_features, reduction);
  pool<Device>(new_features, old_in.contiguous(), g, scale, reduction, out);
  return {out.loss, out.inv_norm};
}

// Pools again (the forward's kernels: the same P, bit for bit), then spreads P into the gradient;
// P lives only during this call.
template <typename Device>
Tensor local_pod_backward(const Tensor& grad_loss, const Tensor& new_in, const Tensor& old_in, const Tensor& inv_norm,
                          at::IntArrayRef scales, c10::string_view reduction) {
  const auto [g, scale] = check_backward(grad_loss, new_in, old_in, inv_norm, scales, reduction);
  glue::check_batch(new_in.size(0), "new");
  [[maybe_unused]] auto device_guard = Device::guard(new_in);
  const Tensor new_features = new_in.contiguous();
  const Tensor upstream = upstream_per_image(grad_loss, new_features);
  const Tensor pooled =
      pool<Device>(new_features, old_in.contiguous(), g, scale, reduction, allocate_forward(new_features, reduction));
  Tensor grad = at::empty_like(new_features, at::MemoryFormat::Contiguous);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, new_features.scalar_type(), "local_pod_backward", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    const GradKernel<k_scalar_t> kernel{kernel_data<scalar_t>(new_features),
                                        pooled.const_data_ptr<acc_t>(),
                                        upstream.const_data_ptr<acc_t>(),
                                        inv_norm.const_data_ptr<acc_t>(),
                                        scale,
                                        new_features.size(1),
                                        g,
                                        mutable_kernel_data<scalar_t>(grad)};
    Device::backward(kernel, new_features.size(0));
  });
  return grad;
}

}  // namespace
}  // namespace pod
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU, m) {
  using incseg::pod::HostEmulation;
  m.impl("local_pod_forward", &incseg::pod::local_pod_forward<HostEmulation>);
  m.impl("local_pod_backward", &incseg::pod::local_pod_backward<HostEmulation>);
}

#if defined(INCSEG_WITH_CUDA)
TORCH_LIBRARY_IMPL(incseg_fast, CUDA, m) {
  using incseg::pod::CudaDevice;
  m.impl("local_pod_forward", &incseg::pod::local_pod_forward<CudaDevice>);
  m.impl("local_pod_backward", &incseg::pod::local_pod_backward<CudaDevice>);
}
#endif
