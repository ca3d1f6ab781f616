"""`fused_kd_loss(..., grad_in_forward=True)`: the logits' gradients computed in the forward.

The forward runs kd_forward and then kd_backward with the row weights the loss puts on the
divergence (alpha·c) and on the cross-entropy (1 − alpha), and keeps the per-row gradients
G_s = ∂loss_r/∂s_r (and G_t when the teacher logits require grad). The backward only scales
them by the upstream per-row gradient: ∂L/∂s = g_r · G_s. This is the trick of Liger-Kernel's
losses. It trades the backward's pass over the logits for gradients held from forward to
backward, and the logits themselves are not saved: teacher logits computed under no_grad are
freed as soon as the caller drops them. The gradient is a constant of the graph, so this mode
is first order only, and temperatures, scale and alpha must not require grad.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import _loss_ops as _ops


class _RowsWithGrad(torch.autograd.Function):
    """Per-row losses whose gradients to the logits were computed in the forward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Tensor, grad_s: Optional[Tensor],
                grad_t: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(grad_s, grad_t)
        return rows.clone()

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "kdops: fused_kd_loss(grad_in_forward=True) computed its gradient in the "
                "forward and cannot be differentiated again; use grad_in_forward=False for "
                "second order")
        scale = grad_rows[:, None]
        # Written straight into the logits' dtype: computed in float32, no float32 [N, V] copy.
        return (*(None if g is None else torch.mul(scale, g, out=torch.empty_like(g))
                  for g in ctx.saved_tensors), None, None, None)

    @staticmethod
    def jvp(ctx, d_student, d_teacher, d_rows, d_grad_s, d_grad_t):
        """Forward mode: the rows' own tangent (kd_forward's, through the logits and the
        temperatures); the gradients held for the backward are constants."""
        return d_rows


def as_rows(x, n: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A float or a 0-dim / [N] tensor as an [N] tensor (no copy from the host)."""
    if isinstance(x, Tensor):
        return x.to(dtype).expand(n)
    return torch.full((), float(x), dtype=dtype, device=like.device).expand(n)


def check_constants(**values) -> None:
    """Raise ValueError naming any argument that requires grad (not supported in this mode)."""
    for name, value in values.items():
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(
                f"{name} requires grad, but grad_in_forward=True computes only the logits' "
                f"gradients; pass it without grad or use grad_in_forward=False")


def attach(rows: Tensor, s: Tensor, t: Tensor, tau_s: Tensor, tau_t: Tensor,
           labels: Optional[Tensor], stats: Tensor, ignore_index: int, divergence: str,
           beta: float, with_ce: bool, w_div, w_ce) -> Tensor:
    """`rows` (the [N] losses from kd_forward's outputs, computed without a graph) with the
    logits' gradients computed now and attached: w_div and w_ce are the weights of the
    divergence and the cross-entropy in a row's loss (floats, 0-dim or [N] tensors)."""
    n, cdt = s.shape[0], tau_s.dtype
    need = [s.requires_grad, t.requires_grad]
    # Constants of the loss, in forward mode too: computed without the inputs' tangents.
    with torch.no_grad(), _forward_ad._set_fwd_grad_enabled(False):
        grads = _ops.kd_backward(
            as_rows(w_div, n, s, cdt), as_rows(w_ce, n, s, cdt), s, t, tau_s, tau_t, labels,
            stats, ignore_index, divergence, beta, with_ce, need + [False, False])
    return _RowsWithGrad.apply(s, t, rows, *(g if m else None for g, m in zip(grads, need)))
