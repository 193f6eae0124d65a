#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) translation units: per-pixel math is written once
// as HOST_DEVICE inline functions so the CPU tests exercise the arithmetic the GPU runs.
//
// On the host they are forced inline: GCC only vectorises a loop whose calls were all inlined,
// and a CPU kernel's `run` must be inlined into each ISA copy to be compiled for that ISA.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define INCSEG_FORCE_INLINE __forceinline__
#define HOST_DEVICE __host__ __device__ __forceinline__
#define INCSEG_UNROLL _Pragma("unroll")
#else
#if defined(__GNUC__)
#define INCSEG_FORCE_INLINE inline __attribute__((always_inline))
#else
#define INCSEG_FORCE_INLINE inline
#endif
#define HOST_DEVICE INCSEG_FORCE_INLINE
#define INCSEG_UNROLL
#endif
