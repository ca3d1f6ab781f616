"""The loss ops inside torch.func transforms (grad, vjp, jacrev, vmap, jvp, jacfwd, hessian, and
their nestings) and on forward-mode dual tensors.

functorch refuses both autograd layers of the ops: the compiled one is a C++
torch::autograd::Function, and the Python twin is the function that `register_autograd`
generates. While a transform is active, `kd_forward` below therefore calls the op through
`_Forward`, an autograd.Function in the form functorch accepts (`setup_context`, a `vmap`
rule). Its backward is `_Backward`, whose backward is `_DoubleBackward`: the same chain and
formulas as the ops' own autograd (`_loss_ops`), so `grad(grad(...))` is exact.

The vmap rules fold the vmapped dim into the rows ([B, N, V] logits are [B·N, V] rows to the
op, which treats rows independently), so a vmap costs one op call, not a loop over the batch.
Each rule calls the op again one transform level down, through the same check, and reaches
the op itself once no transform is left. Outside transforms the ops are called directly.

Forward mode (`jvp`, `jacfwd`, `hessian`, and `torch.autograd.forward_ad`'s dual tensors, for
which the Functions serve too: the compiled autograd has no forward mode) runs the `jvp`
rules below, through the ops of the chain:

    kd_forward   the tangent of a row's divergence is ⟨∇D_r, ẋ_r⟩ (ẋ: the tangents of the
                 logits and temperatures), and kd_double_backward computes exactly that as
                 its derivative with respect to the row weight grad_div (∂⟨v, G⟩/∂gd_r with
                 v = ẋ, G = gd·∇D + gce·∇CE); the cross-entropy's likewise through grad_ce.
                 One pass over the logits and their tangents, no [N, V] temporary.
    kd_backward  G is the gradient of gd·D + gce·CE, so its tangent is ġd·∇D + ġce·∇CE
                 (kd_backward on the weights' tangents) plus H·ẋ, H the symmetric Hessian:
                 the vector-Jacobian product kd_double_backward computes, taken along ẋ.

Forward over reverse (`hessian`, `jvp(grad(...))`) is exact. Forward over forward
(`jacfwd(jacfwd(...))`) raises: torch.func gives jvp rules their saved inputs without the outer
transform's tangents (`_library.refuse_forward_over_forward`); so does any third derivative
(kd_double_backward has no forward-mode rule).
"""
from __future__ import annotations

import torch

from . import _loss_ops as _ops
from ._library import dual_level_open, refuse_forward_over_forward, transformed


def _vmapped(op, info, in_dims, args, mask, logits_at, stats_in=None, stats_out=None):
    """Calls `op` once with the vmapped dim folded into the rows; returns the batched outputs
    and their dims. Per-row tensors [N, ...] go in as [B·N, ...] and the [6, N] statistics
    (argument `stats_in`, output `stats_out`) as [6, B·N]; the student logits are argument
    `logits_at`. Outputs that `mask` says were not computed come back unbatched (empty)."""
    size = info.batch_size
    rows = list(args)
    for k, (x, dim) in enumerate(zip(args, in_dims)):
        if isinstance(x, torch.Tensor):
            x = x.expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
            rows[k] = x.transpose(0, 1).reshape(6, -1) if k == stats_in else x.flatten(0, 1)
    n = rows[logits_at].shape[0] // size
    batched, dims = [], []
    for k, (y, done) in enumerate(zip(op(*rows), mask)):
        if not done:
            batched.append(y)
            dims.append(None)
        elif k == stats_out:
            batched.append(y.reshape(6, size, n))
            dims.append(1)
        else:
            batched.append(y.reshape(size, n, *y.shape[1:]))
            dims.append(0)
    return tuple(batched), tuple(dims)


def _transformable(name, op, setup_context, backward, jvp, *, logits_at, stats_in=None,
                   stats_out=None):
    """`op`, called through an autograd.Function named `name` while a transform or a
    forward-AD dual level is active.

    The Function's forward is the returned function again (one level down), its
    `setup_context`, `backward` and `jvp` are given, and its vmap rule is `_vmapped`: the
    backward ops' last argument is their output mask, kd_forward computes all three outputs."""
    def call(*args):
        return function.apply(*args) if transformed() else op(*args)

    def entry(*args):
        return function.apply(*args) if transformed() or dual_level_open() else op(*args)

    def vmap(info, in_dims, *args):
        mask = args[-1] if stats_in is not None else (True, True, True)
        return _vmapped(call, info, in_dims, args, mask, logits_at, stats_in, stats_out)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(call), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
        "vmap": staticmethod(vmap)})
    return entry


# The setups keep the inputs for the jvp rules too, and turn off the materialization of absent
# gradients and tangents: the rules then skip the passes over zeros that functorch would
# otherwise hand them ([N, V] tangents of the teacher logits that nothing moves, say).

def _forward_setup(ctx, inputs, output):
    _ops.forward_setup(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:5], output[2])
    ctx.set_materialize_grads(False)


def _backward_setup(ctx, inputs, output):
    _ops.backward_setup(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:8])
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_div, grad_ce, _stats_grad):
    """kd_forward's backward, with zeros for an absent upstream gradient (none: no gradient)."""
    if grad_div is None and grad_ce is None:
        return (None,) * 9
    zero = torch.zeros_like(grad_ce if grad_div is None else grad_div)
    return _ops.forward_backward(ctx, kd_backward, zero if grad_div is None else grad_div,
                                 zero if grad_ce is None else grad_ce)


def _forward_jvp(ctx, *tangents):
    """Tangents of (div, ce, stats): per row ⟨∇D_r, ẋ_r⟩ and ⟨∇CE_r, ṡ_r⟩ (module docstring);
    the statistics are not differentiable. (A differentiable output's tangent is returned as
    a tensor, zeros included: autograd's forward mode rejects None there.)"""
    refuse_forward_over_forward("fused_kd_loss")
    student, teacher, tau_s, tau_t, labels, stats = ctx.saved_tensors
    with_ce = ctx.config[3]
    weight = torch.ones_like(tau_s)      # the derivatives to the row weights do not read them
    d_div, d_ce = _kd_double_backward(*tangents[:4], weight, weight, student, teacher, tau_s,
                                      tau_t, labels, stats, *ctx.config,
                                      [True, with_ce, False, False, False, False])[:2]
    return d_div, (d_ce if with_ce else torch.zeros_like(d_div)), None


def _backward_jvp(ctx, d_grad_div, d_grad_ce, *tangents):
    """Tangents of kd_backward's gradients: ġd·∇D + ġce·∇CE + H·ẋ (module docstring); those
    the output mask left out are empty, as the outputs."""
    refuse_forward_over_forward("fused_kd_loss")
    grad_div, grad_ce, student, teacher, tau_s, tau_t, labels, stats = ctx.saved_tensors
    mask = list(ctx.computed)
    rest = (student, teacher, tau_s, tau_t, labels, stats, *ctx.config)
    along = any(v is not None for v in tangents[:4])
    terms = []
    if d_grad_div is not None or d_grad_ce is not None or not along:
        zero = torch.zeros_like(grad_div)
        terms.append(kd_backward(zero if d_grad_div is None else d_grad_div,
                                 zero if d_grad_ce is None else d_grad_ce, *rest, mask))
    if along:
        terms.append(_kd_double_backward(*tangents[:4], grad_div, grad_ce, *rest,
                                         [False, False, *mask])[2:])
    if len(terms) == 1:
        return terms[0]
    return tuple(a + b if done else a for a, b, done in zip(*terms, mask))


def _double_backward_jvp(ctx, *tangents):
    raise NotImplementedError(
        "kdops: kd_double_backward has no forward-mode derivative: third-order derivatives of "
        "fused_kd_loss are not implemented")


_kd_double_backward = _transformable(
    "_DoubleBackward", _ops.kd_double_backward, _ops.no_setup, _ops.third_order,
    _double_backward_jvp, logits_at=6, stats_in=11)
kd_backward = _transformable(
    "_Backward", _ops.kd_backward, _backward_setup,
    lambda ctx, *cotangents: _ops.backward_backward(ctx, _kd_double_backward, cotangents),
    _backward_jvp, logits_at=2, stats_in=7)
kd_forward = _transformable(
    "_Forward", _ops.kd_forward, _forward_setup, _forward_backward, _forward_jvp, logits_at=0,
    stats_out=2)
kd_forward.__doc__ = "kdops::kd_forward, through an autograd.Function inside torch.func transforms."
