"""torch.library definitions of the kdops loss ops: schemas, fake kernels, autograd.

Three ops form a chain, each the derivative of the one before:

    kdops::kd_forward          per-row divergence and cross-entropy, plus row statistics
    kdops::kd_backward         gradients to student, teacher and both temperatures
    kdops::kd_double_backward  the vector-Jacobian product of kd_backward (exact second order)

The portable implementation (`kdops._loss_portable`) serves every device (see `_library`); the
C++ CPU kernels of the compiled extension `kdops._C` (csrc/cpu) override it on CPU, and the
Triton kernels on CUDA. The autograd formulas below are registered only where the extension
is absent: it brings the same formulas in C++ (csrc/kd_loss_autograd.cpp), which spare each
forward and backward the Python autograd layer.
Tensors are rows-flattened: logits [N, V] (any floating dtype), temperatures [N] in the compute
dtype (float64 if either logits tensor is float64, else float32), labels [N] int64 or None.
The statistics output ([6, N]: row max of zs and zt, log Σ exp(z − max) of zs and zt, then
row max and log Σ exp(s − max) of s at T = 1) is
saved for the backward ops, not a differentiable result: their formulas are total derivatives
that already account for it.
"""
from __future__ import annotations

import torch

from . import _loss_portable as _portable
from ._library import LIB, define_autograd, define_portable, wanted_grads

_SHARED = ("Tensor student, Tensor teacher, Tensor tau_s, Tensor tau_t, Tensor? labels")
_STATS = "Tensor stats"
_CONFIG = "int ignore_index, str divergence, float beta, bool with_ce"

LIB.define(f"kd_forward({_SHARED}, {_CONFIG}) -> (Tensor, Tensor, Tensor)")
LIB.define(
    f"kd_backward(Tensor grad_div, Tensor grad_ce, {_SHARED}, {_STATS}, {_CONFIG}, "
    "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "kd_double_backward(Tensor? v_student, Tensor? v_teacher, Tensor? v_tau_s, Tensor? v_tau_t, "
    f"Tensor grad_div, Tensor grad_ce, {_SHARED}, {_STATS}, {_CONFIG}, bool[6] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

for _name in ("kd_forward", "kd_backward", "kd_double_backward"):
    define_portable(_name, getattr(_portable, _name))

kd_forward = torch.ops.kdops.kd_forward.default
kd_backward = torch.ops.kdops.kd_backward.default
kd_double_backward = torch.ops.kdops.kd_double_backward.default


@torch.library.register_fake("kdops::kd_forward")
def _(student, teacher, tau_s, tau_t, labels, ignore_index, divergence, beta, with_ce):
    n, cdt = student.shape[0], tau_s.dtype
    return student.new_empty(n, dtype=cdt), student.new_empty(n, dtype=cdt), student.new_empty(
        (6, n), dtype=cdt)


@torch.library.register_fake("kdops::kd_backward")
def _(grad_div, grad_ce, student, teacher, tau_s, tau_t, labels, stats,
      ignore_index, divergence, beta, with_ce, output_mask):
    n = student.shape[0]
    return (
        _portable.masked_output(output_mask[0], student, student.shape, student.dtype),
        _portable.masked_output(output_mask[1], teacher, teacher.shape, teacher.dtype),
        _portable.masked_output(output_mask[2], tau_s, n, tau_s.dtype),
        _portable.masked_output(output_mask[3], tau_t, n, tau_t.dtype),
    )


@torch.library.register_fake("kdops::kd_double_backward")
def _(v_student, v_teacher, v_tau_s, v_tau_t, grad_div, grad_ce, student, teacher, tau_s,
      tau_t, labels, stats, ignore_index, divergence, beta, with_ce, output_mask):
    n = student.shape[0]
    cdt = tau_s.dtype
    return (
        _portable.masked_output(output_mask[0], grad_div, n, cdt),
        _portable.masked_output(output_mask[1], grad_ce, n, cdt),
        _portable.masked_output(output_mask[2], student, student.shape, student.dtype),
        _portable.masked_output(output_mask[3], teacher, teacher.shape, teacher.dtype),
        _portable.masked_output(output_mask[4], tau_s, n, cdt),
        _portable.masked_output(output_mask[5], tau_t, n, cdt),
    )


# The autograd formulas, shared by the Python twin below and by the torch.func path
# (`_loss_func`), which pass the op that computes each derivative.

def forward_setup(ctx, inputs, output):
    student, teacher, tau_s, tau_t, labels, *config = inputs
    stats = output[2]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(student, teacher, tau_s, tau_t, labels, stats)
    ctx.config = config


def forward_backward(ctx, backward_op, grad_div, grad_ce):
    """Gradients of kd_forward's inputs, computed by `backward_op` (kd_backward's signature)."""
    mask = wanted_grads(ctx, ctx.needs_input_grad[:4])
    if not any(mask):
        return (None,) * 9
    grads = backward_op(grad_div, grad_ce, *ctx.saved_tensors, *ctx.config, mask)
    return (*(g if m else None for g, m in zip(grads, mask)), None, None, None, None, None)


def backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.config = inputs[8:12]
    ctx.computed = inputs[12]


def backward_backward(ctx, double_backward_op, cotangents):
    """Gradients of kd_backward's inputs, computed by `double_backward_op`."""
    mask = wanted_grads(ctx, ctx.needs_input_grad[:6])
    if not any(mask):
        return (None,) * 13
    vs = [v if done else None for v, done in zip(cotangents, ctx.computed)]
    grads = double_backward_op(*vs, *ctx.saved_tensors, *ctx.config, mask)
    return (*(g if m else None for g, m in zip(grads, mask)),) + (None,) * 7


def third_order(*_):
    raise NotImplementedError(
        "kdops: third-order derivatives of fused_kd_loss are not implemented "
        "(kd_double_backward is exact but not itself differentiable)"
    )


def _forward_backward(ctx, grad_div, grad_ce, _stats_grad):
    return forward_backward(ctx, kd_backward, grad_div, grad_ce)


def _backward_backward(ctx, *cotangents):
    return backward_backward(ctx, kd_double_backward, cotangents)


def register_autograd(lib: torch.library.Library) -> None:
    """Register the autograd formulas above on `lib`: the Python twin of the compiled
    extension's (csrc/kd_loss_autograd.cpp), used where the extension is absent."""
    for name, backward, setup in (("kd_forward", _forward_backward, forward_setup),
                                  ("kd_backward", _backward_backward, backward_setup),
                                  ("kd_double_backward", third_order, no_setup)):
        torch.library.register_autograd(f"kdops::{name}", backward, setup_context=setup, lib=lib)


def no_setup(ctx, inputs, output):
    pass


define_autograd(("kd_forward", "kd_backward", "kd_double_backward"), register_autograd)
