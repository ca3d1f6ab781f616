// Streaming forward and backward of the two KL divergences, the losses of nearly every KD
// setup: the generic row path (kd_loss_rows.h) materialises log-probabilities and
// probabilities of both sides; these kernels form them in registers, one exponential per
// element and side, and write gradients straight to the output.
//
// D = KL(P‖Q), P = softmax(x), Q = softmax(y); forward KL has x = teacher, y = student,
// reverse KL swaps them. With z' = z − max and L = log Σ exp(z'):
//   D = Σ exp(x') (x' − y') / Σ exp(x') − (Lx − Ly)       (forward op, from the sums)
//   ∂D/∂y = Q − P                                           (streams: needs no row total)
//   ∂D/∂x = P ⊙ (A − D),  A = log P − log Q                 (a second pass, after D)
// Log-probabilities are clamped at the lowest finite value as in the generic path.
#pragma once

#include "divergences.h"

namespace kdops::cpu::CPU_CAPABILITY {

// Which KL: forward (P = teacher) or reverse (P = student).
template <typename T>
struct KL {
  bool p_is_teacher;
};

// Forward of one row: (D, log Σ exp(zs'), log Σ exp(zt')), given the scaled logits in zs, zt
// and their maxima.
template <typename T, bool PIsTeacher>
std::array<T, 3> kl_forward_row(const T* zs, const T* zt, int64_t v, T ms, T mt) {
  const Vec<T> vms(ms), vmt(mt), lowest(std::numeric_limits<T>::lowest());
  const auto s = row_sums<T, 3>(0, v, [&](int64_t i) {
    const Vec<T> a = Vec<T>::loadu(zs + i) - vms, b = Vec<T>::loadu(zt + i) - vmt;
    const Vec<T> ea = vec_exp(a), eb = vec_exp(b);
    const Vec<T> d = at::vec::maximum(b, lowest) - at::vec::maximum(a, lowest);
    return std::array<Vec<T>, 3>{ea, eb, PIsTeacher ? eb * d : ea * d.neg()};
  });
  const T ls = std::log(s[0]), lt = std::log(s[1]);
  const T value = PIsTeacher ? s[2] / s[1] - (lt - ls) : s[2] / s[0] - (ls - lt);
  return {value, ls, lt};
}

// What the backward ops know of one row: its logits, temperatures, saved statistics and
// cotangents.
template <typename T, bool Convert>
struct KLRow {
  LogitsRow<T, Convert> xs;  // student logits
  LogitsRow<T, Convert> xt;
  int64_t v;
  T tau_s, tau_t, max_s, max_t, log_s, log_t;
  T coef_s, coef_t;  // gD / τ
  T grad_ce, max_hard, log_hard;
};

// Both sides at offset i: raw student logits, shifted scaled logits, clamped
// log-probabilities and probabilities, from the saved statistics.
template <typename T>
struct KLVec {
  Vec<T> sv, a, b, la, lb, pa, pb;
};

template <typename T, bool Convert>
inline KLVec<T> kl_vec(const KLRow<T, Convert>& k, int64_t i) {
  const Vec<T> lowest(std::numeric_limits<T>::lowest());
  const Vec<T> sv = k.xs.load(i);
  const Vec<T> a = sv / Vec<T>(k.tau_s) - Vec<T>(k.max_s);
  const Vec<T> b = k.xt.load(i) / Vec<T>(k.tau_t) - Vec<T>(k.max_t);
  const Vec<T> la = at::vec::maximum(a - Vec<T>(k.log_s), lowest);
  const Vec<T> lb = at::vec::maximum(b - Vec<T>(k.log_t), lowest);
  return {sv, a, b, la, lb, vec_exp(la), vec_exp(lb)};
}

// The backward of one row: the shared inputs, then its outputs and scratch.
template <typename T, bool Convert>
struct KLBackwardRow {
  KLRow<T, Convert> in;
  int64_t label;          // -1 without the cross-entropy term
  T* out_s;               // gradient rows (null when not wanted)
  T* out_t;
  bool need_tau_s, need_tau_t;
  T* p_x;                 // scratch for the x side: P, A and z'
  T* a_x;
  T* z_x;
};

// Backward of one row; returns (∂/∂τs, ∂/∂τt) (zero when not wanted).
template <typename T, bool PIsTeacher, bool Convert>
std::array<T, 2> kl_backward_row(const KLBackwardRow<T, Convert>& k) {
  const KLRow<T, Convert>& in = k.in;
  const int64_t v = in.v;
  const Vec<T> g_ce(in.grad_ce), m1(in.max_hard), l1(in.log_hard);
  T* out_y = PIsTeacher ? k.out_s : k.out_t;
  T* out_x = PIsTeacher ? k.out_t : k.out_s;
  const Vec<T> coef_y(PIsTeacher ? in.coef_s : in.coef_t), coef_x(PIsTeacher ? in.coef_t : in.coef_s);
  const bool need_x = out_x || (PIsTeacher ? k.need_tau_t : k.need_tau_s);
  const bool ce = k.label >= 0;
  // Pass 1: both probabilities; the y-side gradient and its τ sum; D and the x-side terms.
  const auto s1 = row_sums<T, 2>(0, v, [&](int64_t i) {
    const auto [sv, a, b, la, lb, pa, pb] = kl_vec(in, i);
    const Vec<T> p = PIsTeacher ? pb : pa, q = PIsTeacher ? pa : pb;
    const Vec<T> ratio = PIsTeacher ? lb - la : la - lb;
    const Vec<T> gy = q - p;
    if (out_y) {
      Vec<T> o = coef_y * gy;
      if (PIsTeacher && ce) o = o + g_ce * vec_exp((sv - m1) - l1);
      store_tail(o, out_y, i, v);
    }
    if (need_x) {
      p.store(k.p_x + i);
      ratio.store(k.a_x + i);
      (PIsTeacher ? b : a).store(k.z_x + i);
    }
    return std::array<Vec<T>, 2>{p * ratio, gy * zero_neg_inf(PIsTeacher ? a : b)};
  });
  if (out_y && PIsTeacher && ce) out_y[k.label] += -in.grad_ce;
  const T tau_y = -(PIsTeacher ? in.coef_s : in.coef_t) * s1[1];
  T tau_x = 0;
  if (need_x) {
    // Pass 2: ∂D/∂x = P ⊙ (A − D), from the scratch rows.
    const Vec<T> d(s1[0]);
    const T sum = row_sum<T>(v, [&](int64_t i) {
      const Vec<T> g = Vec<T>::loadu(k.p_x + i) * (Vec<T>::loadu(k.a_x + i) - d);
      if (out_x) {
        Vec<T> o = coef_x * g;
        if (!PIsTeacher && ce) o = o + g_ce * vec_exp((in.xs.load(i) - m1) - l1);
        store_tail(o, out_x, i, v);
      }
      return g * zero_neg_inf(Vec<T>::loadu(k.z_x + i));
    });
    if (out_x && !PIsTeacher && ce) out_x[k.label] += -in.grad_ce;
    tau_x = -(PIsTeacher ? in.coef_t : in.coef_s) * sum;
  }
  return PIsTeacher ? std::array<T, 2>{tau_y, tau_x} : std::array<T, 2>{tau_x, tau_y};
}

// Second-order op of one row (see kd_loss_second_order.h for Φ and its derivatives). With the
// HVP direction dx, dy on the x and y logits and c = dx − ⟨P, dx⟩:
//   H_x = P ⊙ (c ⊙ (A − D + 1) − ⟨∂D/∂x, dx⟩ − dy + ⟨P, dy⟩),   H_y = Q ⊙ (dy − ⟨Q, dy⟩) − P ⊙ c
// Pass 1 streams the logits and cotangents and keeps the row in scratch, pass 2 (only with a
// direction on x) forms ⟨∂D/∂x, dx⟩, pass 3 writes both gradient rows and the τ sums.
template <typename T, bool Convert>
struct KLSecondOrderRow {
  KLRow<T, Convert> in;
  LogitsRow<T, Convert> vs;  // cotangents of the logits' gradients (absent = zero)
  LogitsRow<T, Convert> vt;
  bool has_us, has_ut;
  T us, ut;
  int64_t label;  // -1 without the cross-entropy term or without vs
  T* out_s;
  T* out_t;
  bool need_tau_s, need_tau_t;  // ∂Φ/∂τ wanted (only they read the scaled logits back)
  T* scratch[8];  // P, Q, A, dx, dy, zs', zt', softmax(s)
};

// The second-order op of one row when the direction lies on the y logits only and no
// temperature or cross-entropy term is involved: MetaDistil's teacher update under forward KL,
// Φ = ⟨vs, ∂/∂s⟩. With dx = 0, c and ⟨∂D/∂x, dx⟩ vanish and the HVP needs neither A nor D:
//   H_x = P ⊙ (⟨P, dy⟩ − dy),   H_y = Q ⊙ (dy − ⟨Q, dy⟩),   H = ⟨Q − P, dy⟩,   dy = v_y / τ_y
// Pass 1 keeps P, Q and dy in scratch and sums ⟨P, dy⟩, ⟨Q, dy⟩ and H; pass 2 writes both rows.
// Returns (∂Φ/∂gD, 0, 0, 0) as kl_second_order_row does.
template <typename T, bool PIsTeacher, bool Convert>
std::array<T, 4> kl_second_order_row_y(const KLSecondOrderRow<T, Convert>& k) {
  const KLRow<T, Convert>& in = k.in;
  const int64_t v = in.v;
  T* const p_ = k.scratch[0];
  T* const q_ = k.scratch[1];
  T* const dy_ = k.scratch[4];
  const LogitsRow<T, Convert>& v_y = PIsTeacher ? k.vs : k.vt;
  const Vec<T> tau_y(PIsTeacher ? in.tau_s : in.tau_t);
  const auto s = row_sums<T, 3>(0, v, [&](int64_t i) {
    const auto [sv, a, b, la, lb, pa, pb] = kl_vec(in, i);
    const Vec<T> p = PIsTeacher ? pb : pa, q = PIsTeacher ? pa : pb, dy = v_y.load(i) / tau_y;
    p.store(p_ + i);
    q.store(q_ + i);
    dy.store(dy_ + i);
    return std::array<Vec<T>, 3>{p * dy, q * dy, (q - p) * dy};
  });
  const Vec<T> p_dy(s[0]), q_dy(s[1]), cs(in.coef_s), ct(in.coef_t);
  for (int64_t i = 0; i < v; i += kLanes<T>) {
    const Vec<T> p = Vec<T>::loadu(p_ + i), q = Vec<T>::loadu(q_ + i), dy = Vec<T>::loadu(dy_ + i);
    const Vec<T> hx = p * (p_dy - dy), hy = q * (dy - q_dy);
    if (k.out_s) store_tail(cs * (PIsTeacher ? hy : hx), k.out_s, i, v);
    if (k.out_t) store_tail(ct * (PIsTeacher ? hx : hy), k.out_t, i, v);
  }
  return {s[2], T(0), T(0), T(0)};
}

// Returns (∂Φ/∂gD, ∂Φ/∂gCE, ∂Φ/∂τs, ∂Φ/∂τt).
template <typename T, bool PIsTeacher, bool Convert>
std::array<T, 4> kl_second_order_row(const KLSecondOrderRow<T, Convert>& k) {
  const bool y_only = (PIsTeacher ? k.vs && !k.vt : k.vt && !k.vs) && !k.has_us && !k.has_ut &&
                      !k.need_tau_s && !k.need_tau_t && k.label < 0;
  if (y_only) return kl_second_order_row_y<T, PIsTeacher>(k);
  const KLRow<T, Convert>& in = k.in;
  const int64_t v = in.v;
  T* const p_ = k.scratch[0];
  T* const q_ = k.scratch[1];
  T* const a_ = k.scratch[2];
  T* const dx_ = k.scratch[3];
  T* const dy_ = k.scratch[4];
  T* const zs_ = k.scratch[5];
  T* const zt_ = k.scratch[6];
  T* const p1_ = k.scratch[7];
  // A side with neither cotangent has no direction: its scratch row is neither written nor read.
  const Vec<T> ts(in.tau_s), tt(in.tau_t), us(k.us), ut(k.ut), m1(in.max_hard), l1(in.log_hard);
  const Vec<T> zero(0);
  const bool ce = k.label >= 0;
  const bool has_dir_s = bool(k.vs) || k.has_us, has_dir_t = bool(k.vt) || k.has_ut;
  const bool has_dx = PIsTeacher ? has_dir_t : has_dir_s;
  const bool has_dy = PIsTeacher ? has_dir_s : has_dir_t;
  const auto s1 = row_sums<T, 6>(0, v, [&](int64_t i) {
    const auto [sv, a, b, la, lb, pa, pb] = kl_vec(in, i);
    const Vec<T> vsv = k.vs ? k.vs.load(i) : zero, vtv = k.vt ? k.vt.load(i) : zero;
    const Vec<T> dir_s = has_dir_s ? (k.has_us ? vsv - us * zero_neg_inf(a) : vsv) / ts : zero;
    const Vec<T> dir_t = has_dir_t ? (k.has_ut ? vtv - ut * zero_neg_inf(b) : vtv) / tt : zero;
    const Vec<T> p = PIsTeacher ? pb : pa, q = PIsTeacher ? pa : pb;
    const Vec<T> ratio = PIsTeacher ? lb - la : la - lb;
    const Vec<T> dx = PIsTeacher ? dir_t : dir_s, dy = PIsTeacher ? dir_s : dir_t;
    p.store(p_ + i);
    q.store(q_ + i);
    ratio.store(a_ + i);
    if (has_dx) dx.store(dx_ + i);
    if (has_dy) dy.store(dy_ + i);
    if (k.need_tau_s) a.store(zs_ + i);
    if (k.need_tau_t) b.store(zt_ + i);
    Vec<T> p1_vs = zero;
    if (ce) {
      const Vec<T> p1 = vec_exp((sv - m1) - l1);
      p1.store(p1_ + i);
      p1_vs = vsv * p1;
    }
    return std::array<Vec<T>, 6>{p * ratio, p * dx, p * dy, q * dy, (q - p) * dy, p1_vs};
  });
  const T d = s1[0];
  const T gx_dx = has_dx ? row_sum<T>(v, [&](int64_t i) {
    return Vec<T>::loadu(p_ + i) * (Vec<T>::loadu(a_ + i) - Vec<T>(d)) * Vec<T>::loadu(dx_ + i);
  }) : T(0);
  const Vec<T> vd(d), vgx_dx(gx_dx), p_dx(s1[1]), p_dy(s1[2]), q_dy(s1[3]), p1_vs(s1[5]);
  const Vec<T> cs(in.coef_s), ct(in.coef_t), us_ts(k.us / in.tau_s), ut_tt(k.ut / in.tau_t);
  const Vec<T> us2(2 * k.us), ut2(2 * k.ut), g_ce(in.grad_ce), one(1);
  const auto s3 = row_sums<T, 4>(0, v, [&](int64_t i) {
    const Vec<T> p = Vec<T>::loadu(p_ + i), q = Vec<T>::loadu(q_ + i);
    const Vec<T> ratio = Vec<T>::loadu(a_ + i) - vd, dy = has_dy ? Vec<T>::loadu(dy_ + i) : zero;
    const Vec<T> c = (has_dx ? Vec<T>::loadu(dx_ + i) : zero) - p_dx;
    const Vec<T> hx = p * (c * (ratio + one) - vgx_dx - dy + p_dy), hy = q * (dy - q_dy) - p * c;
    const Vec<T> gx = p * ratio, gy = q - p;
    const Vec<T> hs = PIsTeacher ? hy : hx, ht = PIsTeacher ? hx : hy;
    const Vec<T> gs = cs * (PIsTeacher ? gy : gx), gt = ct * (PIsTeacher ? gx : gy);
    const Vec<T> vsv = (ce || k.need_tau_s) && k.vs ? k.vs.load(i) : zero;
    if (k.out_s) {
      Vec<T> o = cs * hs;
      if (k.has_us) o = o - us_ts * gs;
      if (ce) o = o + g_ce * Vec<T>::loadu(p1_ + i) * (vsv - p1_vs);
      store_tail(o, k.out_s, i, v);
    }
    if (k.out_t) {
      const Vec<T> o = ct * ht;
      store_tail(k.has_ut ? o - ut_tt * gt : o, k.out_t, i, v);
    }
    std::array<Vec<T>, 4> tau_sums{zero, zero, zero, zero};
    if (k.need_tau_s) {
      const Vec<T> zs = zero_neg_inf(Vec<T>::loadu(zs_ + i));
      tau_sums[0] = (cs * hs) * zs;
      tau_sums[1] = (k.has_us ? vsv - us2 * zs : vsv) * gs;
    }
    if (k.need_tau_t) {
      const Vec<T> zt = zero_neg_inf(Vec<T>::loadu(zt_ + i));
      const Vec<T> vtv = k.vt ? k.vt.load(i) : zero;
      tau_sums[2] = (ct * ht) * zt;
      tau_sums[3] = (k.has_ut ? vtv - ut2 * zt : vtv) * gt;
    }
    return tau_sums;
  });
  const T d_gce = ce ? s1[5] - k.vs.at(k.label) : T(0);
  return {gx_dx + s1[4], d_gce, -s3[0] - s3[1] / in.tau_s, -s3[2] - s3[3] / in.tau_t};
}

}  // namespace kdops::cpu::CPU_CAPABILITY
