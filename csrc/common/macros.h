#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) translation units: per-pixel math is written once
// as HOST_DEVICE inline functions so the CPU tests exercise the arithmetic the GPU runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#define INCSEG_UNROLL _Pragma("unroll")
#else
#define HOST_DEVICE inline
#define INCSEG_UNROLL
#endif
