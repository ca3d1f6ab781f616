"""The differentiable pilot step: one SGD update over a whole parameter list, one autograd node.

MetaDistil's pilot update (and MAML's inner loop) computes θ' = θ − lr·∇θL with the gradient
kept differentiable, usually as a Python loop of per-tensor ops inside a create_graph graph:
hundreds of small ops forward and again backward. `pilot_sgd_step` runs the whole list as one
registered op (native multi-tensor kernels where built, torch._foreach otherwise) whose backward
is another one, exact to any order.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from ._library import dual_level_open, transformed
from ._pilot_autograd import Layout, TracedPilotStep, apply, step_function


def pilot_sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor | None], lr, *,
                   weight_decay=0.0, momentum=0.0, momentum_buffers=None, dampening: float = 0.0,
                   nesterov: bool = False, maximize: bool = False) -> list:
    """One SGD step over a list of tensors, returned as new tensors (the inputs are untouched).

    For each position i, in torch.optim.SGD's order::

        d   = −g if maximize else g
        d   = d + weight_decay·p                        (when weight_decay ≠ 0)
        buf = d  or  momentum·buf_i + (1 − dampening)·d (when momentum ≠ 0; buf_i given or not)
        u   = d + momentum·buf if nesterov else buf     (when momentum ≠ 0; else u = d)
        p'  = p − lr·u

    Each product is rounded to the tensor's dtype before it is added (no fused multiply-add),
    as the per-tensor loops of higher, learn2learn, torchopt and the torch.func examples compute
    ``p - lr * g``: the result equals `kdops.reference.sgd_step` bit for bit on CPU. (That is
    also torch.optim.SGD's update, up to its ``add(alpha=...)``, which may fuse the multiply.)
    As in those expressions, a step size given as a tensor is first rounded to the param's
    dtype (``lr * g`` with a 0-dim tensor ``lr`` and bf16 ``g`` rounds ``lr`` to bf16), a
    Python number is used at the compute precision (float32, or float64 for float64 params).
    The momentum buffers are read, not updated.

    Args:
        params: tensors p_i of any shape; floating dtypes (float32, bfloat16, float16,
            float64), which may differ between positions; all on one device.
        grads: g_i, the same shape, dtype and device as p_i; None where a parameter got no
            gradient (that position is returned as p_i itself, as SGD skips it).
        lr, weight_decay, momentum: Python numbers or 0-dim floating tensors (on the CPU or the
            params' device). A tensor that requires grad is differentiated (learnable step
            sizes); a tensor weight_decay/momentum always takes its branch of the update.
        momentum_buffers: None (the first step: buf = d) or one tensor like p_i per position.
        dampening, nesterov, maximize: as torch.optim.SGD.

    Returns:
        list of p'_i: same shapes, dtypes and devices as params, differentiable to any order
        with respect to params, grads, momentum_buffers, lr, weight_decay and momentum, in
        reverse mode; in forward mode (torch.func.jvp, jacfwd, hessian, forward_ad dual
        tensors) to first order and forward over reverse.
    """
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"pilot_sgd_step: params has {len(params)} tensors but grads has "
                         f"{len(grads)}")
    buffers = None if momentum_buffers is None else list(momentum_buffers)
    if buffers is not None and len(buffers) != len(params):
        raise ValueError(f"pilot_sgd_step: momentum_buffers has {len(buffers)} tensors, "
                         f"params {len(params)}")
    if not (0.0 <= float(dampening) <= 1.0):
        raise ValueError(f"pilot_sgd_step: dampening must be in [0, 1], got {dampening}")
    if nesterov and (_is_zero(momentum) or dampening != 0):
        raise ValueError("pilot_sgd_step: nesterov needs a momentum and zero dampening "
                         "(as torch.optim.SGD)")
    live = [i for i, g in enumerate(grads) if g is not None]
    out = list(params)
    if not live:
        return out
    first = params[live[0]]
    device = first.device if isinstance(first, Tensor) else None
    lr_t = _scalar("lr", lr, device)
    wd_t = None if _is_zero(weight_decay) else _scalar("weight_decay", weight_decay, device)
    m_t = None if _is_zero(momentum) else _scalar("momentum", momentum, device)
    if len(live) < len(params):
        params_live, grads_live = [params[i] for i in live], [grads[i] for i in live]
    else:
        params_live, grads_live = params, grads
    bufs = [] if buffers is None or m_t is None else [buffers[i] for i in live]
    layout = Layout(len(live), bool(bufs), (float(dampening), bool(nesterov), bool(maximize)),
                    (isinstance(lr, Tensor), isinstance(weight_decay, Tensor),
                     isinstance(momentum, Tensor)))
    tensors = (*params_live, *grads_live, *bufs, lr_t, wd_t, m_t)
    try:
        if _needs_autograd(tensors):
            stepped = apply(step_function(), layout, *tensors)
        else:                               # no graph to record: skip the Function's overhead
            stepped = TracedPilotStep.forward(layout, *tensors)
    except (RuntimeError, TypeError):
        # The ops check every position (cheaply, in bulk); name the culprit for the user.
        _check_lists(params, grads, buffers if bufs else None, live)
        raise
    for i, p in zip(live, stepped):
        out[i] = p
    return out


def pilot_update(module: nn.Module, loss: Tensor, lr, *, create_graph: bool = True,
                 **step_kwargs) -> dict:
    """Fast weights after one differentiable SGD step of `module` on `loss`.

    Computes the gradient of `loss` to the module's trainable parameters (kept differentiable
    when `create_graph`, so a later loss at the fast weights can be differentiated through the
    step, to the teacher of a MetaDistil pilot, say) and applies `pilot_sgd_step` to them.

    Returns a dict for ``torch.func.functional_call(module, fast_weights, inputs)``: the
    stepped parameters (frozen or unused ones as they are), and *copies* of the module's
    buffers, so that train-mode forwards at the fast weights (BatchNorm running statistics)
    update the copies and leave the real model as it was. The forward that produced `loss`
    was an ordinary forward of `module`, with its usual effect on the buffers. Extra keyword
    arguments (weight_decay, momentum, momentum_buffers, ...) go to `pilot_sgd_step`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"pilot_update: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("pilot_update: loss must be a tensor with one element")
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=create_graph,
                                allow_unused=True)
    stepped = pilot_sgd_step([p for _, p in named], grads, lr, **step_kwargs)
    fast = dict(module.named_parameters())
    fast.update((name, p) for (name, _), p in zip(named, stepped))
    fast.update((name, b.clone()) for name, b in module.named_buffers())
    return fast


def _needs_autograd(tensors) -> bool:
    """Whether the step must go through its Function: a grad-requiring input, a torch.func
    transform or an open forward-AD dual level (always under torch.compile, which traces the
    Function)."""
    return (torch.compiler.is_compiling() or transformed() or dual_level_open()
            or (torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors)))


def _is_zero(x) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _scalar(name: str, x, device) -> Tensor:
    """A step size as the 0-dim tensor the op takes (Python numbers as float64 on the CPU)."""
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.dim() > 1 or not x.is_floating_point():
            raise ValueError(f"pilot_sgd_step: {name} must be a number or a 0-dim floating "
                             f"tensor, got shape {tuple(x.shape)} {x.dtype}")
        if x.device.type != "cpu" and x.device != device:
            raise ValueError(f"pilot_sgd_step: {name} is on {x.device}, params on {device}")
        return x.reshape(())
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"pilot_sgd_step: {name} must be a number or a tensor, "
                        f"got {type(x).__name__}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"pilot_sgd_step: {name} must be finite and ≥ 0, got {x}")
    if torch.compiler.is_compiling():
        return torch.tensor(float(x), dtype=torch.float64)
    return _number_tensor(float(x))


@functools.lru_cache(maxsize=64)
def _number_tensor(x: float) -> Tensor:
    """A step size given as a number, as the float64 CPU tensor the ops take; cached, since
    the same few learning rates come back every step (the ops never write it)."""
    return torch.tensor(x, dtype=torch.float64)


def _check_lists(params, grads, buffers, live) -> None:
    """Raises the TypeError/ValueError that names the first inconsistent position."""
    first = params[live[0]]
    device = first.device if isinstance(first, Tensor) else None
    for i in live:
        p = params[i]
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"pilot_sgd_step: params[{i}] must be a floating tensor")
        key = (p.shape, p.dtype, p.device)
        if key[2] != device:
            raise ValueError(f"pilot_sgd_step: params[{i}] is on {p.device}, params[{live[0]}] "
                             f"on {device}")
        for name, xs in (("grads", grads), ("momentum_buffers", buffers)):
            if xs is None:
                continue
            x = xs[i]
            if not isinstance(x, Tensor):
                raise (ValueError if x is None else TypeError)(
                    f"pilot_sgd_step: {name}[{i}] must be a tensor (params[{i}] has a gradient)")
            if (x.shape, x.dtype, x.device) != key:
                raise ValueError(
                    f"pilot_sgd_step: {name}[{i}] is {tuple(x.shape)} {x.dtype} on {x.device}; "
                    f"params[{i}] is {tuple(p.shape)} {p.dtype} on {p.device}")
