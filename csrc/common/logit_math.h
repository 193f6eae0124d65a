#pragma once
// Per-pixel arithmetic of the logit losses (MATH.md#logit-losses), shared by the CPU and CUDA kernels.
//
// A kernel reduces each pixel's C logits (and Co teacher logits) to a handful of running
// maxima and exp-sums, turns them into the per-pixel statistics below with `finish_*`, and in
// the backward combines the statistics into per-pixel gradient coefficients (`grad_coefs`) that
// weigh a few per-channel exponentials (`logit_grad`). Everything here works on scalars so that
// the CPU kernels, which loop over a tile of contiguous pixels, auto-vectorise across pixels.
//
// Notation (MATH.md#notation): lse over all C channels, lse_old over [0, Co), lse_bg over {0} U [Co, C),
// q = softmax(alpha * y) over the Co teacher channels, lse_q its log-normaliser.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

// The kernels call these from loops they need vectorised; GCC only vectorises a loop whose calls
// were all inlined, so on the host they are forced inline.
#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define LOGIT_MATH HOST_DEVICE __attribute__((always_inline))
#else
#define LOGIT_MATH HOST_DEVICE
#endif

namespace incseg {
namespace logit {

enum class CeMode : int32_t { kNone = 0, kUnbiased = 1, kPlain = 2 };
enum class KdMode : int32_t { kNone = 0, kPlain = 1, kUnbiased = 2, kBalanced = 3 };
enum class Reduction : int32_t { kNone = 0, kMean = 1, kSum = 2 };

// Rows of the per-pixel statistics tensor (B, kNumStats, H, W) that the forward saves.
constexpr int kStatLse = 0;
constexpr int kStatLseOld = 1;
constexpr int kStatLseBg = 2;
constexpr int kStatLseTeacher = 3;
constexpr int kNumStats = 4;

// log for float32 on positive normal arguments (the kernels take it of exp-sums >= 1). On the
// host: split v = 2^e * m with m in [sqrt(1/2), sqrt(2)) using integer ops only, then
// log(m) = log1p(f) from the odd series in s = f / (2 + f) (the classic fdlibm logf
// coefficients), about 1 ulp, vectorisable. On the device: logf.
LOGIT_MATH float lm_log(float v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return logf(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t kSqrtHalfBits = 0x3f3504f3u;  // sqrt(1/2)
  bits += 0x3f800000u - kSqrtHalfBits;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  bits = (bits & 0x007fffffu) + kSqrtHalfBits;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float odd = z * (0.66666662693f + w * 0.28498786688f);
  const float even = w * (0.40000972152f + w * 0.24279078841f);
  const float half_f2 = 0.5f * f * f;
  const float ef = static_cast<float>(e);
  return ef * 6.9313812256e-01f + (f - half_f2 + (s * (half_f2 + odd + even) + ef * 9.0580006145e-06f));
#endif
}
LOGIT_MATH double lm_log(double v) { return log(v); }
LOGIT_MATH float lm_max(float a, float b) { return a > b ? a : b; }
LOGIT_MATH double lm_max(double a, double b) { return a > b ? a : b; }

// exp for float32. On the host it is a Cody-Waite reduction plus a degree-6 polynomial (about
// 1 ulp) written without floating-point compares: GCC will not if-convert a float compare under
// the default -ftrapping-math, which would stop every loop calling it from vectorising, so the
// clamps act on the bit patterns instead. Arguments below -87.3 (-inf included) give ~1e-38
// instead of 0, below every tolerance a sum of exps can notice; above 88.7 the result is wrong
// but finite (+inf gives NaN): the kernels only take exp of x - max <= 0. On the device: expf.
LOGIT_MATH float lm_exp(float v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(v);
#else
  // Negative floats at or below -87.3 have sign-magnitude bit patterns at or above this one.
  const uint32_t kMinBits = 0xC2AE999Au;  // -87.3f
  uint32_t vb;
  std::memcpy(&vb, &v, sizeof(vb));
  vb = vb > kMinBits ? kMinBits : vb;
  std::memcpy(&v, &vb, sizeof(v));
  // n = round(v * log2(e)) with the 1.5*2^23 shifter, which also leaves n in the low bits of t.
  const float shifter = 12582912.0f;
  const float t = v * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t tb, shifter_bits;
  std::memcpy(&tb, &t, sizeof(tb));
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
  int32_t ni = tb - shifter_bits;
  ni = ni > 127 ? 127 : ni;
  const float r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
  const float r2 = r * r;
  // 1 + r + r^2 P(r) with P of degree 4, fitted for relative error (3e-9, far below an ulp).
  float p = 1.3814617044e-03f;
  p = p * r + 8.3687102206e-03f;
  p = p * r + 4.1668387316e-02f;
  p = p * r + 1.6666520686e-01f;
  p = p * r + 4.9999993452e-01f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}
LOGIT_MATH double lm_exp(double v) { return exp(v); }

// Scale of CE's "mean" from valid_count, the number of non-ignored pixels: 1 / max(valid_count, 1).
// With no valid pixel every CE term is 0, so the loss and its gradient come out 0 without a branch;
// a device kernel reads valid_count where it is (no host sync).
template <typename T>
LOGIT_MATH T ce_mean_scale(int64_t valid_count) {
  return T(1) / static_cast<T>(valid_count > 1 ? valid_count : 1);
}

template <typename T>
LOGIT_MATH T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// The three log-normalisers of the student logits at one pixel, from the maxima and shifted
// exp-sums of the old channels [0, Co) and of the new channels [Co, C) (max_new = -inf and
// sum_new = 0 when C == Co). x0 is the background logit.
template <typename T>
struct StudentStats {
  T lse;
  T lse_old;
  T lse_bg;
};

template <typename T>
LOGIT_MATH StudentStats<T> finish_student(T max_old, T sum_old, T max_new, T sum_new, T x0) {
  // Each union of ranges is re-shifted by its own max; exp(-inf - m) is (about) 0 when C == Co.
  StudentStats<T> s;
  s.lse_old = max_old + lm_log(sum_old);
  const T m = lm_max(max_old, max_new);
  s.lse = m + lm_log(sum_old * lm_exp(max_old - m) + sum_new * lm_exp(max_new - m));
  const T m_bg = lm_max(x0, max_new);
  s.lse_bg = m_bg + lm_log(lm_exp(x0 - m_bg) + sum_new * lm_exp(max_new - m_bg));
  return s;
}

// MATH.md#unce at a non-ignored pixel with label t; x_t is the label's logit.
template <typename T>
LOGIT_MATH T ce_pixel_loss(CeMode mode, int64_t t, int64_t old_classes, const StudentStats<T>& s, T x_t) {
  if (mode == CeMode::kUnbiased && t < old_classes) return s.lse - s.lse_old;
  return s.lse - x_t;
}

// Teacher sums accumulated over the Co teacher channels, with e_c = exp(alpha*y_c - max_y):
//   e0         e_0 (background)
//   sum_rest   sum_{1<=c<Co} e_c
//   weighted   sum_c e_c (x_c - shift), over c in [0, Co) for plain KD and [1, Co) otherwise;
//              the shift (the max of the old student logits) keeps the sum free of cancellation.
template <typename T>
struct TeacherSums {
  T max_y;
  T e0;
  T sum_rest;
  T weighted;
};

template <typename T>
LOGIT_MATH T teacher_lse(const TeacherSums<T>& ts) {
  return ts.max_y + lm_log(ts.e0 + ts.sum_rest);
}

// 0/1 factors that select a distillation mode's terms (so that loops over pixels carry no
// branches), and the weight of the background term (gamma for balanced KD, else 1).
template <typename T>
struct KdFactors {
  T plain;       // 1 for plain KD
  T background;  // 1 for unbiased and balanced KD
  T g;
};

template <typename T>
LOGIT_MATH KdFactors<T> kd_factors(KdMode mode, T gamma) {
  KdFactors<T> f;
  f.plain = mode == KdMode::kPlain ? T(1) : T(0);
  f.background = mode == KdMode::kUnbiased || mode == KdMode::kBalanced ? T(1) : T(0);
  f.g = mode == KdMode::kBalanced ? gamma : T(1);
  return f;
}

// MATH.md#kd to #bkd at one pixel, before the mask: -(1/Co) sum_c q_c log(student prob of c), with
// the mode given by kd_factors:
//   plain:              sum_{c<Co} q_c (x_c - lse_old)
//   unbiased, balanced: g q_0 (lse_bg - lse) + sum_{1<=c<Co} q_c (x_c - lse)
template <typename T>
LOGIT_MATH T kd_pixel_loss(const KdFactors<T>& f, int64_t old_classes, const StudentStats<T>& s,
                           const TeacherSums<T>& ts, T shift) {
  const T inv_sum = T(1) / (ts.e0 + ts.sum_rest);
  const T q0 = ts.e0 * inv_sum;
  const T q_rest = ts.sum_rest * inv_sum;
  const T mean_x = ts.weighted * inv_sum;  // sum_c q_c (x_c - shift) over the mode's channels
  const T inner = mean_x - f.plain * (s.lse_old - shift) +
                  f.background * (f.g * q0 * (s.lse_bg - s.lse) - q_rest * (s.lse - shift));
  return -inner / static_cast<T>(old_classes);
}

// Gradient of (g_ce * CE + g_kd * KD) at one pixel with respect to its logits x_c, as
//   dL/dx_c = full * p_c + old_set * [c<Co] exp(x_c - lse_old) + bg_set * [c in bgset] exp(x_c - lse_bg)
//           + teacher * [c in T] q_c + teacher0 * [c==0] q_0 + target * [c==t]
// with p = softmax(x) and T = [1, Co) (teacher0 then covers c = 0 for plain KD). Derivation:
//   CE unbiased, t<Co:  l = lse - lse_old   -> p_c - [c<Co] exp(x_c - lse_old)
//   CE, t>=Co or plain: l = lse - x_t       -> p_c - [c==t]
//   KD plain:           l = -(1/Co) sum_{c<Co} q_c (x_c - lse_old)
//                         -> (1/Co) ([c<Co] exp(x_c - lse_old) - q_c)          (sum q = 1)
//   KD unbiased/balanced (weight w = gamma for balanced, 1 for unbiased):
//                       l = -(1/Co) [w q_0 (lse_bg - lse) + sum_{1<=c<Co} q_c (x_c - lse)]
//                         -> (1/Co) [(w q_0 + 1 - q_0) p_c - w q_0 [c in bgset] exp(x_c - lse_bg)
//                                    - [1<=c<Co] q_c]
// g_ce already carries the reduction's scale and is 0 at ignored pixels (and when ce == none);
// g_kd carries the reduction's scale and the mask (and is 0 when kd == none).
template <typename T>
struct GradCoefs {
  T full;
  T old_set;
  T bg_set;
  T teacher;
  T teacher0;
  T target;
};

// old_label is 1 where unbiased CE sees a background/old label (t < Co), else 0. Written with
// factors instead of per-pixel branches so that a loop over pixels vectorises.
template <typename T>
LOGIT_MATH GradCoefs<T> grad_coefs(const KdFactors<T>& f, int64_t old_classes, T old_label, T g_ce, T g_kd, T q0) {
  // A multiply by 1/Co, not a division per pixel: an exact division is a slow-path call on the GPU.
  const T w = g_kd * (T(1) / static_cast<T>(old_classes));
  GradCoefs<T> k;
  k.full = g_ce + f.background * w * (f.g * q0 + T(1) - q0);
  k.old_set = f.plain * w - g_ce * old_label;
  k.bg_set = -f.background * w * f.g * q0;
  k.teacher = -w;
  k.teacher0 = -f.plain * w;
  k.target = -g_ce * (T(1) - old_label);
  return k;
}

// One channel's gradient from the coefficients and the channel's exponentials, without the
// target term (the caller adds k.target at c == t); terms whose set does not contain the channel
// are passed as 0 by the caller.
template <typename T>
LOGIT_MATH T logit_grad(const GradCoefs<T>& k, T p_full, T p_old, T p_bg, T q) {
  return k.full * p_full + k.old_set * p_old + k.bg_set * p_bg + k.teacher * q;
}

}  // namespace logit
}  // namespace incseg
