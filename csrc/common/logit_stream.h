#pragma once
// One-pass (streaming) per-pixel accumulators of the logit losses, for kernels that read each
// logit once in channel order (the CUDA kernels). They end with exactly what the CPU kernels'
// two passes (maxima first, then shifted sums) hand to logit_math.h's finish_student,
// teacher_lse and kd_pixel_loss: a set's maximum and its sum of exp(v - maximum), and the teacher
// sums relative to the teacher's maximum and to the maximum of the old student logits.
#include "common/logit_math.h"

namespace incseg {
namespace logit {

// One step of a streaming log-sum-exp over v: the new maximum, the factor exp(old max - new max)
// that rescales the terms so far, and v's own term exp(v - new max). One exponential either way,
// exp(-|v - max|); v == max (-inf == -inf included) gives the term 1 without computing inf - inf.
// A NaN v becomes the maximum, so that the sum turns NaN and the maximum tells that the set is not
// empty (logit_math.h's finish_student takes a set whose maximum is -inf as empty).
template <typename T>
HOST_DEVICE void lse_step(T v, T& max, T& rescale, T& term) {
  const bool up = v > max || v != v;
  const T e = v == max ? T(1) : lm_exp(up ? max - v : v - max);
  rescale = up ? e : T(1);
  term = up ? T(1) : e;
  max = up ? v : max;
}

template <typename T>
struct StreamingLse {
  T max;
  T sum;  // sum of exp(v - max) over the values seen

  HOST_DEVICE void start(T v) {
    max = v;
    sum = T(1);
  }
  HOST_DEVICE void add(T v) {
    T rescale, term;
    lse_step(v, max, rescale, term);
    sum = sum * rescale + term;
  }
};

// The old channels [0, Co) of one pixel: the student's log-sum-exp over them and, for the
// distillation, the teacher sums of logit_math.h's TeacherSums (e_c = exp(z_c - max_z) with
// z = alpha * y), with `weighted` = sum over the distilled channels of e_c (x_c - max_old) kept
// relative to the running student maximum max_old: when max_old grows by d, every (x_c - max_old)
// shrinks by d, so weighted loses d times the teacher mass of those channels. The distilled
// channels are [1, Co), and channel 0 too for plain KD (`plain` = 1).
template <typename T>
struct StreamingOldChannels {
  StreamingLse<T> student;
  TeacherSums<T> teacher;

  HOST_DEVICE void start(T x0, T z0) {
    student.start(x0);
    teacher = TeacherSums<T>{z0, T(1), T(0), T(0), z0};  // x_0 - max_old = 0
  }
  // Channel c >= 1: student logit x and scaled teacher logit z.
  HOST_DEVICE void add(T x, T z, T plain) {
    T rescale, term;
    lse_step(z, teacher.max_y, rescale, term);
    teacher.e0 *= rescale;
    teacher.sum_rest *= rescale;
    teacher.weighted *= rescale;
    const T previous_max = student.max;
    student.add(x);
    const T mass = plain * teacher.e0 + teacher.sum_rest;
    // No mass yet: nothing to shift (and no inf * 0 when the first old logits are -inf).
    teacher.weighted -= mass == T(0) ? T(0) : (student.max - previous_max) * mass;
    teacher.weighted += term * (x - student.max);
    teacher.sum_rest += term;
  }
};

}  // namespace logit
}  // namespace incseg
