// exp of a float vector, inlined into the row loops.
//
// ATen's Vectorized<float>::exp() calls Sleef's expf8_u10 through a dispatch pointer: the
// call clobbers every vector register, so each of the loss loops' exponentials also spilled
// and reloaded the loop's live vectors. This is the same algorithm written with Vectorized
// operations that inline (AVX2, AVX-512; a scalar loop in the default build):
//
//   x = n·ln2 + r,  n = round(x / ln2),  |r| ≤ ln2 / 2    (ln2 in two parts, fused multiply-add)
//   exp(r) ≈ 1 + r + r²·(1/2 + c3 r + c4 r² + c5 r³ + c6 r⁴ + c7 r⁵)
//   exp(x) = exp(r) · 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋)              (two steps: subnormal and overflowing
//                                                           results need no special case)
//
// The polynomial is a near-minimax fit of exp on [−ln2/2, ln2/2] with float coefficients
// (relative error 1e-10, a thousandth of a float ulp); the result is within 1 ulp of the exact exp for every float input
// (checked exhaustively by csrc/test/vec_exp_test.cpp, as is Sleef's u10 bound). x is clamped
// to [−104, 89], where exp rounds to 0 and overflows to +inf: −inf gives 0, +inf gives +inf,
// and NaN stays NaN (the clamps keep a NaN operand).
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace kdops::cpu::CPU_CAPABILITY {

template <typename T>
inline at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& x) {
  return x.exp();  // double: Sleef's exp_u10
}

template <>
inline at::vec::Vectorized<float> vec_exp(const at::vec::Vectorized<float>& x) {
  using F = at::vec::Vectorized<float>;
  using I = at::vec::Vectorized<int32_t>;
  // clamp_min and clamp_max return x where x is NaN.
  const F xc = at::vec::clamp_max(at::vec::clamp_min(x, F(-104.0f)), F(89.0f));
  const F n = (xc * F(0x1.715476p+0f)).round();
  F r = at::vec::fmadd(n, F(-0x1.62e4p-1f), xc);
  r = at::vec::fmadd(n, F(-0x1.7f7d1cp-20f), r);
  F q = at::vec::fmadd(F(0x1.9dfba8p-13f), r, F(0x1.6d4cbap-10f));
  q = at::vec::fmadd(q, r, F(0x1.11130ep-7f));
  q = at::vec::fmadd(q, r, F(0x1.5554e8p-5f));
  q = at::vec::fmadd(q, r, F(0x1.555554p-3f));
  q = at::vec::fmadd(q, r, F(0.5f));
  const F e_r = at::vec::fmadd(q, r * r, r) + F(1.0f);
  const I k = at::vec::convert_to_int_of_same_size(n);
  const I k1 = k >> I(1), k2 = k - k1;
  const F s1 = at::vec::cast<float>((k1 + I(127)) << I(23));
  const F s2 = at::vec::cast<float>((k2 + I(127)) << I(23));
  return e_r * s1 * s2;
}

}  // namespace kdops::cpu::CPU_CAPABILITY
