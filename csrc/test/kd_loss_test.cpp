// C++ test of the CPU loss kernels, run by ctest (see CMakeLists.txt): values and first- and
// second-order derivatives against autograd through the plain composite, in float64, and
// results that do not depend on the number of threads. The Python suite (tests/) checks the
// same kernels far more widely; this one needs no Python.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "cpu/kd_loss.h"

namespace {

int failures = 0;

void expect_close(const torch::Tensor& got, const torch::Tensor& want, const std::string& what) {
  const double err = (got - want).abs().max().item<double>();
  const double scale = 1.0 + want.abs().max().item<double>();
  if (!(err <= 1e-12 * scale)) {
    std::printf("FAIL %s: max error %.3g\n", what.c_str(), err);
    ++failures;
  }
}

// The divergence per row through log_softmax, as in kdops/reference.py.
torch::Tensor composite(const torch::Tensor& s, const torch::Tensor& t, const torch::Tensor& ts,
                        const torch::Tensor& tt, const std::string& name, double beta) {
  const auto ls = torch::log_softmax(s / ts.unsqueeze(1), 1);
  const auto lt = torch::log_softmax(t / tt.unsqueeze(1), 1);
  if (name == "kl") return (lt.exp() * (lt - ls)).sum(1);
  if (name == "reverse_kl") return (ls.exp() * (ls - lt)).sum(1);
  const auto lm = torch::logsumexp(torch::stack({lt + std::log(beta), ls + std::log(1 - beta)}), 0);
  return beta * (lt.exp() * (lt - lm)).sum(1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(1);
}

void check_divergence(const std::string& name, double beta) {
  const int64_t n = 5, v = 37;
  const auto opts = torch::dtype(torch::kFloat64);
  auto s = torch::randn({n, v}, opts).requires_grad_();
  auto t = torch::randn({n, v}, opts).requires_grad_();
  auto ts = (torch::rand({n}, opts) + 0.5).requires_grad_();
  auto tt = (torch::rand({n}, opts) + 0.5).requires_grad_();
  const auto gd = torch::randn({n}, opts), gce = torch::zeros({n}, opts);
  const auto vs = torch::randn({n, v}, opts), vt = torch::randn({n, v}, opts);
  const auto us = torch::randn({n}, opts), ut = torch::randn({n}, opts);

  const auto ref = composite(s, t, ts, tt, name, beta);
  auto [div, ce, stats] = kdops::cpu::kd_forward(s.detach(), t.detach(), ts.detach(), tt.detach(),
                                                 std::nullopt, -100, name, beta, false);
  expect_close(div, ref.detach(), name + " forward");

  const auto grads = torch::autograd::grad({(ref * gd).sum()}, {s, t, ts, tt}, {}, true, true);
  auto [g_s, g_t, g_ts, g_tt] = kdops::cpu::kd_backward(
      gd, gce, s.detach(), t.detach(), ts.detach(), tt.detach(), std::nullopt, stats, -100, name,
      beta, false, {true, true, true, true});
  expect_close(g_s, grads[0], name + " d/ds");
  expect_close(g_t, grads[1], name + " d/dt");
  expect_close(g_ts, grads[2], name + " d/dtau_s");
  expect_close(g_tt, grads[3], name + " d/dtau_t");

  const auto phi = (grads[0] * vs).sum() + (grads[1] * vt).sum() + (grads[2] * us).sum() +
                   (grads[3] * ut).sum();
  const auto second = torch::autograd::grad({phi}, {s, t, ts, tt});
  auto [d_gd, d_gce, d_s, d_t, d_ts, d_tt] = kdops::cpu::kd_double_backward(
      vs, vt, us, ut, gd, gce, s.detach(), t.detach(), ts.detach(), tt.detach(), std::nullopt,
      stats, -100, name, beta, false, {true, true, true, true, true, true});
  expect_close(d_s, second[0], name + " second order d/ds");
  expect_close(d_t, second[1], name + " second order d/dt");
  expect_close(d_ts, second[2], name + " second order d/dtau_s");
  expect_close(d_tt, second[3], name + " second order d/dtau_t");
}

// Rows are independent, so one and two threads give the same bits.
void check_thread_independence() {
  const int64_t n = 64, v = 3001;
  const auto s = torch::randn({n, v}) * 4, t = torch::randn({n, v}) * 4;
  const auto tau = torch::full({n}, 2.0f);
  const auto gd = torch::randn({n});
  torch::Tensor results[2];
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    auto [div, ce, stats] = kdops::cpu::kd_forward(s, t, tau, tau, std::nullopt, -100, "jsd", 0.3, false);
    auto [g_s, g_t, g_ts, g_tt] = kdops::cpu::kd_backward(
        gd, gd, s, t, tau, tau, std::nullopt, stats, -100, "jsd", 0.3, false, {true, true, true, true});
    results[threads - 1] = torch::cat({div, g_s.flatten(), g_t.flatten(), g_ts, g_tt});
  }
  if (!torch::equal(results[0], results[1])) {
    std::printf("FAIL results differ between 1 and 2 threads\n");
    ++failures;
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  check_divergence("kl", 0.5);
  check_divergence("reverse_kl", 0.5);
  check_divergence("jsd", 0.3);
  check_thread_independence();
  std::printf("kdops CPU kernels (%s): %s\n", kdops::cpu::capability(),
              failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
