// Torch glue of the entropy pseudo-label CUDA kernels (MATH.md#pseudo-labels):
// TORCH_LIBRARY_IMPL(incseg_fast, CUDA) when built with CUDA, and always
// TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU), which runs the same kernel bodies on the CPU
// thread by thread (common/grid.h). Checks are shared with the CPU kernels (common/pseudo_host.h).
// The per-warp counts are added per image by ATen on the op's device: nothing is read back to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common/pseudo_host.h"
#include "cuda/glue.h"
#include "cuda/pseudo_labels_kernels.cuh"

namespace incseg {
namespace pseudo {
namespace {

using glue::kernel_data;
using glue::KernelType;

// Runs the kernels on the CPU, one thread after another.
struct HostEmulation : glue::HostDevice {
  template <typename scalar_t>
  static void labels(const LabelCall<scalar_t>& call) {
    with_label_kernel(call, [&](const auto& kernel) { run_on_host(kernel, call.grid_x, call.grid_y); });
  }
  template <typename scalar_t>
  static void histogram(const HistogramCall<scalar_t>& call) {
    with_histogram_kernel(call, [&](const auto& kernel) { run_on_host(kernel, call.grid_x, call.grid_y); });
  }
};

#if defined(INCSEG_WITH_CUDA)
// Launches the kernels on the current stream of y's device.
struct CudaDevice : glue::CudaDeviceBase {
  template <typename scalar_t>
  static void labels(const LabelCall<scalar_t>& call) {
    check(launch_pseudo_labels(call, stream()));
  }
  template <typename scalar_t>
  static void histogram(const HistogramCall<scalar_t>& call) {
    check(launch_entropy_histogram(call, stream()));
  }
};
#endif

template <typename scalar_t, typename k_scalar_t = typename KernelType<scalar_t>::type>
PseudoInputs<k_scalar_t> kernel_inputs(const Inputs& in) {
  using acc_t = accumulate_t<k_scalar_t>;
  return PseudoInputs<k_scalar_t>{kernel_data<scalar_t>(in.y),
                                  in.labels.const_data_ptr(),
                                  static_cast<int>(in.labels.element_size()),
                                  in.Co,
                                  in.H,
                                  in.W,
                                  in.HW,
                                  in.yh,
                                  in.yw,
                                  in.ignore_index,
                                  static_cast<acc_t>(in.inv_log_classes()),
                                  upsample::source_scale<acc_t>(in.yh, in.H),
                                  upsample::source_scale<acc_t>(in.yw, in.W)};
}

// The pseudo-labels of in into out (int64 (B, H, W), contiguous; may be in.labels itself: each
// thread reads its pixel's label before it writes the pseudo-label); returns the adaptive factor.
template <typename Device>
at::Tensor pseudo_labels_into(const Inputs& in, const at::Tensor& out) {
  glue::check_batch(in.B, "y");
  [[maybe_unused]] auto device_guard = Device::guard(in.y);
  const int64_t grid_x = pixel_blocks(in.HW);
  // (B, warps per image, 2): the kernels' warps are numbered image by image.
  at::Tensor warp_counts =
      at::zeros({in.B, grid_x * (kPseudoThreads / kWarpSize), 2}, in.labels.options().dtype(at::kInt));
  if (in.B > 0 && in.HW > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.y.scalar_type(), "entropy_pseudo_labels", [&] {
      using k_scalar_t = typename KernelType<scalar_t>::type;
      using acc_t = accumulate_t<k_scalar_t>;
      Device::labels(LabelCall<k_scalar_t>{kernel_inputs<scalar_t>(in), in.upsample,
                                           in.thresholds.const_data_ptr<acc_t>(), out.mutable_data_ptr<int64_t>(),
                                           warp_counts.mutable_data_ptr<int32_t>(), grid_x, in.B});
    });
  }
  return adaptive_factor(warp_counts.sum(1, /*keepdim=*/false, at::kLong));
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> entropy_pseudo_labels(const at::Tensor& y, const at::Tensor& labels,
                                                         const at::Tensor& thresholds, int64_t ignore_index,
                                                         at::OptionalIntArrayRef size) {
  Inputs in = check_inputs(y, labels, ignore_index, size);
  check_thresholds(in, thresholds);
  at::Tensor out = at::empty({in.B, in.H, in.W}, labels.options().dtype(at::kLong));
  at::Tensor factor = pseudo_labels_into<Device>(in, out);
  return {out, factor};
}

template <typename Device>
at::Tensor entropy_pseudo_labels_in_place(const at::Tensor& y, const at::Tensor& labels, const at::Tensor& thresholds,
                                          int64_t ignore_index, at::OptionalIntArrayRef size) {
  Inputs in = check_inputs(y, labels, ignore_index, size);
  check_in_place_labels(labels);
  check_thresholds(in, thresholds);
  return pseudo_labels_into<Device>(in, labels);
}

template <typename Device>
at::Tensor entropy_histogram(const at::Tensor& y, const at::Tensor& labels, int64_t bins, int64_t ignore_index,
                             at::OptionalIntArrayRef size) {
  const Inputs in = check_inputs(y, labels, ignore_index, size);
  check_bins(bins);
  glue::check_batch(in.B, "y");
  [[maybe_unused]] auto device_guard = Device::guard(y);
  at::Tensor histogram = at::zeros({in.Co, bins}, labels.options().dtype(at::kLong));
  if (in.B == 0 || in.HW == 0) return histogram;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "entropy_histogram", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    Device::histogram(HistogramCall<k_scalar_t>{kernel_inputs<scalar_t>(in), in.upsample, bins,
                                                histogram.mutable_data_ptr<int64_t>(), pixel_blocks(in.HW), in.B});
  });
  return histogram;
}

}  // namespace
}  // namespace pseudo
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU, m) {
  m.impl("entropy_pseudo_labels", &incseg::pseudo::entropy_pseudo_labels<incseg::pseudo::HostEmulation>);
  m.impl("entropy_pseudo_labels_", &incseg::pseudo::entropy_pseudo_labels_in_place<incseg::pseudo::HostEmulation>);
  m.impl("entropy_histogram", &incseg::pseudo::entropy_histogram<incseg::pseudo::HostEmulation>);
}

#if defined(INCSEG_WITH_CUDA)
TORCH_LIBRARY_IMPL(incseg_fast, CUDA, m) {
  m.impl("entropy_pseudo_labels", &incseg::pseudo::entropy_pseudo_labels<incseg::pseudo::CudaDevice>);
  m.impl("entropy_pseudo_labels_", &incseg::pseudo::entropy_pseudo_labels_in_place<incseg::pseudo::CudaDevice>);
  m.impl("entropy_histogram", &incseg::pseudo::entropy_histogram<incseg::pseudo::CudaDevice>);
}
#endif
