"""Per-row divergence math in z-space (z = logits / temperature), in plain tensor ops.

Every function takes a block of rows ([R, V] tensors in the compute dtype, probabilities and
log-probabilities already formed) and returns the per-row value, the gradient with respect to
the student/teacher z, or the Hessian-vector product of the divergence in a direction
(a on z_student, b on z_teacher). Temperatures, scales, labels and reductions are applied by
the caller (`kdops._loss_portable`); native kernels compute exactly these formulas.

Zero-probability entries (``-inf`` logits, masked vocabulary) contribute exactly zero and never
NaN: every product with a log-probability is guarded by ``p == 0`` (not ``p > 0``, so that a NaN
probability stays NaN). Directions a, b must already be zero where the matching p is zero.
"""
from __future__ import annotations


import torch
from torch import Tensor


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise inner product of two [R, V] tensors -> [R, 1] (kept 2-D for broadcasting)."""
    return (x * y).sum(-1, keepdim=True)


class KLDivergence:
    """D = KL(P‖Q) = Σ P (log P − log Q), P = softmax(x), Q = softmax(y).

    Forward KL (Hinton) is x = teacher, y = student; reverse KL swaps them.

        ∂D/∂x = P ⊙ (A − D),  A = log P − log Q
        ∂D/∂y = Q − P
        HVP in direction (dx, dy), with c = dx − ⟨P, dx⟩:
            H_x = P ⊙ (c ⊙ (A − D + 1) − ⟨∂D/∂x, dx⟩ − dy + ⟨P, dy⟩)
            H_y = Q ⊙ (dy − ⟨Q, dy⟩) − P ⊙ c
    """

    def __init__(self, p_is_teacher: bool):
        self.p_is_teacher = p_is_teacher

    def _p(self, rows) -> Tensor:
        return rows.pt if self.p_is_teacher else rows.ps

    def _q(self, rows) -> Tensor:
        return rows.ps if self.p_is_teacher else rows.pt

    def _swap(self, d_student, d_teacher):
        """Map (d_x, d_y) <-> (d_student, d_teacher)."""
        return (d_teacher, d_student) if self.p_is_teacher else (d_student, d_teacher)

    def _terms(self, rows):
        """(A [R, V], D [R, 1]) of a block, formed once per block and only where used: the
        value needs P but not Q, the gradient to y needs neither A nor D."""
        key = ("kl", self.p_is_teacher)
        if key not in rows.memo:
            log_ratio = rows.logpt - rows.logps if self.p_is_teacher else rows.logps - rows.logpt
            rows.memo[key] = (log_ratio, _dot(self._p(rows), log_ratio))
        return rows.memo[key]

    def value(self, rows) -> Tensor:
        return self._terms(rows)[1].squeeze(-1)

    def grads(self, rows, need_student: bool, need_teacher: bool):
        """(∂D/∂z_student, ∂D/∂z_teacher); an entry is None when not needed."""
        need_x, need_y = self._swap(need_student, need_teacher)
        gx = gy = None
        if need_x:
            log_ratio, value = self._terms(rows)
            gx = self._p(rows) * (log_ratio - value)
        if need_y:
            gy = self._q(rows) - self._p(rows)
        return self._swap(gx, gy)

    def hvp(self, rows, a: Tensor, b: Tensor):
        """(⟨a, ∂D/∂zs⟩ + ⟨b, ∂D/∂zt⟩ per row, H_student, H_teacher, ∂D/∂zs, ∂D/∂zt)."""
        p, q = self._p(rows), self._q(rows)
        log_ratio, value = self._terms(rows)
        dx, dy = self._swap(a, b)
        ratio = log_ratio - value
        gx, gy = p * ratio, q - p
        gx_dx = _dot(gx, dx)
        c = dx - _dot(p, dx)
        hx = p * (c * (ratio + 1) - gx_dx - dy + _dot(p, dy))
        hy = q * (dy - _dot(q, dy)) - p * c
        directional = (gx_dx + _dot(gy, dy)).squeeze(-1)
        return (directional, *self._swap(hx, hy), *self._swap(gx, gy))


class JensenShannon:
    """Generalized JSD for 0 < β < 1 (TRL / Liger convention; β = 0, 1 are KL and reverse KL).

        m = β pt + (1 − β) ps,  e_s = log ps − log m,  e_t = log pt − log m
        D = β Σ pt e_t + (1 − β) Σ ps e_s
        ∂D/∂zs = (1 − β) ps ⊙ (e_s − ⟨ps, e_s⟩),  ∂D/∂zt = β pt ⊙ (e_t − ⟨pt, e_t⟩)
        HVP in direction (a, b): with ṗs = ps ⊙ (a − ⟨ps, a⟩), ṗt = pt ⊙ (b − ⟨pt, b⟩),
            r = ṁ / m = w_t (b − ⟨pt, b⟩) + w_s (a − ⟨ps, a⟩),
            w_s = (1 − β) ps / m = (1 − β) exp(e_s),  w_t = β pt / m = β exp(e_t),
            de_s = a − ⟨ps, a⟩ − r,  de_t = b − ⟨pt, b⟩ − r,
            H_s = (1 − β) [ṗs ⊙ (e_s − ⟨ps, e_s⟩) + ps ⊙ (de_s − ⟨ṗs, e_s⟩ − ⟨ps, de_s⟩)]
            H_t = β [ṗt ⊙ (e_t − ⟨pt, e_t⟩) + pt ⊙ (de_t − ⟨ṗt, e_t⟩ − ⟨pt, de_t⟩)]

    e_s and e_t come from d = log pt − log ps without forming m: log m − log ps =
    log1p(β expm1(d)) for d ≤ 0 and d + log1p((1 − β) expm1(−d)) for d > 0. Both branches are
    free of overflow and cancellation, and the divergence is exactly 0 where ps = pt. They are
    one expression, y = −log1p(c expm1(−|d|)) with c = β or 1 − β, evaluated once per entry.
    """

    def __init__(self, beta: float):
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JensenShannon needs 0 < beta < 1, got {beta}")
        self.beta = beta

    def _logs(self, rows):
        """(e_s, e_t), computed once per block."""
        if "jsd" not in rows.memo:
            rows.memo["jsd"] = self._compute_logs(rows)
        return rows.memo["jsd"]

    def _compute_logs(self, rows):
        d = rows.logpt - rows.logps
        below = d <= 0
        c = torch.full_like(d, 1.0 - self.beta).masked_fill_(below, self.beta)
        y = -torch.log1p(c * torch.expm1(-d.abs()))
        return torch.where(below, y, y - d), torch.where(below, y + d, y)

    def value(self, rows) -> Tensor:
        e_s, e_t = self._logs(rows)
        return self.beta * (rows.pt * e_t).sum(-1) + (1.0 - self.beta) * (rows.ps * e_s).sum(-1)

    def grads(self, rows, need_student: bool, need_teacher: bool):
        e_s, e_t = self._logs(rows)
        gs = (1.0 - self.beta) * rows.ps * (e_s - _dot(rows.ps, e_s)) if need_student else None
        gt = self.beta * rows.pt * (e_t - _dot(rows.pt, e_t)) if need_teacher else None
        return gs, gt

    def hvp(self, rows, a: Tensor, b: Tensor):
        beta = self.beta
        ps, pt = rows.ps, rows.pt
        e_s, e_t = self._logs(rows)
        centred_s = e_s - _dot(ps, e_s)
        centred_t = e_t - _dot(pt, e_t)
        da = a - _dot(ps, a)
        db = b - _dot(pt, b)
        dps, dpt = ps * da, pt * db
        w_s, w_t = (1.0 - beta) * e_s.exp(), beta * e_t.exp()
        r = w_t * db + w_s * da
        de_s, de_t = da - r, db - r
        h_s = (1.0 - beta) * (dps * centred_s + ps * (de_s - _dot(dps, e_s) - _dot(ps, de_s)))
        h_t = beta * (dpt * centred_t + pt * (de_t - _dot(dpt, e_t) - _dot(pt, de_t)))
        g_s, g_t = (1.0 - beta) * ps * centred_s, beta * pt * centred_t
        directional = _dot(a, g_s) + _dot(b, g_t)
        return directional.squeeze(-1), h_s, h_t, g_s, g_t


def make_divergence(name: str, beta: float):
    """The divergence object for an op's (divergence, beta) arguments.

    ``jsd`` with β = 0 is forward KL and with β = 1 reverse KL, exactly (TRL's convention).
    """
    if name == "kl" or (name == "jsd" and beta == 0.0):
        return KLDivergence(p_is_teacher=True)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return KLDivergence(p_is_teacher=False)
    if name == "jsd":
        return JensenShannon(beta)
    raise ValueError(f"unknown divergence {name!r}; expected 'kl', 'reverse_kl' or 'jsd'")
