// The CPU kernels' ISA copies (cpu/toolkit.h) as torch ops: which copy runs, and a cap on it, so that
// `incseg-fast env` can say which path is in use and a benchmark can time every copy in one process.
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/toolkit.h"

namespace {

// [the copy in use, the widest the CPU supports], as 0 = baseline, 1 = avx2, 2 = avx512.
std::vector<int64_t> cpu_isa() {
  return {static_cast<int64_t>(incseg::cpu::active_isa()), static_cast<int64_t>(incseg::cpu::widest_supported_isa())};
}

void set_cpu_isa_cap(const std::string& isa) { incseg::cpu::set_isa_cap(incseg::cpu::isa_from_name(isa, "isa")); }

}  // namespace

// A namespace of their own: the op-contract namespaces hold the ops every backend implements.
TORCH_LIBRARY(incseg_fast_isa, m) {
  m.def("cpu_isa() -> int[]", &cpu_isa);
  m.def("set_cpu_isa_cap(str isa) -> ()", &set_cpu_isa_cap);
}
