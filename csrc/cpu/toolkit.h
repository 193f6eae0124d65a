#pragma once
// What every CPU kernel file shares: ISA dispatch of hot loops, the accumulation type, float16
// loads and stores that vectorise, and the tiling of images into work items with a deterministic
// parallel loop over them. CPU only (OpenMP-backed at::parallel_for); device glue must not include it.
//
// ISA dispatch. A hot loop is a struct with a static INCSEG_FORCE_INLINE `run`; run_best<Kernel>(...)
// calls it through one of three copies compiled with GCC target attributes (baseline x86-64,
// AVX2+FMA+F16C, AVX-512), picking the widest the CPU supports (and the kernel allows, widest_isa),
// so no -march flag is needed and one binary runs everywhere. Non-x86 or non-GCC builds get the baseline copy only. The
// environment variable INCSEG_CPU_ISA=baseline|avx2|avx512 (read once per process) caps the choice, so tests can check
// every copy on one machine.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>

#include "common/dtype.h"
#include "common/macros.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define INCSEG_CPU_X86_COPIES 1
#define INCSEG_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INCSEG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define INCSEG_CPU_X86_COPIES 0
#endif

namespace incseg {
namespace cpu {

// ------------------------------------------------------------------------------------------------
// ISA dispatch
// ------------------------------------------------------------------------------------------------

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa widest_supported_isa() {
  Isa best = Isa::kBaseline;
#if INCSEG_CPU_X86_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = Isa::kAvx2;
  }
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = Isa::kAvx512;
  }
#endif
  return best;
}

inline Isa isa_from_name(std::string_view name, std::string_view what) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "baseline") return Isa::kBaseline;
  TORCH_CHECK_VALUE(false, what, " must be 'baseline', 'avx2' or 'avx512', got '", name, "'");
}

// INCSEG_CPU_ISA as an upper bound; unset or empty means no cap.
inline Isa isa_cap_from_environment() {
  const char* value = std::getenv("INCSEG_CPU_ISA");
  const std::string_view cap = value != nullptr ? value : "";
  if (cap.empty()) return Isa::kAvx512;
  return isa_from_name(cap, "INCSEG_CPU_ISA");
}

// The copy run_best picks: the widest the CPU supports under the cap, which starts as INCSEG_CPU_ISA
// (read once per process) and which set_isa_cap changes, so that a benchmark can run every copy in
// one process, side by side. An inline function's static is one object across translation units.
inline std::atomic<int>& isa_in_use() {
  static std::atomic<int> isa{static_cast<int>(std::min(widest_supported_isa(), isa_cap_from_environment()))};
  return isa;
}

inline Isa active_isa() { return static_cast<Isa>(isa_in_use().load(std::memory_order_relaxed)); }

inline void set_isa_cap(Isa cap) {
  isa_in_use().store(static_cast<int>(std::min(widest_supported_isa(), cap)), std::memory_order_relaxed);
}

// The widest copy of Kernel that run_best compiles and runs: Kernel::kWidestIsa where a kernel
// declares one, else AVX-512. Pure streams of float32/float64 (a load or two and a store per
// element) measured 5-15% slower in their 512-bit copy on a Xeon with AVX-512, so they declare AVX2.
template <typename Kernel>
constexpr Isa widest_isa() {
  if constexpr (requires { Kernel::kWidestIsa; }) {
    return Kernel::kWidestIsa;
  } else {
    return Isa::kAvx512;
  }
}

template <typename Kernel, typename... Args>
void run_baseline(Args&&... args) {
  Kernel::run(std::forward<Args>(args)...);
}
#if INCSEG_CPU_X86_COPIES
template <typename Kernel, typename... Args>
INCSEG_TARGET_AVX2 void run_avx2(Args&&... args) {
  Kernel::run(std::forward<Args>(args)...);
}
template <typename Kernel, typename... Args>
INCSEG_TARGET_AVX512 void run_avx512(Args&&... args) {
  Kernel::run(std::forward<Args>(args)...);
}
#endif

// Kernel::run(args...) compiled for the active ISA. Call it once per work item or chunk of items,
// not per pixel: the switch is cheap, but it is a call the vectoriser cannot see through.
template <typename Kernel, typename... Args>
void run_best(Args&&... args) {
#if INCSEG_CPU_X86_COPIES
  constexpr Isa kWidest = widest_isa<Kernel>();
  const Isa isa = std::min(active_isa(), kWidest);
  if constexpr (kWidest == Isa::kAvx512) {
    if (isa == Isa::kAvx512) return run_avx512<Kernel>(std::forward<Args>(args)...);
  }
  if constexpr (kWidest >= Isa::kAvx2) {
    if (isa == Isa::kAvx2) return run_avx2<Kernel>(std::forward<Args>(args)...);
  }
#endif
  run_baseline<Kernel>(std::forward<Args>(args)...);
}

// ------------------------------------------------------------------------------------------------
// Accumulation type and element loads/stores
// ------------------------------------------------------------------------------------------------

// float for float16, bfloat16 and float32; double for float64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// p[i] as acc_t; every kernel loads stored elements through this.
template <typename acc_t, typename scalar_t>
INCSEG_FORCE_INLINE acc_t load(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<acc_t>(half_to_float(p[i].x));
  } else {
    return static_cast<acc_t>(p[i]);
  }
}

// v rounded to the storage type; every kernel stores elements through this.
template <typename scalar_t, typename acc_t>
INCSEG_FORCE_INLINE scalar_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(float_to_half(static_cast<float>(v)), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Tiles and the parallel loop
// ------------------------------------------------------------------------------------------------

// Kernels put the channel loop outside a loop over a tile of contiguous pixels of one image: the
// pixel loop vectorises and the tile's per-pixel accumulators stay in L1. How a kernel family
// cuts images into tiles:
struct TilePolicy {
  int64_t max_pixels;  // per tile
  int64_t min_pixels;  // when there are fewer tiles than threads, images are cut down to this size
  int64_t align;       // tile sizes are multiples of this
};

// Work items: (image, tile), image-major. The last tile of an image may be shorter.
struct TilePlan {
  int64_t pixels = 0;  // per image
  int64_t tile = 0;    // pixels per tile
  int64_t tiles_per_image = 0;
  int64_t items = 0;
  int64_t image(int64_t item) const { return item / tiles_per_image; }
  int64_t begin(int64_t item) const { return (item % tiles_per_image) * tile; }
  int64_t length(int64_t item) const { return std::min(tile, pixels - begin(item)); }
};

// Tiles as even as `align` allows, at most policy.max_pixels each. Cutting finer for idle threads
// makes tile boundaries, and so the grouping of per-tile partial sums, depend on the thread count;
// min_pixels == max_pixels (with align == max_pixels: fixed tiles) keeps results independent of it.
inline TilePlan plan_tiles(int64_t batch, int64_t pixels, const TilePolicy& policy) {
  TilePlan plan;
  plan.pixels = pixels;
  if (batch == 0 || pixels == 0) return plan;  // no work items
  int64_t per_image = (pixels + policy.max_pixels - 1) / policy.max_pixels;
  const int64_t threads = at::get_num_threads();
  while (batch * per_image < threads && pixels / (2 * per_image) >= policy.min_pixels) per_image *= 2;
  const int64_t even = (pixels + per_image - 1) / per_image;
  plan.tile = std::min(policy.max_pixels, (even + policy.align - 1) / policy.align * policy.align);
  plan.tiles_per_image = (pixels + plan.tile - 1) / plan.tile;
  plan.items = batch * plan.tiles_per_image;
  return plan;
}

// Runs fn(begin, end) over consecutive ranges covering [0, items) on the intra-op threads, which
// take ranges from a shared counter instead of one fixed share each: on cores shared with other
// jobs a descheduled thread then delays the op by one range, not by half of it. A range holds
// items worth at least ~64k element visits (`cost` per item), so small inputs stay on one thread.
// fn must write only per-item outputs (partial sums added in item order afterwards): then results
// do not depend on the schedule or the thread count.
template <typename F>
void parallel_over_items(int64_t items, int64_t cost, const F& fn) {
  constexpr int64_t kMinCostPerRange = 65536;
  const int64_t range = std::max<int64_t>(1, kMinCostPerRange / std::max<int64_t>(cost, 1));
  const int64_t ranges = (items + range - 1) / range;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ranges);
  if (workers <= 1) {
    if (items > 0) fn(int64_t(0), items);
    return;
  }
  std::atomic<int64_t> next_range{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next_range.fetch_add(1); i < ranges; i = next_range.fetch_add(1)) {
      fn(i * range, std::min(items, (i + 1) * range));
    }
  });
}

}  // namespace cpu
}  // namespace incseg
