// The one place where every incseg_fast operator schema is declared.
// Device implementations register against these with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda;
// fake (meta) kernels and autograd formulas are registered from Python (incseg_fast/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing incseg_fast._C runs the static TORCH_LIBRARY initialisers below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(incseg_fast, m) {
  // ---- logit losses (SPEC 2): owned by csrc/cpu/logit_losses_cpu.cpp ----
  // ---- end logit losses ----

  // ---- attentive distillation and structured attention (SPEC 3): owned by csrc/cpu/attention_cpu.cpp ----
  // ---- end attention ----
}
