// The GPU architectures this file, like every csrc/cuda/*.cu, was compiled for (csrc/build_info.cpp).
#include <string>

#define INCSEG_STRINGIFY_ARGS(...) #__VA_ARGS__
#define INCSEG_STRINGIFY(...) INCSEG_STRINGIFY_ARGS(__VA_ARGS__)

namespace incseg::cuda {

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every pass, host included.
std::string compiled_archs() { return INCSEG_STRINGIFY(__CUDA_ARCH_LIST__); }

}  // namespace incseg::cuda
