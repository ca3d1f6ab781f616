"""Portable implementation of the pilot-step ops with torch._foreach (every device).

Per parameter tensor, with s = −1 when maximizing (else 1) and c = 1 − dampening, the step is

    d = s·g (+ wd·p)                        weight decay, when given
    b = d  or  m·buf + c·d                  momentum (first step, or with buffers), when given
    u = b  or  d + m·b                      plain or Nesterov momentum
    p' = p − lr·u

with every product rounded before it is added (no fused multiply-add), so it matches the
per-tensor loop of `kdops.reference.sgd_step` bit for bit. The backward follows the chain rule
through the same intermediates in the same order (what autograd does on the loop):

    ḡu = −w·lr,  ḡb = ḡu (or m·ḡu, Nesterov),  ḡd = ḡu·[Nesterov] + c·ḡb (ḡb without buffers)
    ∂p = w + wd·ḡd,  ∂g = s·ḡd,  ∂buf = m·ḡb
    ∂lr = Σ⟨−w, u⟩,  ∂wd = Σ⟨ḡd, p⟩,  ∂m = Σ⟨ḡb, buf⟩ + Σ⟨ḡu, b⟩·[Nesterov]

Sums run over every element of every tensor and accumulate in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor


def conform(xs: list, refs: list) -> list:
    """Each x with the layout of torch.empty_like(ref) (copied only where it differs), so that
    every operand, and the output, walk memory in the same order."""
    out = []
    for x, ref in zip(xs, refs):
        if x.is_contiguous() and ref.is_contiguous():            # the common case: no copy
            out.append(x)
            continue
        like = torch.empty_like(ref)
        out.append(x if x.stride() == like.stride() else like.copy_(x))
    return out


def scalar(x: Tensor | None):
    """A step size for the backward's torch._foreach ops, at the compute precision: a Python
    number when it lives on the CPU (read without a device sync), else the 0-dim tensor."""
    if x is None or x.device.type != "cpu":
        return x
    return x.item()


def _times(xs: list, x: Tensor, rounded: bool) -> list:
    """[x·t for t in xs] as the forward rounds it: ``x * t`` when `rounded` (x first cast to
    t's dtype, as TensorIterator does for a 0-dim tensor operand), ``t * x`` (x at the compute
    precision) otherwise."""
    if x.device.type != "cpu":
        return [t * (x.to(t.dtype) if rounded else x) for t in xs]
    values = {}
    for t in xs:
        if t.dtype not in values:
            values[t.dtype] = (x.to(t.dtype) if rounded else x).item()
    return torch._foreach_mul(xs, [values[t.dtype] for t in xs])


def list_dot(xs: list, ys: list) -> Tensor:
    """Σ_i ⟨x_i, y_i⟩ over whole tensors, in float64."""
    total = torch.zeros((), dtype=torch.float64, device=xs[0].device if xs else None)
    for x, y in zip(xs, ys):
        total = total + torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
    return total


def _intermediates(params, grads, buffers, wd, m, dampening, nesterov, maximize,
                   rounded=(False, False, False)):
    """(d, b, u) of the step (b is None without momentum)."""
    d = torch._foreach_neg(grads) if maximize else list(grads)
    if wd is not None:
        d = torch._foreach_add(d, _times(params, wd, rounded[1]))
    if m is None:
        return d, None, d
    if buffers is None:
        b = d
    else:
        b = torch._foreach_add(_times(buffers, m, rounded[2]),
                               torch._foreach_mul(d, 1.0 - dampening))
    u = torch._foreach_add(d, _times(b, m, rounded[2])) if nesterov else b
    return d, b, u


def check_lists(params, *lists) -> None:
    """The ops' contract: floating params; each list's tensor like its param (else RuntimeError,
    as the native kernels raise)."""
    for xs in lists:
        if xs is not None and len(xs) != len(params):
            raise RuntimeError("kdops: the tensor lists of a pilot step differ in length")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise RuntimeError(f"kdops: params[{i}] is not a floating tensor")
        for xs in lists:
            x = xs[i] if xs is not None else p
            if x.shape != p.shape or x.dtype != p.dtype or x.device != p.device:
                raise RuntimeError(f"kdops: the tensors of position {i} must share the param's "
                                   "shape, dtype and device")


def pilot_sgd_step(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening,
                   nesterov, maximize, tensor_scalars):
    check_lists(params, grads, momentum_buffers)
    grads = conform(grads, params)
    buffers = None if momentum_buffers is None else conform(momentum_buffers, params)
    _, _, u = _intermediates(params, grads, buffers, weight_decay, momentum, dampening,
                             nesterov, maximize, tensor_scalars)
    return torch._foreach_sub(conform(params, params), _times(u, lr, tensor_scalars[0]))


def empty_scalar_grad(x: Tensor | None) -> Tensor:
    """The placeholder for a scalar gradient that was not asked for."""
    return torch.empty(0) if x is None else x.new_empty(0)


def pilot_sgd_step_backward(grad_outputs, params, grads, momentum_buffers, lr, weight_decay,
                            momentum, dampening, nesterov, maximize, output_mask):
    check_lists(params, grad_outputs, grads, momentum_buffers)
    w = conform(grad_outputs, params)
    params, grads = conform(params, params), conform(grads, params)
    buffers = None if momentum_buffers is None else conform(momentum_buffers, params)
    wd, m = scalar(weight_decay), scalar(momentum)
    steps = (params, grads, buffers, weight_decay, momentum, dampening, nesterov, maximize)
    neg_w = torch._foreach_neg(w)
    g_u = torch._foreach_mul(neg_w, scalar(lr))
    g_m = torch.zeros((), dtype=torch.float64)
    if m is None:
        g_d, g_buf = g_u, None
    else:
        if nesterov:
            g_b = torch._foreach_mul(g_u, m)
            if output_mask[5]:
                _, b, _ = _intermediates(*steps)
                g_m = g_m + list_dot(g_u, b)
        else:
            g_b = g_u
        if buffers is None:
            g_from_b, g_buf = g_b, None
        else:
            g_from_b = torch._foreach_mul(g_b, 1.0 - dampening)
            g_buf = torch._foreach_mul(g_b, m)
            if output_mask[5]:
                g_m = g_m + list_dot(g_b, buffers)
        g_d = torch._foreach_add(g_u, g_from_b) if nesterov else g_from_b
    if weight_decay is None:
        g_p = [x.clone() for x in w]
    else:
        g_p = torch._foreach_add(w, torch._foreach_mul(g_d, wd))
    g_g = torch._foreach_neg(g_d) if maximize else g_d
    if output_mask[3]:
        _, _, u = _intermediates(*steps)
        g_lr = list_dot(neg_w, u).to(lr)
    else:
        g_lr = empty_scalar_grad(lr)
    g_wd = (list_dot(g_d, params).to(weight_decay) if output_mask[4]
            else empty_scalar_grad(weight_decay))
    g_m = g_m.to(momentum) if output_mask[5] else empty_scalar_grad(momentum)
    return (
        g_p if output_mask[0] else [],
        g_g if output_mask[1] else [],
        g_buf if output_mask[2] and g_buf is not None else [],
        g_lr, g_wd, g_m,
    )
