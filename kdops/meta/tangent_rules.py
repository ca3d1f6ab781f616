"""The tangent rules of `TangentTape` (kdops.meta.tangent), per ATen operator.

A rule gives the tangent of an operator's outputs from the tangents of its inputs (None: zero)
and the primal values it reads, and says which of those the tape keeps: only what the
derivative needs, as the operator's own backward would save.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD

aten = torch.ops.aten


class Rule(NamedTuple):
    tangent: Callable   # (args, tangents, outs, meta, kwargs) -> output tangent(s)
    keep: Callable      # (tracked per arg, args) -> (arg positions, output positions) to keep


def _sum(terms):
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _keep_nothing(tracked, args):
    return (), ()


def _keep_input(tracked, args):
    return {0}, ()


def _keep_output(tracked, args):
    return (), {0}


def _keep_other(tracked, args):
    """A bilinear operator of its first two arguments: each kept where the other is tracked."""
    return {i for i, other in ((0, 1), (1, 0)) if tracked[other]}, ()


def _convolution(args, targs, outs, meta, kwargs):
    """conv(x, w) + b is bilinear in (x, w): d = conv(dx, w) + conv(x, dw) + db."""
    x, w, _, *rest = args
    dx, dw, db = targs[:3]
    terms = []
    if dx is not None:
        terms.append(aten.convolution(dx, w, None, *rest))
    if dw is not None:
        terms.append(aten.convolution(x, dw, db, *rest))
    elif db is not None:
        terms.append(db.view(1, -1, *([1] * (len(meta[0][0]) - 2))))
    return _sum(terms)


def _batch_norm_rule(x_at, w_at, b_at, stats_at, training_at, eps_at, saved_at):
    """The rule of a batch norm operator, given where its arguments and saved statistics are.

    y = γ·x̂ + β with x̂ = (x − μ)·r, r = 1/√(σ² + ε) over the batch (training) or the running
    statistics. Along x, in training, it is the batch norm's backward applied to dx: its
    Jacobian in x is γ_c·r_c·(I − 11ᵀ/M − x̂x̂ᵀ/M) within each channel c, symmetric; with
    running statistics it is γ_c·r_c. Along (γ, β): dγ·x̂ + dβ.
    """
    def tangent(args, targs, outs, meta, kwargs):
        x, weight = args[x_at], args[w_at]
        training = training_at is not None and args[training_at]
        if training:
            mean, invstd = outs[saved_at], outs[saved_at + 1]
        else:
            mean, invstd = args[stats_at], torch.rsqrt(args[stats_at + 1] + args[eps_at])
        dx, dw, db = targs[x_at], targs[w_at], targs[b_at]
        shape = (1, -1) + (1,) * (len(meta[0][0]) - 2)
        terms = []
        if dx is not None and training:
            terms.append(aten.native_batch_norm_backward(
                dx, x, weight, None, None, mean, invstd, True, args[eps_at],
                [True, False, False])[0])
        elif dx is not None:                       # running statistics: a per-channel scale
            terms.append(dx * (invstd if weight is None else weight * invstd).view(shape))
        if dw is not None and x.is_cuda:
            # One kernel, SyncBatchNorm's elementwise pass: a GPU replay is bound by launches.
            terms.append(torch.batch_norm_elemt(x, dw, db, mean, invstd, args[eps_at]))
        elif dw is not None:               # dγ·(x − μ)·r + dβ = x·(r·dγ) + (dβ − μ·r·dγ)
            scale = invstd * dw
            shift = -mean * scale if db is None else db - mean * scale
            terms.append(torch.addcmul(shift.view(shape), x, scale.view(shape)))
        elif db is not None:
            terms.append(db.view(shape))
        return (_sum(terms),) + (None,) * (len(meta) - 1)

    def keep(tracked, args):
        if not (tracked[x_at] or tracked[w_at]):
            return (), ()
        if training_at is not None and args[training_at]:
            return {x_at, w_at}, {saved_at, saved_at + 1}
        return {x_at, w_at, stats_at, stats_at + 1}, ()

    return Rule(tangent, keep)


def _add(sign):
    """a ± α·b (in place or not): da ± α·db."""
    def tangent(args, targs, outs, meta, kwargs):
        da, db = targs[0], targs[1] if len(targs) > 1 else None
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if db is not None and alpha * sign != 1:
            db = db * (alpha * sign)
        return _sum([da, db])
    return Rule(tangent, _keep_nothing)


def _mul(args, targs, outs, meta, kwargs):
    """a·b: da·b + a·db."""
    a, b = args[:2]
    da, db = targs[:2]
    return _sum([da * b if da is not None else None, a * db if db is not None else None])


def _mm(args, targs, outs, meta, kwargs):
    """a @ b (batched or not): da @ b + a @ db."""
    a, b = args[:2]
    da, db = targs[:2]
    return _sum([da @ b if da is not None else None, a @ db if db is not None else None])


def _addmm(args, targs, outs, meta, kwargs):
    """β·c + α·(m1 @ m2), a linear layer: β·dc + α·(dm1 @ m2 + m1 @ dm2)."""
    _, m1, m2 = args[:3]
    dbias, d1, d2 = targs[:3]
    beta = kwargs.get("beta", 1)
    alpha = kwargs.get("alpha", 1)
    terms = [d1 @ m2 if d1 is not None else None, m1 @ d2 if d2 is not None else None]
    product = _sum(terms)
    if product is not None and alpha != 1:
        product = product * alpha
    if dbias is not None and beta != 1:
        dbias = dbias * beta
    return _sum([product, dbias])


def _keep_addmm(tracked, args):
    return {i for i, other in ((1, 2), (2, 1)) if tracked[other]}, ()


def _apply_to_tangent(func):
    """An operator linear in its one tensor argument (views, sums, means, casts, pooling by
    averages): the operator applied to the tangent."""
    def tangent(args, targs, outs, meta, kwargs):
        return func(targs[0], *args[1:], **kwargs)
    return Rule(tangent, _keep_nothing)


def _reshape(args, targs, outs, meta, kwargs):
    """x.view(shape): the tangent reshaped (it may not have the primal's strides)."""
    return targs[0].reshape(args[1])


def _identity(args, targs, outs, meta, kwargs):
    """x ± a constant: dx."""
    return targs[0]


def _native_dropout(args, targs, outs, meta, kwargs):
    """x·mask/(1 − p) with the recorded mask: dx·mask/(1 − p), the dropout's own backward."""
    p, train = args[1], args[2]
    if train is not None and not train:        # train=None means training
        return targs[0], None
    return aten.native_dropout_backward(targs[0], outs[1], 1.0 / (1.0 - p)), None


def _pointwise_backward(backward, use_output):
    """A pointwise function f with f'(x)·v = backward(v, output or x): its tangent is that."""
    def tangent(args, targs, outs, meta, kwargs):
        return backward(targs[0], outs[0] if use_output else args[0])
    return Rule(tangent, _keep_output if use_output else _keep_input)


def _hardtanh(args, targs, outs, meta, kwargs):
    """clamp(x, lo, hi) (ReLU6, in place or not): dx where lo < x < hi, read off the output."""
    low, high = (args + (-1.0, 1.0))[1:3]
    return aten.hardtanh_backward(targs[0], outs[0], low, high)


def _leaky_relu(in_place):
    """x if x > 0 else a·x: dx·(1 if x > 0 else a); in place, x > 0 is read off the output
    (for a ≥ 0, as the in-place backward does)."""
    def tangent(args, targs, outs, meta, kwargs):
        slope = args[1] if len(args) > 1 else 0.01
        x = outs[0] if in_place else args[0]
        return aten.leaky_relu_backward(targs[0], x, slope, in_place)
    return Rule(tangent, _keep_output if in_place else _keep_input)


def _attention(bias_at, dropout_at, causal_at):
    """A fused scaled-dot-product attention, softmax(q·kᵀ·scale + bias)·v, given where its
    bias, dropout probability and causal flag are: the tangent of its first output by
    forward-mode autograd through the math implementation, in float32 at least (the primal
    attention again, not the network). With dropout the fused kernel's masks are its own:
    refused."""
    def tangent(args, targs, outs, meta, kwargs):
        if len(args) > dropout_at and args[dropout_at]:
            raise RuntimeError("attention dropout: the fused kernel draws masks of its own, which "
                               "neither its graph nor a record keeps")
        # CPU flash takes the mask as a keyword (untracked: the tape refuses tracked ones).
        bias = kwargs.get("attn_mask") if bias_at is None else args[bias_at]
        dbias = None if bias_at is None else targs[bias_at]
        with fwAD.dual_level():
            def dual(a, t):
                if a is None:
                    return None
                a = _at_least_float32(a)
                return fwAD.make_dual(a.detach(), _at_least_float32(t)) if t is not None else a

            q, k, v = (dual(a, t) for a, t in zip(args[:3], targs[:3]))
            out = aten._scaled_dot_product_attention_math(
                q, k, v, dual(bias, dbias), 0.0, len(args) > causal_at and args[causal_at],
                scale=kwargs.get("scale"))[0]
            return (fwAD.unpack_dual(out).tangent,) + (None,) * (len(meta) - 1)

    def keep(tracked, args):
        return {0, 1, 2} | ({bias_at} if bias_at is not None else set()), ()
    return Rule(tangent, keep)


def _at_least_float32(x):
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _gelu(args, targs, outs, meta, kwargs):
    """GELU(x): GELU'(x)·dx, its backward at x."""
    return aten.gelu_backward(targs[0], args[0], approximate=kwargs.get(
        "approximate", args[1] if len(args) > 1 else "none"))


_LINEAR = [aten.t.default,
           aten.transpose.int, aten.permute.default, aten.expand.default, aten.squeeze.dim,
           aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.select.int,
           aten.slice.Tensor, aten.clone.default, aten._to_copy.default, aten.alias.default,
           aten.neg.default, aten.mean.dim, aten.mean.default, aten.sum.dim_IntList,
           aten.sum.default, aten.mul.Scalar, aten.div.Scalar, aten.avg_pool2d.default,
           aten._adaptive_avg_pool2d.default, aten.split.Tensor, aten.split_with_sizes.default,
           aten.unbind.int]

# Outputs that depend on the inputs' shapes only: untracked (no tangent).
VALUE_FREE = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
              aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
              aten.randint_like.default, aten.new_empty.default, aten.new_zeros.default,
              aten.new_ones.default, aten.new_full.default, aten.new_empty_strided.default}

_RELU = _pointwise_backward(lambda v, y: aten.threshold_backward(v, y, 0), True)  # v·[y > 0]

RULES = {func: _apply_to_tangent(func) for func in _LINEAR}
RULES.update({
    aten.view.default: Rule(_reshape, _keep_nothing),
    aten._unsafe_view.default: Rule(_reshape, _keep_nothing),
    aten.convolution.default: Rule(_convolution, _keep_other),
    aten.native_batch_norm.default: _batch_norm_rule(0, 1, 2, 3, 5, 7, 1),
    aten._native_batch_norm_legit.default: _batch_norm_rule(0, 1, 2, 3, 5, 7, 1),
    aten._native_batch_norm_legit.no_stats: _batch_norm_rule(0, 1, 2, None, 3, 5, 1),
    aten._native_batch_norm_legit_no_training.default: _batch_norm_rule(0, 1, 2, 3, None, 6,
                                                                        None),
    aten.cudnn_batch_norm.default: _batch_norm_rule(0, 1, 2, 3, 5, 7, 1),
    aten.relu.default: _RELU, aten.relu_.default: _RELU,
    aten.hardtanh.default: Rule(_hardtanh, _keep_output),
    aten.hardtanh_.default: Rule(_hardtanh, _keep_output),
    aten.leaky_relu.default: _leaky_relu(False), aten.leaky_relu_.default: _leaky_relu(True),
    aten.sigmoid.default: _pointwise_backward(aten.sigmoid_backward, True),
    aten.tanh.default: _pointwise_backward(aten.tanh_backward, True),
    aten.silu.default: _pointwise_backward(aten.silu_backward, False),
    aten.gelu.default: Rule(_gelu, _keep_input),
    aten.add.Tensor: _add(1), aten.add_.Tensor: _add(1),
    aten.sub.Tensor: _add(-1), aten.sub_.Tensor: _add(-1),
    aten.add.Scalar: Rule(_identity, _keep_nothing),
    aten.sub.Scalar: Rule(_identity, _keep_nothing),
    aten.mul.Tensor: Rule(_mul, _keep_other),
    aten.mm.default: Rule(_mm, _keep_other), aten.bmm.default: Rule(_mm, _keep_other),
    aten.addmm.default: Rule(_addmm, _keep_addmm),
    aten.native_dropout.default: Rule(_native_dropout, lambda tracked, args: ((), {1})),
    aten._scaled_dot_product_flash_attention_for_cpu.default: _attention(None, 3, 4),
    aten._scaled_dot_product_flash_attention.default: _attention(None, 3, 4),
    aten._scaled_dot_product_efficient_attention.default: _attention(3, 5, 6),
    aten._scaled_dot_product_cudnn_attention.default: _attention(3, 5, 6),
    aten.detach.default: Rule(lambda *a: None, _keep_nothing),       # the tangent is cut
})
