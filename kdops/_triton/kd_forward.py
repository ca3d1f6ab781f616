"""Triton forward kernel of kdops::kd_forward: per-row divergence, cross-entropy, statistics.

KIND selects the divergence: 0 = KL(pt‖ps) (``kl``, ``jsd`` with β = 0), 1 = KL(ps‖pt)
(``reverse_kl``, ``jsd`` with β = 1), 2 = generalized JSD with 0 < β < 1.
"""
import triton
import triton.language as tl

from .rows import (div, divergence_sums, load_rows, load_z, online_lse, row_tile,
                   row_validity)


@triton.jit
def _online_kl(mx, sx, my, sy, w, zx, zy):
    """Streaming KL(P‖Q), P = softmax(zx), Q = softmax(zy), in one pass over the row.

    With running maxima mx, my and sums sx = Σ exp(zx − mx), sy = Σ exp(zy − my),
        w = Σ exp(zx − mx) · ((zx − mx) − (zy − my))
    and at the end KL = w / sx − log sx + log sy. When a block raises the maxima to mx', my',
    every earlier term's weight scales by exp(mx − mx') and its difference moves by
    (my' − my) − (mx' − mx), so w' = exp(mx − mx')·(w + sx·((my' − my) − (mx' − mx))). The
    differences are of shifted logits, so a common offset of the logits (±1e4) cancels
    exactly instead of rounding away the divergence. Entries with P = 0 contribute nothing.
    """
    mx_new = tl.maximum(mx, tl.max(zx, 1))
    my_new = tl.maximum(my, tl.max(zy, 1))
    cx_old = tl.where(mx == float("-inf"), 0.0, mx)
    cy_old = tl.where(my == float("-inf"), 0.0, my)
    cx = tl.where(mx_new == float("-inf"), 0.0, mx_new)
    cy = tl.where(my_new == float("-inf"), 0.0, my_new)
    rx = tl.exp(mx - cx)
    w = rx * (w + sx * ((cy - cy_old) - (cx - cx_old)))
    dx = zx - cx[:, None]
    dy = zy - cy[:, None]
    ex = tl.exp(dx)
    w += tl.sum(tl.where(ex == 0.0, 0.0, ex * (dx - dy)), 1)
    sx = sx * rx + tl.sum(ex, 1)
    sy = sy * tl.exp(my - cy) + tl.sum(tl.exp(dy), 1)
    return mx_new, sx, my_new, sy, w


@triton.jit
def kd_forward_kernel(
    s_ptr, t_ptr, s_stride, t_stride, tau_s_ptr, tau_s_stride, tau_t_ptr, tau_t_stride,
    labels_ptr, beta_ptr, div_ptr, ce_ptr, stats_ptr, n, v, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, WITH_CE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, LOWEST: tl.constexpr, ALTERNATE: tl.constexpr,
):
    """Per row: D(softmax(s/τs), softmax(t/τt)), CE = −log softmax(s)[y], and the statistics
    (max and log Σ exp(z − max) of zs, zt and s) that the backward kernels recompute
    probabilities from. Rows whose label is ignore_index get D = CE = 0.

    The KLs take one pass over s and t (`_online_kl`). The JSD needs normalized probabilities
    for log m, so it takes a second pass once the row statistics are known (backward along
    the row where ALTERNATE: `rows.block_cols`).
    """
    rows, row_ok = row_tile(n, ROWS)
    valid, label = row_validity(labels_ptr, rows, row_ok, ignore_index, HAS_LABELS)
    tau_s = load_rows(tau_s_ptr, tau_s_stride, rows, row_ok)
    tau_t = load_rows(tau_t_ptr, tau_t_stride, rows, row_ok)
    cols0 = tl.arange(0, BLOCK_V)
    zero = tl.zeros([ROWS], dtype=tau_s.dtype)
    ms = zero + float("-inf")
    mt = zero + float("-inf")
    m1 = zero + float("-inf")
    ss = zero
    st = zero
    s1 = zero
    w = zero
    for start in range(0, v, BLOCK_V):
        cols = start + cols0
        mask = row_ok[:, None] & (cols < v)[None, :]
        zs = load_z(s_ptr, s_stride, rows, cols, mask, tau_s)
        zt = load_z(t_ptr, t_stride, rows, cols, mask, tau_t)
        if KIND == 0:
            mt, st, ms, ss, w = _online_kl(mt, st, ms, ss, w, zt, zs)
        elif KIND == 1:
            ms, ss, mt, st, w = _online_kl(ms, ss, mt, st, w, zs, zt)
        else:
            ms, ss = online_lse(ms, ss, zs)
            mt, st = online_lse(mt, st, zt)
        if WITH_CE:
            x = tl.load(s_ptr + rows[:, None] * s_stride + cols[None, :], mask=mask,
                        other=float("-inf"))
            m1, s1 = online_lse(m1, s1, x.to(tau_s.dtype))
    log_ss = tl.log(ss)
    log_st = tl.log(st)
    if KIND == 0:
        d = div(w, st) - log_st + log_ss
    elif KIND == 1:
        d = div(w, ss) - log_ss + log_st
    else:
        beta = tl.load(beta_ptr).to(tau_s.dtype)
        acc_s, acc_t = divergence_sums(s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, v, tau_s,
                                       tau_t, ms, mt, log_ss, log_st, beta, KIND, ROWS, BLOCK_V,
                                       LOWEST, ALTERNATE)
        d = beta * acc_t + (1.0 - beta) * acc_s
    tl.store(div_ptr + rows, tl.where(valid, d, 0.0), mask=row_ok)
    tl.store(stats_ptr + rows, ms, mask=row_ok)
    tl.store(stats_ptr + n + rows, mt, mask=row_ok)
    tl.store(stats_ptr + 2 * n + rows, log_ss, mask=row_ok)
    tl.store(stats_ptr + 3 * n + rows, log_st, mask=row_ok)
    if WITH_CE:
        s_y = tl.load(s_ptr + rows * s_stride + label, mask=valid, other=0.0).to(tau_s.dtype)
        log_s1 = tl.log(s1)
        tl.store(ce_ptr + rows, tl.where(valid, -((s_y - m1) - log_s1), 0.0), mask=row_ok)
        tl.store(stats_ptr + 4 * n + rows, m1, mask=row_ok)
        tl.store(stats_ptr + 5 * n + rows, log_s1, mask=row_ok)
    else:
        tl.store(ce_ptr + rows, zero, mask=row_ok)
        tl.store(stats_ptr + 4 * n + rows, zero, mask=row_ok)
        tl.store(stats_ptr + 5 * n + rows, zero, mask=row_ok)
