// What this build of incseg_fast._C is and does here, for `incseg-fast env`, `--version` and the benchmark:
//   torch.ops.incseg_fast_build.cpu_isa()          [the CPU kernels' ISA copy in use, the widest the CPU
//                                                  supports] as 0 = baseline, 1 = avx2, 2 = avx512
//                                                  (toolkit.h's dispatch: capped by INCSEG_CPU_ISA)
//   torch.ops.incseg_fast_build.set_cpu_isa_cap(isa)  caps it at run time ("baseline", "avx2", "avx512"),
//                                                  so that one process can time or test every copy
//   torch.ops.incseg_fast_build.cuda_archs()       the GPU architectures the CUDA kernels were compiled
//                                                  for ("800,900"), empty in a build without CUDA kernels
// incseg_fast/cpu_isa.py and incseg_fast/_environment.py read them. Their own namespace: the op
// namespaces of ops.cpp hold the kernels' contract only.
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/toolkit.h"

#if defined(INCSEG_WITH_CUDA)
namespace incseg::cuda {
std::string compiled_archs();  // csrc/cuda/build_info.cu: nvcc's __CUDA_ARCH_LIST__
}
#endif

namespace {

std::vector<int64_t> cpu_isa() {
  return {static_cast<int64_t>(incseg::cpu::active_isa()), static_cast<int64_t>(incseg::cpu::widest_supported_isa())};
}

void set_cpu_isa_cap(const std::string& isa) { incseg::cpu::set_isa_cap(incseg::cpu::isa_from_name(isa, "isa")); }

std::string cuda_archs() {
#if defined(INCSEG_WITH_CUDA)
  return incseg::cuda::compiled_archs();
#else
  return "";
#endif
}

}  // namespace

TORCH_LIBRARY(incseg_fast_build, m) {
  m.def("cpu_isa() -> int[]", &cpu_isa);
  m.def("set_cpu_isa_cap(str isa) -> ()", &set_cpu_isa_cap);
  m.def("cuda_archs() -> str", &cuda_archs);
}
