// SIMD building blocks for one row of V values, on ATen's Vectorized<T>.
//
// Included only inside a capability translation unit (kd_loss_<capability>.cpp): CPU_CAPABILITY names
// the namespace and selects ATen's Vectorized specialisation (see kd_loss_avx2.cpp).
// Scratch rows are padded to a whole number of vectors; loops over them run to the padded
// length and every reduction masks the padding out, so padding never reaches a result.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "kd_loss_kernels.h"
#include "vec_exp.h"

namespace kdops::cpu::CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
constexpr int64_t kLanes = Vec<T>::size();

template <typename T>
int64_t padded(int64_t n) {
  return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// Scratch rows of `n` values (padded), owned by one call on one thread; a row is allocated
// when first used, so a call holds only the rows its path needs.
template <typename T, int Rows>
class Scratch {
 public:
  explicit Scratch(int64_t n) : length_(padded<T>(n)) {}
  T* row(int k) {
    if (rows_[k].empty()) rows_[k].resize(length_);
    return rows_[k].data();
  }

 private:
  int64_t length_;
  std::array<std::vector<T>, Rows> rows_;
};

// The loops below take the vector-wise body as a lambda. Flattening them inlines the body
// (and what it calls) into the loop: the bodies are large, and GCC's size heuristics otherwise
// call them out of line, passing every vector through memory (a fifth of the second-order op).
#if defined(__GNUC__)
#define KDOPS_FLATTEN __attribute__((flatten))
#else
#define KDOPS_FLATTEN
#endif

// out[i] = f(i) vector by vector, over the padded length.
template <typename T, typename F>
KDOPS_FLATTEN inline void fill(T* out, int64_t n, const F& f) {
  for (int64_t i = 0; i < n; i += kLanes<T>) f(i).store(out + i);
}

// K sums Σ_i f(i)[k] over one block of at most 64 vectors, two accumulators per sum.
template <typename T, size_t K, typename F>
KDOPS_FLATTEN std::array<T, K> block_sums(int64_t begin, int64_t end, const F& f) {
  constexpr int64_t L = kLanes<T>;
  std::array<Vec<T>, K> a{}, b{};
  int64_t i = begin;
  for (; i + 2 * L <= end; i += 2 * L) {
    const auto x = f(i), y = f(i + L);
    for (size_t k = 0; k < K; ++k) {
      a[k] += x[k];
      b[k] += y[k];
    }
  }
  for (; i < end; i += L) {
    const auto x = f(i);
    for (size_t k = 0; k < K; ++k) a[k] += Vec<T>::set(Vec<T>(0), x[k], end - i);
  }
  std::array<T, K> out;
  for (size_t k = 0; k < K; ++k) {
    out[k] = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, a[k] + b[k]);
  }
  return out;
}

// K row sums Σ_i f(i)[k], f returning std::array<Vec<T>, K> for the vector at offset i.
//
// Summation order: blocks of kBlock values are summed with two vector accumulators per
// output (each lane adds kBlock / (2·lanes) terms), and blocks are combined pairwise, so the
// rounding error grows like log(n), not n; the order depends on n only.
template <typename T, size_t K, typename F>
std::array<T, K> row_sums(int64_t begin, int64_t end, const F& f) {
  constexpr int64_t kBlock = 64 * kLanes<T>;
  if (end - begin <= kBlock) return block_sums<T, K>(begin, end, f);
  const int64_t half = begin + ((end - begin) / 2 + kBlock - 1) / kBlock * kBlock;
  auto lo = row_sums<T, K>(begin, half, f);
  const auto hi = row_sums<T, K>(half, end, f);
  for (size_t k = 0; k < K; ++k) lo[k] += hi[k];
  return lo;
}

template <typename T, typename F>
inline T row_sum(int64_t n, const F& f) {
  return row_sums<T, 1>(0, n, [&](int64_t i) { return std::array<Vec<T>, 1>{f(i)}; })[0];
}

// Σ x·y over n values.
template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  return row_sum<T>(n, [&](int64_t i) { return Vec<T>::loadu(x + i) * Vec<T>::loadu(y + i); });
}

// Loads and stores of the vector at offset i of a row of n values that is not padded (a row
// of an input or output tensor): the last vector is partial.
template <typename T>
inline Vec<T> load_tail(const T* x, int64_t i, int64_t n) {
  return n - i >= kLanes<T> ? Vec<T>::loadu(x + i) : Vec<T>::loadu(x + i, n - i);
}

template <typename T>
inline void store_tail(const Vec<T>& x, T* out, int64_t i, int64_t n) {
  n - i >= kLanes<T> ? x.store(out + i) : x.store(out + i, n - i);
}

// max over n values (NaN propagates); x may be an unpadded row.
template <typename T>
T row_max(const T* x, int64_t n) {
  const Vec<T> lowest(-std::numeric_limits<T>::infinity());
  Vec<T> m = lowest;
  for (int64_t i = 0; i < n; i += kLanes<T>) {
    m = at::vec::maximum(m, Vec<T>::set(lowest, load_tail(x, i, n), n - i));
  }
  return at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return at::vec::maximum(x, y); },
                                    m);
}

// x with -inf entries replaced by 0 (a masked entry's logit inside an inner product with a
// vector that is zero there).
template <typename T>
inline Vec<T> zero_neg_inf(const Vec<T>& x) {
  const Vec<T> ninf(-std::numeric_limits<T>::infinity());
  return Vec<T>::blendv(x, Vec<T>(0), x == ninf);
}

template <typename T>
constexpr Dtype dtype_of() {
  return std::is_same_v<T, double> ? Dtype::Double : Dtype::Float;
}

// Row loads and stores between the logits' dtype and the compute type.
template <typename S, typename T>
void convert_row(const S* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else if constexpr ((std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>) &&
                       std::is_same_v<T, float>) {
    constexpr int64_t L = kLanes<float>;
    int64_t i = 0;
    for (; i + 2 * L <= n; i += 2 * L) {
      auto [lo, hi] = at::vec::convert_to_float<S>(Vec<S>::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + L);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]));
  }
}

template <typename T, typename S>
void convert_out(const T* src, S* dst, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
void load_row(const void* base, Dtype dtype, int64_t row, int64_t v, T* dst) {
  const int64_t off = row * v;
  switch (dtype) {
    case Dtype::Float: return convert_row(static_cast<const float*>(base) + off, dst, v);
    case Dtype::Double: return convert_row(static_cast<const double*>(base) + off, dst, v);
    case Dtype::BFloat16: return convert_row(static_cast<const c10::BFloat16*>(base) + off, dst, v);
    case Dtype::Half: return convert_row(static_cast<const c10::Half*>(base) + off, dst, v);
  }
}

// A row of logits read in the compute type T. With Convert, a float computation reads
// bfloat16 and float16 rows from the tensor's own memory and converts each vector as it loads
// it (no conversion pass over the row, half the bytes read). Without it (and for any other
// storage), a row whose dtype is not T is converted into a scratch row up front, and loads are
// plain loads.
//
// The last, partial vector of a row is loaded whole when the values after the row are still
// the tensor's (the next rows; the padding of a scratch row), and its lanes past the row set
// to zero. A partial load goes through memory value by value (converting each 16-bit one)
// before a vector load reads it back: at V = 100 that cost the bf16 ops 5-10% of their time.
template <typename T, bool Convert>
struct LogitsRow {
  const void* data = nullptr;   // the row's first value; null: no row (an absent cotangent)
  Dtype dtype = dtype_of<T>();  // dtype_of<T>(), or BFloat16 / Half with Convert
  int64_t v = 0;
  int64_t readable = 0;         // values that may be read from `data` on (at least v)

  explicit operator bool() const { return data != nullptr; }

  T at(int64_t j) const {
    if constexpr (Convert) {
      if (dtype == Dtype::BFloat16) return static_cast<const c10::BFloat16*>(data)[j];
      if (dtype == Dtype::Half) return static_cast<const c10::Half*>(data)[j];
    }
    return static_cast<const T*>(data)[j];
  }

  // The vector at offset i (the last one partial, zero-padded).
  Vec<T> load(int64_t i) const {
    if constexpr (Convert) {
      if (dtype == Dtype::BFloat16) return load_float(static_cast<const c10::BFloat16*>(data), i);
      if (dtype == Dtype::Half) return load_float(static_cast<const c10::Half*>(data), i);
    }
    const T* x = static_cast<const T*>(data);
    return readable - i >= kLanes<T> ? in_row(Vec<T>::loadu(x + i), i) : load_tail(x, i, v);
  }

  // The row as T values: its own memory, or converted into `scratch`.
  const T* values(T* scratch) const {
    if (dtype == dtype_of<T>()) return static_cast<const T*>(data);
    load_row(data, dtype, 0, v, scratch);
    return scratch;
  }

 private:
  // x, a whole vector loaded at offset i, with its lanes past the row's end set to zero.
  Vec<T> in_row(const Vec<T>& x, int64_t i) const {
    return v - i >= kLanes<T> ? x : Vec<T>::set(Vec<T>(0), x, v - i);
  }

  template <typename S>
  Vec<T> load_float(const S* x, int64_t i) const {
    Vec<T> out;
    if (readable - i >= kLanes<T>) {
      at::vec::load_to_float(x + i, out);
      return in_row(out, i);
    }
    T tail[kLanes<T>] = {};
    for (int64_t j = 0; j < v - i; ++j) tail[j] = static_cast<T>(x[i + j]);
    return Vec<T>::loadu(tail);
  }
};

inline bool is_half(Dtype dtype) { return dtype == Dtype::BFloat16 || dtype == Dtype::Half; }

// Row r of a contiguous [n, v] tensor as a LogitsRow (converted into `scratch`, a padded
// scratch row, where it must be).
template <bool Convert, typename T>
LogitsRow<T, Convert> logits_row(const void* base, Dtype dtype, int64_t r, int64_t n, int64_t v,
                                 T* scratch) {
  const int64_t rest = (n - r) * v;
  if (dtype == dtype_of<T>()) return {static_cast<const T*>(base) + r * v, dtype, v, rest};
  if constexpr (Convert && std::is_same_v<T, float>) {
    if (is_half(dtype)) return {static_cast<const char*>(base) + r * v * 2, dtype, v, rest};
  }
  load_row(base, dtype, r, v, scratch);
  return {scratch, dtype_of<T>(), v, padded<T>(v)};
}

// Where to write row r of an output: the tensor's own memory when its dtype is T, else
// `scratch`, to be converted by store_row afterwards.
template <typename T>
T* out_row(void* base, Dtype dtype, int64_t r, int64_t v, T* scratch) {
  return dtype == dtype_of<T>() ? static_cast<T*>(base) + r * v : scratch;
}

template <typename T>
void store_row(const T* src, void* base, Dtype dtype, int64_t row, int64_t v) {
  const int64_t off = row * v;
  switch (dtype) {
    case Dtype::Float: return convert_out(src, static_cast<float*>(base) + off, v);
    case Dtype::Double: return convert_out(src, static_cast<double*>(base) + off, v);
    case Dtype::BFloat16: return convert_out(src, static_cast<c10::BFloat16*>(base) + off, v);
    case Dtype::Half: return convert_out(src, static_cast<c10::Half*>(base) + off, v);
  }
}

template <typename T>
void finish_out_row(const T* row, void* base, Dtype dtype, int64_t r, int64_t v) {
  if (dtype != dtype_of<T>()) store_row(row, base, dtype, r, v);
}

inline void zero_row(void* base, Dtype dtype, int64_t row, int64_t v) {
  const size_t bytes = dtype == Dtype::Double ? 8 : dtype == Dtype::Float ? 4 : 2;
  std::memset(static_cast<char*>(base) + row * v * bytes, 0, v * bytes);
}

}  // namespace kdops::cpu::CPU_CAPABILITY
