#pragma once
// The teacher's dtype rule (docs/MATH.md#teacher-dtype), shared by the torch glue of every device: the
// frozen teacher's tensors (y of the logit losses, g and b of attentive distillation) have the
// student's dtype, or the one wider dtype a mixed-precision loop gives them: float32 for a float16 or
// bfloat16 student (a teacher run outside autocast), float64 for a float32 student. Kernels read the
// teacher in its own dtype (no cast copy) and accumulate in the student's accumulation type.
#include <ATen/ATen.h>

#include <type_traits>

namespace incseg {

// The wider element type a teacher of a scalar_t student may have; void where there is none.
template <typename scalar_t>
struct WiderTeacher {
  using type = void;
};
template <>
struct WiderTeacher<at::Half> {
  using type = float;
};
template <>
struct WiderTeacher<at::BFloat16> {
  using type = float;
};
template <>
struct WiderTeacher<float> {
  using type = double;
};

// The wider teacher dtype of a student dtype, or Undefined.
inline at::ScalarType wider_teacher_dtype(at::ScalarType student) {
  switch (student) {
    case at::kHalf:
    case at::kBFloat16:
      return at::kFloat;
    case at::kFloat:
      return at::kDouble;
    default:
      return at::ScalarType::Undefined;
  }
}

// TypeError naming both arguments unless `teacher` may go with `student` (same dtype or the wider one).
inline void check_teacher_dtype(at::ScalarType student, at::ScalarType teacher, const char* student_name,
                                const char* teacher_name) {
  TORCH_CHECK_TYPE(teacher == student || teacher == wider_teacher_dtype(student), teacher_name, " has dtype ", teacher,
                   " but ", student_name, " has ", student, "; the teacher must have the student's dtype or, in mixed ",
                   "precision, float32 for a float16/bfloat16 student or float64 for a float32 one");
}

// fn(scalar_t*, teacher_t*) (two null pointers: the element types) for a scalar_t student and a teacher
// of dtype `teacher`, scalar_t's own or its wider one.
template <typename scalar_t, typename Fn>
void dispatch_teacher(at::ScalarType teacher, const char* name, Fn& fn) {
  using wider_t = typename WiderTeacher<scalar_t>::type;
  if constexpr (!std::is_void_v<wider_t>) {
    if (teacher == c10::CppTypeToScalarType<wider_t>::value) {
      return fn(static_cast<scalar_t*>(nullptr), static_cast<wider_t*>(nullptr));
    }
  }
  TORCH_CHECK_TYPE(teacher == c10::CppTypeToScalarType<scalar_t>::value, name, ": a teacher of dtype ", teacher,
                   " does not go with a ", c10::CppTypeToScalarType<scalar_t>::value, " student");
  fn(static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr));
}

// fn(scalar_t*, teacher_t*) for every pair of dtypes check_teacher_dtype allows.
template <typename Fn>
void dispatch_student_teacher(at::ScalarType student, at::ScalarType teacher, const char* name, Fn&& fn) {
  switch (student) {
    case at::kDouble:
      return dispatch_teacher<double>(teacher, name, fn);
    case at::kFloat:
      return dispatch_teacher<float>(teacher, name, fn);
    case at::kHalf:
      return dispatch_teacher<at::Half>(teacher, name, fn);
    case at::kBFloat16:
      return dispatch_teacher<at::BFloat16>(teacher, name, fn);
    default:
      TORCH_CHECK_TYPE(false, name, ": the student must be float16, bfloat16, float32 or float64, got ", student);
  }
}

}  // namespace incseg
