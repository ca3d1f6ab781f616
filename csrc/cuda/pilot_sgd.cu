// CUDA multi-tensor kernels of kdops::pilot_sgd_step and kdops::pilot_sgd_step_backward
// (schemas and contract in kdops/_pilot_ops.py, math in kdops/_pilot_portable.py, the CPU twin
// in csrc/cpu/pilot_sgd.cpp).
//
// Multi-tensor apply: the pointers and sizes of up to kMaxTensors tensors of one dtype travel in
// the kernel's argument (large kernel parameters: sm_70+, CUDA 12.1+), so a whole parameter list
// of one dtype is one launch on the current stream. Each block takes kChunk elements of one
// tensor and finds that tensor by a binary search over the blocks' prefix sums; offsets are
// 64-bit. Tensors whose operands are all aligned load and store 4 elements at a time.
// Arithmetic is in the op-math type with the round-to-nearest intrinsics (__fmul_rn, ...),
// which the compiler never fuses into multiply-adds, and every intermediate is rounded to the
// storage type, as in the per-tensor loop. The backward's scalar gradients are per-block float64
// partial sums reduced in block order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <optional>
#include <tuple>
#include <vector>

namespace kdops::cuda {
namespace {

using at::Tensor;
using at::TensorList;

constexpr int kMaxTensors = 320;
constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = kThreads * kVec * 8;   // elements per block

// A step size: a value known on the host, or a 0-dim float/double tensor on the device (read
// by the kernel, so learnable step sizes never synchronize). `rounded`: round it to the param's
// dtype first (it came as a tensor; see kdops/_pilot_ops.py).
struct ScalarArg {
  double value;
  const void* ptr;
  bool is_double;
  bool rounded;
};

struct Config {
  ScalarArg lr, wd, m;
  double c;   // 1 − dampening
  bool has_wd, has_m, has_buffers, nesterov, maximize;
};

template <int kLists>
struct ListArgs {
  const void* in[kLists][kMaxTensors];
  void* out[3][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_block[kMaxTensors + 1];
  bool aligned[kMaxTensors];
  int count;
};

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }

template <typename S, typename T>
__device__ __forceinline__ T round_to(T x) {
  return static_cast<T>(static_cast<S>(x));
}

template <typename S, typename T>
__device__ __forceinline__ T load_scalar(const ScalarArg& s, bool for_forward) {
  double v = s.value;
  if (s.ptr != nullptr) {
    v = s.is_double ? *static_cast<const double*>(s.ptr)
                    : static_cast<double>(*static_cast<const float*>(s.ptr));
  }
  const T t = static_cast<T>(v);
  return for_forward && s.rounded ? round_to<S>(t) : t;
}

template <typename S>
struct Scalars {
  using T = at::opmath_type<S>;
  T lr, wd, m, c;
  __device__ Scalars(const Config& cfg, bool forward)
      : lr(load_scalar<S, T>(cfg.lr, forward)), wd(load_scalar<S, T>(cfg.wd, forward)),
        m(load_scalar<S, T>(cfg.m, forward)), c(static_cast<T>(cfg.c)) {}
};

// d = ±g + wd·p;  b = d or m·buf + c·d;  u = b or d + m·b   (csrc/cpu/pilot_sgd.cpp, same order)
template <typename S>
struct Intermediates {
  using T = at::opmath_type<S>;
  T d, b, u;
  __device__ Intermediates(const Config& cfg, const Scalars<S>& k, T p, T g, T buf) {
    d = cfg.maximize ? -g : g;
    if (cfg.has_wd) d = round_to<S>(add(d, round_to<S>(mul(k.wd, p))));
    b = d;
    if (cfg.has_m && cfg.has_buffers) {
      b = round_to<S>(add(round_to<S>(mul(k.m, buf)), round_to<S>(mul(k.c, d))));
    }
    u = !cfg.has_m ? d : cfg.nesterov ? round_to<S>(add(d, round_to<S>(mul(k.m, b)))) : b;
  }
};

// The tensor of this block and the element range it covers.
template <int kLists>
__device__ __forceinline__ int locate(const ListArgs<kLists>& a, int64_t block, int64_t& begin,
                                      int64_t& end) {
  int lo = 0, hi = a.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  begin = (block - a.first_block[lo]) * kChunk;
  end = a.numel[lo] < begin + kChunk ? a.numel[lo] : begin + kChunk;
  return lo;
}

// Calls f(j) for every element j of [begin, end) this thread owns, kVec consecutive ones at a
// time (f_vec) where the tensor's operands are aligned.
template <typename F>
__device__ __forceinline__ void for_elements(int64_t begin, int64_t end, bool aligned, F f) {
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t j = begin + threadIdx.x * kVec; j < vec_end; j += kThreads * kVec) f(j, kVec);
    for (int64_t j = vec_end + threadIdx.x; j < end; j += kThreads) f(j, 1);
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) f(j, 1);
  }
}

template <typename S>
struct alignas(sizeof(S) * kVec) Pack {
  S v[kVec];
};

template <typename S>
__device__ __forceinline__ void load(const void* base, int64_t j, int width, S* x) {
  const S* ptr = static_cast<const S*>(base) + j;
  if (width == kVec) {
    const Pack<S> pack = *reinterpret_cast<const Pack<S>*>(ptr);
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = pack.v[i];
  } else {
    x[0] = *ptr;
  }
}

template <typename S>
__device__ __forceinline__ void store(void* base, int64_t j, int width, const S* x) {
  S* ptr = static_cast<S*>(base) + j;
  if (width == kVec) {
    Pack<S> pack;
#pragma unroll
    for (int i = 0; i < kVec; ++i) pack.v[i] = x[i];
    *reinterpret_cast<Pack<S>*>(ptr) = pack;
  } else {
    ptr[0] = x[0];
  }
}

// Lists in: params, grads, buffers. Out: the new params.
template <typename S>
__global__ void __launch_bounds__(kThreads) step_kernel(const __grid_constant__ ListArgs<3> a,
                                                        const __grid_constant__ Config cfg) {
  using T = at::opmath_type<S>;
  int64_t begin, end;
  const int t = locate(a, blockIdx.x, begin, end);
  const Scalars<S> k(cfg, true);
  for_elements(begin, end, a.aligned[t], [&](int64_t j, int width) {
    S p[kVec], g[kVec], b[kVec], o[kVec];
    load(a.in[0][t], j, width, p);
    load(a.in[1][t], j, width, g);
    if (cfg.has_buffers) load(a.in[2][t], j, width, b);
    for (int i = 0; i < width; ++i) {
      const Intermediates<S> x(cfg, k, T(p[i]), T(g[i]), cfg.has_buffers ? T(b[i]) : T(0));
      o[i] = static_cast<S>(add(T(p[i]), -round_to<S>(mul(k.lr, x.u))));
    }
    store(a.out[0][t], j, width, o);
  });
}

__device__ __forceinline__ double block_sum(double v, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kThreads / 32; ++i) total += shared[i];
  }
  return total;
}

// Lists in: grad_outputs w, params, grads, buffers. Out: ∂params, ∂grads, ∂buffers (null where
// not wanted); partial[block] = (⟨−w, u⟩, ⟨ḡd, p⟩, ⟨ḡb, buf⟩ + ⟨ḡu, b⟩) when `partial`.
template <typename S>
__global__ void __launch_bounds__(kThreads) backward_kernel(const __grid_constant__ ListArgs<4> a,
                                                            const __grid_constant__ Config cfg,
                                                            double* partial) {
  using T = at::opmath_type<S>;
  __shared__ double shared[kThreads / 32];
  int64_t begin, end;
  const int t = locate(a, blockIdx.x, begin, end);
  const Scalars<S> k(cfg, false);
  double s_lr = 0, s_wd = 0, s_m = 0;
  for_elements(begin, end, a.aligned[t], [&](int64_t j, int width) {
    S w[kVec], p[kVec], g[kVec], b[kVec], gp[kVec], gg[kVec], gb[kVec];
    load(a.in[0][t], j, width, w);
    if (partial != nullptr) {
      load(a.in[1][t], j, width, p);
      load(a.in[2][t], j, width, g);
    }
    if (cfg.has_buffers) load(a.in[3][t], j, width, b);
    for (int i = 0; i < width; ++i) {
      const T wi = w[i];
      const T g_u = round_to<S>(mul(-wi, k.lr));
      const T g_b = cfg.has_m && cfg.nesterov ? round_to<S>(mul(g_u, k.m)) : g_u;
      T g_d = g_u;
      if (cfg.has_m) {
        const T from_b = cfg.has_buffers ? round_to<S>(mul(g_b, k.c)) : g_b;
        g_d = cfg.nesterov ? round_to<S>(add(g_u, from_b)) : from_b;
      }
      gp[i] = static_cast<S>(cfg.has_wd ? add(wi, round_to<S>(mul(g_d, k.wd))) : wi);
      gg[i] = static_cast<S>(cfg.maximize ? -g_d : g_d);
      gb[i] = static_cast<S>(mul(g_b, k.m));
      if (partial != nullptr) {
        const T bi = cfg.has_buffers ? T(b[i]) : T(0);
        const Intermediates<S> x(cfg, k, T(p[i]), T(g[i]), bi);
        s_lr += -double(wi) * double(x.u);
        s_wd += double(g_d) * double(T(p[i]));
        if (cfg.has_buffers) s_m += double(g_b) * double(bi);
        if (cfg.has_m && cfg.nesterov) s_m += double(g_u) * double(x.b);
      }
    }
    if (a.out[0][t] != nullptr) store(a.out[0][t], j, width, gp);
    if (a.out[1][t] != nullptr) store(a.out[1][t], j, width, gg);
    if (a.out[2][t] != nullptr) store(a.out[2][t], j, width, gb);
  });
  if (partial != nullptr) {
    const double sums[3] = {s_lr, s_wd, s_m};
    for (int i = 0; i < 3; ++i) {
      const double total = block_sum(sums[i], shared);
      if (threadIdx.x == 0) partial[3 * int64_t(blockIdx.x) + i] = total;
    }
  }
}

ScalarArg scalar_arg(const std::optional<Tensor>& x, bool rounded, std::vector<Tensor>& keep) {
  ScalarArg s{0.0, nullptr, false, rounded};
  if (!x.has_value()) return s;
  if (x->device().is_cpu()) {
    s.value = x->item<double>();
    return s;
  }
  Tensor v = x->scalar_type() == at::kFloat || x->scalar_type() == at::kDouble
                 ? *x : x->to(at::kDouble);
  keep.push_back(v);
  s.ptr = v.const_data_ptr();
  s.is_double = v.scalar_type() == at::kDouble;
  return s;
}

Config config_of(const Tensor& lr, const std::optional<Tensor>& wd,
                 const std::optional<Tensor>& m, bool has_buffers, double dampening,
                 bool nesterov, bool maximize, std::array<bool, 3> rounded,
                 std::vector<Tensor>& keep) {
  Config cfg;
  cfg.lr = scalar_arg(lr, rounded[0], keep);
  cfg.wd = scalar_arg(wd, rounded[1], keep);
  cfg.m = scalar_arg(m, rounded[2], keep);
  cfg.c = 1.0 - dampening;
  cfg.has_wd = wd.has_value();
  cfg.has_m = m.has_value();
  cfg.has_buffers = has_buffers && cfg.has_m;
  cfg.nesterov = nesterov;
  cfg.maximize = maximize;
  return cfg;
}

// x laid out as `like` (a copy only where the strides differ), so both walk memory alike.
Tensor conform(const Tensor& x, const Tensor& like) {
  return x.strides() == like.strides() ? x : at::empty_like(like).copy_(x);
}

// Whether kVec consecutive elements of t can move as one aligned vector.
bool aligned(const Tensor& t) {
  if (!t.defined()) return true;
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (kVec * t.element_size()) == 0;
}

// Positions grouped by dtype (one launch per group and kMaxTensors tensors), in order.
std::map<at::ScalarType, std::vector<size_t>> by_dtype(TensorList params) {
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[params[i].scalar_type()].push_back(i);
  return groups;
}

// Launches `launch(args, blocks)` over `positions` in batches of kMaxTensors tensors;
// `in[l][i]` and `out[o][i]` are the operands of position i (undefined: absent).
template <int kLists, typename Launch>
void for_batches(const std::vector<size_t>& positions,
                 const std::array<std::vector<Tensor>, kLists>& in,
                 const std::array<std::vector<Tensor>*, 3>& out, Launch launch) {
  for (size_t start = 0; start < positions.size(); start += kMaxTensors) {
    ListArgs<kLists> a{};
    int64_t blocks = 0;
    a.count = 0;
    for (size_t q = start; q < std::min(positions.size(), start + kMaxTensors); ++q) {
      const size_t i = positions[q];
      const int slot = a.count++;
      bool ok = true;
      for (int l = 0; l < kLists; ++l) {
        const Tensor& x = in[l].empty() ? Tensor() : in[l][i];
        a.in[l][slot] = x.defined() ? x.const_data_ptr() : nullptr;
        ok = ok && aligned(x);
      }
      for (int o = 0; o < 3; ++o) {
        const Tensor& x = out[o] == nullptr || out[o]->empty() ? Tensor() : (*out[o])[i];
        a.out[o][slot] = x.defined() ? x.mutable_data_ptr() : nullptr;
        ok = ok && aligned(x);
      }
      a.numel[slot] = in[0][i].numel();
      a.aligned[slot] = ok;
      a.first_block[slot] = blocks;
      blocks += (a.numel[slot] + kChunk - 1) / kChunk;
    }
    a.first_block[a.count] = blocks;
    if (blocks > 0) launch(a, blocks);
  }
}

void check_lists(TensorList params, std::initializer_list<const TensorList*> lists) {
  TORCH_CHECK(!params.empty(), "kdops: a pilot step needs at least one tensor");
  const auto device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(at::isFloatingType(params[i].scalar_type()) && params[i].device() == device,
                "kdops: params[", i, "] must be a floating tensor on ", device);
    for (const TensorList* xs : lists) {
      if (xs == nullptr) continue;
      TORCH_CHECK(xs->size() == params.size(), "kdops: the tensor lists differ in length");
      const Tensor& x = (*xs)[i];
      TORCH_CHECK(x.sizes() == params[i].sizes() && x.scalar_type() == params[i].scalar_type() &&
                  x.device() == device, "kdops: the tensors of position ", i,
                  " must share the param's shape, dtype and device");
    }
  }
  static_assert(sizeof(ListArgs<4>) + sizeof(Config) + sizeof(double*) <= 32764,
                "kernel arguments over the 32 KiB limit");
}

#define KDOPS_DISPATCH_PARAM_TYPES(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "kdops_pilot_sgd", __VA_ARGS__)

std::vector<Tensor> pilot_sgd_step(TensorList params, TensorList grads,
                                   std::optional<TensorList> buffers, const Tensor& lr,
                                   const std::optional<Tensor>& weight_decay,
                                   const std::optional<Tensor>& momentum, double dampening,
                                   bool nesterov, bool maximize,
                                   std::array<bool, 3> tensor_scalars) {
  check_lists(params, {&grads, buffers ? &*buffers : nullptr});
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<Tensor> keep;
  const Config cfg = config_of(lr, weight_decay, momentum, buffers.has_value(), dampening,
                               nesterov, maximize, tensor_scalars, keep);
  std::vector<Tensor> outs;
  std::array<std::vector<Tensor>, 3> in;
  for (size_t i = 0; i < params.size(); ++i) {
    outs.push_back(at::empty_like(params[i]));
    in[0].push_back(conform(params[i], outs[i]));
    in[1].push_back(conform(grads[i], outs[i]));
    if (cfg.has_buffers) in[2].push_back(conform((*buffers)[i], outs[i]));
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& group : by_dtype(params)) {
    const std::vector<size_t>& positions = group.second;
    KDOPS_DISPATCH_PARAM_TYPES(group.first, [&] {
      for_batches<3>(positions, in, {&outs, nullptr, nullptr}, [&](const ListArgs<3>& a,
                                                                  int64_t blocks) {
        step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(a, cfg);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return outs;
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor, Tensor, Tensor>
pilot_sgd_step_backward(TensorList grad_outputs, TensorList params, TensorList grads,
                        std::optional<TensorList> buffers, const Tensor& lr,
                        const std::optional<Tensor>& weight_decay,
                        const std::optional<Tensor>& momentum, double dampening, bool nesterov,
                        bool maximize, std::array<bool, 6> mask) {
  check_lists(params, {&grad_outputs, &grads, buffers ? &*buffers : nullptr});
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<Tensor> keep;
  const Config cfg = config_of(lr, weight_decay, momentum, buffers.has_value(), dampening,
                               nesterov, maximize, {false, false, false}, keep);
  const size_t n = params.size();
  std::array<std::vector<Tensor>, 4> in;
  std::vector<Tensor> g_params, g_grads, g_buffers;
  for (size_t i = 0; i < n; ++i) {
    const Tensor like = at::empty_like(params[i]);
    in[0].push_back(conform(grad_outputs[i], like));
    in[1].push_back(conform(params[i], like));
    in[2].push_back(conform(grads[i], like));
    if (cfg.has_buffers) in[3].push_back(conform((*buffers)[i], like));
    if (mask[0]) g_params.push_back(like);
    if (mask[1]) g_grads.push_back(at::empty_like(like));
    if (mask[2] && cfg.has_buffers) g_buffers.push_back(at::empty_like(like));
  }
  const bool sums = mask[3] || mask[4] || mask[5];
  std::vector<Tensor> partials;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& group : by_dtype(params)) {
    const std::vector<size_t>& positions = group.second;
    KDOPS_DISPATCH_PARAM_TYPES(group.first, [&] {
      for_batches<4>(positions, in, {&g_params, &g_grads, &g_buffers},
                     [&](const ListArgs<4>& a, int64_t blocks) {
        Tensor partial;
        if (sums) {
          partial = at::empty({blocks, 3}, params[0].options().dtype(at::kDouble));
          partials.push_back(partial);
        }
        backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            a, cfg, sums ? partial.mutable_data_ptr<double>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  Tensor total;
  if (sums) total = at::cat(partials).sum(0);
  auto scalar_out = [&](bool wanted, const std::optional<Tensor>& like, int k) {
    if (wanted && like.has_value()) return total.select(0, k).to(like->options());
    return like.has_value() ? at::empty({0}, like->options()) : at::empty({0});
  };
  return {std::move(g_params), std::move(g_grads), std::move(g_buffers),
          scalar_out(mask[3], lr, 0), scalar_out(mask[4], weight_decay, 1),
          scalar_out(mask[5], momentum, 2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("pilot_sgd_step", &pilot_sgd_step);
  m.impl("pilot_sgd_step_backward", &pilot_sgd_step_backward);
}

}  // namespace kdops::cuda
