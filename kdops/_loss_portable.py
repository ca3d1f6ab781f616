"""Portable implementation of the kdops loss ops: vectorized tensor ops, chunked over rows.

This is the device-independent implementation registered for every backend
(CompositeExplicitAutograd); native kernels registered for a device key take precedence.
Rows are processed in blocks of about `BLOCK_ELEMENTS` elements, so no temporary grows with N:
the only [N, V] tensors allocated are the outputs.

Notation (per row): zs = s / τs, zt = t / τt, ps = softmax(zs), pt = softmax(zt); the caller's
per-row cotangents are gD (on the divergence) and gCE (on the hard-label cross-entropy at T = 1).
The gradient of a row is

    ∂/∂s = (gD / τs) ∂D/∂zs + gCE (softmax(s) − onehot(y))       ∂/∂t = (gD / τt) ∂D/∂zt
    ∂/∂τs = −(gD / τs) ⟨∂D/∂zs, zs⟩                              ∂/∂τt = −(gD / τt) ⟨∂D/∂zt, zt⟩

and the second-order op differentiates Φ = ⟨vs, ∂/∂s⟩ + ⟨vt, ∂/∂t⟩ + us ∂/∂τs + ut ∂/∂τt.
With a = (vs − us zs) / τs, b = (vt − ut zt) / τt and the divergence's HVP (H, Hs, Ht) in
direction (a, b) (see `_divergences`), gs = (gD / τs) ∂D/∂zs, gt = (gD / τt) ∂D/∂zt:

    ∂Φ/∂gD  = H                                ∂Φ/∂gCE = ⟨vs, softmax(s)⟩ − vs[y]
    ∂Φ/∂s   = (gD / τs) Hs − (us / τs) gs + gCE p ⊙ (vs − ⟨p, vs⟩),  p = softmax(s)
    ∂Φ/∂t   = (gD / τt) Ht − (ut / τt) gt
    ∂Φ/∂τs  = −(gD / τs) ⟨Hs, zs⟩ − (1 / τs) ⟨vs − 2 us zs, gs⟩
    ∂Φ/∂τt  = −(gD / τt) ⟨Ht, zt⟩ − (1 / τt) ⟨vt − 2 ut zt, gt⟩

Row statistics (``stats``, [6, N] in the compute dtype) are the row max and
log Σ exp(z − max) of zs, zt and of s at T = 1 (layout: MAX, LOGSUM, HARD below); the backward
ops recompute probabilities from them. `-inf` logits are treated as z = 0 inside inner products with z (their probability, and
so every gradient entry that multiplies them, is exactly zero).
"""
from __future__ import annotations

from functools import cached_property
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ._divergences import _dot, make_divergence

BLOCK_ELEMENTS = 1 << 16
# Rows of the [6, N] statistics: row max of (zs, zt), then log Σ exp(z − max) of (zs, zt),
# then the same pair for s at T = 1 (cross-entropy), each pair written in one go.
MAX, LOGSUM, HARD = slice(0, 2), slice(2, 4), 4


def _row_blocks(n: int, v: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // max(v, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _zero_neg_inf(z: Tensor) -> Tensor:
    return torch.where(torch.isneginf(z), 0.0, z)


def _scaled(student, teacher, tau_s, tau_t, rows) -> Tensor:
    """[2, R, V] stack of (s / τs, t / τt) for one block, in the compute dtype."""
    z = student.new_empty((2, *student[rows].shape), dtype=tau_s.dtype)
    torch.div(student[rows], tau_s[rows, None], out=z[0])
    torch.div(teacher[rows], tau_t[rows, None], out=z[1])
    return z


def _log_softmax_stats(z: Tensor):
    """(log softmax(z), row max, log Σ exp(z − max)) over the last dim.

    At the row maximum log_softmax is exactly −log Σ exp(z − max), so both statistics are
    read off the fused log_softmax without another pass of exponentials.
    """
    logp = torch.log_softmax(z, dim=-1)
    return logp, z.amax(-1), logp.amax(-1).neg_()


class _Block:
    """Max-shifted scaled logits and log-probabilities of one block, student and teacher
    stacked along a leading dim of 2.

    Probabilities are recomputed as exp((z − max) − log Σ exp(z − max)), as exact as
    log_softmax; (z − logsumexp) would lose the low bits of z when |z| is large (at |z| ~ 1e4
    one float32 ulp of the logsumexp is 1e-3 of relative error in every probability).
    Inner products of a gradient or HVP with z use the shifted z: they are invariant to the
    shift (the divergences are), and the shift removes the cancellation of a common offset.
    """

    def __init__(self, logp: Tensor, shifted: Optional[Tensor] = None):
        # Clamped at the lowest finite value: differences of log-probabilities of masked
        # entries are finite (and multiplied by p = 0), see `_divergences`.
        self.logp = logp.clamp_(min=torch.finfo(logp.dtype).min)
        self.shifted = shifted
        self.logps, self.logpt = self.logp[0], self.logp[1]
        self.memo = {}  # per-divergence intermediates, shared by value/grads/hvp

    @classmethod
    def from_stats(cls, student, teacher, tau_s, tau_t, stats, rows):
        shifted = _scaled(student, teacher, tau_s, tau_t, rows).sub_(stats[MAX, rows, None])
        return cls(shifted - stats[LOGSUM, rows, None], shifted)

    @cached_property
    def ps(self) -> Tensor:
        return self.logps.exp()

    @cached_property
    def pt(self) -> Tensor:
        return self.logpt.exp()

    @cached_property
    def z_safe(self) -> Tensor:
        """Shifted (zs, zt) with -inf entries (p = 0) set to 0."""
        return _zero_neg_inf(self.shifted)


class _Labels:
    """Row validity and safe label indices for one op call (all rows valid without labels)."""

    def __init__(self, labels: Optional[Tensor], ignore_index: int):
        self.labels = labels
        if labels is not None:
            self.valid = labels != ignore_index
            self.safe = torch.where(self.valid, labels, 0)

    def mask_rows(self, x: Tensor, rows: slice) -> Tensor:
        """x with the rows of ignored labels set to zero (x is [R] or [R, V])."""
        if self.labels is None:
            return x
        valid = self.valid[rows]
        return torch.where(valid if x.dim() == 1 else valid[:, None], x, 0.0)

    def gather(self, x: Tensor, rows: slice) -> Tensor:
        return x.gather(1, self.safe[rows, None]).squeeze(1)


def _hard_probs(student: Tensor, stats: Tensor, rows: slice) -> Tensor:
    """softmax(s) at T = 1 for one block, from the saved statistics."""
    shifted = student[rows].to(stats.dtype) - stats[HARD, rows, None]
    return shifted.sub_(stats[HARD + 1, rows, None]).exp_()


def masked_output(flag: bool, like: Tensor, shape, dtype) -> Tensor:
    """An output of the given shape, or an empty one where the output mask says not needed.

    Shared with the fake kernels in `_ops`, so both agree on the outputs' shapes."""
    return like.new_empty(shape if flag else 0, dtype=dtype)


def kd_forward(student: Tensor, teacher: Tensor, tau_s: Tensor, tau_t: Tensor,
               labels: Optional[Tensor], ignore_index: int, divergence: str, beta: float,
               with_ce: bool):
    n, v = student.shape
    cdt = tau_s.dtype
    div = make_divergence(divergence, beta)
    lab = _Labels(labels, ignore_index)
    d_out = student.new_empty(n, dtype=cdt)
    ce_out = student.new_zeros(n, dtype=cdt)
    stats = student.new_zeros(6, n, dtype=cdt)
    for rows in _row_blocks(n, v):
        logp, stats[MAX, rows], stats[LOGSUM, rows] = _log_softmax_stats(
            _scaled(student, teacher, tau_s, tau_t, rows))
        d_out[rows] = lab.mask_rows(div.value(_Block(logp)), rows)
        if with_ce:
            logp1, stats[HARD, rows], stats[HARD + 1, rows] = _log_softmax_stats(
                student[rows].to(cdt))
            ce_out[rows] = lab.mask_rows(-lab.gather(logp1, rows), rows)
    return d_out, ce_out, stats


def kd_backward(grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                tau_s: Tensor, tau_t: Tensor, labels: Optional[Tensor], stats: Tensor,
                ignore_index: int, divergence: str, beta: float, with_ce: bool,
                output_mask: Sequence[bool]):
    need_s, need_t, need_tau_s, need_tau_t = output_mask
    n, v = student.shape
    cdt = tau_s.dtype
    div = make_divergence(divergence, beta)
    lab = _Labels(labels, ignore_index)
    gs_out = masked_output(need_s, student, (n, v), student.dtype)
    gt_out = masked_output(need_t, teacher, (n, v), teacher.dtype)
    gts_out = masked_output(need_tau_s, tau_s, n, cdt)
    gtt_out = masked_output(need_tau_t, tau_t, n, cdt)
    for rows in _row_blocks(n, v):
        blk = _Block.from_stats(student, teacher, tau_s, tau_t, stats, rows)
        g_d = lab.mask_rows(grad_div[rows], rows)
        coef_s, coef_t = g_d / tau_s[rows], g_d / tau_t[rows]
        dzs, dzt = div.grads(blk, need_s or need_tau_s, need_t or need_tau_t)
        if need_s:
            gs = coef_s[:, None] * dzs
            if with_ce:
                g_ce = lab.mask_rows(grad_ce[rows], rows)[:, None]
                gs = (gs + g_ce * _hard_probs(student, stats, rows)).scatter_add(
                    1, lab.safe[rows, None], -g_ce)
            gs_out[rows] = lab.mask_rows(gs, rows)
        if need_t:
            gt_out[rows] = lab.mask_rows(coef_t[:, None] * dzt, rows)
        if need_tau_s:
            gts_out[rows] = lab.mask_rows(-coef_s * (dzs * blk.z_safe[0]).sum(-1), rows)
        if need_tau_t:
            gtt_out[rows] = lab.mask_rows(-coef_t * (dzt * blk.z_safe[1]).sum(-1), rows)
    return gs_out, gt_out, gts_out, gtt_out


def _minus_uz(v: Optional[Tensor], u: Optional[Tensor], z, k: float, zeros) -> Tensor:
    """v − k·u·z for one block, where a missing v or u is zero.

    z is a callable so the (shifted, -inf-safe) logits are only formed when u is given.
    """
    if u is None:
        return zeros() if v is None else v
    kuz = (k * u) * z()
    return -kuz if v is None else v - kuz


def kd_double_backward(v_student: Optional[Tensor], v_teacher: Optional[Tensor],
                       v_tau_s: Optional[Tensor], v_tau_t: Optional[Tensor],
                       grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                       tau_s: Tensor, tau_t: Tensor, labels: Optional[Tensor], stats: Tensor,
                       ignore_index: int, divergence: str, beta: float, with_ce: bool,
                       output_mask: Sequence[bool]):
    need_gd, need_gce, need_s, need_t, need_tau_s, need_tau_t = output_mask
    n, v = student.shape
    cdt = tau_s.dtype
    div = make_divergence(divergence, beta)
    lab = _Labels(labels, ignore_index)
    d_gd, d_gce = masked_output(need_gd, grad_div, n, cdt), masked_output(need_gce, grad_ce, n, cdt)
    d_s = masked_output(need_s, student, (n, v), student.dtype)
    d_t = masked_output(need_t, teacher, (n, v), teacher.dtype)
    d_ts, d_tt = masked_output(need_tau_s, tau_s, n, cdt), masked_output(need_tau_t, tau_t, n, cdt)
    if need_gce and not with_ce:
        d_gce.zero_()  # the cross-entropy cotangent is unused without the hard-label term
    for rows in _row_blocks(n, v):
        blk = _Block.from_stats(student, teacher, tau_s, tau_t, stats, rows)
        ts, tt = tau_s[rows, None], tau_t[rows, None]
        vs = None if v_student is None else v_student[rows].to(cdt)
        vt = None if v_teacher is None else v_teacher[rows].to(cdt)
        us = None if v_tau_s is None else v_tau_s[rows, None]
        ut = None if v_tau_t is None else v_tau_t[rows, None]
        g_d = lab.mask_rows(grad_div[rows], rows)[:, None]

        def zs_safe():
            return blk.z_safe[0]

        def zt_safe():
            return blk.z_safe[1]

        def zeros():
            return torch.zeros_like(blk.logps)

        # Direction of the HVP in z-space; a cotangent on τ acts like one on z of −u·z.
        a = _minus_uz(vs, us, zs_safe, 1.0, zeros)
        b = _minus_uz(vt, ut, zt_safe, 1.0, zeros)
        directional, h_s, h_t, dzs, dzt = div.hvp(blk, a / ts, b / tt)
        if need_gd:
            d_gd[rows] = lab.mask_rows(directional, rows)
        p1 = _hard_probs(student, stats, rows) if with_ce and vs is not None else None
        if need_gce and with_ce:
            dot = torch.zeros_like(g_d[:, 0]) if vs is None else (
                _dot(vs, p1).squeeze(-1) - lab.gather(vs, rows))
            d_gce[rows] = lab.mask_rows(dot, rows)
        if need_s or need_tau_s:
            gs = g_d / ts * dzs
        if need_t or need_tau_t:
            gt = g_d / tt * dzt
        if need_s:
            ds = g_d / ts * h_s if us is None else g_d / ts * h_s - us / ts * gs
            if p1 is not None:
                g_ce = lab.mask_rows(grad_ce[rows], rows)[:, None]
                ds = ds + g_ce * p1 * (vs - _dot(p1, vs))
            d_s[rows] = lab.mask_rows(ds, rows)
        if need_t:
            dt = g_d / tt * h_t if ut is None else g_d / tt * h_t - ut / tt * gt
            d_t[rows] = lab.mask_rows(dt, rows)
        if need_tau_s:
            w = _minus_uz(vs, us, zs_safe, 2.0, zeros)
            d_ts[rows] = lab.mask_rows(
                (-_dot(g_d / ts * h_s, zs_safe()) - _dot(w, gs) / ts).squeeze(-1), rows)
        if need_tau_t:
            w = _minus_uz(vt, ut, zt_safe, 2.0, zeros)
            d_tt[rows] = lab.mask_rows(
                (-_dot(g_d / tt * h_t, zt_safe()) - _dot(w, gt) / tt).squeeze(-1), rows)
    return d_gd, d_gce, d_s, d_t, d_ts, d_tt
