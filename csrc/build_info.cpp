// What this build of incseg_fast._C is and does here, for `incseg-fast env` and `--version`:
//   torch.ops.incseg_fast_build.cpu_isa()     the instruction set the CPU kernels run (toolkit.h's
//                                             dispatch: the widest the CPU has, capped by INCSEG_CPU_ISA)
//   torch.ops.incseg_fast_build.cuda_archs()  the GPU architectures the CUDA kernels were compiled
//                                             for ("800,900"), empty in a build without CUDA kernels
// Its own namespace: the op namespaces of ops.cpp hold the kernels' contract only.
#include <torch/library.h>

#include <string>

#include "cpu/toolkit.h"

#if defined(INCSEG_WITH_CUDA)
namespace incseg::cuda {
std::string compiled_archs();  // csrc/cuda/build_info.cu: nvcc's __CUDA_ARCH_LIST__
}
#endif

namespace {

std::string cpu_isa() {
  switch (incseg::cpu::active_isa()) {
    case incseg::cpu::Isa::kAvx512:
      return "avx512";
    case incseg::cpu::Isa::kAvx2:
      return "avx2";
    case incseg::cpu::Isa::kBaseline:
      break;
  }
  return "baseline";
}

std::string cuda_archs() {
#if defined(INCSEG_WITH_CUDA)
  return incseg::cuda::compiled_archs();
#else
  return "";
#endif
}

}  // namespace

TORCH_LIBRARY(incseg_fast_build, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cuda_archs() -> str", &cuda_archs);
}
