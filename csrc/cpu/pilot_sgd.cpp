// CPU multi-tensor kernels of kdops::pilot_sgd_step and kdops::pilot_sgd_step_backward (schemas
// and contract in kdops/_pilot_ops.py, math in kdops/_pilot_portable.py).
//
// The whole parameter list is cut into chunks of at most kChunk elements of one tensor, and the
// chunks run in parallel with at::parallel_for, so one call covers every tensor, large or
// small. Every operand of a position shares the output's memory layout (copied where it does
// not), so a chunk is a plain range of memory. Values are computed in the op-math type
// (float32 for float32/bf16/fp16, float64 for float64) and rounded to the tensor's dtype after
// every product and sum, the per-tensor loop's roundings; the build disables floating-point
// contraction, so no multiply-add is fused. The backward's scalar gradients are sums per chunk
// in float64, added in chunk order: results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "huge_pages.h"

namespace kdops::cpu {
namespace {

using at::Tensor;
using at::TensorList;

constexpr int64_t kChunk = 1 << 15;
// Below this many elements a list runs on the calling thread: waking the thread pool costs
// more than it saves (a ResNet-20 list, 0.28M elements, took as long on 1 thread as on 2).
constexpr int64_t kParallelElements = 1 << 20;

// The step's configuration; scalars at full precision (the forward may round them, `Scalars`).
struct Config {
  double lr = 0, wd = 0, m = 0, c = 1;   // c = 1 − dampening
  bool has_wd = false, has_m = false, has_buffers = false, nesterov = false, maximize = false;
};

double value_of(const std::optional<Tensor>& x) {
  return x.has_value() ? x->item<double>() : 0.0;
}

Config config_of(const Tensor& lr, const std::optional<Tensor>& wd,
                 const std::optional<Tensor>& m, bool has_buffers, double dampening,
                 bool nesterov, bool maximize) {
  for (const Tensor* x : {&lr, wd ? &*wd : nullptr, m ? &*m : nullptr}) {
    TORCH_CHECK(x == nullptr || x->device().is_cpu(), "kdops: step sizes of a CPU pilot step "
                "must be CPU tensors");
  }
  Config cfg;
  cfg.lr = lr.item<double>();
  cfg.wd = value_of(wd);
  cfg.m = value_of(m);
  cfg.c = 1.0 - dampening;
  cfg.has_wd = wd.has_value();
  cfg.has_m = m.has_value();
  cfg.has_buffers = has_buffers && cfg.has_m;
  cfg.nesterov = nesterov;
  cfg.maximize = maximize;
  return cfg;
}

// x rounded to the storage type S and back: the rounding of a stored intermediate tensor.
template <typename S, typename T>
inline T round_to(T x) {
  return static_cast<T>(static_cast<S>(x));
}

// The scalars as the forward uses them: a step size the user gave as a tensor is rounded to
// the param's dtype first (as `lr * g` does), a number only to the op-math type.
template <typename S>
struct Scalars {
  using T = at::opmath_type<S>;
  T lr, wd, m, c;
  Scalars(const Config& cfg, std::array<bool, 3> rounded)
      : lr(pick(cfg.lr, rounded[0])), wd(pick(cfg.wd, rounded[1])), m(pick(cfg.m, rounded[2])),
        c(static_cast<T>(cfg.c)) {}
  static T pick(double v, bool rounded) {
    return rounded ? static_cast<T>(static_cast<S>(static_cast<T>(v))) : static_cast<T>(v);
  }
};

constexpr int64_t kBlock = 256;

// The loop's intermediates for a block of n ≤ kBlock elements (p' = p − lr·u):
//   d = ±g + wd·p;  b = d or m·buf + c·d;  u = b or d + m·b
// one plain loop per stage, so that each vectorizes; `b` and `u` point at the stage that holds
// them.
template <typename S>
struct Stages {
  using T = at::opmath_type<S>;
  T d[kBlock], buf_stage[kBlock], u_stage[kBlock];
  const T *b = d, *u = d;
  Stages(const Config& cfg, const Scalars<S>& k, const S* p, const S* g, const S* buf,
         int64_t n) {
    if (cfg.maximize) {
      for (int64_t i = 0; i < n; ++i) d[i] = -T(g[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) d[i] = T(g[i]);
    }
    if (cfg.has_wd) {
      for (int64_t i = 0; i < n; ++i) d[i] = round_to<S>(d[i] + round_to<S>(k.wd * T(p[i])));
    }
    if (!cfg.has_m) return;
    if (cfg.has_buffers) {
      for (int64_t i = 0; i < n; ++i) {
        buf_stage[i] = round_to<S>(round_to<S>(k.m * T(buf[i])) + round_to<S>(k.c * d[i]));
      }
      b = buf_stage;
    }
    u = b;
    if (cfg.nesterov) {
      for (int64_t i = 0; i < n; ++i) u_stage[i] = round_to<S>(d[i] + round_to<S>(k.m * b[i]));
      u = u_stage;
    }
  }
};

struct Chunk {
  size_t tensor;
  int64_t begin, end;
};

// at::parallel_for over the chunks, on the calling thread alone for small lists.
template <typename F>
void for_chunks(const std::vector<Chunk>& chunks, const F& f) {
  int64_t total = 0;
  for (const Chunk& ch : chunks) total += ch.end - ch.begin;
  const auto n = static_cast<int64_t>(chunks.size());
  at::parallel_for(0, n, total < kParallelElements ? n : 1, f);
}

std::vector<Chunk> chunks_of(const std::vector<Tensor>& outs) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < outs.size(); ++i) {
    const int64_t n = outs[i].numel();
    for (int64_t at = 0; at < n; at += kChunk) chunks.push_back({i, at, std::min(n, at + kChunk)});
  }
  return chunks;
}

// x laid out as `like` (a copy only where the strides differ), so both walk memory alike.
Tensor conform(const Tensor& x, const Tensor& like) {
  return x.strides() == like.strides() ? x : at::empty_like(like).copy_(x);
}

// The operands of every position, each conformed to that position's output layout.
struct Lists {
  std::vector<Tensor> like, params, grads, buffers, extra;
  Lists(TensorList params_in, TensorList grads_in, const std::optional<TensorList>& buffers_in,
        const TensorList* extra_in) {
    TORCH_CHECK(grads_in.size() == params_in.size(), "kdops: params and grads differ in length");
    const bool with_buffers = buffers_in.has_value();
    TORCH_CHECK(!with_buffers || buffers_in->size() == params_in.size(),
                "kdops: momentum_buffers and params differ in length");
    for (size_t i = 0; i < params_in.size(); ++i) {
      const Tensor& p = params_in[i];
      TORCH_CHECK(at::isFloatingType(p.scalar_type()) && p.device().is_cpu(),
                  "kdops: params[", i, "] must be a floating CPU tensor");
      like.push_back(at::empty_like(p));
      advise_huge_pages(like.back());
      for (const Tensor* x : {&grads_in[i], with_buffers ? &(*buffers_in)[i] : nullptr,
                              extra_in ? &(*extra_in)[i] : nullptr}) {
        TORCH_CHECK(x == nullptr || (x->sizes() == p.sizes() && x->scalar_type() ==
                    p.scalar_type() && x->device() == p.device()), "kdops: the tensors of "
                    "position ", i, " must share the param's shape, dtype and device");
      }
      params.push_back(conform(p, like[i]));
      grads.push_back(conform(grads_in[i], like[i]));
      if (with_buffers) buffers.push_back(conform((*buffers_in)[i], like[i]));
      if (extra_in) extra.push_back(conform((*extra_in)[i], like[i]));
    }
  }
};

template <typename S>
const S* in(const std::vector<Tensor>& xs, size_t i) {
  return xs.empty() ? nullptr : xs[i].const_data_ptr<S>();
}

template <typename S>
S* out(std::vector<Tensor>& xs, size_t i) {
  return xs.empty() ? nullptr : xs[i].mutable_data_ptr<S>();
}

#define KDOPS_DISPATCH_PARAM_TYPES(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "kdops_pilot_sgd", __VA_ARGS__)

std::vector<Tensor> pilot_sgd_step(TensorList params, TensorList grads,
                                   std::optional<TensorList> buffers, const Tensor& lr,
                                   const std::optional<Tensor>& weight_decay,
                                   const std::optional<Tensor>& momentum, double dampening,
                                   bool nesterov, bool maximize,
                                   std::array<bool, 3> tensor_scalars) {
  const Config cfg = config_of(lr, weight_decay, momentum, buffers.has_value(), dampening,
                               nesterov, maximize);
  Lists lists(params, grads, buffers, nullptr);
  std::vector<Tensor>& outs = lists.like;
  const std::vector<Chunk> chunks = chunks_of(outs);
  for_chunks(chunks, [&](int64_t first, int64_t last) {
    for (int64_t ci = first; ci < last; ++ci) {
      const Chunk& ch = chunks[ci];
      KDOPS_DISPATCH_PARAM_TYPES(outs[ch.tensor].scalar_type(), [&] {
        using T = at::opmath_type<scalar_t>;
        const Scalars<scalar_t> k(cfg, tensor_scalars);
        const scalar_t* p = in<scalar_t>(lists.params, ch.tensor);
        const scalar_t* g = in<scalar_t>(lists.grads, ch.tensor);
        const scalar_t* b = in<scalar_t>(lists.buffers, ch.tensor);
        scalar_t* o = out<scalar_t>(outs, ch.tensor);
        for (int64_t at = ch.begin; at < ch.end; at += kBlock) {
          const int64_t n = std::min(kBlock, ch.end - at);
          const Stages<scalar_t> x(cfg, k, p + at, g + at, b ? b + at : nullptr, n);
          for (int64_t i = 0; i < n; ++i) {
            o[at + i] = static_cast<scalar_t>(T(p[at + i]) - round_to<scalar_t>(k.lr * x.u[i]));
          }
        }
      });
    }
  });
  return outs;
}

// The backward through the loop's intermediates in reverse (w = ∂L/∂p'), for a block:
//   ḡu = −w·lr;  ḡb = ḡu (or m·ḡu, Nesterov);  ḡd = [Nesterov] ḡu + (c·ḡb, or ḡb without buffers)
// after which ∂p = w + wd·ḡd, ∂g = ±ḡd, ∂buf = m·ḡb, and the scalar gradients are the sums
// ⟨−w, u⟩ (lr), ⟨ḡd, p⟩ (weight decay), ⟨ḡb, buf⟩ + [Nesterov] ⟨ḡu, b⟩ (momentum).
template <typename S>
struct BackwardStages {
  using T = at::opmath_type<S>;
  T g_u[kBlock], b_stage[kBlock], d_stage[kBlock];
  const T *g_b = g_u, *g_d = g_u;
  BackwardStages(const Config& cfg, const Scalars<S>& k, const S* w, int64_t n) {
    for (int64_t i = 0; i < n; ++i) g_u[i] = round_to<S>(-T(w[i]) * k.lr);
    if (!cfg.has_m) return;
    if (cfg.nesterov) {
      for (int64_t i = 0; i < n; ++i) b_stage[i] = round_to<S>(g_u[i] * k.m);
      g_b = b_stage;
    }
    g_d = g_b;
    if (cfg.has_buffers) {
      for (int64_t i = 0; i < n; ++i) d_stage[i] = round_to<S>(g_b[i] * k.c);
      g_d = d_stage;
    }
    if (cfg.nesterov) {
      for (int64_t i = 0; i < n; ++i) d_stage[i] = round_to<S>(g_u[i] + g_d[i]);
      g_d = d_stage;
    }
  }
};

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor, Tensor, Tensor>
pilot_sgd_step_backward(TensorList grad_outputs, TensorList params, TensorList grads,
                        std::optional<TensorList> buffers, const Tensor& lr,
                        const std::optional<Tensor>& weight_decay,
                        const std::optional<Tensor>& momentum, double dampening, bool nesterov,
                        bool maximize, std::array<bool, 6> mask) {
  const Config cfg = config_of(lr, weight_decay, momentum, buffers.has_value(), dampening,
                               nesterov, maximize);
  Lists lists(params, grads, buffers, &grad_outputs);
  const size_t n = params.size();
  // The params' gradient takes the layout tensors as its storage; the others get their own.
  std::vector<Tensor> g_params = mask[0] ? lists.like : std::vector<Tensor>{};
  std::vector<Tensor> g_grads, g_buffers;
  for (size_t i = 0; i < n; ++i) {
    if (mask[1]) g_grads.push_back(at::empty_like(lists.like[i]));
    if (mask[2] && cfg.has_buffers) g_buffers.push_back(at::empty_like(lists.like[i]));
  }
  for (auto* xs : {&g_grads, &g_buffers}) {
    for (const Tensor& x : *xs) advise_huge_pages(x);
  }
  const bool sums = mask[3] || mask[4] || mask[5];
  const std::vector<Chunk> chunks = chunks_of(lists.params);
  std::vector<std::array<double, 3>> partial(sums ? chunks.size() : 0, {0.0, 0.0, 0.0});
  for_chunks(chunks, [&](int64_t first, int64_t last) {
    for (int64_t ci = first; ci < last; ++ci) {
      const Chunk& ch = chunks[ci];
      KDOPS_DISPATCH_PARAM_TYPES(lists.params[ch.tensor].scalar_type(), [&] {
        using T = at::opmath_type<scalar_t>;
        const Scalars<scalar_t> k(cfg, {false, false, false});
        const size_t t = ch.tensor;
        const scalar_t *w = in<scalar_t>(lists.extra, t), *p = in<scalar_t>(lists.params, t),
                       *g = in<scalar_t>(lists.grads, t), *b = in<scalar_t>(lists.buffers, t);
        scalar_t *gp = out<scalar_t>(g_params, t), *gg = out<scalar_t>(g_grads, t),
                 *gb = out<scalar_t>(g_buffers, t);
        double s_lr = 0, s_wd = 0, s_m = 0;
        for (int64_t at = ch.begin; at < ch.end; at += kBlock) {
          const int64_t n = std::min(kBlock, ch.end - at);
          const BackwardStages<scalar_t> y(cfg, k, w + at, n);
          if (gp && cfg.has_wd) {
            for (int64_t i = 0; i < n; ++i) {
              const T decay = round_to<scalar_t>(y.g_d[i] * k.wd);
              gp[at + i] = static_cast<scalar_t>(T(w[at + i]) + decay);
            }
          } else if (gp) {
            std::copy(w + at, w + at + n, gp + at);
          }
          if (gg && cfg.maximize) {
            for (int64_t i = 0; i < n; ++i) gg[at + i] = static_cast<scalar_t>(-y.g_d[i]);
          } else if (gg) {
            for (int64_t i = 0; i < n; ++i) gg[at + i] = static_cast<scalar_t>(y.g_d[i]);
          }
          if (gb) {
            for (int64_t i = 0; i < n; ++i) gb[at + i] = static_cast<scalar_t>(y.g_b[i] * k.m);
          }
          if (!sums) continue;
          const Stages<scalar_t> x(cfg, k, p + at, g + at, b ? b + at : nullptr, n);
          for (int64_t i = 0; i < n; ++i) {
            s_lr -= double(T(w[at + i])) * double(x.u[i]);
            s_wd += double(y.g_d[i]) * double(T(p[at + i]));
          }
          if (cfg.has_buffers) {
            for (int64_t i = 0; i < n; ++i) s_m += double(y.g_b[i]) * double(T(b[at + i]));
          }
          if (cfg.has_m && cfg.nesterov) {
            for (int64_t i = 0; i < n; ++i) s_m += double(y.g_u[i]) * double(x.b[i]);
          }
        }
        if (sums) partial[ci] = {s_lr, s_wd, s_m};
      });
    }
  });
  std::array<double, 3> total{0.0, 0.0, 0.0};
  for (const auto& part : partial) {
    for (int k = 0; k < 3; ++k) total[k] += part[k];
  }
  auto scalar_out = [&](bool wanted, const std::optional<Tensor>& like, double v) {
    if (wanted && like.has_value()) return at::scalar_tensor(v, like->options());
    return like.has_value() ? at::empty({0}, like->options()) : at::empty({0});
  };
  return {std::move(g_params), std::move(g_grads), std::move(g_buffers),
          scalar_out(mask[3], lr, total[0]), scalar_out(mask[4], weight_decay, total[1]),
          scalar_out(mask[5], momentum, total[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("pilot_sgd_step", &pilot_sgd_step);
  m.impl("pilot_sgd_step_backward", &pilot_sgd_step_backward);
}

}  // namespace kdops::cpu
