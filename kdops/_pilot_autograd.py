"""Autograd for the pilot step: two torch.autograd.Functions around the registered ops.

`PilotStep` is one node for the whole parameter list; its backward is `PilotStepBackward`, the
op `kdops::pilot_sgd_step_backward`, whose own derivative (second order) is written out here
in PyTorch ops and so is differentiable again, to any order. Both define `setup_context`,
`vmap` and `jvp`, so torch.func.grad, vmap (over tasks, per-task learning rates included),
jvp, jacfwd, hessian, functional_call and forward-mode dual tensors work through them; under
torch.compile the step is `TracedPilotStep`, the same without the jvp, which Dynamo refuses.

With d = s·g + wd·p (s = −1 when maximizing), the step is p' = p − lr·(K·d + L·buf): linear in
(p, g, buf), with coefficients K(m), L(m) that depend on the momentum only (`step_coefficients`).

Tensors travel flat: ``[*params, *grads, *buffers, lr, weight_decay, momentum]`` (buffers only
when given; weight_decay and momentum may be None), described by a `Layout`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._library import refuse_forward_over_forward, wanted_groups
from ._pilot_ops import pilot_sgd_step, pilot_sgd_step_backward
from ._pilot_portable import list_dot


class Layout(NamedTuple):
    n: int                 # tensors per list
    has_buffers: bool
    config: tuple          # (dampening, nesterov, maximize)
    tensor_scalars: tuple  # which of (lr, weight_decay, momentum) the user gave as tensors


def unpack(layout: Layout, tensors):
    """(params, grads, buffers or None, lr, weight_decay, momentum) from the flat tensors."""
    n = layout.n
    buffers = list(tensors[2 * n:3 * n]) if layout.has_buffers else None
    return (list(tensors[:n]), list(tensors[n:2 * n]), buffers, *tensors[-3:])


def _group_sizes(layout):
    """Tensors per input group (params, grads, buffers, lr, weight decay, momentum)."""
    n = layout.n
    return [n, n, n if layout.has_buffers else 0, 1, 1, 1]


def _wanted(ctx, layout, tensors):
    """Per group (params, grads, buffers, lr, wd, m): whether the running backward uses it."""
    sizes = _group_sizes(layout)
    present = [t is not None for t in tensors[-2:]]
    needs = [need for need, t in zip(ctx.needs_input_grad[-len(tensors):], tensors)
             if t is not None]
    wanted = iter(wanted_groups(ctx, needs, sizes[:4] + [1 for p in present if p]))
    return [next(wanted) for _ in range(4)] + [next(wanted) if p else False for p in present]


def apply(function, *args):
    """``function.apply(*args)`` without the Python-side argument processing of
    torch.autograd.Function.apply (binding default arguments, unwrapping dead torch.func
    wrappers: about a microsecond per tensor, so hundreds for a parameter list). Neither applies
    to these Functions outside torch.func transforms and torch.compile, which take the full path.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


class TracedPilotStep(torch.autograd.Function):
    """p'_i for every i: `apply(layout, *tensors)` returns one tensor per param. Without a
    forward-mode rule: what torch.compile traces (Dynamo refuses Functions with a custom jvp);
    `PilotStep` adds the rule everywhere else (`step_function`)."""

    @staticmethod
    def forward(layout, *tensors):
        return tuple(pilot_sgd_step(*unpack(layout, tensors), *layout.config,
                                    list(layout.tensor_scalars)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        layout, *tensors = inputs
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, *grad_outputs):
        layout, tensors = ctx.layout, ctx.saved_tensors
        want = _wanted(ctx, layout, tensors)
        weight_decay = tensors[-2]
        # Without weight decay ∂p'/∂p is the identity: the params' gradient is grad_outputs.
        mask = [want[0] and weight_decay is not None, *want[1:]]
        # A node for the backward only when it is itself differentiated (create_graph); the
        # op alone otherwise, and under torch.compile, which traces backward graphs first-order.
        args = (layout, tuple(mask), *grad_outputs, *tensors)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            flat = apply(PilotStepBackward, *args)
        else:
            flat = PilotStepBackward.forward(*args)
        grads, at = [], 0
        for group, size in enumerate(_group_sizes(layout)):
            if group == 0 and not mask[0]:
                grads.extend(grad_outputs if want[0] else [None] * size)
            elif mask[group]:
                grads.extend(flat[at:at + size])
                at += size
            else:
                grads.extend([None] * size)
        needs = ctx.needs_input_grad[1:]
        return (None, *(g if need else None for g, need in zip(grads, needs)))

    @staticmethod
    def vmap(info, in_dims, layout, *tensors):
        dims = in_dims[1:]
        if any(d is not None for d in dims[-3:]):      # batched step sizes: one step per task
            return _per_sample(lambda *ts: step_function().apply(layout, *ts), info, dims,
                               tensors)
        # Shared step sizes: the step is elementwise, so a batch of lists is a longer list.
        lists = [_batch_first(t, d, info.batch_size) for t, d in zip(tensors[:-3], dims[:-3])]
        out = step_function().apply(layout, *lists, *tensors[-3:])
        return out, (0,) * len(out)


class PilotStep(TracedPilotStep):
    """TracedPilotStep with its forward-mode rule."""

    @staticmethod
    def jvp(ctx, _layout, *tangents):
        """The step is linear in (p, g, buf): their tangents take the same step (through this
        Function again, so a vmap over tangents is one call), and tangents of the scalars add
        −lṙ·u − lr·K·ẇd·p − lr·ṁ·∂u/∂m."""
        refuse_forward_over_forward("pilot_sgd_step")
        layout, tensors = ctx.layout, ctx.saved_tensors
        params, grads, buffers, lr, wd, m = unpack(layout, tensors)
        d_params, d_grads, d_buffers, d_lr, d_wd, d_m = unpack(layout, tangents)
        out = apply(PilotStep, layout, *_filled(d_params, params), *_filled(d_grads, grads),
                    *([] if buffers is None else _filled(d_buffers, buffers)), lr, wd, m)
        if d_lr is None and d_wd is None and d_m is None:
            return out
        u, u_m, (k, *_) = _update_and_its_momentum_derivative(layout, params, grads, buffers,
                                                              wd, m)
        scalars = _combine([(_coef(-1, d_lr), u), (_coef(-1, lr, k, d_wd), params),
                            (_coef(-1, lr, d_m), u_m)], params)
        return tuple(a + b for a, b in zip(out, scalars))


def step_function():
    """The pilot step's Function: PilotStep, or TracedPilotStep while torch.compile traces."""
    return TracedPilotStep if torch.compiler.is_compiling() else PilotStep


class PilotStepBackward(torch.autograd.Function):
    """`apply(layout, mask, *grad_outputs, *tensors)`: the gradients the mask selects, flat
    (params', grads', buffers' lists, then the lr, weight-decay and momentum scalars)."""

    @staticmethod
    def forward(layout, mask, *tensors):
        w, step = list(tensors[:layout.n]), tensors[layout.n:]
        out = pilot_sgd_step_backward(w, *unpack(layout, step), *layout.config, list(mask))
        return (*out[0], *out[1], *out[2], *(s for s, on in zip(out[3:], mask[3:]) if on))

    @staticmethod
    def setup_context(ctx, inputs, output):
        layout, mask, *tensors = inputs
        ctx.layout, ctx.mask = layout, mask
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, *cotangents):
        layout, mask = ctx.layout, ctx.mask
        tensors = ctx.saved_tensors
        w, step = list(tensors[:layout.n]), tensors[layout.n:]
        sizes = [layout.n] * 3 + [1] * 3
        parts, at = [], 0
        for on, size in zip(mask, sizes):
            parts.append(list(cotangents[at:at + size]) if on else None)
            at += size if on else 0
        cp, cg, cb = parts[:3]
        cb = cb if layout.has_buffers else None
        c_scalars = [p[0] if p is not None else None for p in parts[3:]]
        needs = ctx.needs_input_grad[2:]
        grads = _second_order(layout, w, *unpack(layout, step), cp, cg, cb, *c_scalars, needs)
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _layout, _mask, *tangents):
        """This op is w ↦ Jᵀw, J the step's Jacobian at x = (p, g, buf, lr, wd, m): linear in
        w, so ẇ takes the op once more; along ẋ its tangent is H_w·ẋ, H_w the Hessian of
        ⟨w, step(x)⟩, symmetric, so the vector-Jacobian product `backward` computes,
        `_second_order` with the tangents as cotangents."""
        refuse_forward_over_forward("pilot_sgd_step")
        layout, mask, tensors = ctx.layout, ctx.mask, ctx.saved_tensors
        n = layout.n
        w, step = list(tensors[:n]), tensors[n:]
        d_w, d_step = tangents[:n], tangents[n:]
        params, grads, buffers, lr, wd, m = unpack(layout, step)
        d_params, d_grads, d_buffers, d_lr, d_wd, d_m = unpack(layout, d_step)
        out = apply(PilotStepBackward, layout, mask, *_filled(d_w, w), *step)
        lists = [_filled(d, x) if d is not None and any(t is not None for t in d) else None
                 for d, x in ((d_params, params), (d_grads, grads), (d_buffers, buffers))]
        lists_on = mask[:3] if buffers is not None else mask[:2]
        needs = [False] * n + [on for on in lists_on for _ in range(n)] + list(mask[3:])
        second = [g for g in _second_order(layout, w, params, grads, buffers, lr, wd, m, *lists,
                                           d_lr, d_wd, d_m, needs)[n:] if g is not None]
        return tuple(a + b for a, b in zip(out, second))

    @staticmethod
    def vmap(info, in_dims, layout, mask, *tensors):
        # The scalar gradients are sums over each task's elements: one call per task.
        return _per_sample(lambda *ts: PilotStepBackward.apply(layout, mask, *ts), info,
                           in_dims[2:], tensors)


def _filled(tangents, like):
    """A list of tangents with zeros for the absent ones (forward mode passes None there)."""
    return [torch.zeros_like(x) if t is None else t for t, x in zip(tangents, like)]


def _update_and_its_momentum_derivative(layout, params, grads, buffers, wd, m):
    """(u, ∂u/∂m, `step_coefficients`) of the step p' = p − lr·u, u = K·d + L·buf,
    d = s·g + wd·p."""
    dampening, nesterov, maximize = layout.config
    coefficients = step_coefficients(m, dampening, nesterov, buffers is not None)
    k, l, k_m, l_m, _ = coefficients
    d = _combine([(-1 if maximize else 1, grads), (wd, params)], params)
    u = _combine([(k, d), (_coef(l), buffers)], params)
    u_m = _combine([(_coef(k_m), d), (_coef(l_m), buffers)], params)
    return u, u_m, coefficients


def _per_sample(fn, info, dims, tensors):
    """vmap by a loop: fn on each sample's tensors, outputs stacked along dim 0."""
    results = [fn(*(t.select(d, i) if d is not None else t for t, d in zip(tensors, dims)))
               for i in range(info.batch_size)]
    out = tuple(torch.stack(ts) for ts in zip(*results))
    return out, (0,) * len(out)


def _batch_first(x, dim, size):
    """x with the batch dim first (expanded when x is not batched)."""
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


def step_coefficients(m, dampening, nesterov, has_buffers):
    """(K, L, ∂K/∂m, ∂L/∂m, ∂²L/∂m²) of u = K·d + L·buf for momentum m (None: off)."""
    if m is None or not (nesterov or has_buffers):
        return 1, 0, 0, 0, 0
    if not has_buffers:                                    # Nesterov, first step: u = (1 + m)·d
        return 1 + m, 0, 1, 0, 0
    c = 1 - dampening
    if not nesterov:                                       # u = m·buf + c·d
        return c, m, 0, 1, 0
    return 1 + m * c, m * m, c, 2 * m, 2                   # u = d + m·(m·buf + c·d)


def _coef(*factors):
    """The product of the factors; None if one is None or the number 0 (an absent term)."""
    out = 1
    for f in factors:
        if f is None or (not isinstance(f, torch.Tensor) and f == 0):
            return None
        out = out * f
    return out


def _total(*coefs):
    """The sum of the coefficients that are present (None if none is)."""
    present = [c for c in coefs if c is not None]
    return sum(present[1:], present[0]) if present else None


def _combine(terms, like):
    """Per tensor Σ coef·x over the (coef, xs) terms whose coef and xs are present."""
    live = [(c, xs) for c, xs in terms if c is not None and xs is not None]
    out = []
    for i, ref in enumerate(like):
        acc = torch.zeros_like(ref)
        for c, xs in live:
            acc = acc + xs[i] * c
        out.append(acc)
    return out


def _scalar_total(terms, like):
    """Σ coef·dot over the (coef, dot) terms that are present, as a scalar like `like`."""
    total = _total(*(_coef(c, dot) for c, dot in terms if dot is not None))
    return (total if total is not None else torch.zeros((), dtype=torch.float64)).to(like)


def _second_order(layout, w, params, grads, buffers, lr, wd, m, cp, cg, cb, clr, cwd, cm, needs):
    """The derivative of pilot_sgd_step_backward, from its closed form (with u_m = ∂u/∂m):

        ∂p = w − lr·K·wd·w,  ∂g = −lr·K·s·w,  ∂buf = −lr·L·w,
        ∂lr = −Σ⟨w, u⟩,  ∂wd = −lr·K·Σ⟨w, p⟩,  ∂m = −lr·Σ⟨w, u_m⟩,

    contracted with the cotangents (cp, cg, cb lists; clr, cwd, cm scalars; None: absent).
    Returns the gradients of the flat inputs (w, params, grads, buffers, lr, wd, m), None where
    `needs` is False.
    """
    maximize = layout.config[2]
    s = -1 if maximize else 1
    u, u_m, (k, l, k_m, l_m, l_mm) = _update_and_its_momentum_derivative(
        layout, params, grads, buffers, wd, m)
    dot = {name: list_dot(w, xs) if xs is not None else None
           for name, xs in (("cp", cp), ("cg", cg), ("cb", cb), ("p", params), ("um", u_m),
                            ("b", buffers))}
    g_w = _combine([(1, cp), (_coef(-1, lr, k, wd), cp), (_coef(-s, lr, k), cg),
                    (_coef(-1, lr, l), cb), (_coef(-1, clr), u),
                    (_coef(-1, cwd, lr, k), params), (_coef(-1, cm, lr), u_m)], params)
    g_p = _combine([(_total(_coef(-1, clr, k, wd), _coef(-1, cwd, lr, k),
                            _coef(-1, cm, lr, k_m, wd)), w)], params)
    g_g = _combine([(_total(_coef(-s, clr, k), _coef(-s, cm, lr, k_m)), w)], params)
    g_b = (_combine([(_total(_coef(-1, clr, l), _coef(-1, cm, lr, l_m)), w)], params)
           if buffers is not None else [])
    n = layout.n
    b = 3 * n if buffers is not None else 2 * n
    out = [*g_w, *g_p, *g_g, *g_b]
    if needs[n + b]:
        out.append(_scalar_total([(_coef(-1, k, wd), dot["cp"]), (_coef(-s, k), dot["cg"]),
                                  (_coef(-1, l), dot["cb"]), (_coef(-1, cwd, k), dot["p"]),
                                  (_coef(-1, cm), dot["um"])], lr))
    else:
        out.append(None)
    out.append(_scalar_total([(_coef(-1, lr, k), dot["cp"]), (_coef(-1, clr, k), dot["p"]),
                              (_coef(-1, cm, lr, k_m), dot["p"])], wd)
               if needs[n + b + 1] else None)
    out.append(_scalar_total([(_coef(-1, lr, k_m, wd), dot["cp"]),
                              (_coef(-s, lr, k_m), dot["cg"]), (_coef(-1, lr, l_m), dot["cb"]),
                              (_coef(-1, clr), dot["um"]), (_coef(-1, cwd, lr, k_m), dot["p"]),
                              (_coef(-1, cm, lr, l_mm), dot["b"])], m)
               if needs[n + b + 2] else None)
    return [g if need else None for g, need in zip(out, needs)]
