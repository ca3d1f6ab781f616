"""The loss ops inside torch.func transforms (grad, vjp, jacrev, vmap, and their nestings).

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

Forward-mode transforms (`jvp`, `jacfwd`, `hessian`) are not supported: the ops have no
forward-mode derivative, and PyTorch says so when one is asked for.
"""
from __future__ import annotations

import torch

from . import _loss_ops as _ops


def _transformed() -> bool:
    """Whether a torch.func transform is active (not asked while torch.compile traces: the
    compiled graph calls the ops, whose own autograd it traces)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


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


def _transformable(name, op, setup_context, backward, *, logits_at, stats_in=None,
                   stats_out=None):
    """`op`, called through an autograd.Function named `name` while a transform is active.

    The Function's forward is the returned function again (one level down), its
    `setup_context` and `backward` are given, and its vmap rule is `_vmapped`: the backward
    ops' last argument is their output mask, kd_forward computes all three outputs."""
    def call(*args):
        return function.apply(*args) if _transformed() else op(*args)

    def vmap(info, in_dims, *args):
        mask = args[-1] if stats_in is not None else (True, True, True)
        return _vmapped(call, info, in_dims, args, mask, logits_at, stats_in, stats_out)

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(call), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "vmap": staticmethod(vmap)})
    return call


_kd_double_backward = _transformable(
    "_DoubleBackward", _ops.kd_double_backward, _ops.no_setup, _ops.third_order,
    logits_at=6, stats_in=11)
kd_backward = _transformable(
    "_Backward", _ops.kd_backward, _ops.backward_setup,
    lambda ctx, *cotangents: _ops.backward_backward(ctx, _kd_double_backward, cotangents),
    logits_at=2, stats_in=7)
kd_forward = _transformable(
    "_Forward", _ops.kd_forward, _ops.forward_setup,
    lambda ctx, grad_div, grad_ce, _stats_grad: _ops.forward_backward(
        ctx, kd_backward, grad_div, grad_ce),
    logits_at=0, stats_out=2)
kd_forward.__doc__ = "kdops::kd_forward, through an autograd.Function inside torch.func transforms."
