// The one place where every incseg_fast operator schema is declared.
//
// One contract, several implementations: the same schemas are defined in one namespace per
// implementation family, and each family registers kernels against its own namespace.
//   incseg_fast          the compiled kernels: csrc/cpu (CPU) and csrc/cuda (CUDA), TORCH_LIBRARY_IMPL
//   incseg_fast_triton   the Triton kernels, registered from Python (incseg_fast/triton) with
//                        torch.library.register_kernel for CUDA (and CPU under TRITON_INTERPRET=1)
//   incseg_fast_cuda_emulator   the CUDA kernels' bodies run thread by thread on the CPU
//                        (csrc/cuda/*_cuda.cpp), for tests on machines without a GPU
// Fake (meta) kernels and autograd formulas are registered from Python once per op family and
// applied to every namespace (incseg_fast/ops/), so a new device adds kernels and nothing else.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing incseg_fast._C runs the static TORCH_LIBRARY initialisers below; the module itself is empty.
// Only limited-API calls here: the binary is _C.abi3.so, one file for every Python (setup.py).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

void define_schemas(torch::Library& m) {
  // ---- logit losses (docs/KERNELS.md) ----
  // Modes are strings: ce in {unbiased, plain, none}, kd in {unbiased, balanced, plain, none},
  // reduction in {mean, sum, none}. Returns (ce_loss, kd_loss) in float32 (float64 for float64 x),
  // 0-dim or (B, H, W), plus what the backward needs: stats (B, 4, H, W) = per-pixel
  // (lse, lse_old, lse_bg, lse of alpha*y; the last is 0 when kd == none) and valid_count, the
  // int64 number of non-ignored pixels (0-dim, on x's device).
  // size = [H, W] (MATH.md#upsampling): the losses of F.interpolate(x, size, mode="bilinear",
  // align_corners=False) and likewise of y, interpolated on the fly; x is then (B, C, h, w) and y
  // (B, Co, h', w') at their own resolutions (h, h' <= H; w, w' <= W), while target, mask, the
  // per-pixel losses and stats live at the output resolution (B, H, W). size = None: H, W are x's.
  m.def(
      "logit_losses_fwd(Tensor x, Tensor? target, Tensor? y, Tensor? log_gamma, Tensor? mask, *, int old_classes, "
      "str ce, str kd, float alpha, int ignore_index, str reduction, int[]? size=None) "
      "-> (Tensor ce_loss, Tensor kd_loss, Tensor stats, Tensor valid_count)");
  // dL/dx (x's dtype and shape, contiguous; with size= at x's own resolution) for upstream
  // gradients grad_ce, grad_kd shaped like the losses.
  m.def(
      "logit_losses_bwd(Tensor grad_ce, Tensor grad_kd, Tensor x, Tensor? target, Tensor? y, Tensor? log_gamma, "
      "Tensor? mask, Tensor stats, Tensor valid_count, *, int old_classes, str ce, str kd, float alpha, "
      "int ignore_index, str reduction, int[]? size=None) -> Tensor");

  // ---- attentive distillation and structured attention ----
  // Forward returns (loss, spatial (3, B, H, W) = Ŝ_f, Ŝ_g, Ŝ_f - Ŝ_g, 1/N (2, B) for f then g,
  // P (2, B, H, W) = sum_c D a f and sum_c D b g, or an empty tensor unless save_spatial_grad);
  // the last three are saved for the backward.
  m.def(
      "attentive_distillation_forward(Tensor f, Tensor g, Tensor a, Tensor b, str reduction, "
      "bool save_spatial_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // (df, dg, da, db); an output whose output_mask entry is false comes back empty.
  m.def(
      "attentive_distillation_backward(Tensor grad_loss, Tensor f, Tensor g, Tensor a, Tensor b, "
      "Tensor spatial, Tensor inv_norm, Tensor pixel_grad, str reduction, bool spatial_chain, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("structured_attention(Tensor v, Tensor a_ch, Tensor a_sp) -> Tensor");
  // (dv, da_ch, da_sp); an output whose output_mask entry is false comes back empty.
  m.def(
      "structured_attention_backward(Tensor grad_out, Tensor v, Tensor a_ch, Tensor a_sp, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- Local POD (PLOP, MATH.md#local-pod) ----
  // new, old (B, C, H, W), one float dtype; scales: positive, each <= H and <= W, at most 8 of them;
  // reduction in {mean, sum, none}. Returns (loss: 0-dim, or (B,) for none; inv_norm (B,): 1/l_n, 0
  // where l_n == 0), in the accumulation dtype; the backward gets inv_norm and both inputs back and
  // recomputes the pooled differences (common/pod_math.h's layout) it needs, so nothing of size
  // C x sum_s s^2 (h_s + w_s) per image outlives the forward.
  m.def("local_pod_forward(Tensor new, Tensor old, int[] scales, str reduction) -> (Tensor, Tensor)");
  // d loss / d new (new's dtype and shape, contiguous) for grad_loss shaped like the loss.
  m.def(
      "local_pod_backward(Tensor grad_loss, Tensor new, Tensor old, Tensor inv_norm, int[] scales, "
      "str reduction) -> Tensor");
  // ---- entropy pseudo-labels (PLOP; MATH.md#pseudo-labels) ----
  // y (B, Co, h, w) old-model logits, labels (B, H, W) int64/int32/uint8, thresholds (Co,) float32.
  // size = [H, W]: y is bilinearly upsampled to the labels' resolution on the fly (MATH.md#upsampling);
  // size = None: y is at the labels' resolution. Returns (new labels (B, H, W) int64, the adaptive
  // factor (B,) float32). Not differentiable.
  m.def(
      "entropy_pseudo_labels(Tensor y, Tensor labels, Tensor thresholds, *, int ignore_index, "
      "int[]? size=None) -> (Tensor, Tensor)");
  // The same, written into labels (int64, contiguous) in place: returns the adaptive factor only. A
  // pixel's label is read before its pseudo-label is written, so the step needs no second labels map.
  m.def(
      "entropy_pseudo_labels_(Tensor y, Tensor(a!) labels, Tensor thresholds, *, int ignore_index, "
      "int[]? size=None) -> Tensor");
  // int64 (Co, bins): per background pixel, +1 at (argmax class, entropy bin) (MATH.md#entropy-histogram).
  m.def("entropy_histogram(Tensor y, Tensor labels, *, int bins, int ignore_index, int[]? size=None) -> Tensor");
  // ---- sigmoid losses with composed targets (MATH.md#sigmoid-losses: SSUL, DKD) ----
  // Channels [0, negative_channels) have target 0, [negative_channels, label_channels_from)
  // sigmoid(y_c), [label_channels_from, C) the one-hot of the (pseudo-)label; pseudo_threshold
  // (None: off) relabels pixels whose label is below pseudo_background with the teacher's argmax.
  // ignored_pixels in {skip, negative}, reduction in {mean, sum, none}. Returns (label_loss,
  // soft_loss, negative_loss) in float32 (float64 for float64 x), 0-dim or (B, H, W), and
  // label_count, the int64 number of pixels the label term counts (0-dim), saved for the backward.
  // pos_weight, channel_weight: (C,) or None (ones). size: as for logit_losses.
  m.def(
      "sigmoid_losses_fwd(Tensor x, Tensor? target, Tensor? y, Tensor? pos_weight, Tensor? channel_weight, *, "
      "int negative_channels, int label_channels_from, float? pseudo_threshold, int pseudo_background, "
      "int ignore_index, str ignored_pixels, str reduction, int[]? size=None) "
      "-> (Tensor label_loss, Tensor soft_loss, Tensor negative_loss, Tensor label_count)");
  // dL/dx (x's dtype and shape, contiguous) for upstream gradients shaped like the three losses.
  m.def(
      "sigmoid_losses_bwd(Tensor grad_label, Tensor grad_soft, Tensor grad_negative, Tensor x, Tensor? target, "
      "Tensor? y, Tensor? pos_weight, Tensor? channel_weight, Tensor label_count, *, int negative_channels, "
      "int label_channels_from, float? pseudo_threshold, int pseudo_background, int ignore_index, "
      "str ignored_pixels, str reduction, int[]? size=None) -> Tensor");
}

}  // namespace

TORCH_LIBRARY(incseg_fast, m) { define_schemas(m); }
TORCH_LIBRARY(incseg_fast_triton, m) { define_schemas(m); }
TORCH_LIBRARY(incseg_fast_cuda_emulator, m) { define_schemas(m); }
