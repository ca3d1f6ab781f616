"""Triton kernel of kdops::kd_backward: gradients to the logits and temperatures."""
import triton
import triton.language as tl

from .rows import (block_cols, block_log_probs, div, divergence_sums, hard_probs, jsd_logs,
                   load_rows, load_stats, row_tile, row_validity, store_rounded)


@triton.jit
def _side_grads(ls, lt, ps, pt, beta, mean_s, mean_t, KIND: tl.constexpr):
    """(∂D/∂zs, ∂D/∂zt) of one block, given the row means the divergence needs:
    KL(pt‖ps): ps − pt and pt ⊙ (A − D), A = log pt − log ps, mean_t = D;
    KL(ps‖pt): the mirror image, mean_s = D;
    JSD: (1 − β) ps ⊙ (e_s − ⟨ps, e_s⟩) and β pt ⊙ (e_t − ⟨pt, e_t⟩) (see rows.jsd_logs)."""
    if KIND == 0:
        dzs = ps - pt
        dzt = pt * ((lt - ls) - mean_t[:, None])
    elif KIND == 1:
        dzs = ps * ((ls - lt) - mean_s[:, None])
        dzt = pt - ps
    else:
        e_s, e_t = jsd_logs(ls, lt, beta)
        dzs = (1.0 - beta) * ps * (e_s - mean_s[:, None])
        dzt = beta * pt * (e_t - mean_t[:, None])
    return dzs, dzt


@triton.jit
def kd_backward_kernel(
    gd_ptr, gd_stride, gce_ptr, gce_stride, s_ptr, t_ptr, s_stride, t_stride,
    tau_s_ptr, tau_s_stride, tau_t_ptr, tau_t_stride, labels_ptr, stats_ptr, beta_ptr,
    gs_ptr, gt_ptr, gts_ptr, gtt_ptr, n, v, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, WITH_CE: tl.constexpr,
    NEED_S: tl.constexpr, NEED_T: tl.constexpr, NEED_TAU_S: tl.constexpr,
    NEED_TAU_T: tl.constexpr, MEANS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    LOWEST: tl.constexpr, ALTERNATE: tl.constexpr,
):
    """With gD, gCE the per-row cotangents (zero on ignored rows):

        ∂/∂s  = (gD/τs) ∂D/∂zs + gCE (softmax(s) − onehot(y))    ∂/∂t = (gD/τt) ∂D/∂zt
        ∂/∂τs = −(gD/τs) ⟨∂D/∂zs, zs⟩                            ∂/∂τt = −(gD/τt) ⟨∂D/∂zt, zt⟩

    (z shifted by its row max; the divergences are shift-invariant). A first pass gathers
    the row means of `_side_grads` where a requested output needs them (the KL side that
    carries P, both JSD sides: MEANS); a second writes the gradients and sums the τ
    products (backward along the row after a first pass where ALTERNATE: `rows.block_cols`).
    """
    rows, row_ok = row_tile(n, ROWS)
    valid, label = row_validity(labels_ptr, rows, row_ok, ignore_index, HAS_LABELS)
    tau_s = load_rows(tau_s_ptr, tau_s_stride, rows, row_ok)
    tau_t = load_rows(tau_t_ptr, tau_t_stride, rows, row_ok)
    g_d = tl.where(valid, load_rows(gd_ptr, gd_stride, rows, row_ok), 0.0)
    ms, mt, log_ss, log_st, m1, log_s1 = load_stats(stats_ptr, n, rows, row_ok)
    beta = tl.load(beta_ptr).to(tau_s.dtype)
    coef_s = div(g_d, tau_s)
    coef_t = div(g_d, tau_t)
    zero = tl.zeros([ROWS], dtype=tau_s.dtype)
    mean_s = zero
    mean_t = zero
    if MEANS:
        mean_s, mean_t = divergence_sums(s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, v,
                                         tau_s, tau_t, ms, mt, log_ss, log_st, beta, KIND, ROWS,
                                         BLOCK_V, LOWEST, False)
    if WITH_CE:
        g_ce = tl.where(valid, load_rows(gce_ptr, gce_stride, rows, row_ok), 0.0)
    dot_s = zero
    dot_t = zero
    for start in range(0, v, BLOCK_V):
        cols = block_cols(start, v, BLOCK_V, ALTERNATE and MEANS)
        mask, ls, ps, zs, lt, pt, zt = block_log_probs(
            s_ptr, t_ptr, s_stride, t_stride, rows, row_ok, cols, v, tau_s, tau_t,
            ms, mt, log_ss, log_st, LOWEST)
        dzs, dzt = _side_grads(ls, lt, ps, pt, beta, mean_s, mean_t, KIND)
        out = rows[:, None] * v + cols[None, :]
        if NEED_S:
            gs = coef_s[:, None] * dzs
            if WITH_CE:
                gs += g_ce[:, None] * hard_probs(s_ptr, s_stride, rows, cols, mask, m1, log_s1)
                gs -= tl.where(cols[None, :] == label[:, None], g_ce[:, None], 0.0)
            gs = tl.where(valid[:, None], gs, 0.0)
            store_rounded(gs_ptr + out, gs, mask)
        if NEED_T:
            gt = tl.where(valid[:, None], coef_t[:, None] * dzt, 0.0)
            store_rounded(gt_ptr + out, gt, mask)
        if NEED_TAU_S:
            dot_s += tl.sum(dzs * zs, 1)
        if NEED_TAU_T:
            dot_t += tl.sum(dzt * zt, 1)
    if NEED_TAU_S:
        tl.store(gts_ptr + rows, tl.where(valid, -coef_s * dot_s, 0.0), mask=row_ok)
    if NEED_TAU_T:
        tl.store(gtt_ptr + rows, tl.where(valid, -coef_t * dot_t, 0.0), mask=row_ok)
