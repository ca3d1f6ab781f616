// Per-row divergence math in z-space (z = logits / temperature) on prepared rows, for the
// generic row path (the JSD; the two KLs have streaming kernels in kl_rows.h).
//
// The same formulas as kdops/_divergences.py (the module docstrings there carry the
// derivations): the value of D, its gradients ∂D/∂zs and ∂D/∂zt, and its Hessian-vector
// product in a direction (a on zs, b on zt). Log-probabilities are clamped at the lowest
// finite value, so an entry with p = 0 contributes a finite number times zero, never NaN.
#pragma once

#include "row_ops.h"

namespace kdops::cpu::CPU_CAPABILITY {

// One prepared row: n values, each array padded (see row_ops.h).
template <typename T>
struct Row {
  int64_t n;
  T* zs;  // z − max(z), −inf kept
  T* zt;
  T* ls;  // log-probabilities, clamped
  T* lt;
  T* ps;  // probabilities
  T* pt;
};

// Results of a Hessian-vector product, student and teacher side.
template <typename T>
struct Hvp {
  T* h_s;
  T* h_t;
  T* g_s;  // ∂D/∂zs
  T* g_t;  // ∂D/∂zt
};

// Generalized JSD, 0 < β < 1 (β = 0, 1 are the KL structs). With m = β pt + (1 − β) ps,
// e_s = log ps − log m, e_t = log pt − log m:
//   D = β Σ pt e_t + (1 − β) Σ ps e_s
//   ∂D/∂zs = (1 − β) ps ⊙ (e_s − ⟨ps, e_s⟩),  ∂D/∂zt = β pt ⊙ (e_t − ⟨pt, e_t⟩)
// and the HVP of kdops/_divergences.py. e_s, e_t come from d = log pt − log ps: with
// y = −log1p(c expm1(−|d|)), c = β where d ≤ 0 and 1 − β elsewhere (the log of the larger of
// ps, pt over m), e_s = y, e_t = y + d for d ≤ 0 and e_t = y, e_s = y − d for d > 0.
template <typename T>
struct JSD {
  T beta;
  T* e_s;  // scratch rows owned by the caller
  T* e_t;
  T* de_s;
  T* de_t;

  // Fills e_s, e_t; call once per row before anything else.
  void prepare(const Row<T>& r) const {
    const Vec<T> zero(0), b(beta), nb(1 - beta);
    for (int64_t i = 0; i < r.n; i += kLanes<T>) {
      const Vec<T> d = Vec<T>::loadu(r.lt + i) - Vec<T>::loadu(r.ls + i);
      const Vec<T> below = d <= zero;
      const Vec<T> y = (Vec<T>::blendv(nb, b, below) * d.abs().neg().expm1()).log1p().neg();
      Vec<T>::blendv(y - d, y, below).store(e_s + i);
      Vec<T>::blendv(y, y + d, below).store(e_t + i);
    }
  }

  T value(const Row<T>& r) const {
    const auto s = row_sums<T, 2>(0, r.n, [&](int64_t i) {
      return std::array<Vec<T>, 2>{Vec<T>::loadu(r.pt + i) * Vec<T>::loadu(e_t + i),
                                   Vec<T>::loadu(r.ps + i) * Vec<T>::loadu(e_s + i)};
    });
    return beta * s[0] + (1 - beta) * s[1];
  }

  void grads(const Row<T>& r, T* d_student, T* d_teacher) const {
    if (d_student) side_grad(r.n, r.ps, e_s, 1 - beta, d_student);
    if (d_teacher) side_grad(r.n, r.pt, e_t, beta, d_teacher);
  }

  T hvp(const Row<T>& r, const T* a, const T* b, const Hvp<T>& out) const {
    const T nb = 1 - beta;
    const auto m = row_sums<T, 4>(0, r.n, [&](int64_t i) {
      const Vec<T> ps = Vec<T>::loadu(r.ps + i), pt = Vec<T>::loadu(r.pt + i);
      return std::array<Vec<T>, 4>{ps * Vec<T>::loadu(e_s + i), pt * Vec<T>::loadu(e_t + i),
                                   ps * Vec<T>::loadu(a + i), pt * Vec<T>::loadu(b + i)};
    });
    const Vec<T> ps_es(m[0]), pt_et(m[1]), ps_a(m[2]), pt_b(m[3]), vb(beta), vnb(nb);
    // Pass 1: the gradients, de_s and de_t, and the inner products the Hessian needs.
    const auto s = row_sums<T, 5>(0, r.n, [&](int64_t i) {
      const Vec<T> ps = Vec<T>::loadu(r.ps + i), pt = Vec<T>::loadu(r.pt + i);
      const Vec<T> es = Vec<T>::loadu(e_s + i), et = Vec<T>::loadu(e_t + i);
      const Vec<T> va = Vec<T>::loadu(a + i), vbb = Vec<T>::loadu(b + i);
      const Vec<T> da = va - ps_a, db = vbb - pt_b;
      const Vec<T> rr = vb * vec_exp(et) * db + vnb * vec_exp(es) * da;
      const Vec<T> ds = da - rr, dt = db - rr;
      const Vec<T> gs = vnb * ps * (es - ps_es), gt = vb * pt * (et - pt_et);
      ds.store(de_s + i);
      dt.store(de_t + i);
      gs.store(out.g_s + i);
      gt.store(out.g_t + i);
      return std::array<Vec<T>, 5>{ps * da * es, ps * ds, pt * db * et, pt * dt,
                                   va * gs + vbb * gt};
    });
    const Vec<T> dps_es(s[0]), ps_des(s[1]), dpt_et(s[2]), pt_det(s[3]);
    for (int64_t i = 0; i < r.n; i += kLanes<T>) {
      const Vec<T> ps = Vec<T>::loadu(r.ps + i), pt = Vec<T>::loadu(r.pt + i);
      const Vec<T> dps = ps * (Vec<T>::loadu(a + i) - ps_a);
      const Vec<T> dpt = pt * (Vec<T>::loadu(b + i) - pt_b);
      (vnb * (dps * (Vec<T>::loadu(e_s + i) - ps_es) +
              ps * (Vec<T>::loadu(de_s + i) - dps_es - ps_des)))
          .store(out.h_s + i);
      (vb * (dpt * (Vec<T>::loadu(e_t + i) - pt_et) +
             pt * (Vec<T>::loadu(de_t + i) - dpt_et - pt_det)))
          .store(out.h_t + i);
    }
    return s[4];
  }

 private:
  static void side_grad(int64_t n, const T* p, const T* e, T weight, T* out) {
    const Vec<T> mean(dot(p, e, n)), w(weight);
    fill(out, n, [&](int64_t i) { return w * Vec<T>::loadu(p + i) * (Vec<T>::loadu(e + i) - mean); });
  }
};

}  // namespace kdops::cpu::CPU_CAPABILITY
