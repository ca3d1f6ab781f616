// The CPU implementations of the kdops loss ops, registered for the CPU dispatch key on the
// schemas that kdops/_loss_ops.py defines (see that file for the ops' contract). Declared here for
// the C++ test; Python reaches them through torch.ops.kdops.*.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace kdops::cpu {

using Tensor = at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// (divergence [n], cross-entropy [n], statistics [6, n]), all in the temperatures' dtype.
std::tuple<Tensor, Tensor, Tensor> kd_forward(
    const Tensor& student, const Tensor& teacher, const Tensor& tau_s, const Tensor& tau_t,
    const OptionalTensor& labels, int64_t ignore_index, c10::string_view divergence, double beta,
    bool with_ce);

// Gradients to (student, teacher, tau_s, tau_t); outputs masked off are empty.
std::tuple<Tensor, Tensor, Tensor, Tensor> kd_backward(
    const Tensor& grad_div, const Tensor& grad_ce, const Tensor& student, const Tensor& teacher,
    const Tensor& tau_s, const Tensor& tau_t, const OptionalTensor& labels, const Tensor& stats,
    int64_t ignore_index, c10::string_view divergence, double beta, bool with_ce,
    std::array<bool, 4> output_mask);

// Vector-Jacobian product of kd_backward: gradients to (grad_div, grad_ce, student, teacher,
// tau_s, tau_t); outputs masked off are empty.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> kd_double_backward(
    const OptionalTensor& v_student, const OptionalTensor& v_teacher,
    const OptionalTensor& v_tau_s, const OptionalTensor& v_tau_t, const Tensor& grad_div,
    const Tensor& grad_ce, const Tensor& student, const Tensor& teacher, const Tensor& tau_s,
    const Tensor& tau_t, const OptionalTensor& labels, const Tensor& stats, int64_t ignore_index,
    c10::string_view divergence, double beta, bool with_ce, std::array<bool, 6> output_mask);

// The CPU capability whose kernels run ("DEFAULT", "AVX2" or "AVX512"), chosen once from
// at::get_cpu_capability(), which honours the ATEN_CPU_CAPABILITY environment variable.
const char* capability();

}  // namespace kdops::cpu
