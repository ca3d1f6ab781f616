"""The student's JVP from the forward it already ran: tangents without a second primal pass.

`TangentTape` watches one forward (a `TorchDispatchMode` below autograd) and notes each
operator that reads a tensor computed from the sources (the student's parameters), keeping
only the primal values that operator's derivative needs: for a convolution its input and
weight, for a batch norm its input and batch statistics, for a ReLU its output; autograd saves
the same tensors for the backward, so the tape costs no activation memory of its own.
`jvp(output, tangents)` then runs the derivative of each noted operator, in order, on the
tangents alone: z = J·u for the price of the tangent terms (two convolutions per convolution),
where torch.func.jvp runs the whole forward again beside them.

Operators without a rule below are differentiated one by one with forward-mode autograd on
their recorded inputs (exact, at the cost of recomputing that one operator). The tape refuses
(`UnsupportedForward`; `kdops.meta` then falls back to torch.func.jvp) what it cannot replay
exactly: an in-place or random operator without a rule, a tensor changed in place after it
was read, a tensor that requires grad but was computed outside the recorded operators (a
compiled region, say), or an output that does not depend on the sources.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import itertools

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_TAG = "_kdops_tangent_slot"    # (tape serial, slot) on each tensor a tape tracks


class UnsupportedForward(RuntimeError):
    """The recorded forward cannot be replayed exactly; the message says why."""


class _Rule(NamedTuple):
    tangent: Callable   # (args, tangents, outs, meta, kwargs) -> output tangent(s)
    keep: Callable      # (tracked per arg, args) -> (arg positions, output positions) to keep


class _Entry(NamedTuple):
    func: object
    rule: _Rule | None  # None: forward-mode autograd on the recorded inputs
    args: tuple         # recorded args, tensors not kept replaced by None
    kwargs: dict
    slots: tuple        # per arg: its slot, a tuple of slots for a tensor list, or None
    outs: tuple         # kept outputs (None where not kept)
    out_slots: tuple
    meta: tuple         # (shape, dtype) per output
    versions: tuple     # (tensor, version or None, slot or None) of every kept tensor


class TangentTape:
    """Records a forward that depends on `sources`; `jvp` replays its tangents.

    Usage::

        tape = TangentTape(params)
        with tape:
            out = model(x)
        z = tape.jvp(out, tangents)      # J_out(params)·tangents, or UnsupportedForward

    A tracked tensor carries its slot (the index of its tangent) as an attribute, tagged with
    the tape's serial number; the tape holds no reference to it unless a rule keeps it.
    """

    _serials = itertools.count()

    def __init__(self, sources: Sequence[Tensor]):
        self._serial = next(self._serials)
        self._sources = list(sources)
        self._version = [p._version for p in self._sources]
        self._entries: list[_Entry] = []
        self._refusal: str | None = None
        self._unsettled: list = []     # (slot, tensor) of the last operator's outputs
        self._mode = _Recorder(self)

    def __enter__(self):
        for slot, p in enumerate(self._sources):
            setattr(p, _TAG, (self._serial, slot))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._settle()
        for p in self._sources:               # the caller's parameters keep no trace
            delattr(p, _TAG)
        return self._mode.__exit__(*exc)

    def jvp(self, output: Tensor, tangents: Sequence[Tensor]) -> Tensor:
        """J·tangents for the recorded `output` (a tensor the recorded forward returned).

        tangents: one per source, same shapes and dtypes. Raises UnsupportedForward where the
        forward cannot be replayed (module docstring)."""
        if self._refusal is not None:
            raise UnsupportedForward(self._refusal)
        target = self._slot(output)
        if target is None or target < len(self._sources):
            raise UnsupportedForward("the output was not computed from the sources by the "
                                     "recorded operators")
        if len(tangents) != len(self._sources):
            raise ValueError(f"TangentTape.jvp: {len(tangents)} tangents for "
                             f"{len(self._sources)} sources")
        last_use = {}
        for i, entry in enumerate(self._entries):
            for s in _flat_slots(entry.slots):
                last_use[s] = i
        tan: dict[int, Tensor] = dict(enumerate(tangents))
        with torch.no_grad():
            for i, entry in enumerate(self._entries):
                for t, version, slot in entry.versions:
                    if t._version != (version if slot is None else self._version[slot]):
                        raise UnsupportedForward(f"a tensor {entry.func} read was changed in "
                                                 "place later in the forward")
                targs = tuple(_tangent_of(s, tan) for s in entry.slots)
                result = _replay(entry, targs)
                for s, t in zip(entry.out_slots, result):
                    if s is not None and t is not None:
                        tan[s] = t
                for s in _flat_slots(entry.slots):
                    if last_use[s] == i and s >= len(self._sources) and s != target:
                        tan.pop(s, None)
        z = tan.get(target)
        return torch.zeros_like(output) if z is None else z

    def _slot(self, x: Tensor):
        tag = getattr(x, _TAG, None)
        return tag[1] if tag is not None and tag[0] == self._serial else None

    def _settle(self) -> None:
        """Notes the versions of the last operator's outputs. Autograd sets them after the
        operator returns (it bumps an in-place operator's, gives a view its base's counter), so
        they are read when the next operator starts."""
        for slot, t in self._unsettled:
            self._version[slot] = t._version
        self._unsettled.clear()

    def _refuse(self, why: str) -> None:
        if self._refusal is None:
            self._refusal = why
            self._entries.clear()

    def _input_slots(self, func, args):
        """Per argument its slot, a tuple of slots for a tensor list, or None (untracked);
        None instead of the list when no argument is tracked or the tape refuses: a tensor
        that requires grad but is untracked, or is tracked at another version."""
        slots, tracked = [], False
        for a in args:
            if isinstance(a, Tensor):
                slot = self._check(func, a)
            elif isinstance(a, (list, tuple)) and a and (a[0] is None
                                                         or isinstance(a[0], Tensor)):
                slot = tuple(self._check(func, x) if isinstance(x, Tensor) else None
                             for x in a)
                slot = slot if any(s is not None for s in slot) else None
            else:
                slot = None
            if self._refusal is not None:
                return None
            tracked = tracked or slot is not None
            slots.append(slot)
        return slots if tracked else None

    def _check(self, func, x):
        slot = self._slot(x)
        if slot is None:
            if x.requires_grad:
                self._refuse(f"{func} reads a tensor that requires grad but was not computed "
                             "by the recorded operators")
        elif x._version != self._version[slot]:
            self._refuse(f"{func} reads a tensor changed in place by an operator that did not "
                         "update its tangent")
        return slot

    def _record(self, func, args, kwargs):
        """Runs one operator, noting it when it reads a tracked tensor."""
        if self._unsettled:
            self._settle()
        if self._refusal is not None or func in _VALUE_FREE:
            return func(*args, **kwargs)
        slots = self._input_slots(func, args)
        if slots is None:
            return func(*args, **kwargs)
        if any(isinstance(v, Tensor) and self._slot(v) is not None for v in kwargs.values()):
            self._refuse(f"{func} takes a tracked tensor as a keyword argument")
            return func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is None and not _replayable(func):
            self._refuse(f"no tangent rule for {func} (in place or random)")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        tracked = [s is not None for s in slots]
        keep_args, keep_outs = rule.keep(tracked, args) if rule else (range(len(args)), ())
        kept_args = tuple(a if i in keep_args or not _has_tensor(a) else None
                          for i, a in enumerate(args))
        kept_outs = tuple(o if i in keep_outs else None for i, o in enumerate(outs))
        out_slots = []
        for o in outs:
            if isinstance(o, Tensor) and (o.is_floating_point() or o.is_complex()):
                slot = len(self._version)
                setattr(o, _TAG, (self._serial, slot))
                self._unsettled.append((slot, o))
                self._version.append(None)
                out_slots.append(slot)
            else:
                out_slots.append(None)
        versions = [(t, t._version, None) for i in keep_args for t in _tensors(args[i])]
        versions += [(o, None, s) if s is not None else (o, o._version, None)
                     for o, s in zip(kept_outs, out_slots) if o is not None]
        meta = tuple((o.shape, o.dtype) if isinstance(o, Tensor) else None for o in outs)
        self._entries.append(_Entry(func, rule, kept_args, kwargs, tuple(slots), kept_outs,
                                    tuple(out_slots), meta, tuple(versions)))
        return out


class _Recorder(TorchDispatchMode):
    def __init__(self, tape: TangentTape):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.tape._record(func, args, kwargs or {})


def _replayable(func) -> bool:
    """Whether forward-mode autograd on the recorded inputs reproduces the operator: out of
    place, deterministic, and not a batch norm (whose running statistics it would move)."""
    schema = func._schema
    return not (schema.is_mutable or torch.Tag.nondeterministic_seeded in func.tags
                or "batch_norm" in schema.name)


def _has_tensor(a) -> bool:
    return isinstance(a, Tensor) or (isinstance(a, (list, tuple))
                                     and any(isinstance(x, Tensor) for x in a))


def _tensors(a):
    if isinstance(a, Tensor):
        return (a,)
    if isinstance(a, (list, tuple)):
        return tuple(x for x in a if isinstance(x, Tensor))
    return ()


def _flat_slots(slots):
    for s in slots:
        if isinstance(s, tuple):
            yield from (x for x in s if x is not None)
        elif s is not None:
            yield s


def _tangent_of(slot, tan):
    if isinstance(slot, tuple):
        return tuple(tan.get(s) if s is not None else None for s in slot)
    return tan.get(slot) if slot is not None else None


def _replay(entry: _Entry, targs) -> tuple:
    """The output tangents of one recorded operator, a tuple aligned with its outputs."""
    if entry.rule is not None:
        result = entry.rule.tangent(entry.args, targs, entry.outs, entry.meta, entry.kwargs)
    else:
        result = _forward_ad(entry.func, entry.args, targs, entry.kwargs)
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    return tuple(_shaped(t, m) for t, m in zip(result, entry.meta))


def _shaped(t, meta):
    """A tangent with its output's shape and dtype (broadcast terms come out smaller)."""
    if t is None or meta is None:
        return t
    shape, dtype = meta
    if t.shape != shape:
        t = t.expand(shape)
    return t if t.dtype == dtype else t.to(dtype)


def _forward_ad(func, args, targs, kwargs):
    """Tangents of one operator by forward-mode autograd on its recorded inputs."""
    with fwAD.dual_level():
        def dual(a, t):
            if isinstance(a, (list, tuple)) and isinstance(t, tuple):
                return type(a)(dual(x, y) for x, y in zip(a, t))
            if isinstance(a, Tensor) and t is not None:
                return fwAD.make_dual(a.detach(), t)
            return a

        try:
            out = func(*(dual(a, t) for a, t in zip(args, targs)), **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            raise UnsupportedForward(f"forward-mode autograd of {func}: {e}") from e
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(fwAD.unpack_dual(o).tangent if isinstance(o, Tensor) else None
                     for o in outs)


# Rules: the tangent of an operator's outputs from its inputs' tangents (None: zero) and the
# primal values it keeps.

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


def _keep_convolution(tracked, args):
    return {i for i, other in ((0, 1), (1, 0)) if tracked[other]}, ()


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
        if dw is not None:                         # dγ·(x − μ)·r = x·(r·dγ) + (−μ·r·dγ)
            scale = invstd * dw
            terms.append(torch.addcmul((-mean * scale).view(shape), x, scale.view(shape)))
        if db is not None:
            terms.append(db.view(shape))
        return (_sum(terms),) + (None,) * (len(meta) - 1)

    def keep(tracked, args):
        if not (tracked[x_at] or tracked[w_at]):
            return (), ()
        if training_at is not None and args[training_at]:
            return {x_at, w_at}, {saved_at, saved_at + 1}
        return {x_at, w_at, stats_at, stats_at + 1}, ()

    return _Rule(tangent, keep)


def _add(sign):
    def tangent(args, targs, outs, meta, kwargs):
        da, db = targs[0], targs[1] if len(targs) > 1 else None
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if db is not None and alpha * sign != 1:
            db = db * (alpha * sign)
        return _sum([da, db])
    return _Rule(tangent, _keep_nothing)


def _mul(args, targs, outs, meta, kwargs):
    a, b = args[:2]
    da, db = targs[:2]
    return _sum([da * b if da is not None else None, a * db if db is not None else None])


def _keep_other(tracked, args):
    return {i for i, other in ((0, 1), (1, 0)) if tracked[other]}, ()


def _mm(args, targs, outs, meta, kwargs):
    a, b = args[:2]
    da, db = targs[:2]
    return _sum([da @ b if da is not None else None, a @ db if db is not None else None])


def _addmm(args, targs, outs, meta, kwargs):
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
    """Tangent rule of an operator linear in its first (only tracked) argument."""
    def tangent(args, targs, outs, meta, kwargs):
        return func(targs[0], *args[1:], **kwargs)
    return _Rule(tangent, _keep_nothing)


def _identity(args, targs, outs, meta, kwargs):
    return targs[0]


def _native_dropout(args, targs, outs, meta, kwargs):
    p, train = args[1], args[2]
    if train is not None and not train:        # train=None means training
        return targs[0], None
    return aten.native_dropout_backward(targs[0], outs[1], 1.0 / (1.0 - p)), None


def _pointwise_backward(backward, use_output):
    """A pointwise function f with f'(x)·v = backward(v, output or x): its tangent is that."""
    def tangent(args, targs, outs, meta, kwargs):
        return backward(targs[0], outs[0] if use_output else args[0])

    def keep(tracked, args):
        return ((), {0}) if use_output else ({0}, ())
    return _Rule(tangent, keep)


def _gelu(args, targs, outs, meta, kwargs):
    return aten.gelu_backward(targs[0], args[0], approximate=kwargs.get(
        "approximate", args[1] if len(args) > 1 else "none"))


_LINEAR = [aten.view.default, aten._unsafe_view.default, aten.t.default,
           aten.transpose.int, aten.permute.default, aten.expand.default, aten.squeeze.dim,
           aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default, aten.select.int,
           aten.slice.Tensor, aten.clone.default, aten._to_copy.default, aten.alias.default,
           aten.neg.default, aten.mean.dim, aten.mean.default, aten.sum.dim_IntList,
           aten.sum.default, aten.mul.Scalar, aten.div.Scalar, aten.avg_pool2d.default,
           aten._adaptive_avg_pool2d.default, aten.split.Tensor, aten.split_with_sizes.default,
           aten.unbind.int]

# Outputs that depend on the inputs' shapes only: untracked (no tangent).
_VALUE_FREE = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
               aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
               aten.randint_like.default, aten.new_empty.default, aten.new_zeros.default,
               aten.new_ones.default, aten.new_full.default, aten.new_empty_strided.default}

_RULES = {func: _apply_to_tangent(func) for func in _LINEAR}
_RULES.update({
    aten.convolution.default: _Rule(_convolution, _keep_convolution),
    aten.native_batch_norm.default: _batch_norm_rule(0, 1, 2, 3, 5, 7, 1),
    aten._native_batch_norm_legit.default: _batch_norm_rule(0, 1, 2, 3, 5, 7, 1),
    aten._native_batch_norm_legit.no_stats: _batch_norm_rule(0, 1, 2, None, 3, 5, 1),
    aten._native_batch_norm_legit_no_training.default: _batch_norm_rule(0, 1, 2, 3, None, 6,
                                                                        None),
    aten.cudnn_batch_norm.default: _batch_norm_rule(0, 1, 2, 3, 5, 7, 1),
    aten.relu.default: _pointwise_backward(lambda v, y: aten.threshold_backward(v, y, 0), True),
    aten.relu_.default: _pointwise_backward(lambda v, y: aten.threshold_backward(v, y, 0), True),
    aten.sigmoid.default: _pointwise_backward(aten.sigmoid_backward, True),
    aten.tanh.default: _pointwise_backward(aten.tanh_backward, True),
    aten.silu.default: _pointwise_backward(aten.silu_backward, False),
    aten.gelu.default: _Rule(_gelu, lambda tracked, args: ({0}, ())),
    aten.add.Tensor: _add(1), aten.add_.Tensor: _add(1),
    aten.sub.Tensor: _add(-1), aten.sub_.Tensor: _add(-1),
    aten.add.Scalar: _Rule(_identity, _keep_nothing),
    aten.sub.Scalar: _Rule(_identity, _keep_nothing),
    aten.mul.Tensor: _Rule(_mul, _keep_other),
    aten.mm.default: _Rule(_mm, _keep_other), aten.bmm.default: _Rule(_mm, _keep_other),
    aten.addmm.default: _Rule(_addmm, _keep_addmm),
    aten.native_dropout.default: _Rule(_native_dropout, lambda tracked, args: ((), {1})),
    aten.detach.default: _Rule(lambda *a: None, _keep_nothing),
})
