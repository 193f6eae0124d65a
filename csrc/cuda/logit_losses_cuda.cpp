// Torch glue of the logit-loss CUDA kernels: TORCH_LIBRARY_IMPL(incseg_fast, CUDA) when built with
// CUDA, and always TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU), which runs the very same
// kernel bodies on the CPU, thread by thread (common/grid.h), so that the tests check the CUDA
// kernels' indexing and arithmetic on machines without a GPU. The two differ only in the Device
// that runs a launch; checks, allocation and launch planning are shared (common/logit_host.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "common/logit_host.h"
#include "cuda/glue.h"
#include "cuda/logit_losses_kernels.cuh"

namespace incseg {
namespace logit {
namespace {

using glue::aligned_to;
using glue::kernel_data;
using glue::KernelType;

LabelType label_type(const at::Tensor& target) {
  if (!target.defined()) return LabelType::kInt64;
  switch (target.scalar_type()) {
    case at::kInt:
      return LabelType::kInt32;
    case at::kByte:
      return LabelType::kUInt8;
    default:
      return LabelType::kInt64;
  }
}

// The axes of the upsampling with size=; without distillation y's are x's (y is not read).
template <typename coord_t>
Upsampling<coord_t> upsampling(const Inputs& in) {
  if (!in.upsample) return Upsampling<coord_t>{};
  const bool with_y = in.y.defined();
  return Upsampling<coord_t>{upsample_axis<coord_t>(in.h, in.H), upsample_axis<coord_t>(in.w, in.W),
                             upsample_axis<coord_t>(with_y ? in.yh : in.h, in.H),
                             upsample_axis<coord_t>(with_y ? in.yw : in.w, in.W)};
}

template <typename scalar_t, typename teacher_t, typename k_scalar_t = typename KernelType<scalar_t>::type,
          typename k_teacher_t = typename KernelType<teacher_t>::type>
LogitInputs<k_scalar_t, k_teacher_t> kernel_inputs(const Inputs& in, double alpha, int64_t ignore_index) {
  using acc_t = accumulate_t<k_scalar_t>;
  return LogitInputs<k_scalar_t, k_teacher_t>{kernel_data<scalar_t>(in.x),
                                              kernel_data<teacher_t>(in.y),
                                              in.target.defined() ? in.target.const_data_ptr() : nullptr,
                                              label_type(in.target),
                                              in.log_gamma.defined() ? in.log_gamma.const_data_ptr<acc_t>() : nullptr,
                                              in.mask.defined() ? in.mask.const_data_ptr<acc_t>() : nullptr,
                                              static_cast<acc_t>(alpha),
                                              ignore_index,
                                              in.B,
                                              in.C,
                                              in.Co,
                                              in.HW,
                                              in.ce,
                                              in.kd,
                                              in.upsample,
                                              upsampling<acc_t>(in)};
}

// Runs the kernels on the CPU, one thread after another.
struct HostEmulation : glue::HostDevice {
  template <typename scalar_t, typename teacher_t>
  static void forward(const LogitInputs<scalar_t, teacher_t>& in, const ForwardBuffers<scalar_t>& out,
                      const ForwardTotals<accumulate_t<scalar_t>>& totals, const LaunchPlan& plan) {
    with_forward_kernel(in, out, plan, [&](const auto& kernel) { run_on_host(kernel, plan.grid_x, plan.grid_y); });
    finish_forward_on_host(out, plan.warps, totals);
  }

  template <typename scalar_t, typename teacher_t>
  static void backward(const LogitInputs<scalar_t, teacher_t>& in, const BackwardBuffers<scalar_t>& grad,
                       const LaunchPlan& plan) {
    for_each_backward_kernel(in, grad, plan,
                             [&](const auto& kernel, int64_t grid_x) { run_on_host(kernel, grid_x, plan.grid_y); });
  }
};

#if defined(INCSEG_WITH_CUDA)
// Launches the kernels on the current stream of x's device.
struct CudaDevice : glue::CudaDeviceBase {
  template <typename scalar_t, typename teacher_t>
  static void forward(const LogitInputs<scalar_t, teacher_t>& in, const ForwardBuffers<scalar_t>& out,
                      const ForwardTotals<accumulate_t<scalar_t>>& totals, const LaunchPlan& plan) {
    check(launch_logit_forward(in, out, totals, plan, stream()));
  }

  template <typename scalar_t, typename teacher_t>
  static void backward(const LogitInputs<scalar_t, teacher_t>& in, const BackwardBuffers<scalar_t>& grad,
                       const LaunchPlan& plan) {
    check(launch_logit_backward(in, grad, plan, stream()));
  }
};
#endif

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logit_losses_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
    const std::optional<at::Tensor>& log_gamma, const std::optional<at::Tensor>& mask, int64_t old_classes,
    c10::string_view ce, c10::string_view kd, double alpha, int64_t ignore_index, c10::string_view reduction,
    at::OptionalIntArrayRef size) {
  const Inputs in = check_inputs(x, target, y, log_gamma, mask, old_classes, ce, kd, reduction, size);
  glue::check_batch(in.B, "x");
  [[maybe_unused]] auto device_guard = Device::guard(x);
  auto outputs = allocate_forward_outputs(in);
  const auto acc_options = x.options().dtype(in.acc_dtype);
  const bool reduce = in.reduction != Reduction::kNone;
  at::Tensor ce_loss = reduce ? at::empty({}, acc_options) : outputs.ce_map;
  at::Tensor kd_loss = reduce ? at::empty({}, acc_options) : outputs.kd_map;
  at::Tensor valid_count = at::empty({}, x.options().dtype(at::kLong));
  const bool aligned = aligned_to(16, {&in.x, &in.y, &in.mask, &outputs.stats, &outputs.ce_map, &outputs.kd_map});

  dispatch_student_teacher(x.scalar_type(), in.teacher_dtype, "logit_losses_fwd", [&](auto* x_type, auto* y_type) {
    using scalar_t = std::remove_pointer_t<decltype(x_type)>;
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    const auto inputs = kernel_inputs<scalar_t, std::remove_pointer_t<decltype(y_type)>>(in, alpha, ignore_index);
    const LaunchPlan plan = plan_forward(inputs, aligned);
    at::Tensor partials = at::empty({reduce ? 2 * plan.warps : 0}, acc_options);
    at::Tensor valid_partial = at::empty({plan.warps}, x.options().dtype(at::kInt));
    acc_t* partial = partials.mutable_data_ptr<acc_t>();
    const ForwardBuffers<k_scalar_t> out{outputs.stats.mutable_data_ptr<acc_t>(),
                                         reduce ? nullptr : outputs.ce_map.mutable_data_ptr<acc_t>(),
                                         reduce ? nullptr : outputs.kd_map.mutable_data_ptr<acc_t>(),
                                         reduce ? partial : nullptr,
                                         reduce ? partial + plan.warps : nullptr,
                                         valid_partial.mutable_data_ptr<int32_t>()};
    const ForwardTotals<acc_t> totals{reduce,
                                      in.reduction == Reduction::kMean,
                                      kd_scale(in),
                                      reduce ? ce_loss.mutable_data_ptr<acc_t>() : nullptr,
                                      reduce ? kd_loss.mutable_data_ptr<acc_t>() : nullptr,
                                      valid_count.mutable_data_ptr<int64_t>()};
    Device::forward(inputs, out, totals, plan);
  });
  return {ce_loss, kd_loss, outputs.stats, valid_count};
}

template <typename Device>
at::Tensor logit_losses_bwd(const at::Tensor& grad_ce, const at::Tensor& grad_kd, const at::Tensor& x,
                            const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& y,
                            const std::optional<at::Tensor>& log_gamma, const std::optional<at::Tensor>& mask,
                            const at::Tensor& stats, const at::Tensor& valid_count, int64_t old_classes,
                            c10::string_view ce, c10::string_view kd, double alpha, int64_t ignore_index,
                            c10::string_view reduction, at::OptionalIntArrayRef size) {
  const Inputs in = check_inputs(x, target, y, log_gamma, mask, old_classes, ce, kd, reduction, size);
  check_backward(in, grad_ce, grad_kd, stats, valid_count);
  glue::check_batch(in.B, "x");
  [[maybe_unused]] auto device_guard = Device::guard(x);
  at::Tensor grad_x = at::empty_like(in.x, at::MemoryFormat::Contiguous);
  if (in.ce == CeMode::kNone && in.kd == KdMode::kNone) return grad_x.zero_();
  const at::Tensor g_ce = grad_ce.to(in.acc_dtype).contiguous();
  const at::Tensor g_kd = grad_kd.to(in.acc_dtype).contiguous();
  const at::Tensor saved = stats.contiguous();
  const bool per_pixel = in.reduction == Reduction::kNone;
  const bool aligned =
      aligned_to(16, {&in.x, &in.y, &in.mask, &saved, &grad_x}) && (!per_pixel || aligned_to(16, {&g_ce, &g_kd}));

  dispatch_student_teacher(x.scalar_type(), in.teacher_dtype, "logit_losses_bwd", [&](auto* x_type, auto* y_type) {
    using scalar_t = std::remove_pointer_t<decltype(x_type)>;
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    const auto inputs = kernel_inputs<scalar_t, std::remove_pointer_t<decltype(y_type)>>(in, alpha, ignore_index);
    const LaunchPlan plan = plan_backward(inputs, aligned);
    at::Tensor cell_sums = at::empty({plan.cell_sums}, x.options().dtype(in.acc_dtype));
    const BackwardBuffers<k_scalar_t> grad{saved.const_data_ptr<acc_t>(),
                                           valid_count.const_data_ptr<int64_t>(),
                                           g_ce.const_data_ptr<acc_t>(),
                                           g_kd.const_data_ptr<acc_t>(),
                                           per_pixel,
                                           in.reduction == Reduction::kMean,
                                           static_cast<acc_t>(kd_scale(in)),
                                           reinterpret_cast<k_scalar_t*>(grad_x.mutable_data_ptr<scalar_t>()),
                                           cell_sums.mutable_data_ptr<acc_t>(),
                                           plan.cell_strips};
    Device::backward(inputs, grad, plan);
  });
  return grad_x;
}

}  // namespace
}  // namespace logit
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU, m) {
  m.impl("logit_losses_fwd", &incseg::logit::logit_losses_fwd<incseg::logit::HostEmulation>);
  m.impl("logit_losses_bwd", &incseg::logit::logit_losses_bwd<incseg::logit::HostEmulation>);
}

#if defined(INCSEG_WITH_CUDA)
TORCH_LIBRARY_IMPL(incseg_fast, CUDA, m) {
  m.impl("logit_losses_fwd", &incseg::logit::logit_losses_fwd<incseg::logit::CudaDevice>);
  m.impl("logit_losses_bwd", &incseg::logit::logit_losses_bwd<incseg::logit::CudaDevice>);
}
#endif
