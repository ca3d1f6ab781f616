// The interface between the loss ops (kd_loss.cpp) and their row kernels.
//
// The row kernels are compiled once per CPU capability (DEFAULT, AVX2, AVX512, as ATen does
// it), each copy in its own namespace; this header only uses plain types so that it means the
// same thing in every copy. The ops pick one table at run time (see kd_loss.cpp).
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define KDOPS_X86_CAPABILITIES 1
#endif

namespace kdops::cpu {

enum class Dtype : int8_t { Float, Double, BFloat16, Half };
enum class Divergence : int8_t { ForwardKL, ReverseKL, JSD };

// One op call: row-major contiguous [n, v] logits in their own dtypes, everything per row
// ([n] temperatures, [6, n] statistics, [n] row outputs) in the compute dtype (Float or
// Double). Pointers of outputs that were not asked for are null.
struct Problem {
  int64_t n = 0, v = 0;
  const void* student = nullptr;
  const void* teacher = nullptr;
  Dtype student_dtype = Dtype::Float, teacher_dtype = Dtype::Float, compute = Dtype::Float;
  const void* tau_s = nullptr;
  const void* tau_t = nullptr;
  const int64_t* labels = nullptr;  // [n] or null
  int64_t ignore_index = -100;
  Divergence divergence = Divergence::ForwardKL;
  double beta = 0.5;
  bool with_ce = false;
  void* stats = nullptr;  // written by forward, read by the backward ops
};

struct ForwardOut {
  void* div;
  void* ce;
};

// Cotangents of (div, ce) and the gradients to (student, teacher, tau_s, tau_t).
struct BackwardIo {
  const void* grad_div;
  const void* grad_ce;
  void* grad_student;  // student dtype
  void* grad_teacher;  // teacher dtype
  void* grad_tau_s;
  void* grad_tau_t;
};

// Cotangents of the four gradients (null = zero) and the six results of the second-order op.
struct DoubleBackwardIo {
  const void* v_student;  // student dtype
  const void* v_teacher;  // teacher dtype
  const void* v_tau_s;
  const void* v_tau_t;
  const void* grad_div;
  const void* grad_ce;
  void* d_grad_div;
  void* d_grad_ce;
  void* d_student;
  void* d_teacher;
  void* d_tau_s;
  void* d_tau_t;
};

// Each entry processes rows [begin, end); rows are independent, so results do not depend on
// how the caller splits them between threads.
struct KernelTable {
  const char* capability;
  void (*forward)(const Problem&, const ForwardOut&, int64_t begin, int64_t end);
  void (*backward)(const Problem&, const BackwardIo&, int64_t begin, int64_t end);
  void (*double_backward)(const Problem&, const DoubleBackwardIo&, int64_t begin, int64_t end);
};

namespace DEFAULT { extern const KernelTable kernels; }
#ifdef KDOPS_X86_CAPABILITIES
namespace AVX2 { extern const KernelTable kernels; }
namespace AVX512 { extern const KernelTable kernels; }
#endif

}  // namespace kdops::cpu
