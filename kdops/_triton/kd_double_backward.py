"""Triton kernel of kdops::kd_double_backward: the exact second order of the loss.

The op differentiates Φ = ⟨vs, ∂/∂s⟩ + ⟨vt, ∂/∂t⟩ + us ∂/∂τs + ut ∂/∂τt of kd_backward's
outputs; kdops/_loss_portable.py derives the formulas this kernel evaluates. In z-space the
direction is a = (vs − us zs)/τs on the student and b = (vt − ut zt)/τt on the teacher, and
the divergence's Hessian-vector product (H_s, H_t) in that direction (kdops/_divergences.py)
gives every output:

    ∂Φ/∂gD = ⟨a, ∂D/∂zs⟩ + ⟨b, ∂D/∂zt⟩             ∂Φ/∂gCE = ⟨vs, softmax(s)⟩ − vs[y]
    ∂Φ/∂s  = (gD/τs) H_s − (us/τs) gs + gCE p ⊙ (vs − ⟨p, vs⟩),  p = softmax(s)
    ∂Φ/∂t  = (gD/τt) H_t − (ut/τt) gt
    ∂Φ/∂τs = −(gD/τs) ⟨H_s, zs⟩ − (1/τs) ⟨vs − 2 us zs, gs⟩      (and ∂Φ/∂τt alike)

with gs = (gD/τs) ∂D/∂zs, gt = (gD/τt) ∂D/∂zt.
"""
import triton
import triton.language as tl

from .rows import (block_cols, block_log_probs, div, hard_probs, jsd_logs, load_rows,
                   load_stats, row_tile, row_validity, store_rounded)


@triton.jit
def _direction(v_ptr, v_stride, rows, cols, mask, u, z, tau, HAS_V: tl.constexpr,
               HAS_U: tl.constexpr):
    """(v in the compute dtype, the z-space direction (v − u z)/τ); missing v or u are 0."""
    if HAS_V:
        vv = tl.load(v_ptr + rows[:, None] * v_stride + cols[None, :], mask=mask, other=0.0)
        vv = vv.to(tau.dtype)
    else:
        vv = tl.zeros_like(z)
    if HAS_U:
        d = vv - u[:, None] * z
    else:
        d = vv
    return vv, div(d, tau[:, None])


@triton.jit
def _kl_hvp(lx, ly, px, py, dx, dy, d, px_dx, px_dy, py_dy, gx_dx):
    """KL(P‖Q) with P = softmax(x): (H_x, H_y, ∂D/∂x, ∂D/∂y) of one block, given the row
    sums D = ⟨P, A⟩, ⟨P, dx⟩, ⟨P, dy⟩, ⟨Q, dy⟩ and ⟨∂D/∂x, dx⟩, A = log P − log Q:
        H_x = P ⊙ (c ⊙ (A − D + 1) − ⟨∂D/∂x, dx⟩ − dy + ⟨P, dy⟩),  c = dx − ⟨P, dx⟩
        H_y = Q ⊙ (dy − ⟨Q, dy⟩) − P ⊙ c"""
    ratio = (lx - ly) - d[:, None]
    c = dx - px_dx[:, None]
    hx = px * (c * (ratio + 1.0) - gx_dx[:, None] - dy + px_dy[:, None])
    hy = py * (dy - py_dy[:, None]) - px * c
    return hx, hy, px * ratio, py - px


@triton.jit
def _jsd_parts(ps, pt, e_s, e_t, a, b, beta, ps_a, pt_b):
    """Centred directions da, db and the JSD's de_s, de_t = (da, db) − ṁ/m."""
    da = a - ps_a[:, None]
    db = b - pt_b[:, None]
    r = beta * tl.exp(e_t) * db + (1.0 - beta) * tl.exp(e_s) * da
    return da, db, da - r, db - r


@triton.jit
def kd_double_backward_kernel(
    vs_ptr, vt_ptr, us_ptr, ut_ptr, vs_stride, vt_stride, gd_ptr, gd_stride, gce_ptr,
    gce_stride, s_ptr, t_ptr, s_stride, t_stride, tau_s_ptr, tau_s_stride, tau_t_ptr,
    tau_t_stride, labels_ptr, stats_ptr, beta_ptr,
    d_gd_ptr, d_gce_ptr, d_s_ptr, d_t_ptr, d_ts_ptr, d_tt_ptr, n, v, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, WITH_CE: tl.constexpr,
    HAS_VS: tl.constexpr, HAS_VT: tl.constexpr, HAS_US: tl.constexpr, HAS_UT: tl.constexpr,
    NEED_GD: tl.constexpr, NEED_GCE: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    NEED_TAU_S: tl.constexpr, NEED_TAU_T: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, LOWEST: tl.constexpr, ALTERNATE: tl.constexpr,
):
    """Passes over the row: the KLs gather their row sums in one pass (⟨∂D/∂x, dx⟩ as
    ⟨P ⊙ A, dx⟩ − D ⟨P, dx⟩) and write in a second; the JSD needs the centred directions
    before its second set of sums, so it takes three. Where ALTERNATE, each pass walks the
    row the other way from the one before (`rows.block_cols`)."""
    rows, row_ok = row_tile(n, ROWS)
    valid, label = row_validity(labels_ptr, rows, row_ok, ignore_index, HAS_LABELS)
    tau_s = load_rows(tau_s_ptr, tau_s_stride, rows, row_ok)
    tau_t = load_rows(tau_t_ptr, tau_t_stride, rows, row_ok)
    g_d = tl.where(valid, load_rows(gd_ptr, gd_stride, rows, row_ok), 0.0)
    ms, mt, log_ss, log_st, m1, log_s1 = load_stats(stats_ptr, n, rows, row_ok)
    beta = tl.load(beta_ptr).to(tau_s.dtype)
    zero = tl.zeros([ROWS], dtype=tau_s.dtype)
    us = zero
    ut = zero
    if HAS_US:
        us = load_rows(us_ptr, 1, rows, row_ok).to(tau_s.dtype)
    if HAS_UT:
        ut = load_rows(ut_ptr, 1, rows, row_ok).to(tau_s.dtype)
    coef_s = div(g_d, tau_s)
    coef_t = div(g_d, tau_t)
    # Pass 1: sums that need only probabilities and directions.
    d = zero       # KL: D = ⟨P, A⟩; JSD: ⟨ps, e_s⟩
    pa_dx = zero   # KL: ⟨P ⊙ A, dx⟩; JSD: ⟨pt, e_t⟩
    px_dx = zero   # KL: ⟨P, dx⟩; JSD: ⟨ps, a⟩
    px_dy = zero   # KL: ⟨P, dy⟩; JSD: ⟨pt, b⟩
    py_dy = zero   # KL: ⟨Q, dy⟩
    p1_vs = zero   # ⟨softmax(s), vs⟩ for the cross-entropy terms
    for start in range(0, v, BLOCK_V):
        cols = block_cols(start, v, BLOCK_V, False)
        mask, ls, ps, zs, lt, pt, zt = block_log_probs(
            s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, cols, v, tau_s, tau_t,
            ms, mt, log_ss, log_st, LOWEST)
        vs, a = _direction(vs_ptr, vs_stride, rows, cols, mask, us, zs, tau_s, HAS_VS, HAS_US)
        _, b = _direction(vt_ptr, vt_stride, rows, cols, mask, ut, zt, tau_t, HAS_VT, HAS_UT)
        if KIND == 0:
            pa = pt * (lt - ls)
            d += tl.sum(pa, 1)
            pa_dx += tl.sum(pa * b, 1)
            px_dx += tl.sum(pt * b, 1)
            px_dy += tl.sum(pt * a, 1)
            py_dy += tl.sum(ps * a, 1)
        elif KIND == 1:
            pa = ps * (ls - lt)
            d += tl.sum(pa, 1)
            pa_dx += tl.sum(pa * a, 1)
            px_dx += tl.sum(ps * a, 1)
            px_dy += tl.sum(ps * b, 1)
            py_dy += tl.sum(pt * b, 1)
        else:
            e_s, e_t = jsd_logs(ls, lt, beta)
            d += tl.sum(ps * e_s, 1)
            pa_dx += tl.sum(pt * e_t, 1)
            px_dx += tl.sum(ps * a, 1)
            px_dy += tl.sum(pt * b, 1)
        if WITH_CE and HAS_VS:
            p1_vs += tl.sum(vs * hard_probs(s_ptr, s_stride, rows, cols, mask, m1, log_s1), 1)
    # JSD pass 2: sums over the centred directions.
    dps_es = zero
    ps_des = zero
    dpt_et = zero
    pt_det = zero
    directional = zero
    if KIND == 2:
        for start in range(0, v, BLOCK_V):
            cols = block_cols(start, v, BLOCK_V, ALTERNATE)
            mask, ls, ps, zs, lt, pt, zt = block_log_probs(
                s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, cols, v, tau_s, tau_t,
                ms, mt, log_ss, log_st, LOWEST)
            _, a = _direction(vs_ptr, vs_stride, rows, cols, mask, us, zs, tau_s, HAS_VS,
                              HAS_US)
            _, b = _direction(vt_ptr, vt_stride, rows, cols, mask, ut, zt, tau_t, HAS_VT,
                              HAS_UT)
            e_s, e_t = jsd_logs(ls, lt, beta)
            da, db, de_s, de_t = _jsd_parts(ps, pt, e_s, e_t, a, b, beta, px_dx, px_dy)
            dps_es += tl.sum(ps * da * e_s, 1)
            ps_des += tl.sum(ps * de_s, 1)
            dpt_et += tl.sum(pt * db * e_t, 1)
            pt_det += tl.sum(pt * de_t, 1)
            directional += tl.sum(a * ((1.0 - beta) * ps * (e_s - d[:, None])) +
                                  b * (beta * pt * (e_t - pa_dx[:, None])), 1)
    else:
        gx_dx = pa_dx - d * px_dx
        directional = gx_dx + (py_dy - px_dy)
    # Last pass: the [N, V] outputs and the temperature sums.
    if WITH_CE:
        g_ce = tl.where(valid, load_rows(gce_ptr, gce_stride, rows, row_ok), 0.0)
    dot_hs = zero
    dot_ws = zero
    dot_ht = zero
    dot_wt = zero
    if NEED_S or NEED_T or NEED_TAU_S or NEED_TAU_T:
        for start in range(0, v, BLOCK_V):
            cols = block_cols(start, v, BLOCK_V, ALTERNATE and KIND != 2)
            mask, ls, ps, zs, lt, pt, zt = block_log_probs(
                s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, cols, v, tau_s, tau_t,
                ms, mt, log_ss, log_st, LOWEST)
            vs, a = _direction(vs_ptr, vs_stride, rows, cols, mask, us, zs, tau_s, HAS_VS,
                               HAS_US)
            vt, b = _direction(vt_ptr, vt_stride, rows, cols, mask, ut, zt, tau_t, HAS_VT,
                               HAS_UT)
            if KIND == 0:
                ht, hs, g_t, g_s = _kl_hvp(lt, ls, pt, ps, b, a, d, px_dx, px_dy, py_dy, gx_dx)
            elif KIND == 1:
                hs, ht, g_s, g_t = _kl_hvp(ls, lt, ps, pt, a, b, d, px_dx, px_dy, py_dy, gx_dx)
            else:
                e_s, e_t = jsd_logs(ls, lt, beta)
                da, db, de_s, de_t = _jsd_parts(ps, pt, e_s, e_t, a, b, beta, px_dx, px_dy)
                cs = e_s - d[:, None]
                ct = e_t - pa_dx[:, None]
                hs = (1.0 - beta) * (ps * da * cs + ps * (de_s - (dps_es + ps_des)[:, None]))
                ht = beta * (pt * db * ct + pt * (de_t - (dpt_et + pt_det)[:, None]))
                g_s = (1.0 - beta) * ps * cs
                g_t = beta * pt * ct
            out = rows[:, None] * v + cols[None, :]
            hs = coef_s[:, None] * hs
            ht = coef_t[:, None] * ht
            g_s = coef_s[:, None] * g_s
            g_t = coef_t[:, None] * g_t
            if NEED_S:
                ds = hs
                if HAS_US:
                    ds -= div(us, tau_s)[:, None] * g_s
                if WITH_CE and HAS_VS:
                    p1 = hard_probs(s_ptr, s_stride, rows, cols, mask, m1, log_s1)
                    ds += g_ce[:, None] * p1 * (vs - p1_vs[:, None])
                ds = tl.where(valid[:, None], ds, 0.0)
                store_rounded(d_s_ptr + out, ds, mask)
            if NEED_T:
                dt = ht
                if HAS_UT:
                    dt -= div(ut, tau_t)[:, None] * g_t
                dt = tl.where(valid[:, None], dt, 0.0)
                store_rounded(d_t_ptr + out, dt, mask)
            if NEED_TAU_S:
                dot_hs += tl.sum(hs * zs, 1)
                dot_ws += tl.sum((vs - 2.0 * us[:, None] * zs) * g_s, 1)
            if NEED_TAU_T:
                dot_ht += tl.sum(ht * zt, 1)
                dot_wt += tl.sum((vt - 2.0 * ut[:, None] * zt) * g_t, 1)
    if NEED_GD:
        tl.store(d_gd_ptr + rows, tl.where(valid, directional, 0.0), mask=row_ok)
    if NEED_GCE:
        if WITH_CE and HAS_VS:
            v_y = tl.load(vs_ptr + rows * vs_stride + label, mask=valid, other=0.0)
            tl.store(d_gce_ptr + rows, tl.where(valid, p1_vs - v_y.to(tau_s.dtype), 0.0),
                     mask=row_ok)
        else:
            tl.store(d_gce_ptr + rows, zero, mask=row_ok)
    if NEED_TAU_S:
        tl.store(d_ts_ptr + rows, tl.where(valid, -dot_hs - div(dot_ws, tau_s), 0.0),
                 mask=row_ok)
    if NEED_TAU_T:
        tl.store(d_tt_ptr + rows, tl.where(valid, -dot_ht - div(dot_wt, tau_t), 0.0),
                 mask=row_ok)
