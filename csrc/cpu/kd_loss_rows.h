// Row kernels of the three loss ops (forward, backward, second-order backward).
//
// Included once per CPU capability (kd_loss_default.cpp, kd_loss_avx2.cpp, ...), which defines
// CPU_CAPABILITY first. One row at a time, entirely in a per-thread scratch of a few rows of V
// values that stays in cache: the logits are read once from memory per op, each output row is
// written once. The math is that of kdops/_loss_portable.py (module docstring); the comments here
// name the terms.
#pragma once

#include "kl_rows.h"

namespace kdops::cpu::CPU_CAPABILITY {

// Scratch rows.
enum : int { XS, XT, ZS, ZT, LS, LT, PS, PT, GS, GT, ES, ET, DES, DET, VA, VB, HS, HT, VS, VT, P1, OUT,
             kScratchRows };
template <typename T>
using Workspace = Scratch<T, kScratchRows>;

// Rows of the [6, n] statistics: max of zs, zt; log Σ exp(z − max) of zs, zt; max and
// log Σ exp(s − max) of s at T = 1.
enum : int { MAX_S, MAX_T, LOG_S, LOG_T, MAX_HARD, LOG_HARD };

template <typename T>
struct Prepared {
  Row<T> row;
  T max_s, max_t, log_s, log_t;
  LogitsRow<T, false> xs;  // the student logits at T = 1 (for the cross-entropy)
};

// z = x / τ for both sides of row r, in one pass over the logits; returns the row maxima of zs
// and zt and the student's row of logits.
template <bool Convert, typename T>
std::tuple<T, T, LogitsRow<T, Convert>> load_scaled(const Problem& p, Workspace<T>& w, int64_t r,
                                                    T* zs, T* zt) {
  const int64_t v = p.v;
  const auto xs = logits_row<Convert>(p.student, p.student_dtype, r, p.n, v, w.row(XS));
  const auto xt = logits_row<Convert>(p.teacher, p.teacher_dtype, r, p.n, v, w.row(XT));
  const Vec<T> ts(static_cast<const T*>(p.tau_s)[r]), tt(static_cast<const T*>(p.tau_t)[r]);
  const Vec<T> ninf(-std::numeric_limits<T>::infinity());
  Vec<T> ms = ninf, mt = ninf;
  for (int64_t i = 0; i < v; i += kLanes<T>) {
    const Vec<T> a = xs.load(i) / ts, b = xt.load(i) / tt;
    a.store(zs + i);
    b.store(zt + i);
    ms = at::vec::maximum(ms, Vec<T>::set(ninf, a, v - i));
    mt = at::vec::maximum(mt, Vec<T>::set(ninf, b, v - i));
  }
  const auto vmax = [](Vec<T>& x, Vec<T>& y) { return at::vec::maximum(x, y); };
  return {at::vec::vec_reduce_all<T>(vmax, ms), at::vec::vec_reduce_all<T>(vmax, mt), xs};
}

// Loads row r, scales it by the temperatures and forms the row's log-probabilities and
// probabilities: log p = max((z − max) − log Σ exp(z − max), lowest). The forward op
// (stats == null) computes the maxima and sums and takes p = exp(z − max) / Σ; the backward
// ops read the maxima and log-sums from `stats` and take p = exp(log p) in a single pass.
template <typename T>
Prepared<T> prepare(const Problem& p, Workspace<T>& w, int64_t r, const T* stats) {
  const int64_t v = p.v, n = p.n;
  Row<T> row{v, w.row(ZS), w.row(ZT), w.row(LS), w.row(LT), w.row(PS), w.row(PT)};
  const auto [max_s, max_t, xs] = load_scaled<false>(p, w, r, row.zs, row.zt);
  const Vec<T> lowest(std::numeric_limits<T>::lowest());
  if (stats) {
    const T ms = stats[MAX_S * n + r], mt = stats[MAX_T * n + r];
    const T ls = stats[LOG_S * n + r], lt = stats[LOG_T * n + r];
    const Vec<T> vms(ms), vmt(mt), vls(ls), vlt(lt);
    for (int64_t i = 0; i < v; i += kLanes<T>) {
      const Vec<T> a = Vec<T>::loadu(row.zs + i) - vms, b = Vec<T>::loadu(row.zt + i) - vmt;
      const Vec<T> la = at::vec::maximum(a - vls, lowest), lb = at::vec::maximum(b - vlt, lowest);
      a.store(row.zs + i);
      b.store(row.zt + i);
      la.store(row.ls + i);
      lb.store(row.lt + i);
      vec_exp(la).store(row.ps + i);
      vec_exp(lb).store(row.pt + i);
    }
    return {row, ms, mt, ls, lt, xs};
  }
  const T ms = max_s, mt = max_t;
  const Vec<T> vms(ms), vmt(mt);
  const auto sums = row_sums<T, 2>(0, v, [&](int64_t i) {
    const Vec<T> a = Vec<T>::loadu(row.zs + i) - vms, b = Vec<T>::loadu(row.zt + i) - vmt;
    a.store(row.zs + i);
    b.store(row.zt + i);
    const Vec<T> ea = vec_exp(a), eb = vec_exp(b);
    ea.store(row.ps + i);
    eb.store(row.pt + i);
    return std::array<Vec<T>, 2>{ea, eb};
  });
  const T ls = std::log(sums[0]), lt = std::log(sums[1]);
  const Vec<T> vls(ls), vlt(lt), rs(1 / sums[0]), rt(1 / sums[1]);
  for (int64_t i = 0; i < v; i += kLanes<T>) {
    at::vec::maximum(Vec<T>::loadu(row.zs + i) - vls, lowest).store(row.ls + i);
    at::vec::maximum(Vec<T>::loadu(row.zt + i) - vlt, lowest).store(row.lt + i);
    (Vec<T>::loadu(row.ps + i) * rs).store(row.ps + i);
    (Vec<T>::loadu(row.pt + i) * rt).store(row.pt + i);
  }
  return {row, ms, mt, ls, lt, xs};
}

template <typename T>
std::tuple<T, T, T> unpack3(const std::array<T, 3>& a) {
  return {a[0], a[1], a[2]};
}

// Whether the KL kernels read this problem's 16-bit logits converting as they load (float
// computation only; see LogitsRow).
template <typename T>
bool converts(const Problem& p) {
  return std::is_same_v<T, float> && (is_half(p.student_dtype) || is_half(p.teacher_dtype));
}

// Calls f(std::true_type{}) where the KL kernels convert 16-bit logits as they load them
// (`converts`), else f(std::false_type{}).
template <typename T, typename F>
void with_conversion(const Problem& p, const F& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (converts<T>(p)) return f(std::true_type{});
  }
  f(std::false_type{});
}

// The inputs of a backward op's KL kernels for row r.
template <bool Convert, typename T>
KLRow<T, Convert> kl_row(const Problem& p, Workspace<T>& w, int64_t r, const T* stats,
                         const T* grad_div, const T* grad_ce) {
  const int64_t n = p.n, v = p.v;
  const T tau_s = static_cast<const T*>(p.tau_s)[r], tau_t = static_cast<const T*>(p.tau_t)[r];
  return {logits_row<Convert>(p.student, p.student_dtype, r, p.n, v, w.row(XS)),
          logits_row<Convert>(p.teacher, p.teacher_dtype, r, p.n, v, w.row(XT)),
          v, tau_s, tau_t,
          stats[MAX_S * n + r], stats[MAX_T * n + r], stats[LOG_S * n + r], stats[LOG_T * n + r],
          grad_div[r] / tau_s, grad_div[r] / tau_t,
          p.with_ce ? grad_ce[r] : T(0), stats[MAX_HARD * n + r], stats[LOG_HARD * n + r]};
}

inline bool row_valid(const Problem& p, int64_t r) {
  return p.labels == nullptr || p.labels[r] != p.ignore_index;
}

// softmax(s) at T = 1 from the saved statistics: exp((s − max) − log Σ exp(s − max)).
template <typename T>
void hard_probs(const T* x, T* out, int64_t v, const T* stats, int64_t n, int64_t r) {
  const Vec<T> m(stats[MAX_HARD * n + r]), l(stats[LOG_HARD * n + r]);
  fill(out, v, [&](int64_t i) { return vec_exp((load_tail(x, i, v) - m) - l); });
}

// Σ g ⊙ z over a row, −inf entries of z counted as 0.
template <typename T>
T dot_z(const T* g, const T* z, int64_t v) {
  return row_sum<T>(v, [&](int64_t i) { return Vec<T>::loadu(g + i) * zero_neg_inf(Vec<T>::loadu(z + i)); });
}

// Calls f with the divergence object of this problem.
template <typename T, typename F>
void with_divergence(const Problem& p, Workspace<T>& w, const F& f) {
  switch (p.divergence) {
    case Divergence::ForwardKL: return f(KL<T>{true});
    case Divergence::ReverseKL: return f(KL<T>{false});
    case Divergence::JSD:
      return f(JSD<T>{static_cast<T>(p.beta), w.row(ES), w.row(ET), w.row(DES), w.row(DET)});
  }
}

template <typename T>
void forward_rows(const Problem& p, const ForwardOut& o, int64_t begin, int64_t end) {
  Workspace<T> w(p.v);
  T* stats = static_cast<T*>(p.stats);
  T* div_out = static_cast<T*>(o.div);
  T* ce_out = static_cast<T*>(o.ce);
  const int64_t n = p.n, v = p.v;
  with_divergence<T>(p, w, [&](const auto& div) {
    for (int64_t r = begin; r < end; ++r) {
      const bool valid = row_valid(p, r);
      T value, ms, mt, ls, lt;
      const T* x1 = nullptr;  // the student row at T = 1, for the cross-entropy
      if constexpr (std::is_same_v<std::decay_t<decltype(div)>, KL<T>>) {
        T* zs = w.row(ZS);
        T* zt = w.row(ZT);
        with_conversion<T>(p, [&](auto convert) {
          const auto [row_ms, row_mt, xs] = load_scaled<convert()>(p, w, r, zs, zt);
          ms = row_ms;
          mt = row_mt;
          if (p.with_ce) x1 = xs.values(w.row(XS));
        });
        std::tie(value, ls, lt) = div.p_is_teacher ? unpack3(kl_forward_row<T, true>(zs, zt, v, ms, mt))
                                                   : unpack3(kl_forward_row<T, false>(zs, zt, v, ms, mt));
      } else {
        const Prepared<T> x = prepare<T>(p, w, r, nullptr);
        div.prepare(x.row);
        value = div.value(x.row);
        std::tie(ms, mt, ls, lt) = std::tie(x.max_s, x.max_t, x.log_s, x.log_t);
        if (p.with_ce) x1 = x.xs.values(w.row(XS));
      }
      stats[MAX_S * n + r] = ms;
      stats[MAX_T * n + r] = mt;
      stats[LOG_S * n + r] = ls;
      stats[LOG_T * n + r] = lt;
      div_out[r] = valid ? value : T(0);
      T m1 = 0, l1 = 0;
      if (p.with_ce) {
        m1 = row_max(x1, v);
        const Vec<T> vm(m1);
        l1 = std::log(
            row_sum<T>(v, [&](int64_t i) { return vec_exp(load_tail(x1, i, v) - vm); }));
        ce_out[r] = valid ? -((x1[p.labels[r]] - m1) - l1) : T(0);
      } else {
        ce_out[r] = 0;
      }
      stats[MAX_HARD * n + r] = m1;
      stats[LOG_HARD * n + r] = l1;
    }
  });
}

// Gradients of c·D + CE to the student and teacher logits and both temperatures:
//   ∂/∂s = (gD / τs) ∂D/∂zs + gCE (softmax(s) − onehot(y))     ∂/∂t = (gD / τt) ∂D/∂zt
//   ∂/∂τs = −(gD / τs) ⟨∂D/∂zs, zs⟩                            ∂/∂τt = −(gD / τt) ⟨∂D/∂zt, zt⟩
template <typename T>
void backward_rows(const Problem& p, const BackwardIo& io, int64_t begin, int64_t end) {
  Workspace<T> w(p.v);
  const T* stats = static_cast<const T*>(p.stats);
  const T* grad_div = static_cast<const T*>(io.grad_div);
  const T* grad_ce = static_cast<const T*>(io.grad_ce);
  const int64_t n = p.n, v = p.v;
  const bool need_zs = io.grad_student || io.grad_tau_s, need_zt = io.grad_teacher || io.grad_tau_t;
  with_divergence<T>(p, w, [&](const auto& div) {
    for (int64_t r = begin; r < end; ++r) {
      if (!row_valid(p, r)) {
        if (io.grad_student) zero_row(io.grad_student, p.student_dtype, r, v);
        if (io.grad_teacher) zero_row(io.grad_teacher, p.teacher_dtype, r, v);
        if (io.grad_tau_s) static_cast<T*>(io.grad_tau_s)[r] = 0;
        if (io.grad_tau_t) static_cast<T*>(io.grad_tau_t)[r] = 0;
        continue;
      }
      if constexpr (std::is_same_v<std::decay_t<decltype(div)>, KL<T>>) {
        with_conversion<T>(p, [&](auto convert) {
          KLBackwardRow<T, convert()> k{};
          k.in = kl_row<convert()>(p, w, r, stats, grad_div, grad_ce);
          k.label = p.with_ce ? p.labels[r] : -1;
          if (io.grad_student) k.out_s = out_row(io.grad_student, p.student_dtype, r, v, w.row(OUT));
          if (io.grad_teacher) k.out_t = out_row(io.grad_teacher, p.teacher_dtype, r, v, w.row(GT));
          k.need_tau_s = io.grad_tau_s != nullptr;
          k.need_tau_t = io.grad_tau_t != nullptr;
          k.p_x = w.row(PS);
          k.a_x = w.row(LS);
          k.z_x = w.row(ZS);
          const auto taus =
              div.p_is_teacher ? kl_backward_row<T, true>(k) : kl_backward_row<T, false>(k);
          if (io.grad_tau_s) static_cast<T*>(io.grad_tau_s)[r] = taus[0];
          if (io.grad_tau_t) static_cast<T*>(io.grad_tau_t)[r] = taus[1];
          if (k.out_s) finish_out_row(k.out_s, io.grad_student, p.student_dtype, r, v);
          if (k.out_t) finish_out_row(k.out_t, io.grad_teacher, p.teacher_dtype, r, v);
        });
      } else {
        const T coef_s = grad_div[r] / static_cast<const T*>(p.tau_s)[r];
        const T coef_t = grad_div[r] / static_cast<const T*>(p.tau_t)[r];
        const Prepared<T> x = prepare(p, w, r, stats);
        div.prepare(x.row);
        T* dzs = need_zs ? w.row(GS) : nullptr;
        T* dzt = need_zt ? w.row(GT) : nullptr;
        div.grads(x.row, dzs, dzt);
        if (io.grad_tau_s) static_cast<T*>(io.grad_tau_s)[r] = -coef_s * dot_z(dzs, x.row.zs, v);
        if (io.grad_tau_t) static_cast<T*>(io.grad_tau_t)[r] = -coef_t * dot_z(dzt, x.row.zt, v);
        T* out = w.row(OUT);
        if (io.grad_student) {
          const Vec<T> c(coef_s);
          if (p.with_ce) {
            hard_probs(x.xs.values(w.row(XS)), w.row(P1), v, stats, n, r);
            const Vec<T> g(grad_ce[r]);
            const T* p1 = w.row(P1);
            fill(out, v, [&](int64_t i) { return c * Vec<T>::loadu(dzs + i) + g * Vec<T>::loadu(p1 + i); });
            out[p.labels[r]] += -grad_ce[r];
          } else {
            fill(out, v, [&](int64_t i) { return c * Vec<T>::loadu(dzs + i); });
          }
          store_row(out, io.grad_student, p.student_dtype, r, v);
        }
        if (io.grad_teacher) {
          const Vec<T> c(coef_t);
          fill(out, v, [&](int64_t i) { return c * Vec<T>::loadu(dzt + i); });
          store_row(out, io.grad_teacher, p.teacher_dtype, r, v);
        }
      }
    }
  });
}

}  // namespace kdops::cpu::CPU_CAPABILITY
