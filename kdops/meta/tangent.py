"""The student's JVP from the forward it already ran: tangents without a second primal pass.

`TangentTape` watches one forward (a `TorchDispatchMode` below autograd) and notes each
operator that reads a tensor computed from the sources (the student's parameters), keeping
only the primal values that operator's derivative needs: for a convolution its input and
weight, for a batch norm its input and batch statistics, for a ReLU its output
(`tangent_rules`); autograd saves the same tensors for the backward, so the tape costs no
activation memory of its own.
`jvp(output, tangents)` then runs the derivative of each noted operator, in order, on the
tangents alone: z = J·u for the price of the tangent terms (two convolutions per convolution),
where torch.func.jvp runs the whole forward again beside them.

Operators without a rule are differentiated one by one with forward-mode autograd on
their recorded inputs (exact, at the cost of recomputing that one operator). The tape refuses
(`UnsupportedForward`; `kdops.meta` then falls back to torch.func.jvp) what it cannot replay
exactly: an in-place or random operator without a rule, a tensor changed in place after it
was read, a tensor that requires grad but was computed outside the recorded operators (a
compiled region, say), or an output that does not depend on the sources.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .tangent_rules import RULES, VALUE_FREE, Rule

_TAG = "_kdops_tangent_slot"    # (tape serial, slot) on each tensor a tape tracks


class UnsupportedForward(RuntimeError):
    """The recorded forward cannot be replayed exactly; the message says why."""


class _Entry(NamedTuple):
    func: object
    rule: Rule | None   # None: forward-mode autograd on the recorded inputs
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
        if len({id(p) for p in self._sources}) != len(self._sources):
            raise ValueError("TangentTape: a source tensor is listed twice")
        self._version = [p._version for p in self._sources]
        self._entries: list[_Entry] = []
        self._refusal: str | None = None
        self._unsettled: list = []     # (slot, tensor) of the last operator's outputs
        self._mode = None

    def __enter__(self):
        for slot, p in enumerate(self._sources):
            setattr(p, _TAG, (self._serial, slot))
        self._mode = _Recorder(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._settle()
        for p in self._sources:               # the caller's parameters keep no trace
            delattr(p, _TAG)
        # No reference cycle through the mode: the tape (and what it keeps) goes with its
        # last reference, not at the next garbage collection.
        mode, self._mode = self._mode, None
        return mode.__exit__(*exc)

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
                try:
                    result = _replay(entry, targs)
                except (RuntimeError, NotImplementedError) as e:
                    raise UnsupportedForward(f"the tangent of {entry.func}: {e}") from e
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
            return None
        if x._version != self._version[slot]:
            self._refuse(f"{func} reads a tensor changed in place by an operator that did not "
                         "update its tangent")
        return slot

    def _record(self, func, args, kwargs):
        """Runs one operator, noting it when it reads a tracked tensor."""
        if self._unsettled:
            self._settle()
        kind = _kind(func)
        if self._refusal is not None or kind is _VALUE_FREE:
            return func(*args, **kwargs)
        slots = self._input_slots(func, args)
        if slots is None:
            return func(*args, **kwargs)
        if kwargs and any(isinstance(v, Tensor) and self._slot(v) is not None
                          for v in kwargs.values()):
            self._refuse(f"{func} takes a tracked tensor as a keyword argument")
            return func(*args, **kwargs)
        if kind is _REFUSED:
            self._refuse(f"no tangent rule for {func} (in place or random)")
            return func(*args, **kwargs)
        rule = kind if isinstance(kind, Rule) else None
        out = func(*args, **kwargs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if rule is None:
            keep_args, keep_outs = range(len(args)), ()
        else:
            keep_args, keep_outs = rule.keep([s is not None for s in slots], args)
        kept_args, versions = list(args), []
        for i, a in enumerate(args):
            if i in keep_args:
                versions.extend((t, t._version, None) for t in _tensors(a))
            elif isinstance(a, (Tensor, list, tuple)) and _tensors(a):
                kept_args[i] = None
        kept_outs, out_slots, meta = [], [], []
        for i, o in enumerate(outs):
            slot = None
            if isinstance(o, Tensor):
                meta.append((o.shape, o.dtype))
                if o.is_floating_point() or o.is_complex():
                    slot = len(self._version)
                    setattr(o, _TAG, (self._serial, slot))
                    self._unsettled.append((slot, o))
                    self._version.append(None)
            else:
                meta.append(None)
            out_slots.append(slot)
            if i in keep_outs:
                kept_outs.append(o)
                versions.append((o, None, slot) if slot is not None else (o, o._version, None))
            else:
                kept_outs.append(None)
        self._entries.append(_Entry(func, rule, tuple(kept_args), kwargs, tuple(slots),
                                    tuple(kept_outs), tuple(out_slots), tuple(meta),
                                    tuple(versions)))
        return out


# What `_record` does with an operator: a Rule, forward-mode autograd (_FORWARD_AD), nothing
# (_VALUE_FREE: outputs that depend on the inputs' shapes only) or a refusal (_REFUSED: in
# place or random, without a rule). Cached per operator.
_FORWARD_AD, _VALUE_FREE, _REFUSED = "forward_ad", "value_free", "refused"
_KINDS: dict = {}


def _kind(func):
    kind = _KINDS.get(func)
    if kind is None:
        if func in VALUE_FREE:
            kind = _VALUE_FREE
        else:
            kind = RULES.get(func) or (_FORWARD_AD if _replayable(func) else _REFUSED)
        _KINDS[func] = kind
    return kind


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

        out = func(*(dual(a, t) for a, t in zip(args, targs)), **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(fwAD.unpack_dual(o).tangent if isinstance(o, Tensor) else None
                     for o in outs)
