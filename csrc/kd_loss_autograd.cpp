// Autograd of the loss ops, in C++, for every device: the derivative of kd_forward is
// kd_backward, the derivative of kd_backward is kd_double_backward, and a third derivative
// raises. These are the formulas of kdops/_loss_ops.py (the Python twin, which serves installs
// without this extension) without Python on the way: at 256x100 that Python layer cost more
// than the kernels themselves.
//
// Each backward asks for the gradients the running pass will use and no others
// (AutogradContext::needs_input_grad is the engine's per-task answer: autograd.grad(loss,
// student) does not compute the teacher's gradient).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace kdops {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, int64_t,
    c10::string_view, double, bool);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptionalTensor&, const Tensor&, int64_t, c10::string_view, double, bool,
    std::array<bool, 4>);
using DoubleBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptionalTensor&, const Tensor&, int64_t, c10::string_view, double, bool,
    std::array<bool, 6>);

// The ops are defined from Python (kdops/_loss_ops.py) and looked up on first use.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto handle = find<ForwardSignature>("kdops::kd_forward");
  return handle;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto handle = find<BackwardSignature>("kdops::kd_backward");
  return handle;
}

const c10::TypedOperatorHandle<DoubleBackwardSignature>& double_backward_op() {
  static const auto handle = find<DoubleBackwardSignature>("kdops::kd_double_backward");
  return handle;
}

// The op arguments after the tensors, kept on the graph node.
struct Config {
  int64_t ignore_index;
  std::string divergence;
  double beta;
  bool with_ce;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["divergence"] = divergence;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["with_ce"] = with_ce;
  }
  static Config load(AutogradContext* ctx) {
    return {ctx->saved_data["ignore_index"].toInt(),
            ctx->saved_data["divergence"].toStringRef(), ctx->saved_data["beta"].toDouble(),
            ctx->saved_data["with_ce"].toBool()};
  }
};

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

template <size_t N>
std::array<bool, N> wanted(AutogradContext* ctx) {
  std::array<bool, N> mask{};
  for (size_t i = 0; i < N; ++i) mask[i] = ctx->needs_input_grad(i);
  return mask;
}

template <size_t N>
bool any(const std::array<bool, N>& mask) {
  for (bool m : mask) {
    if (m) return true;
  }
  return false;
}

// `grads` with those not wanted dropped, padded with undefined gradients to `total` (one per
// argument of the forward, as torch::autograd::Function expects).
template <size_t N>
variable_list masked(variable_list grads, const std::array<bool, N>& mask, size_t total) {
  for (size_t i = 0; i < N; ++i) {
    if (!mask[i]) grads[i] = Tensor();
  }
  grads.resize(total);
  return grads;
}

struct KdDoubleBackward : torch::autograd::Function<KdDoubleBackward> {
  template <typename... Args>
  static variable_list forward(AutogradContext*, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    const auto out = double_backward_op().call(args...);
    return std::apply([](const auto&... t) { return variable_list{t...}; }, out);
  }
  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "kdops: third-order derivatives of fused_kd_loss are not "
                                "implemented (kd_double_backward is exact but not itself "
                                "differentiable)");
  }
};

struct KdBackward : torch::autograd::Function<KdBackward> {
  static constexpr size_t kArgs = 13;

  static variable_list forward(AutogradContext* ctx, const Tensor& grad_div,
                               const Tensor& grad_ce, const Tensor& student,
                               const Tensor& teacher, const Tensor& tau_s, const Tensor& tau_t,
                               const OptionalTensor& labels, const Tensor& stats,
                               int64_t ignore_index, c10::string_view divergence, double beta,
                               bool with_ce, std::array<bool, 4> output_mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    const auto [gs, gt, gts, gtt] =
        backward_op().call(grad_div, grad_ce, student, teacher, tau_s, tau_t, labels, stats,
                           ignore_index, divergence, beta, with_ce, output_mask);
    ctx->save_for_backward({grad_div, grad_ce, student, teacher, tau_s, tau_t,
                            labels.value_or(Tensor()), stats});
    Config{ignore_index, std::string(divergence), beta, with_ce}.save(ctx);
    int64_t computed = 0;  // which outputs exist (the others are empty), one bit each
    for (size_t i = 0; i < 4; ++i) computed |= int64_t{output_mask[i]} << i;
    ctx->saved_data["computed"] = computed;
    // An unused gradient's cotangent stays undefined and reaches the op as None (no zeros).
    ctx->set_materialize_grads(false);
    return {gs, gt, gts, gtt};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& cotangents) {
    const auto mask = wanted<6>(ctx);
    if (!any(mask)) return variable_list(kArgs);
    const int64_t computed = ctx->saved_data["computed"].toInt();
    std::array<OptionalTensor, 4> v;
    for (size_t i = 0; i < 4; ++i) {
      if ((computed >> i) & 1) v[i] = optional(cotangents[i]);
    }
    const auto s = ctx->get_saved_variables();
    const Config c = Config::load(ctx);
    const auto grads = KdDoubleBackward::apply(v[0], v[1], v[2], v[3], s[0], s[1], s[2], s[3],
                                               s[4], s[5], optional(s[6]), s[7], c.ignore_index,
                                               c.divergence, c.beta, c.with_ce, mask);
    return masked(grads, mask, kArgs);
  }
};

struct KdForward : torch::autograd::Function<KdForward> {
  static constexpr size_t kArgs = 9;

  static variable_list forward(AutogradContext* ctx, const Tensor& student,
                               const Tensor& teacher, const Tensor& tau_s, const Tensor& tau_t,
                               const OptionalTensor& labels, int64_t ignore_index,
                               c10::string_view divergence, double beta, bool with_ce) {
    at::AutoDispatchBelowADInplaceOrView below;
    const auto [div, ce, stats] = forward_op().call(student, teacher, tau_s, tau_t, labels,
                                                    ignore_index, divergence, beta, with_ce);
    // The statistics are saved for the backward ops, whose formulas are total derivatives.
    ctx->mark_non_differentiable({stats});
    ctx->save_for_backward({student, teacher, tau_s, tau_t, labels.value_or(Tensor()), stats});
    Config{ignore_index, std::string(divergence), beta, with_ce}.save(ctx);
    return {div, ce, stats};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto mask = wanted<4>(ctx);
    if (!any(mask)) return variable_list(kArgs);
    const auto s = ctx->get_saved_variables();
    const Config c = Config::load(ctx);
    const auto out = KdBackward::apply(grads[0], grads[1], s[0], s[1], s[2], s[3], optional(s[4]),
                                       s[5], c.ignore_index, c.divergence, c.beta, c.with_ce,
                                       mask);
    return masked(out, mask, kArgs);
  }
};

std::tuple<Tensor, Tensor, Tensor> kd_forward(const Tensor& student, const Tensor& teacher,
                                              const Tensor& tau_s, const Tensor& tau_t,
                                              const OptionalTensor& labels, int64_t ignore_index,
                                              c10::string_view divergence, double beta,
                                              bool with_ce) {
  const auto out = KdForward::apply(student, teacher, tau_s, tau_t, labels, ignore_index,
                                    divergence, beta, with_ce);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_backward(
    const Tensor& grad_div, const Tensor& grad_ce, const Tensor& student, const Tensor& teacher,
    const Tensor& tau_s, const Tensor& tau_t, const OptionalTensor& labels, const Tensor& stats,
    int64_t ignore_index, c10::string_view divergence, double beta, bool with_ce,
    std::array<bool, 4> output_mask) {
  const auto out = KdBackward::apply(grad_div, grad_ce, student, teacher, tau_s, tau_t, labels,
                                     stats, ignore_index, divergence, beta, with_ce, output_mask);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> kd_double_backward(
    const OptionalTensor& v_student, const OptionalTensor& v_teacher,
    const OptionalTensor& v_tau_s, const OptionalTensor& v_tau_t, const Tensor& grad_div,
    const Tensor& grad_ce, const Tensor& student, const Tensor& teacher, const Tensor& tau_s,
    const Tensor& tau_t, const OptionalTensor& labels, const Tensor& stats, int64_t ignore_index,
    c10::string_view divergence, double beta, bool with_ce, std::array<bool, 6> output_mask) {
  const auto out = KdDoubleBackward::apply(v_student, v_teacher, v_tau_s, v_tau_t, grad_div,
                                           grad_ce, student, teacher, tau_s, tau_t, labels, stats,
                                           ignore_index, divergence, beta, with_ce, output_mask);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, Autograd, m) {
  m.impl("kd_forward", &kd_forward);
  m.impl("kd_backward", &kd_backward);
  m.impl("kd_double_backward", &kd_double_backward);
}

}  // namespace kdops
