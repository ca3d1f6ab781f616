// Row kernel of kdops::kd_double_backward: the vector-Jacobian product of the backward op.
//
// Φ = ⟨vs, ∂/∂s⟩ + ⟨vt, ∂/∂t⟩ + us ∂/∂τs + ut ∂/∂τt is differentiated with respect to the
// cotangents gD, gCE, the logits and both temperatures. With a = (vs − us zs) / τs,
// b = (vt − ut zt) / τt, the divergence's HVP (H, Hs, Ht) in direction (a, b),
// gs = (gD / τs) ∂D/∂zs, gt = (gD / τt) ∂D/∂zt and p = softmax(s):
//   ∂Φ/∂gD = H                       ∂Φ/∂gCE = ⟨vs, p⟩ − vs[y]
//   ∂Φ/∂s  = (gD / τs) Hs − (us / τs) gs + gCE p ⊙ (vs − ⟨p, vs⟩)
//   ∂Φ/∂t  = (gD / τt) Ht − (ut / τt) gt
//   ∂Φ/∂τs = −(gD / τs) ⟨Hs, zs⟩ − (1 / τs) ⟨vs − 2 us zs, gs⟩   (and the same for τt)
#pragma once

#include "kd_loss_rows.h"

namespace kdops::cpu::CPU_CAPABILITY {

// One side (student or teacher) of a row of the second-order op.
template <typename T>
struct Side {
  const T* v;    // cotangent of the logits' gradient, or null
  bool has_u;    // cotangent of the temperature's gradient given
  T u, tau, coef;  // coef = gD / τ
  const T* z;    // shifted scaled logits
  T* dir;        // HVP direction (v − u z) / τ
  T* h;          // HVP
  T* g;          // ∂D/∂z
};

// dir = (v − u·z) / τ, with a missing v or u counted as zero.
template <typename T>
void direction(const Side<T>& s, int64_t n) {
  const Vec<T> u(s.u), tau(s.tau);
  fill(s.dir, n, [&](int64_t i) {
    Vec<T> x = s.v ? Vec<T>::loadu(s.v + i) : Vec<T>(0);
    if (s.has_u) x = x - u * zero_neg_inf(Vec<T>::loadu(s.z + i));
    return x / tau;
  });
}

// ∂Φ/∂τ of one side: −coef ⟨H, z⟩ − ⟨v − 2 u z, coef ∂D/∂z⟩ / τ.
template <typename T>
T tau_term(const Side<T>& s, int64_t n) {
  const Vec<T> c(s.coef), u2(2 * s.u);
  const auto sums = row_sums<T, 2>(0, n, [&](int64_t i) {
    const Vec<T> z = zero_neg_inf(Vec<T>::loadu(s.z + i));
    Vec<T> wv = s.v ? Vec<T>::loadu(s.v + i) : Vec<T>(0);
    if (s.has_u) wv = wv - u2 * z;
    return std::array<Vec<T>, 2>{(c * Vec<T>::loadu(s.h + i)) * z, wv * (c * Vec<T>::loadu(s.g + i))};
  });
  return -sums[0] - sums[1] / s.tau;
}

// out = coef·H − (u / τ)·coef·∂D/∂z, the divergence part of ∂Φ/∂logits.
template <typename T>
void logits_term(const Side<T>& s, T* out, int64_t n) {
  const Vec<T> c(s.coef), ut(s.u / s.tau);
  fill(out, n, [&](int64_t i) {
    const Vec<T> x = c * Vec<T>::loadu(s.h + i);
    return s.has_u ? x - ut * (c * Vec<T>::loadu(s.g + i)) : x;
  });
}

template <typename T>
void zero_double_backward_row(const Problem& p, const DoubleBackwardIo& io, int64_t r) {
  for (void* out : {io.d_grad_div, io.d_grad_ce, io.d_tau_s, io.d_tau_t}) {
    if (out) static_cast<T*>(out)[r] = 0;
  }
  if (io.d_student) zero_row(io.d_student, p.student_dtype, r, p.v);
  if (io.d_teacher) zero_row(io.d_teacher, p.teacher_dtype, r, p.v);
}

template <typename T>
void double_backward_rows(const Problem& p, const DoubleBackwardIo& io, int64_t begin,
                          int64_t end) {
  Workspace<T> w(p.v);
  const T* stats = static_cast<const T*>(p.stats);
  const T* grad_div = static_cast<const T*>(io.grad_div);
  const T* grad_ce = static_cast<const T*>(io.grad_ce);
  const int64_t n = p.n, v = p.v;
  with_divergence<T>(p, w, [&](const auto& div) {
    for (int64_t r = begin; r < end; ++r) {
      if (!row_valid(p, r)) {
        zero_double_backward_row<T>(p, io, r);
        continue;
      }
      const T* us = static_cast<const T*>(io.v_tau_s);
      const T* ut = static_cast<const T*>(io.v_tau_t);
      if constexpr (std::is_same_v<std::decay_t<decltype(div)>, KL<T>>) {
        with_conversion<T>(p, [&](auto convert) {
          KLSecondOrderRow<T, convert()> k{};
          k.in = kl_row<convert()>(p, w, r, stats, grad_div, grad_ce);
          if (io.v_student) {
            k.vs = logits_row<convert()>(io.v_student, p.student_dtype, r, p.n, v, w.row(VS));
          }
          if (io.v_teacher) {
            k.vt = logits_row<convert()>(io.v_teacher, p.teacher_dtype, r, p.n, v, w.row(VT));
          }
          k.has_us = us != nullptr;
          k.has_ut = ut != nullptr;
          k.us = us ? us[r] : T(0);
          k.ut = ut ? ut[r] : T(0);
          k.label = p.with_ce && io.v_student ? p.labels[r] : -1;
          if (io.d_student) k.out_s = out_row(io.d_student, p.student_dtype, r, v, w.row(OUT));
          if (io.d_teacher) k.out_t = out_row(io.d_teacher, p.teacher_dtype, r, v, w.row(HT));
          k.need_tau_s = io.d_tau_s != nullptr;
          k.need_tau_t = io.d_tau_t != nullptr;
          const int rows[8] = {PS, PT, LS, VA, VB, ZS, ZT, P1};
          for (int j = 0; j < 8; ++j) k.scratch[j] = w.row(rows[j]);
          const auto res = div.p_is_teacher ? kl_second_order_row<T, true>(k)
                                            : kl_second_order_row<T, false>(k);
          T* const scalars[4] = {static_cast<T*>(io.d_grad_div), static_cast<T*>(io.d_grad_ce),
                                 static_cast<T*>(io.d_tau_s), static_cast<T*>(io.d_tau_t)};
          for (int j = 0; j < 4; ++j) {
            if (scalars[j]) scalars[j][r] = res[j];
          }
          if (k.out_s) finish_out_row(k.out_s, io.d_student, p.student_dtype, r, v);
          if (k.out_t) finish_out_row(k.out_t, io.d_teacher, p.teacher_dtype, r, v);
        });
      } else {
        const T ts = static_cast<const T*>(p.tau_s)[r], tt = static_cast<const T*>(p.tau_t)[r];
        const Prepared<T> x = prepare(p, w, r, stats);
        div.prepare(x.row);
        const T* vs = nullptr;
        const T* vt = nullptr;
        if (io.v_student) {
          load_row(io.v_student, p.student_dtype, r, v, w.row(VS));
          vs = w.row(VS);
        }
        if (io.v_teacher) {
          load_row(io.v_teacher, p.teacher_dtype, r, v, w.row(VT));
          vt = w.row(VT);
        }
        const Side<T> s{vs, us != nullptr, us ? us[r] : T(0), ts, grad_div[r] / ts, x.row.zs,
                        w.row(VA), w.row(HS), w.row(GS)};
        const Side<T> t{vt, ut != nullptr, ut ? ut[r] : T(0), tt, grad_div[r] / tt, x.row.zt,
                        w.row(VB), w.row(HT), w.row(GT)};
        direction(s, v);
        direction(t, v);
        const T directional = div.hvp(x.row, s.dir, t.dir, Hvp<T>{s.h, t.h, s.g, t.g});
        if (io.d_grad_div) static_cast<T*>(io.d_grad_div)[r] = directional;

        // The hard-label term only sees the student cotangent.
        const bool ce = p.with_ce && vs;
        T p1_vs = 0;
        if (ce) {
          hard_probs(x.xs.values(w.row(XS)), w.row(P1), v, stats, n, r);
          p1_vs = dot(vs, w.row(P1), v);
        }
        if (io.d_grad_ce) static_cast<T*>(io.d_grad_ce)[r] = ce ? p1_vs - vs[p.labels[r]] : T(0);
        T* out = w.row(OUT);
        if (io.d_student) {
          logits_term(s, out, v);
          if (ce) {
            const Vec<T> g(grad_ce[r]), m(p1_vs);
            const T* p1 = w.row(P1);
            fill(out, v, [&](int64_t i) {
              const Vec<T> q = Vec<T>::loadu(p1 + i);
              return Vec<T>::loadu(out + i) + g * q * (Vec<T>::loadu(vs + i) - m);
            });
          }
          store_row(out, io.d_student, p.student_dtype, r, v);
        }
        if (io.d_teacher) {
          logits_term(t, out, v);
          store_row(out, io.d_teacher, p.teacher_dtype, r, v);
        }
        if (io.d_tau_s) static_cast<T*>(io.d_tau_s)[r] = tau_term(s, v);
        if (io.d_tau_t) static_cast<T*>(io.d_tau_t)[r] = tau_term(t, v);
      }
    }
  });
}

// Entries of the table this capability exports (see kd_loss_kernels.h).
inline void forward(const Problem& p, const ForwardOut& o, int64_t b, int64_t e) {
  p.compute == Dtype::Double ? forward_rows<double>(p, o, b, e) : forward_rows<float>(p, o, b, e);
}
inline void backward(const Problem& p, const BackwardIo& io, int64_t b, int64_t e) {
  p.compute == Dtype::Double ? backward_rows<double>(p, io, b, e) : backward_rows<float>(p, io, b, e);
}
inline void double_backward(const Problem& p, const DoubleBackwardIo& io, int64_t b, int64_t e) {
  p.compute == Dtype::Double ? double_backward_rows<double>(p, io, b, e)
                             : double_backward_rows<float>(p, io, b, e);
}

}  // namespace kdops::cpu::CPU_CAPABILITY
