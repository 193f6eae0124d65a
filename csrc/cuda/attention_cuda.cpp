// Torch glue of the attention CUDA kernels: TORCH_LIBRARY_IMPL(incseg_fast, CUDA) when built with
// CUDA, and always TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU), which runs the very same
// kernel bodies and kernel sequences on the CPU, thread by thread (common/grid.h), so that the tests
// check the CUDA kernels' indexing and arithmetic on machines without a GPU. The two differ only in
// the Device that runs a sequence; checks and the saved state's allocation are shared with the CPU
// kernels (common/attention_host.h). Scratch (partials) is allocated here, on the op's device; no
// value is read back to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <tuple>

#include "common/attention_host.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/glue.h"

namespace incseg {
namespace attention {
namespace {

namespace host = incseg::attention;
using at::Tensor;
using glue::aligned_to;
using glue::data_or_null;
using glue::kernel_data;
using glue::KernelType;
using glue::mutable_kernel_data;

// Whether the feature passes may read kPackedPixels pixels at once: 16 bytes of each feature
// tensor, and a pack of acc_t (32 bytes for 16-bit features) of each per-pixel map.
template <typename k_scalar_t>
bool packs_aligned(std::initializer_list<const Tensor*> features, std::initializer_list<const Tensor*> maps) {
  return aligned_to(16, features) && aligned_to(kPackedPixels<k_scalar_t> * sizeof(accumulate_t<k_scalar_t>), maps);
}

// Scratch of n elements of `dtype` on like's device. Kernels write it in packs of up to 64 bytes;
// fresh allocations are aligned to at least that (64 bytes on the CPU, more on CUDA).
Tensor scratch(int64_t n, const Tensor& like, at::ScalarType dtype) {
  Tensor t = at::empty({n}, like.options().dtype(dtype));
  TORCH_INTERNAL_ASSERT(aligned_to(64, {&t}));
  return t;
}

// A zero-filled gradient of `like`'s shape where wanted, else the empty tensor of unwanted outputs.
Tensor zeros_or_empty(bool wanted, const Tensor& like) {
  return wanted ? at::zeros_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, like.options());
}

// Runs the kernel sequences on the CPU, one thread after another.
struct HostEmulation : glue::HostDevice {
  template <typename scalar_t, typename teacher_t>
  static int64_t resident_blocks(FeaturePass, int) {
    return kEmulatedResidentBlocks;
  }
  template <typename scalar_t, typename teacher_t>
  static void forward(const ForwardCall<scalar_t, teacher_t>& call) {
    HostExecutor ex;
    attentive_distillation_forward_kernels(ex, call);
  }
  template <typename scalar_t, typename teacher_t>
  static void backward(const BackwardCall<scalar_t, teacher_t>& call) {
    HostExecutor ex;
    attentive_distillation_backward_kernels(ex, call);
  }
  template <typename scalar_t>
  static void structured(const StructuredInputs<scalar_t>& in, const AttentionPlan& plan, scalar_t* out) {
    HostExecutor ex;
    structured_attention_forward_kernels(ex, in, plan, out);
  }
  template <typename scalar_t>
  static void structured_backward(const StructuredBackwardCall<scalar_t>& call) {
    HostExecutor ex;
    structured_attention_backward_kernels(ex, call);
  }
};

#if defined(INCSEG_WITH_CUDA)
// Launches the kernel sequences on the current stream of the op's device; every launch is checked.
struct CudaDevice : glue::CudaDeviceBase {
  template <typename scalar_t, typename teacher_t>
  static int64_t resident_blocks(FeaturePass pass, int pixels_per_thread) {
    int64_t blocks = 0;
    check(resident_feature_blocks<scalar_t, teacher_t>(pass, pixels_per_thread, &blocks));
    return blocks;
  }
  template <typename scalar_t, typename teacher_t>
  static void forward(const ForwardCall<scalar_t, teacher_t>& call) {
    check(launch_attentive_distillation_forward(call, stream()));
  }
  template <typename scalar_t, typename teacher_t>
  static void backward(const BackwardCall<scalar_t, teacher_t>& call) {
    check(launch_attentive_distillation_backward(call, stream()));
  }
  template <typename scalar_t>
  static void structured(const StructuredInputs<scalar_t>& in, const AttentionPlan& plan, scalar_t* out) {
    check(launch_structured_attention_forward(in, plan, out, stream()));
  }
  template <typename scalar_t>
  static void structured_backward(const StructuredBackwardCall<scalar_t>& call) {
    check(launch_structured_attention_backward(call, stream()));
  }
};
#endif

// plan_attention's resident_blocks: the blocks of `pass`'s feature kernel that Device holds at once
// (k_teacher_t: the old features' dtype of the attentive passes; the structured ones pass k_scalar_t).
template <typename Device, typename k_scalar_t, typename k_teacher_t>
auto resident_blocks(FeaturePass pass) {
  return [pass](int pixels_per_thread) {
    return Device::template resident_blocks<k_scalar_t, k_teacher_t>(pass, pixels_per_thread);
  };
}

// f, g (contiguous; g in its own dtype teacher_t), a, b (acc dtype) as the kernels read them.
template <typename scalar_t, typename teacher_t, typename k_scalar_t = typename KernelType<scalar_t>::type,
          typename k_teacher_t = typename KernelType<teacher_t>::type>
FeaturePair<k_scalar_t, k_teacher_t> feature_pair(const Tensor& f, const Tensor& g, const Tensor& a, const Tensor& b) {
  using acc_t = accumulate_t<k_scalar_t>;
  return FeaturePair<k_scalar_t, k_teacher_t>{kernel_data<scalar_t>(f), kernel_data<teacher_t>(g),
                                              a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>()};
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_distillation_forward(const Tensor& f_in, const Tensor& g_in,
                                                                          const Tensor& a_in, const Tensor& b_in,
                                                                          c10::string_view reduction,
                                                                          bool save_spatial_grad) {
  host::check_feature_pair(f_in, g_in, a_in, b_in);
  const double scale = host::reduction_scale(reduction, f_in);
  glue::check_batch(f_in.size(0), "f");
  [[maybe_unused]] auto device_guard = Device::guard(f_in);
  const Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = f.size(0), channels = f.size(1), pixels = f.size(2) * f.size(3);
  const auto acc_dtype = at::toOpMathType(f.scalar_type());
  const Tensor a = a_in.to(acc_dtype).contiguous(), b = b_in.to(acc_dtype).contiguous();
  const host::SavedState state = host::allocate_saved_state(f, save_spatial_grad);
  Tensor loss = at::empty({}, f.options().dtype(acc_dtype));

  dispatch_student_teacher(
      f.scalar_type(), g.scalar_type(), "attentive_distillation_forward", [&](auto* f_type, auto* g_type) {
        using scalar_t = std::remove_pointer_t<decltype(f_type)>;
        using teacher_t = std::remove_pointer_t<decltype(g_type)>;
        using k_scalar_t = typename KernelType<scalar_t>::type;
        using k_teacher_t = typename KernelType<teacher_t>::type;
        using acc_t = accumulate_t<k_scalar_t>;
        const AttentionPlan plan = plan_attention<k_scalar_t>(
            batch, channels, pixels, packs_aligned<k_scalar_t>({&f, &g}, {&state.spatial}),
            resident_blocks<Device, k_scalar_t, k_teacher_t>(FeaturePass::kAttentiveForward));
        const int64_t warps = batch * plan.pixel_kernel_warps();
        const Tensor group_partial =
            scratch(plan.groups * batch * kForwardPartialRows<k_scalar_t> * pixels, f, at::kDouble);
        const Tensor square_partial = scratch(2 * warps, f, at::kDouble), loss_partial = scratch(warps, f, at::kDouble);
        const Tensor inv_exact = scratch(2 * batch, f, at::kDouble);
        const ForwardScratch buffers{group_partial.mutable_data_ptr<double>(),
                                     square_partial.mutable_data_ptr<double>(), inv_exact.mutable_data_ptr<double>(),
                                     loss_partial.mutable_data_ptr<double>()};
        Device::forward(ForwardCall<k_scalar_t, k_teacher_t>{
            feature_pair<scalar_t, teacher_t>(f, g, a, b), plan, scale, loss.mutable_data_ptr<acc_t>(),
            state.spatial.mutable_data_ptr<acc_t>(), state.inv_norm.mutable_data_ptr<acc_t>(),
            data_or_null<acc_t>(state.pixel_grad), buffers});
      });
  return {loss, state.spatial, state.inv_norm, state.pixel_grad};
}

// The backward's tensors, contiguous; a, b in the accumulation dtype; df, dg, da, db empty unless wanted.
struct BackwardTensors {
  Tensor f, g, a, b, upstream;
  Tensor df, dg, da, db;
};

BackwardTensors backward_tensors(const Tensor& grad_loss, const Tensor& f_in, const Tensor& g_in, const Tensor& a_in,
                                 const Tensor& b_in, const std::array<bool, 4>& output_mask) {
  const auto acc_dtype = at::toOpMathType(f_in.scalar_type());
  BackwardTensors t;
  t.f = f_in.contiguous();
  t.g = g_in.contiguous();
  t.a = a_in.to(acc_dtype).contiguous();
  t.b = b_in.to(acc_dtype).contiguous();
  t.upstream = grad_loss.to(f_in.device(), acc_dtype).contiguous();  // read by the kernels, on the device
  t.df = host::gradient_or_empty(output_mask[0], t.f);
  t.dg = host::gradient_or_empty(output_mask[1], t.g);
  t.da = host::gradient_or_empty(output_mask[2], a_in);
  t.db = host::gradient_or_empty(output_mask[3], b_in);
  return t;
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor, Tensor> attentive_distillation_backward(
    const Tensor& grad_loss, const Tensor& f_in, const Tensor& g_in, const Tensor& a_in, const Tensor& b_in,
    const Tensor& spatial, const Tensor& inv_norm, const Tensor& pixel_grad, c10::string_view reduction,
    bool spatial_chain, std::array<bool, 4> output_mask) {
  const auto [scale, reads_pixel_grad] = host::check_backward(grad_loss, f_in, g_in, a_in, b_in, spatial, inv_norm,
                                                              pixel_grad, reduction, spatial_chain, output_mask);
  glue::check_batch(f_in.size(0), "f");
  [[maybe_unused]] auto device_guard = Device::guard(f_in);
  const BackwardTensors t = backward_tensors(grad_loss, f_in, g_in, a_in, b_in, output_mask);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2] && !output_mask[3]) return {t.df, t.dg, t.da, t.db};
  const int64_t batch = t.f.size(0), channels = t.f.size(1), pixels = t.f.size(2) * t.f.size(3);
  const bool channel_sums = output_mask[2] || output_mask[3];

  dispatch_student_teacher(
      t.f.scalar_type(), t.g.scalar_type(), "attentive_distillation_backward", [&](auto* f_type, auto* g_type) {
        using scalar_t = std::remove_pointer_t<decltype(f_type)>;
        using teacher_t = std::remove_pointer_t<decltype(g_type)>;
        using k_scalar_t = typename KernelType<scalar_t>::type;
        using k_teacher_t = typename KernelType<teacher_t>::type;
        using acc_t = accumulate_t<k_scalar_t>;
        const bool aligned = packs_aligned<k_scalar_t>({&t.f, &t.g, &t.df, &t.dg}, {&spatial, &pixel_grad});
        const AttentionPlan plan = plan_attention<k_scalar_t>(
            batch, channels, pixels, aligned,
            resident_blocks<Device, k_scalar_t, k_teacher_t>(FeaturePass::kAttentiveBackward));
        const Tensor spatial_dot = scratch(reads_pixel_grad ? 2 * batch : 0, spatial, spatial.scalar_type());
        const Tensor channel_partial =
            scratch(channel_sums ? 2 * batch * plan.pixel_warps() * channels : 0, spatial, spatial.scalar_type());
        const acc_t* dot = reads_pixel_grad ? spatial_dot.const_data_ptr<acc_t>() : nullptr;
        const SavedMaps<acc_t> saved{spatial.const_data_ptr<acc_t>(), inv_norm.const_data_ptr<acc_t>(),
                                     reads_pixel_grad ? pixel_grad.const_data_ptr<acc_t>() : nullptr, dot};
        const FeatureGrads<k_scalar_t, k_teacher_t> grads{
            mutable_kernel_data<scalar_t>(t.df), mutable_kernel_data<teacher_t>(t.dg),
            data_or_null<acc_t>(channel_partial), output_mask[2], output_mask[3]};
        Device::backward(BackwardCall<k_scalar_t, k_teacher_t>{
            feature_pair<scalar_t, teacher_t>(t.f, t.g, t.a, t.b), plan, saved, data_or_null<acc_t>(spatial_dot),
            t.upstream.const_data_ptr<acc_t>(), 2.0 * scale, grads, mutable_kernel_data<scalar_t>(t.da),
            mutable_kernel_data<teacher_t>(t.db)});
      });
  return {t.df, t.dg, t.da, t.db};
}

template <typename scalar_t, typename k_scalar_t = typename KernelType<scalar_t>::type>
StructuredInputs<k_scalar_t> structured_inputs(const Tensor& v, const Tensor& a_ch, const Tensor& a_sp) {
  using acc_t = accumulate_t<k_scalar_t>;
  return StructuredInputs<k_scalar_t>{kernel_data<scalar_t>(v), a_ch.const_data_ptr<acc_t>(),
                                      a_sp.const_data_ptr<acc_t>()};
}

template <typename Device>
Tensor structured_attention(const Tensor& v_in, const Tensor& a_ch_in, const Tensor& a_sp_in) {
  host::check_structured(v_in, a_ch_in, a_sp_in);
  glue::check_batch(v_in.size(0), "v");
  [[maybe_unused]] auto device_guard = Device::guard(v_in);
  const Tensor v = v_in.contiguous();
  Tensor out = at::empty_like(v);
  if (v.numel() == 0) return out;
  const int64_t batch = v.size(0), channels = v.size(1), pixels = v.size(2) * v.size(3);
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  const Tensor a_ch = a_ch_in.to(acc_dtype).contiguous(), a_sp = a_sp_in.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "structured_attention", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    const AttentionPlan plan =
        plan_attention<k_scalar_t>(batch, channels, pixels, packs_aligned<k_scalar_t>({&v, &out}, {&a_sp}),
                                   resident_blocks<Device, k_scalar_t, k_scalar_t>(FeaturePass::kStructuredForward));
    Device::structured(structured_inputs<scalar_t>(v, a_ch, a_sp), plan, mutable_kernel_data<scalar_t>(out));
  });
  return out;
}

template <typename Device>
std::tuple<Tensor, Tensor, Tensor> structured_attention_backward(const Tensor& grad_out_in, const Tensor& v_in,
                                                                 const Tensor& a_ch_in, const Tensor& a_sp_in,
                                                                 std::array<bool, 3> output_mask) {
  host::check_structured(v_in, a_ch_in, a_sp_in);
  host::check_structured_grad(grad_out_in, v_in);
  glue::check_batch(v_in.size(0), "v");
  [[maybe_unused]] auto device_guard = Device::guard(v_in);
  const Tensor v = v_in.contiguous(), grad_out = grad_out_in.contiguous();
  Tensor dv = host::gradient_or_empty(output_mask[0], v);
  if (v.numel() == 0) return {dv, zeros_or_empty(output_mask[1], a_ch_in), zeros_or_empty(output_mask[2], a_sp_in)};
  Tensor d_ch = host::gradient_or_empty(output_mask[1], a_ch_in);
  Tensor d_sp = host::gradient_or_empty(output_mask[2], a_sp_in);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dv, d_ch, d_sp};
  const int64_t batch = v.size(0), channels = v.size(1), pixels = v.size(2) * v.size(3);
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  const Tensor a_ch = a_ch_in.to(acc_dtype).contiguous(), a_sp = a_sp_in.to(acc_dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "structured_attention_backward", [&] {
    using k_scalar_t = typename KernelType<scalar_t>::type;
    using acc_t = accumulate_t<k_scalar_t>;
    const bool aligned = packs_aligned<k_scalar_t>({&v, &grad_out, &dv}, {&a_sp});
    const AttentionPlan plan =
        plan_attention<k_scalar_t>(batch, channels, pixels, aligned,
                                   resident_blocks<Device, k_scalar_t, k_scalar_t>(FeaturePass::kStructuredBackward));
    const Tensor spatial_partial = scratch(output_mask[2] ? plan.groups * batch * pixels : 0, a_sp, acc_dtype);
    const Tensor channel_partial = scratch(output_mask[1] ? batch * plan.pixel_warps() * channels : 0, a_sp, acc_dtype);
    const StructuredGrads<k_scalar_t> grads{mutable_kernel_data<scalar_t>(dv), data_or_null<acc_t>(spatial_partial),
                                            data_or_null<acc_t>(channel_partial)};
    Device::structured_backward(StructuredBackwardCall<k_scalar_t>{
        structured_inputs<scalar_t>(v, a_ch, a_sp), kernel_data<scalar_t>(grad_out), plan, grads,
        mutable_kernel_data<scalar_t>(d_ch), mutable_kernel_data<scalar_t>(d_sp)});
  });
  return {dv, d_ch, d_sp};
}

}  // namespace
}  // namespace attention
}  // namespace incseg

TORCH_LIBRARY_IMPL(incseg_fast_cuda_emulator, CPU, m) {
  using incseg::attention::HostEmulation;
  m.impl("attentive_distillation_forward", &incseg::attention::attentive_distillation_forward<HostEmulation>);
  m.impl("attentive_distillation_backward", &incseg::attention::attentive_distillation_backward<HostEmulation>);
  m.impl("structured_attention", &incseg::attention::structured_attention<HostEmulation>);
  m.impl("structured_attention_backward", &incseg::attention::structured_attention_backward<HostEmulation>);
}

#if defined(INCSEG_WITH_CUDA)
TORCH_LIBRARY_IMPL(incseg_fast, CUDA, m) {
  using incseg::attention::CudaDevice;
  m.impl("attentive_distillation_forward", &incseg::attention::attentive_distillation_forward<CudaDevice>);
  m.impl("attentive_distillation_backward", &incseg::attention::attentive_distillation_backward<CudaDevice>);
  m.impl("structured_attention", &incseg::attention::structured_attention<CudaDevice>);
  m.impl("structured_attention_backward", &incseg::attention::structured_attention_backward<CudaDevice>);
}
#endif
