// CPU loss ops: argument checks, output allocation, and rows split across threads with
// at::parallel_for; the row kernels (kd_loss_rows.h) are compiled per CPU capability.
#include "kd_loss.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "huge_pages.h"
#include "kd_loss_kernels.h"

namespace kdops::cpu {
namespace {

const KernelTable& select_kernels() {
  const std::string cap = at::get_cpu_capability();
#ifdef KDOPS_X86_CAPABILITIES
  if (cap == "AVX512") return AVX512::kernels;
  if (cap == "AVX2") return AVX2::kernels;
#endif
  return DEFAULT::kernels;
}

const KernelTable& kernels() {
  static const KernelTable& table = select_kernels();
  return table;
}

Dtype dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kBFloat16: return Dtype::BFloat16;
    case at::kHalf: return Dtype::Half;
    default: TORCH_CHECK(false, "kdops: ", name, " must be float32/64, bfloat16 or float16, got ",
                         t.scalar_type());
  }
}

Divergence divergence_of(c10::string_view name, double beta) {
  if (name == "kl" || (name == "jsd" && beta == 0.0)) return Divergence::ForwardKL;
  if (name == "reverse_kl" || (name == "jsd" && beta == 1.0)) return Divergence::ReverseKL;
  TORCH_CHECK(name == "jsd", "kdops: unknown divergence '", std::string(name), "'");
  return Divergence::JSD;
}

// The contiguous tensors one op call reads, kept alive for the call.
struct Inputs {
  Tensor student, teacher, tau_s, tau_t, labels, stats;
  Problem problem;
};

Inputs check_inputs(const Tensor& student, const Tensor& teacher, const Tensor& tau_s,
                    const Tensor& tau_t, const OptionalTensor& labels, const Tensor* stats,
                    int64_t ignore_index, c10::string_view divergence, double beta, bool with_ce) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "kdops: student and teacher must be [N, V] of the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  const int64_t n = student.size(0);
  const auto cdt = tau_s.scalar_type();
  TORCH_CHECK(cdt == at::kFloat || cdt == at::kDouble, "kdops: temperatures must be float32/64");
  for (const Tensor* tau : {&tau_s, &tau_t}) {
    TORCH_CHECK(tau->dim() == 1 && tau->size(0) == n && tau->scalar_type() == cdt,
                "kdops: temperatures must be [N] tensors of one dtype");
  }
  Inputs in;
  in.student = student.contiguous();
  in.teacher = teacher.contiguous();
  in.tau_s = tau_s.contiguous();
  in.tau_t = tau_t.contiguous();
  Problem& p = in.problem;
  p.n = n;
  p.v = student.size(1);
  p.student = in.student.const_data_ptr();
  p.teacher = in.teacher.const_data_ptr();
  p.student_dtype = dtype_of(student, "student");
  p.teacher_dtype = dtype_of(teacher, "teacher");
  p.compute = cdt == at::kDouble ? Dtype::Double : Dtype::Float;
  p.tau_s = in.tau_s.const_data_ptr();
  p.tau_t = in.tau_t.const_data_ptr();
  if (labels.has_value() && labels->defined()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n && labels->scalar_type() == at::kLong,
                "kdops: labels must be an int64 [N] tensor");
    in.labels = labels->contiguous();
    p.labels = in.labels.const_data_ptr<int64_t>();
  }
  // An empty labels tensor (N = 0) may have no address: its presence is what counts.
  TORCH_CHECK(!with_ce || in.labels.defined(), "kdops: the cross-entropy term needs labels");
  p.ignore_index = ignore_index;
  p.divergence = divergence_of(divergence, beta);
  p.beta = beta;
  p.with_ce = with_ce;
  if (stats) {
    TORCH_CHECK(stats->dim() == 2 && stats->size(0) == 6 && stats->size(1) == n &&
                    stats->scalar_type() == cdt,
                "kdops: stats must be the [6, N] statistics of kd_forward");
    in.stats = stats->contiguous();
    p.stats = const_cast<void*>(in.stats.const_data_ptr());
  }
  return in;
}

// Rows per task: a task of about 4096 values already outweighs waking a thread.
int64_t grain(int64_t v) { return std::max<int64_t>(1, (int64_t{1} << 12) / std::max<int64_t>(v, 1)); }

template <typename F>
void over_rows(const Problem& p, const F& f) {
  at::parallel_for(0, p.n, grain(p.v), f);
}

// An output of `like`'s options, or an empty one where it is not asked for (as the fakes).
Tensor output(bool wanted, const Tensor& like, at::IntArrayRef shape, at::ScalarType dtype) {
  Tensor out = at::empty(wanted ? shape : at::IntArrayRef{0}, like.options().dtype(dtype));
  advise_huge_pages(out);
  return out;
}

void* ptr_if(bool wanted, Tensor& t) { return wanted ? t.mutable_data_ptr() : nullptr; }

const void* cotangent(const OptionalTensor& v, at::ScalarType dtype, Tensor& keep) {
  if (!v.has_value() || !v->defined()) return nullptr;
  keep = v->to(dtype).contiguous();
  return keep.const_data_ptr();
}

}  // namespace

const char* capability() { return kernels().capability; }

std::tuple<Tensor, Tensor, Tensor> kd_forward(
    const Tensor& student, const Tensor& teacher, const Tensor& tau_s, const Tensor& tau_t,
    const OptionalTensor& labels, int64_t ignore_index, c10::string_view divergence, double beta,
    bool with_ce) {
  Inputs in = check_inputs(student, teacher, tau_s, tau_t, labels, nullptr, ignore_index,
                           divergence, beta, with_ce);
  const int64_t n = in.problem.n;
  const auto opts = tau_s.options();
  Tensor div = at::empty({n}, opts), ce = at::empty({n}, opts), stats = at::empty({6, n}, opts);
  in.problem.stats = stats.mutable_data_ptr();
  const ForwardOut out{div.mutable_data_ptr(), ce.mutable_data_ptr()};
  over_rows(in.problem, [&](int64_t b, int64_t e) { kernels().forward(in.problem, out, b, e); });
  return {div, ce, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_backward(
    const Tensor& grad_div, const Tensor& grad_ce, const Tensor& student, const Tensor& teacher,
    const Tensor& tau_s, const Tensor& tau_t, const OptionalTensor& labels, const Tensor& stats,
    int64_t ignore_index, c10::string_view divergence, double beta, bool with_ce,
    std::array<bool, 4> mask) {
  Inputs in = check_inputs(student, teacher, tau_s, tau_t, labels, &stats, ignore_index,
                           divergence, beta, with_ce);
  const auto cdt = tau_s.scalar_type();
  const int64_t n = in.problem.n;
  const Tensor g_div = grad_div.to(cdt).contiguous(), g_ce = grad_ce.to(cdt).contiguous();
  Tensor gs = output(mask[0], student, student.sizes(), student.scalar_type());
  Tensor gt = output(mask[1], teacher, teacher.sizes(), teacher.scalar_type());
  Tensor gts = output(mask[2], tau_s, {n}, cdt), gtt = output(mask[3], tau_t, {n}, cdt);
  const BackwardIo io{g_div.const_data_ptr(), g_ce.const_data_ptr(), ptr_if(mask[0], gs),
                      ptr_if(mask[1], gt),    ptr_if(mask[2], gts),  ptr_if(mask[3], gtt)};
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    over_rows(in.problem, [&](int64_t b, int64_t e) { kernels().backward(in.problem, io, b, e); });
  }
  return {gs, gt, gts, gtt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> kd_double_backward(
    const OptionalTensor& v_student, const OptionalTensor& v_teacher,
    const OptionalTensor& v_tau_s, const OptionalTensor& v_tau_t, const Tensor& grad_div,
    const Tensor& grad_ce, const Tensor& student, const Tensor& teacher, const Tensor& tau_s,
    const Tensor& tau_t, const OptionalTensor& labels, const Tensor& stats, int64_t ignore_index,
    c10::string_view divergence, double beta, bool with_ce, std::array<bool, 6> mask) {
  Inputs in = check_inputs(student, teacher, tau_s, tau_t, labels, &stats, ignore_index,
                           divergence, beta, with_ce);
  const auto cdt = tau_s.scalar_type();
  const int64_t n = in.problem.n;
  const Tensor g_div = grad_div.to(cdt).contiguous(), g_ce = grad_ce.to(cdt).contiguous();
  Tensor keep_vs, keep_vt, keep_us, keep_ut;
  DoubleBackwardIo io{};
  io.v_student = cotangent(v_student, student.scalar_type(), keep_vs);
  io.v_teacher = cotangent(v_teacher, teacher.scalar_type(), keep_vt);
  io.v_tau_s = cotangent(v_tau_s, cdt, keep_us);
  io.v_tau_t = cotangent(v_tau_t, cdt, keep_ut);
  io.grad_div = g_div.const_data_ptr();
  io.grad_ce = g_ce.const_data_ptr();
  Tensor d_gd = output(mask[0], grad_div, {n}, cdt), d_gce = output(mask[1], grad_ce, {n}, cdt);
  Tensor d_s = output(mask[2], student, student.sizes(), student.scalar_type());
  Tensor d_t = output(mask[3], teacher, teacher.sizes(), teacher.scalar_type());
  Tensor d_ts = output(mask[4], tau_s, {n}, cdt), d_tt = output(mask[5], tau_t, {n}, cdt);
  io.d_grad_div = ptr_if(mask[0], d_gd);
  io.d_grad_ce = ptr_if(mask[1], d_gce);
  io.d_student = ptr_if(mask[2], d_s);
  io.d_teacher = ptr_if(mask[3], d_t);
  io.d_tau_s = ptr_if(mask[4], d_ts);
  io.d_tau_t = ptr_if(mask[5], d_tt);
  if (mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5]) {
    over_rows(in.problem,
              [&](int64_t b, int64_t e) { kernels().double_backward(in.problem, io, b, e); });
  }
  return {d_gd, d_gce, d_s, d_t, d_ts, d_tt};
}

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("kd_forward", &kd_forward);
  m.impl("kd_backward", &kd_backward);
  m.impl("kd_double_backward", &kd_double_backward);
}

}  // namespace kdops::cpu
