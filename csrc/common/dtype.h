#pragma once
// Element types for code that compiles without torch (CUDA kernels and their CPU emulation):
// 16-bit float storage types laid out like at::Half / __half and at::BFloat16 / __nv_bfloat16,
// the accumulation type of each element type, and loads/stores through it. Torch glue passes its
// tensors' data as these types (same size and bits). On the device the conversions are the CUDA
// intrinsics; on the host, integer arithmetic with the same rounding (to nearest even).
#include <cstdint>
#include <cstring>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace incseg {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// float for the 16-bit types and float32, double for float64.
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using accumulate_t = typename Accumulate<T>::type;

HOST_DEVICE uint32_t bits_of(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

HOST_DEVICE float float_of(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
#endif
}

HOST_DEVICE float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t magnitude = h & 0x7fffu;
  // Rebias the exponent by a multiply (handles subnormals), then force inf/NaN's exponent.
  const float v = float_of(magnitude << 13) * float_of((254u - 15u) << 23);
  const uint32_t b = bits_of(v) | (magnitude >= 0x7c00u ? 0x7f800000u : 0u);
  return float_of(b | (static_cast<uint32_t>(h & 0x8000u) << 16));
#endif
}

HOST_DEVICE uint16_t float_to_half(float v) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(v));
#else
  const uint32_t b = bits_of(v);
  const uint32_t sign = (b & 0x80000000u) >> 16;
  const uint32_t a = b & 0x7fffffffu;  // |v|
  // Subnormal half: adding 0.5 (2^-1) aligns the 10 result bits at the bottom, rounding RNE.
  const float denorm_magic = float_of(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const uint32_t subnormal = bits_of(float_of(a) + denorm_magic) - bits_of(denorm_magic);
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t special = 0x7c00u | (static_cast<uint32_t>(a > 0x7f800000u) << 9);  // inf, or NaN 0x7e00
  // Bit masks, not ?:, pick the result: GCC turns ?: into branches that leave the float add above
  // conditional, will not if-convert it then (-ftrapping-math), and so does not vectorise a CPU loop
  // that stores float16 without AVX-512's masked operations.
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(a < (113u << 23));
  const uint32_t is_special = 0u - static_cast<uint32_t>(a >= ((127u + 16u) << 23));
  const uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  return static_cast<uint16_t>((special & is_special) | (finite & ~is_special) | sign);
#endif
}

HOST_DEVICE float bfloat16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

HOST_DEVICE uint16_t float_to_bfloat16(float v) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  const uint32_t b = bits_of(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
#endif
}

// An element as its accumulation type, and back.
HOST_DEVICE float to_accumulate(float v) { return v; }
HOST_DEVICE double to_accumulate(double v) { return v; }
HOST_DEVICE float to_accumulate(Half v) { return half_to_float(v.bits); }
HOST_DEVICE float to_accumulate(BFloat16 v) { return bfloat16_to_float(v.bits); }

template <typename T>
struct Storage;
template <>
struct Storage<float> {
  HOST_DEVICE static float from(float v) { return v; }
};
template <>
struct Storage<double> {
  HOST_DEVICE static double from(double v) { return v; }
};
template <>
struct Storage<Half> {
  HOST_DEVICE static Half from(float v) { return Half{float_to_half(v)}; }
};
template <>
struct Storage<BFloat16> {
  HOST_DEVICE static BFloat16 from(float v) { return BFloat16{float_to_bfloat16(v)}; }
};

// kVec consecutive elements, aligned so that a load of one pack is one wide access, or 16-byte
// accesses for a larger pack (float32 statistics next to 8 pixels of bfloat16); store_pack stores
// them 16 bytes at a time. Callers guarantee the alignment: 16 bytes, or the pack's size if smaller.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec < 16 ? sizeof(T) * kVec : 16) Pack {
  T value[kVec];
};

template <int kVec, typename T, typename acc_t>
HOST_DEVICE void load_pack(const T* p, acc_t (&out)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(p);
  INCSEG_UNROLL
  for (int i = 0; i < kVec; ++i) out[i] = static_cast<acc_t>(to_accumulate(pack.value[i]));
}

// Stores 16 bytes at p (16-byte aligned, global memory). On the device, one explicit 128-bit store
// (STG.E.128): a plain copy of a Pack is split into element stores, which the compiler joins again
// only where it can prove the address aligned, and inside the kernels' channel loops it cannot (their
// stores were all 32-bit). Plain st.global, not CUDA's __stwb, which compiles to a STRONG.SM store.
HOST_DEVICE void store_16_bytes(void* p, const void* bytes) {
#if defined(__CUDA_ARCH__)
  uint4 v;
  memcpy(&v, bytes, sizeof(v));
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#else
  std::memcpy(p, bytes, 16);
#endif
}

template <int kVec, typename T, typename acc_t>
HOST_DEVICE void store_pack(T* p, const acc_t (&in)[kVec]) {
  Pack<T, kVec> pack;
  INCSEG_UNROLL
  for (int i = 0; i < kVec; ++i) pack.value[i] = Storage<T>::from(in[i]);
  if constexpr (sizeof(pack) % 16 == 0) {
    INCSEG_UNROLL
    for (int k = 0; k < static_cast<int>(sizeof(pack) / 16); ++k) {
      store_16_bytes(reinterpret_cast<char*>(p) + 16 * k, reinterpret_cast<const char*>(&pack) + 16 * k);
    }
  } else {
    *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
  }
}

}  // namespace incseg
