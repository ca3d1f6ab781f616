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

`-inf` logits are treated as z = 0 inside inner products with z (their probability, and so
every gradient entry that multiplies them, is exactly zero).
"""
from __future__ import annotations

from functools import cached_property
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ._divergences import make_divergence

BLOCK_ELEMENTS = 1 << 16


def _row_blocks(n: int, v: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // max(v, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _zero_neg_inf(z: Tensor) -> Tensor:
    return torch.where(torch.isneginf(z), 0.0, z)


class _Block:
    """Scaled logits and softmax statistics of one block of rows; probabilities formed lazily."""

    def __init__(self, zs: Tensor, zt: Tensor, logps: Tensor, logpt: Tensor):
        self.zs, self.zt, self.logps, self.logpt = zs, zt, logps, logpt

    @classmethod
    def from_lse(cls, student, teacher, tau_s, tau_t, lse_s, lse_t, rows):
        zs = student[rows] / tau_s[rows, None]
        zt = teacher[rows] / tau_t[rows, None]
        return cls(zs, zt, zs - lse_s[rows, None], zt - lse_t[rows, None])

    @cached_property
    def ps(self) -> Tensor:
        return self.logps.exp()

    @cached_property
    def pt(self) -> Tensor:
        return self.logpt.exp()

    @cached_property
    def zs_safe(self) -> Tensor:
        return _zero_neg_inf(self.zs)

    @cached_property
    def zt_safe(self) -> Tensor:
        return _zero_neg_inf(self.zt)


def _log_softmax_lse(z: Tensor):
    """(log softmax(z), logsumexp(z)) per row, from one fused log_softmax.

    At the row maximum, log_softmax is exactly −log Σ exp(z − max), so max(z) − max(logp) is
    the logsumexp rounded once, as torch.logsumexp computes it.
    """
    logp = torch.log_softmax(z, dim=-1)
    return logp, z.amax(-1) - logp.amax(-1)


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


def _out(flag: bool, like: Tensor, shape, dtype) -> Tensor:
    return like.new_empty(shape, dtype=dtype) if flag else like.new_empty(0, dtype=dtype)


def kd_forward(student: Tensor, teacher: Tensor, tau_s: Tensor, tau_t: Tensor,
               labels: Optional[Tensor], ignore_index: int, divergence: str, beta: float,
               with_ce: bool):
    n, v = student.shape
    cdt = tau_s.dtype
    div = make_divergence(divergence, beta)
    lab = _Labels(labels, ignore_index)
    d_out, lse_s, lse_t = (student.new_empty(n, dtype=cdt) for _ in range(3))
    ce_out, lse_ce = (student.new_zeros(n, dtype=cdt) for _ in range(2))
    for rows in _row_blocks(n, v):
        zs = student[rows] / tau_s[rows, None]
        zt = teacher[rows] / tau_t[rows, None]
        logps, lse_s[rows] = _log_softmax_lse(zs)
        logpt, lse_t[rows] = _log_softmax_lse(zt)
        d_out[rows] = lab.mask_rows(div.value(_Block(zs, zt, logps, logpt)), rows)
        if with_ce:
            s1 = student[rows].to(cdt)
            lse_ce[rows] = torch.logsumexp(s1, dim=-1)
            ce_out[rows] = lab.mask_rows(lse_ce[rows] - lab.gather(s1, rows), rows)
    return d_out, ce_out, lse_s, lse_t, lse_ce


def kd_backward(grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                tau_s: Tensor, tau_t: Tensor, labels: Optional[Tensor], lse_s: Tensor,
                lse_t: Tensor, lse_ce: Tensor, ignore_index: int, divergence: str, beta: float,
                with_ce: bool, output_mask: Sequence[bool]):
    need_s, need_t, need_tau_s, need_tau_t = output_mask
    n, v = student.shape
    cdt = tau_s.dtype
    div = make_divergence(divergence, beta)
    lab = _Labels(labels, ignore_index)
    gs_out = _out(need_s, student, (n, v), student.dtype)
    gt_out = _out(need_t, teacher, (n, v), teacher.dtype)
    gts_out = _out(need_tau_s, tau_s, n, cdt)
    gtt_out = _out(need_tau_t, tau_t, n, cdt)
    for rows in _row_blocks(n, v):
        blk = _Block.from_lse(student, teacher, tau_s, tau_t, lse_s, lse_t, rows)
        g_d = lab.mask_rows(grad_div[rows], rows)
        coef_s, coef_t = g_d / tau_s[rows], g_d / tau_t[rows]
        value = div.value(blk)
        dzs, dzt = div.grads(blk, value, need_s or need_tau_s, need_t or need_tau_t)
        if need_s:
            gs = coef_s[:, None] * dzs
            if with_ce:
                gs = gs + _ce_grad(student, lse_ce, lab, grad_ce, rows)
            gs_out[rows] = lab.mask_rows(gs, rows)
        if need_t:
            gt_out[rows] = lab.mask_rows(coef_t[:, None] * dzt, rows)
        if need_tau_s:
            gts_out[rows] = -coef_s * (dzs * blk.zs_safe).sum(-1)
        if need_tau_t:
            gtt_out[rows] = -coef_t * (dzt * blk.zt_safe).sum(-1)
    return gs_out, gt_out, gts_out, gtt_out


def _ce_probs(student: Tensor, lse_ce: Tensor, rows: slice) -> Tensor:
    return (student[rows].to(lse_ce.dtype) - lse_ce[rows, None]).exp()


def _ce_grad(student, lse_ce, lab: _Labels, grad_ce, rows) -> Tensor:
    """gCE (softmax(s) − onehot(y)) for one block, ignored rows' cotangent zeroed."""
    g_ce = lab.mask_rows(grad_ce[rows], rows)[:, None]
    grad = g_ce * _ce_probs(student, lse_ce, rows)
    return grad.scatter_add(1, lab.safe[rows, None], -g_ce)


def kd_double_backward(v_student: Optional[Tensor], v_teacher: Optional[Tensor],
                       v_tau_s: Optional[Tensor], v_tau_t: Optional[Tensor],
                       grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                       tau_s: Tensor, tau_t: Tensor, labels: Optional[Tensor], lse_s: Tensor,
                       lse_t: Tensor, lse_ce: Tensor, ignore_index: int, divergence: str,
                       beta: float, with_ce: bool, output_mask: Sequence[bool]):
    need_gd, need_gce, need_s, need_t, need_tau_s, need_tau_t = output_mask
    n, v = student.shape
    cdt = tau_s.dtype
    div = make_divergence(divergence, beta)
    lab = _Labels(labels, ignore_index)
    outs = (
        _out(need_gd, grad_div, n, cdt),
        _out(need_gce, grad_ce, n, cdt),
        _out(need_s, student, (n, v), student.dtype),
        _out(need_t, teacher, (n, v), teacher.dtype),
        _out(need_tau_s, tau_s, n, cdt),
        _out(need_tau_t, tau_t, n, cdt),
    )
    zeros_nv = None
    for rows in _row_blocks(n, v):
        blk = _Block.from_lse(student, teacher, tau_s, tau_t, lse_s, lse_t, rows)
        if zeros_nv is None or zeros_nv.shape != blk.zs.shape:
            zeros_nv = torch.zeros_like(blk.zs)
        ts, tt = tau_s[rows, None], tau_t[rows, None]
        vs = zeros_nv if v_student is None else v_student[rows].to(cdt)
        vt = zeros_nv if v_teacher is None else v_teacher[rows].to(cdt)
        us = 0.0 if v_tau_s is None else v_tau_s[rows, None]
        ut = 0.0 if v_tau_t is None else v_tau_t[rows, None]
        g_d = lab.mask_rows(grad_div[rows], rows)[:, None]
        value = div.value(blk)
        a = (vs - us * blk.zs_safe) / ts
        b = (vt - ut * blk.zt_safe) / tt
        directional, h_s, h_t = div.hvp(blk, value, a, b)
        dzs, dzt = div.grads(blk, value, True, True)
        gs, gt = g_d / ts * dzs, g_d / tt * dzt
        if need_gd:
            outs[0][rows] = lab.mask_rows(directional, rows)
        if need_gce or need_s:
            p = _ce_probs(student, lse_ce, rows) if with_ce else None
        if need_gce:
            dot = (vs * p).sum(-1) - lab.gather(vs, rows) if with_ce else zeros_nv[:, 0]
            outs[1][rows] = lab.mask_rows(dot, rows)
        if need_s:
            d_s = g_d / ts * h_s - us / ts * gs
            if with_ce:
                g_ce = lab.mask_rows(grad_ce[rows], rows)[:, None]
                d_s = d_s + g_ce * p * (vs - (p * vs).sum(-1, keepdim=True))
            outs[2][rows] = lab.mask_rows(d_s, rows)
        if need_t:
            outs[3][rows] = lab.mask_rows(g_d / tt * h_t - ut / tt * gt, rows)
        if need_tau_s:
            outs[4][rows] = (-(g_d / ts * h_s * blk.zs_safe).sum(-1, keepdim=True)
                             - ((vs - 2 * us * blk.zs_safe) * gs).sum(-1, keepdim=True) / ts
                             ).squeeze(-1)
        if need_tau_t:
            outs[5][rows] = (-(g_d / tt * h_t * blk.zt_safe).sum(-1, keepdim=True)
                             - ((vt - 2 * ut * blk.zt_safe) * gt).sum(-1, keepdim=True) / tt
                             ).squeeze(-1)
    return outs
