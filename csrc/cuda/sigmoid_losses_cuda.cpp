// Torch glue of the sigmoid-loss CUDA kernels: TORCH_LIBRARY_IMPL(incseg_fast, CUDA) when built with
// CUDA, and always TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU), which runs the same kernel
// bodies on the CPU thread by thread (common/grid.h). Checks and reductions: common/sigmoid_host.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common/sigmoid_host.h"
#include "cuda/glue.h"
#include "cuda/sigmoid_losses_kernels.cuh"

namespace incseg {
namespace sigmoid {
namespace {

using glue::kernel_data;
using glue::KernelType;

template <typename scalar_t, typename k_scalar_t = typename KernelType<scalar_t>::type>
KernelArgs<k_scalar_t> kernel_args(const Inputs& in) {
  using acc_t = accumulate_t<k_scalar_t>;
  KernelArgs<k_scalar_t> a;
  a.x = kernel_data<scalar_t>(in.x);
  a.y = kernel_data<scalar_t>(in.y);
  a.target = in.target.defined() ? in.target.const_data_ptr<int64_t>() : nullptr;
  a.pos_weight = in.pos_weight.const_data_ptr<acc_t>();
  a.channel_weight = in.channel_weight.const_data_ptr<acc_t>();
  a.layout = in.layout;
  a.pseudo = in.pseudo;
  a.ignore_index = in.ignore_index;
  a.B = in.B;
  a.H = in.H;
  a.W = in.W;
  a.h = in.h;
  a.w = in.w;
  a.yh = in.yh;
  a.yw = in.yw;
  a.upsample = in.upsample;
  if (in.upsample) {
    a.x_row_scale = upsample::source_scale<acc_t>(in.h, in.H);
    a.x_col_scale = upsample::source_scale<acc_t>(in.w, in.W);
    a.y_row_scale = upsample::source_scale<acc_t>(in.yh, in.H);
    a.y_col_scale = upsample::source_scale<acc_t>(in.yw, in.W);
    a.x_row_inverse_scale = static_cast<acc_t>(in.H) / static_cast<acc_t>(in.h);
    a.x_col_inverse_scale = static_cast<acc_t>(in.W) / static_cast<acc_t>(in.w);
    a.x_row_readers = host_readers(in.h, in.H);
    a.x_col_readers = host_readers(in.w, in.W);
  }
  a.skip_ignored = in.skip_ignored && in.target.defined();
  return a;
}

// Runs the kernels on the CPU, one thread after another, on the grids the GPU launches.
struct HostEmulation : glue::HostDevice {
  template <typename scalar_t>
  static void forward(const KernelArgs<scalar_t>& a, const TermMaps<accumulate_t<scalar_t>>& out) {
    using Kernel = SigmoidForwardKernel<scalar_t>;
    run_on_host(Kernel{a, out}, ceil_div(a.H * a.W, Kernel::kThreads), a.B);
  }

  template <typename scalar_t>
  static void backward(const KernelArgs<scalar_t>& a, const UpstreamGrads<accumulate_t<scalar_t>>& up, scalar_t* grad_x,
                       accumulate_t<scalar_t>* upsampled_grad_x) {
    if (!a.upsample) {
      using Kernel = SigmoidBackwardKernel<scalar_t>;
      run_on_host(Kernel{a, up, grad_x}, ceil_div(a.H * a.W, Kernel::kThreads), a.B);
    } else {
      using Kernel = SigmoidUpsampledBackwardKernel<scalar_t>;
      run_on_host(Kernel{a, up, upsampled_grad_x}, ceil_div(a.h * a.w, Kernel::kThreads), a.B);
    }
  }
};

#if defined(INCSEG_WITH_CUDA)
// Launches the kernels on the current stream of x's device.
struct CudaDevice : glue::CudaDeviceBase {
  template <typename scalar_t>
  static void forward(const KernelArgs<scalar_t>& a, const TermMaps<accumulate_t<scalar_t>>& out) {
    check(launch_sigmoid_forward(a, out, stream()));
  }

  template <typename scalar_t>
  static void backward(const KernelArgs<scalar_t>& a, const UpstreamGrads<accumulate_t<scalar_t>>& up, scalar_t* grad_x,
                       accumulate_t<scalar_t>* upsampled_grad_x) {
    check(launch_sigmoid_backward(a, up, grad_x, upsampled_grad_x, stream()));
  }
};
#endif

// The label term's pixel count: the non-ignored pixels with "skip", else every pixel.
at::Tensor label_count(const Inputs& in) {
  if (!in.target.defined() || !in.skip_ignored)
    return at::scalar_tensor(in.B * in.H * in.W, in.x.options().dtype(at::kLong));
  return in.target.ne(in.ignore_index).sum();
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_losses_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& pos_weight, const std::optional<at::Tensor>& channel_weight,
    int64_t negative_channels, int64_t label_channels_from, std::optional<double> pseudo_threshold,
    int64_t pseudo_background, int64_t ignore_index, c10::string_view ignored_pixels, c10::string_view reduction,
    at::OptionalIntArrayRef size) {
  const Inputs in = check_inputs(x, target, y, pos_weight, channel_weight, negative_channels, label_channels_from,
                                 pseudo_threshold, pseudo_background, ignore_index, ignored_pixels, reduction, size);
  glue::check_batch(in.B, "x");
  [[maybe_unused]] auto device_guard = Device::guard(x);
  const auto options = in.x.options().dtype(in.acc_dtype);
  at::Tensor maps[kNumTerms];
  for (auto& map : maps) map = at::empty({in.B, in.H, in.W}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sigmoid_losses_fwd", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    const TermMaps<acc_t> out{
        {maps[0].mutable_data_ptr<acc_t>(), maps[1].mutable_data_ptr<acc_t>(), maps[2].mutable_data_ptr<acc_t>()}};
    Device::forward(kernel_args<scalar_t>(in), out);
  });
  const at::Tensor count = label_count(in);
  if (in.reduction == Reduction::kNone) return {maps[0], maps[1], maps[2], count};
  // Each map summed by torch in float64, in its fixed order: the same totals run to run.
  const at::Tensor totals = at::stack({maps[0].sum(at::kDouble), maps[1].sum(at::kDouble), maps[2].sum(at::kDouble)});
  const auto [label, soft, negative] = reduced_losses(in, totals, count);
  return {label, soft, negative, count};
}

template <typename Device>
at::Tensor sigmoid_losses_bwd(const at::Tensor& grad_label, const at::Tensor& grad_soft,
                              const at::Tensor& grad_negative, const at::Tensor& x,
                              const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
                              const std::optional<at::Tensor>& pos_weight,
                              const std::optional<at::Tensor>& channel_weight, const at::Tensor& label_count,
                              int64_t negative_channels, int64_t label_channels_from,
                              std::optional<double> pseudo_threshold, int64_t pseudo_background, int64_t ignore_index,
                              c10::string_view ignored_pixels, c10::string_view reduction,
                              at::OptionalIntArrayRef size) {
  const Inputs in = check_inputs(x, target, y, pos_weight, channel_weight, negative_channels, label_channels_from,
                                 pseudo_threshold, pseudo_background, ignore_index, ignored_pixels, reduction, size);
  glue::check_batch(in.B, "x");
  [[maybe_unused]] auto device_guard = Device::guard(x);
  const Upstreams upstream = checked_upstreams(in, grad_label, grad_soft, grad_negative, label_count);
  at::Tensor grad_x = at::empty_like(in.x, at::MemoryFormat::Contiguous);
  // With size= the gather accumulates in the accumulation dtype, then casts once.
  at::Tensor accumulated = in.upsample ? at::zeros(in.x.sizes(), in.x.options().dtype(in.acc_dtype)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sigmoid_losses_bwd", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    UpstreamGrads<acc_t> up{};
    for (int t = 0; t < kNumTerms; ++t) {
      up.grad[t] = upstream.grads[t].const_data_ptr<acc_t>();
      up.inverse_divisor[t] = static_cast<acc_t>(1.0 / upstream.divisors[t]);
    }
    up.per_pixel = in.reduction == Reduction::kNone;
    Device::backward(kernel_args<scalar_t>(in), up, reinterpret_cast<k_scalar_t*>(grad_x.mutable_data_ptr<scalar_t>()),
                     in.upsample ? accumulated.mutable_data_ptr<acc_t>() : nullptr);
  });
  if (in.upsample) grad_x.copy_(accumulated);
  return grad_x;
}

}  // namespace
}  // namespace sigmoid
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU, m) {
  m.impl("sigmoid_losses_fwd", &incseg::sigmoid::sigmoid_losses_fwd<incseg::sigmoid::HostEmulation>);
  m.impl("sigmoid_losses_bwd", &incseg::sigmoid::sigmoid_losses_bwd<incseg::sigmoid::HostEmulation>);
}

#if defined(INCSEG_WITH_CUDA)
TORCH_LIBRARY_IMPL(incseg_fast, CUDA, m) {
  m.impl("sigmoid_losses_fwd", &incseg::sigmoid::sigmoid_losses_fwd<incseg::sigmoid::CudaDevice>);
  m.impl("sigmoid_losses_bwd", &incseg::sigmoid::sigmoid_losses_bwd<incseg::sigmoid::CudaDevice>);
}
#endif
