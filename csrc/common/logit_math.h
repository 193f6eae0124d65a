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

#include "common/dtype.h"
#include "common/macros.h"

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

// Bit-level selects for the host polynomials below: GCC will not if-convert a float compare under
// the default -ftrapping-math, which would stop the loops calling them from vectorising.
// `v` itself where it is NaN or +-inf (every exponent bit set), else `result`.
HOST_DEVICE float pass_non_finite(float v, float result) {
  const uint32_t keep_v = 0u - static_cast<uint32_t>((bits_of(v) & 0x7f800000u) == 0x7f800000u);
  return float_of((bits_of(v) & keep_v) | (bits_of(result) & ~keep_v));
}

// max that keeps a NaN of either operand (a plain a > b ? a : b drops a NaN `a`, so a running
// maximum would forget a NaN logit and an empty-looking set could hide it). The float version keeps
// `a` by a select on the bits: written as `a > b || isnan(a) ? a : b` (the NaN test on the bits too),
// GCC 12 at -O3 compiled the CPU kernel's maximum pass into one that dropped the NaN.
HOST_DEVICE float lm_max(float a, float b) {
  const float larger = a > b ? a : b;
  const uint32_t keep_a = 0u - static_cast<uint32_t>((bits_of(a) & 0x7fffffffu) > 0x7f800000u);
  return float_of((bits_of(a) & keep_a) | (bits_of(larger) & ~keep_a));
}
HOST_DEVICE double lm_max(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  // The device takes maxima only of statistics whose sums already carry any NaN (logit_stream.h's
  // lse_step keeps it); the second compare cost LogitForwardKernel<double, 1> a spill on sm_90.
  return a > b ? a : b;
#else
  return a > b || a != a ? a : b;
#endif
}

// log for float32 on positive normal arguments (the kernels take it of exp-sums >= 1). On the
// host: split v = 2^e * m with m in [sqrt(1/2), sqrt(2)) using integer ops only, then
// log(m) = log1p(f) from the odd series in s = f / (2 + f) (the classic fdlibm logf
// coefficients), about 1 ulp, vectorisable. NaN and +inf come back unchanged, as from logf: an
// exp-sum is NaN exactly when a logit that decides it is NaN or +inf (RELIABILITY.md#numerics). On the
// device: logf.
HOST_DEVICE float lm_log(float v) {
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
  const float log_v = ef * 6.9313812256e-01f + (f - half_f2 + (s * (half_f2 + odd + even) + ef * 9.0580006145e-06f));
  return pass_non_finite(v, log_v);
#endif
}
HOST_DEVICE double lm_log(double v) { return log(v); }

// exp for float32. On the host it is a Cody-Waite reduction plus a degree-6 polynomial (about
// 1 ulp) written without floating-point compares: GCC will not if-convert a float compare under
// the default -ftrapping-math, which would stop every loop calling it from vectorising, so the
// clamps act on the bit patterns instead. Arguments below -87.3 (-inf included) give ~1e-38
// instead of 0, below every tolerance a sum of exps can notice; above 88.7 the result is wrong
// but finite (+inf gives NaN): the kernels only take exp of x - max <= 0. NaN of either sign gives
// NaN (x86's default NaN, from inf - inf, has the sign bit set: the clamp must not catch it), so a
// NaN or +inf logit reaches the loss (RELIABILITY.md#numerics). On the device: expf.
HOST_DEVICE float lm_exp(float v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(v);
#else
  // Negative floats below -87.3 have sign-magnitude bit patterns in (kMinBits, kMinusInfBits]; the
  // patterns above -inf's are NaNs, which pass. One unsigned compare tests the range, and the clamp
  // is a select on the bits: written as `cond ? kMinBits : vb`, GCC 12 left the AVX2 copies of every
  // loop calling lm_exp scalar ("control flow in loop") while it vectorised the AVX-512 ones.
  const uint32_t kMinBits = 0xC2AE999Au;       // -87.3f
  const uint32_t kMinusInfBits = 0xFF800000u;  // -inf
  const uint32_t vb = bits_of(v);
  const uint32_t below = 0u - static_cast<uint32_t>(vb - (kMinBits + 1u) < kMinusInfBits - kMinBits);
  v = float_of((below & kMinBits) | (~below & vb));
  // n = round(v * log2(e)) with the 1.5*2^23 shifter, which also leaves n in the low bits of t.
  const float shifter = 12582912.0f;
  const float t = v * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t ni = static_cast<int32_t>(bits_of(t) - bits_of(shifter));
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
  return p * float_of(static_cast<uint32_t>(ni + 127) << 23);
#endif
}
HOST_DEVICE double lm_exp(double v) { return exp(v); }

// Scale of CE's "mean" from valid_count, the number of non-ignored pixels: 1 / max(valid_count, 1).
// With no valid pixel every CE term is 0, so the loss and its gradient come out 0 without a branch;
// a device kernel reads valid_count where it is (no host sync).
template <typename T>
HOST_DEVICE T ce_mean_scale(int64_t valid_count) {
  return T(1) / static_cast<T>(valid_count > 1 ? valid_count : 1);
}

template <typename T>
HOST_DEVICE T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// `sum` where `max` is not -inf, else 0 (a select on the bits: see pass_non_finite).
HOST_DEVICE float zero_where_minus_inf(float max, float sum) {
  const uint32_t keep = 0u - static_cast<uint32_t>(bits_of(max) != 0xff800000u);
  return float_of(bits_of(sum) & keep);
}
HOST_DEVICE double zero_where_minus_inf(double max, double sum) { return max == neg_inf<double>() ? 0.0 : sum; }

// 0 for a finite m, NaN for m = +-inf or NaN: added to a statistic shifted by m so that an infinite
// logit (which the shifted sums would turn into a finite or infinite value) gives NaN.
template <typename T>
HOST_DEVICE T nan_if_infinite(T m) {
  return m - m;
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

// Where every new channel is -inf (masked classes, or C == Co) the new set is empty: max_new is -inf
// and sum_new is whatever a kernel summed there (a two-pass kernel's exp(-inf - (-inf)) is NaN), so
// it is taken as 0. An infinite maximum (a +inf logit) makes the statistics NaN, as the float64
// reference's are: the shifted exps below would otherwise hide it (RELIABILITY.md#numerics).
template <typename T>
HOST_DEVICE StudentStats<T> finish_student(T max_old, T sum_old, T max_new, T sum_new, T x0) {
  // Each union of ranges is re-shifted by its own max; exp(-inf - m) is (about) 0 when C == Co.
  sum_new = zero_where_minus_inf(max_new, sum_new);
  StudentStats<T> s;
  s.lse_old = max_old + lm_log(sum_old) + nan_if_infinite(max_old);
  const T m = lm_max(max_old, max_new);
  s.lse = m + lm_log(sum_old * lm_exp(max_old - m) + sum_new * lm_exp(max_new - m)) + nan_if_infinite(m);
  const T m_bg = lm_max(x0, max_new);
  s.lse_bg = m_bg + lm_log(lm_exp(x0 - m_bg) + sum_new * lm_exp(max_new - m_bg)) + nan_if_infinite(m_bg);
  return s;
}

// MATH.md#unce at a non-ignored pixel with label t; x_t is the label's logit.
template <typename T>
HOST_DEVICE T ce_pixel_loss(CeMode mode, int64_t t, int64_t old_classes, const StudentStats<T>& s, T x_t) {
  if (mode == CeMode::kUnbiased && t < old_classes) return s.lse - s.lse_old;
  return s.lse - x_t;
}

// z = alpha * y of one teacher logit, rounded to T before any use. The forward's maximum of z holds
// the rounded product, so every exponent must take the same one: a product contracted into the
// subtraction that follows (an FMA: nvcc forms them by default, GCC in its AVX2/AVX-512 copies) is
// exact in one place and rounded in another, and a one-hot teacher's q = exp(z - lse_q) comes out
// exp(the rounding error of z) instead of 1, an error of up to half an ulp of |alpha y| (5e-4 at
// 1e4). On the device the product is __fmul_rn / __dmul_rn, which nvcc never contracts. On the host
// it is the plain product: host code calling this must be compiled without contraction
// (-ffp-contract=off), as the CUDA emulator's baseline x86-64 build is (RELIABILITY.md#numerics).
HOST_DEVICE float scaled_teacher_logit(float alpha, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(alpha, y);
#else
  return alpha * y;
#endif
}
HOST_DEVICE double scaled_teacher_logit(double alpha, double y) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(alpha, y);
#else
  return alpha * y;
#endif
}

// Teacher sums accumulated over the Co teacher channels, with e_c = exp(alpha*y_c - max_y):
//   e0         e_0 (background)
//   sum_rest   sum_{1<=c<Co} e_c
//   weighted   sum_c e_c (x_c - shift), over c in [0, Co) for plain KD and [1, Co) otherwise;
//              the shift (the max of the old student logits) keeps the sum free of cancellation.
//   z0         alpha*y_0 itself: log q_0 = z0 - lse_q, finite where e0 (and q_0) underflow
template <typename T>
struct TeacherSums {
  T max_y;
  T e0;
  T sum_rest;
  T weighted;
  T z0;
};

// NaN when the teacher's maximum is infinite: q = softmax(alpha y) is undefined there (the float64
// reference's is NaN), while the shifted sums would give a one-hot q (RELIABILITY.md#numerics).
template <typename T>
HOST_DEVICE T teacher_lse(const TeacherSums<T>& ts) {
  return ts.max_y + lm_log(ts.e0 + ts.sum_rest) + nan_if_infinite(ts.max_y);
}

// 0/1 factors that select a distillation mode's terms (so that loops over pixels carry no
// branches), and the log of the background term's weight (log gamma for balanced KD, else 0).
template <typename T>
struct KdFactors {
  T plain;       // 1 for plain KD
  T background;  // 1 for unbiased and balanced KD
  T log_g;
};

template <typename T>
HOST_DEVICE KdFactors<T> kd_factors(KdMode mode, T log_gamma) {
  KdFactors<T> f;
  f.plain = mode == KdMode::kPlain ? T(1) : T(0);
  f.background = mode == KdMode::kUnbiased || mode == KdMode::kBalanced ? T(1) : T(0);
  f.log_g = mode == KdMode::kBalanced ? log_gamma : T(0);
  return f;
}

// The background term's weight times q_0, gamma q_0, from log q_0 = alpha y_0 - lse_q
// (MATH.md#bkd-gamma): a gamma of e^88 or more (carried as its log, which does not overflow) meets
// a q_0 of e^-88 or less (subnormal or 0 as a float), and only their product, often ~1, is formed.
template <typename T>
HOST_DEVICE T weighted_q0(const KdFactors<T>& f, T log_q0) {
  return lm_exp(f.log_g + log_q0);
}

// The teacher's share of kd_pixel_loss at one pixel, which needs no student statistic:
//   q_rest   sum_{1<=c<Co} q_c
//   mean_x   sum_c q_c (x_c - shift) over the mode's channels
//   g_q0     weighted_q0: gamma q_0 (q_0 for unbiased KD)
// A kernel forms it before finish_student, so that the five teacher sums are not live across the
// student's exps and logs (which cost LogitForwardKernel<double, 1> a spill on sm_90: docs/KERNELS.md).
template <typename T>
struct TeacherTerms {
  T q_rest;
  T mean_x;
  T g_q0;
};

template <typename T>
HOST_DEVICE TeacherTerms<T> teacher_terms(const KdFactors<T>& f, const TeacherSums<T>& ts) {
  // NaN for an infinite teacher maximum (see teacher_lse), folded in before the division: added after
  // it, it kept a register live across the double division's slow path (a spill on sm_90).
  const T inv_sum = T(1) / (ts.e0 + ts.sum_rest + nan_if_infinite(ts.max_y));
  return TeacherTerms<T>{ts.sum_rest * inv_sum, ts.weighted * inv_sum,
                         weighted_q0(f, (ts.z0 - ts.max_y) - lm_log(ts.e0 + ts.sum_rest))};
}

// MATH.md#kd to #bkd at one pixel, before the mask: -(1/Co) sum_c q_c log(student prob of c), with
// the mode given by kd_factors and the teacher's share t = teacher_terms(f, ts):
//   plain:              sum_{c<Co} q_c (x_c - lse_old)
//   unbiased, balanced: g q_0 (lse_bg - lse) + sum_{1<=c<Co} q_c (x_c - lse)
template <typename T>
HOST_DEVICE T kd_pixel_loss(const KdFactors<T>& f, int64_t old_classes, const StudentStats<T>& s,
                            const TeacherTerms<T>& t, T shift) {
  const T inner = t.mean_x - f.plain * (s.lse_old - shift) +
                  f.background * (t.g_q0 * (s.lse_bg - s.lse) - t.q_rest * (s.lse - shift));
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

// old_label is 1 where unbiased CE sees a background/old label (t < Co), else 0; g_q0 is
// weighted_q0 (gamma q_0, q_0 for unbiased KD). Written with factors instead of per-pixel branches
// so that a loop over pixels vectorises.
template <typename T>
HOST_DEVICE GradCoefs<T> grad_coefs(const KdFactors<T>& f, int64_t old_classes, T old_label, T g_ce, T g_kd, T q0,
                                    T g_q0) {
  // A multiply by 1/Co, not a division per pixel: an exact division is a slow-path call on the GPU.
  const T w = g_kd * (T(1) / static_cast<T>(old_classes));
  GradCoefs<T> k;
  k.full = g_ce + f.background * w * (g_q0 + T(1) - q0);
  k.old_set = f.plain * w - g_ce * old_label;
  k.bg_set = -f.background * w * g_q0;
  k.teacher = -w;
  k.teacher0 = -f.plain * w;
  k.target = -g_ce * (T(1) - old_label);
  return k;
}

// One channel's gradient from the coefficients and the channel's exponentials, without the
// target term (the caller adds k.target at c == t); terms whose set does not contain the channel
// are passed as 0 by the caller.
template <typename T>
HOST_DEVICE T logit_grad(const GradCoefs<T>& k, T p_full, T p_old, T p_bg, T q) {
  return k.full * p_full + k.old_set * p_old + k.bg_set * p_bg + k.teacher * q;
}

}  // namespace logit
}  // namespace incseg
