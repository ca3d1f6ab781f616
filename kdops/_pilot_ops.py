"""torch.library definitions of the pilot SGD step: schemas, fake kernels, implementations.

    kdops::pilot_sgd_step           p' = p − lr·u for every tensor of a list (the math is in
                                    `kdops._pilot_portable`'s docstring)
    kdops::pilot_sgd_step_backward  its vector-Jacobian product: gradients to params, grads,
                                    momentum buffers, lr, weight decay and momentum

The portable implementation (`kdops._pilot_portable`) serves every device; the compiled
extension overrides it with multi-tensor kernels (csrc/cpu, csrc/cuda). The ops carry no
autograd formula of their own: `kdops._pilot_autograd` wraps them in autograd Functions, which
torch.func transforms (grad, vmap) accept as well.

Arguments as the ops receive them: lr a 0-dim tensor of any floating dtype (Python numbers
arrive as float64 CPU tensors) on the CPU or the params' device; weight_decay and momentum
likewise, or None when off (torch.optim.SGD skips a zero weight decay or momentum, which
matters for non-finite values and for dampening). `tensor_scalars` says which of (lr,
weight_decay, momentum) the user gave as tensors: the forward rounds those to each param's
dtype before use, as ``lr * g`` does with a 0-dim tensor ``lr``, and uses numbers at the compute
precision, as ``g * 0.01`` does (float32 for float32/bf16/fp16 params, float64 for float64).
Every tensor of a list position shares the param's shape, dtype and device; positions may
differ in dtype.
"""
from __future__ import annotations

import torch

from . import _pilot_portable as _portable
from ._library import LIB, define_portable
from ._pilot_portable import empty_scalar_grad

_STEP_ARGS = ("Tensor[] params, Tensor[] grads, Tensor[]? momentum_buffers, Tensor lr, "
              "Tensor? weight_decay, Tensor? momentum, float dampening, bool nesterov, "
              "bool maximize")
LIB.define(f"pilot_sgd_step({_STEP_ARGS}, bool[3] tensor_scalars) -> Tensor[]")
LIB.define(f"pilot_sgd_step_backward(Tensor[] grad_outputs, {_STEP_ARGS}, bool[6] output_mask) "
           "-> (Tensor[], Tensor[], Tensor[], Tensor, Tensor, Tensor)")

for _name in ("pilot_sgd_step", "pilot_sgd_step_backward"):
    define_portable(_name, getattr(_portable, _name))

pilot_sgd_step = torch.ops.kdops.pilot_sgd_step.default
pilot_sgd_step_backward = torch.ops.kdops.pilot_sgd_step_backward.default


def _like(params, wanted):
    return [torch.empty_like(p) for p in params] if wanted else []


def _scalar_like(x, wanted):
    return x.new_empty(()) if wanted and x is not None else empty_scalar_grad(x)


@torch.library.register_fake("kdops::pilot_sgd_step")
def _(params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize,
      tensor_scalars):
    return _like(params, True)


@torch.library.register_fake("kdops::pilot_sgd_step_backward")
def _(grad_outputs, params, grads, momentum_buffers, lr, weight_decay, momentum, dampening,
      nesterov, maximize, output_mask):
    return (_like(params, output_mask[0]), _like(params, output_mask[1]),
            _like(params, output_mask[2] and momentum_buffers is not None),
            _scalar_like(lr, output_mask[3]), _scalar_like(weight_decay, output_mask[4]),
            _scalar_like(momentum, output_mask[5]))
