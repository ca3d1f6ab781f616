"""`fused_kd_loss` and `KDLoss`: argument checking, normalization and the per-row combination.

The heavy work (softmaxes, divergences, their first and second derivatives) happens in the
registered ops of `kdops._loss_ops`; this module only turns user arguments into their row-flattened
form and combines the ops' per-row outputs, with [N]-sized tensor ops that autograd
differentiates (the scale τ² and the mixing weight alpha included).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch._C import _functorch

from . import _grad_in_forward
from . import _loss_func
from ._library import transformed

Scalar = Union[float, Tensor]

DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_values(ok: Tensor, message: str) -> None:
    """Raise ValueError(message) unless `ok` (a bool tensor) is all true, without a host sync.

    The check reads the data only where that costs no device synchronization (CPU tensors, in
    eager mode); on other devices it is a device-side assertion that fails asynchronously, and
    under torch.compile it is left to the user. Inside torch.func transforms it checks the
    tensor they wrap (under vmap: every batch entry at once), which is not data-dependent
    control flow to them.
    """
    if _is_compiling():
        return
    while _functorch.is_functorch_wrapped_tensor(ok):
        ok = _functorch.get_unwrapped(ok)
    if ok.device.type == "cpu":
        if not bool(ok.all()):
            raise ValueError(message)
    else:
        torch._assert_async(ok.all(), message)


def _check_logits(student: Tensor, teacher: Tensor) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got "
            f"{student.device} and {teacher.device}"
        )


def _row_values(value: Scalar, name: str, lead: torch.Size, n: int, like: Tensor,
                dtype: torch.dtype, positive: bool) -> Tensor:
    """A Python number or a tensor broadcastable to the leading dims, as an [N] tensor.

    Python numbers are validated here, without touching the device; tensors are validated
    with `_check_values` (no host sync)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {like.device}")
        try:
            rows = value.to(dtype).broadcast_to(lead).reshape(n)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} does not broadcast to the logits' leading "
                f"dims {tuple(lead)}"
            ) from None
        if positive:
            _check_values(torch.isfinite(value) & (value > 0),
                          f"{name} must be finite and > 0")
        return rows
    value = _number(value, name, positive)
    return torch.full((), value, dtype=dtype, device=like.device).expand(n)


def _number(value, name: str, positive: bool) -> float:
    """A Python number argument, checked, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return float(value)


def _flat_labels(labels: Tensor, lead: torch.Size, v: int, ignore_index: int,
                 like: Tensor) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead)}, got {tuple(labels.shape)}"
        )
    if labels.device != like.device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {like.device}")
    flat = labels.reshape(-1).to(torch.int64)
    _check_values(((flat >= 0) & (flat < v)) | (flat == ignore_index),
                  f"labels must lie in [0, {v}) or equal ignore_index={ignore_index}")
    return flat


def _check_options(divergence, beta, reduction, alpha, labels) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if alpha is not None:
        if labels is None:
            raise ValueError("alpha mixes in a cross-entropy on labels: pass labels as well")
        if isinstance(alpha, numbers.Real) and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: Scalar = 1.0,
    teacher_temperature: Optional[Scalar] = None,
    divergence: str = "kl",
    beta: float = 0.5,
    scale: Optional[Scalar] = None,
    labels: Optional[Tensor] = None,
    alpha: Optional[Scalar] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    grad_in_forward: bool = False,
) -> Tensor:
    """Temperature-scaled distillation loss between student and teacher logits, fused.

    Per row r (all leading dims flattened), with zs = s / τs, zt = t / τt::

        loss_r = alpha · c · D(softmax(zs), softmax(zt)) + (1 − alpha) · CE(s_r, y_r)

    (without ``alpha`` just ``c · D``). Differentiable to second order with respect to the
    student and teacher logits and both temperatures (also the scale and alpha when tensors).

    Works inside ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jvp``,
    ``jacfwd``, ``hessian`` and their nestings; there ``grad_in_forward`` runs the default
    mode) and on ``torch.autograd.forward_ad`` dual tensors. Forward mode is exact to second
    order over reverse mode (``hessian``, ``jvp(grad(...))``); forward over forward
    (``jacfwd(jacfwd(...))``) raises NotImplementedError.

    Args:
        student_logits: [..., V] floating tensor (float32, bfloat16, float16 or float64).
        teacher_logits: [..., V], same shape and device; its dtype may differ from the student's.
        temperature: student temperature τs > 0: a float, a 0-dim tensor, or a tensor
            broadcastable to the leading dims (per row / per sample). May require grad.
        teacher_temperature: τt, same forms; ``None`` means the student temperature.
        divergence: ``"kl"`` = KL(pt‖ps) (Hinton), ``"reverse_kl"`` = KL(ps‖pt), or ``"jsd"``:
            β KL(pt‖m) + (1 − β) KL(ps‖m), m = β pt + (1 − β) ps, where β = 0 is exactly
            ``"kl"`` and β = 1 exactly ``"reverse_kl"`` (TRL's and Liger's convention).
        beta: β in [0, 1] for ``"jsd"``.
        scale: the factor c; ``None`` means τs² (per row for per-row τs, and differentiated
            when τs is a tensor). A float or a tensor broadcastable to the leading dims.
        labels: [...] integer tensor of the leading shape. Rows whose label is
            ``ignore_index`` contribute nothing (to either term); the others must lie in [0, V).
            Without ``alpha`` labels only select rows.
        alpha: weight of the distillation term; ``(1 − alpha)`` weighs the hard-label
            cross-entropy computed at T = 1 in the same pass. Needs ``labels``.
        ignore_index: label value of ignored rows.
        reduction: ``"batchmean"`` (sum / number of non-ignored rows, at least 1),
            ``"sum"``, ``"mean"`` (sum / (non-ignored rows · V), PyTorch's mean over all
            elements), or ``"none"`` (per-row losses of the leading shape, ignored rows 0).
            Note ``"batchmean"`` divides by rows, not by ``size(0)`` as ``F.kl_div`` does for
            3-D inputs.
        grad_in_forward: compute the gradients to the logits during the forward pass
            (Liger-Kernel's trick; opt-in). The backward then only scales them, and the
            logits are not kept for it: teacher logits made under ``no_grad`` are freed once
            you drop them. **First order only**: differentiating the gradient again raises,
            and temperatures, scale and alpha must not require grad (ValueError). It costs an
            [N, V] gradient held from forward to backward, and the forward does the
            backward's work even if no backward follows. Inside ``torch.func`` transforms
            the default mode runs instead (same values).

    Returns:
        The loss: 0-dim (or the leading shape for ``"none"``), float64 when either logits
        tensor is float64 and float32 otherwise (float32 accumulation for bf16/fp16 inputs).
        Gradients to the logits come back in the logits' own dtypes.

    Raises:
        TypeError / ValueError naming the argument for bad inputs. Value checks of tensor
        arguments (temperatures > 0 and finite, labels in range) raise ValueError on CPU;
        on GPUs they are device-side assertions (no host sync), and under torch.compile they
        are skipped. NaN logits propagate to a NaN loss.
    """
    a = _arguments(student_logits, teacher_logits, temperature, teacher_temperature, divergence,
                   beta, scale, labels, alpha, ignore_index, reduction)
    if grad_in_forward:
        _grad_in_forward.check_constants(temperature=temperature,
                                         teacher_temperature=teacher_temperature, scale=scale,
                                         alpha=alpha)
        # Inside torch.func transforms nothing outlives the call for the mode to spare: the
        # default mode runs, with the same values (and derivatives to any order).
        grad_in_forward = not transformed()
    with torch.no_grad() if grad_in_forward else contextlib.nullcontext():
        div, ce, stats = _loss_func.kd_forward(a.s, a.t, a.tau_s, a.tau_t, a.labels, ignore_index,
                                               divergence, float(beta), a.with_ce)
    rows = _combined(div, ce, a.c, alpha, a.with_ce)
    if grad_in_forward and torch.is_grad_enabled() and (a.s.requires_grad or a.t.requires_grad):
        rows = _grad_in_forward.attach(rows, a.s, a.t, a.tau_s, a.tau_t, a.labels, stats,
                                       ignore_index, divergence, float(beta), a.with_ce,
                                       *_row_weights(a, alpha))
    return _reduce(rows, a.labels, ignore_index, a.lead, a.v, reduction)


def loss_and_student_grad(student_logits: Tensor, teacher_logits: Tensor, *,
                          temperature: Scalar = 1.0, teacher_temperature: Optional[Scalar] = None,
                          divergence: str = "kl", beta: float = 0.5,
                          scale: Optional[Scalar] = None, labels: Optional[Tensor] = None,
                          alpha: Optional[Scalar] = None, ignore_index: int = -100,
                          reduction: str = "batchmean") -> tuple[Tensor, Tensor]:
    """(loss, ∂loss/∂student_logits) of `fused_kd_loss` with the same arguments, the gradient
    differentiable with respect to the teacher logits, the temperatures, scale and alpha (to
    second order overall), not to the student logits; the loss a value without a graph.

    What a pilot step needs (`kdops.meta`): the gradient comes from one kd_backward call whose
    upstream per-row weights are the loss's (alpha·c and 1 − alpha over the reduction's
    denominator), and its autograd is kd_double_backward, so neither the loss's graph nor a
    create_graph backward through it is built. A scalar reduction is required.
    """
    if reduction == "none":
        raise ValueError("loss_and_student_grad: reduction='none' has no gradient of a scalar "
                         "loss; use 'batchmean', 'sum' or 'mean'")
    a = _arguments(student_logits, teacher_logits, temperature, teacher_temperature, divergence,
                   beta, scale, labels, alpha, ignore_index, reduction)
    s, beta, cdt = a.s.detach(), float(beta), a.tau_s.dtype
    with torch.no_grad():
        div, ce, stats = _loss_func.kd_forward(s, a.t, a.tau_s, a.tau_t, a.labels, ignore_index,
                                               divergence, beta, a.with_ce)
        loss = _combined(div, ce, a.c, alpha, a.with_ce).sum()
    weights = _row_weights(a, alpha)
    if reduction != "sum":             # the loss's denominator, counted once for both
        per_row = _denominator(a.labels, ignore_index, a.n, a.v, reduction, cdt)
        loss = loss / per_row
        weights = tuple(w / per_row for w in weights)
    weights = [_grad_in_forward.as_rows(w, a.n, s, cdt) for w in weights]
    grad = _loss_func.kd_backward(*weights, s, a.t, a.tau_s, a.tau_t, a.labels, stats,
                                  ignore_index, divergence, beta, a.with_ce,
                                  [True, False, False, False])[0]
    return loss, grad.reshape(student_logits.shape)


class _Arguments(NamedTuple):
    """fused_kd_loss's arguments checked and row-flattened: logits [N, V], temperatures [N] in
    the compute dtype, labels [N] or None, c the divergence's factor (float or tensor)."""
    s: Tensor
    t: Tensor
    lead: torch.Size
    n: int
    v: int
    tau_s: Tensor
    tau_t: Tensor
    labels: Optional[Tensor]
    with_ce: bool
    c: Scalar


def _arguments(student_logits, teacher_logits, temperature, teacher_temperature, divergence,
               beta, scale, labels, alpha, ignore_index, reduction) -> _Arguments:
    _check_logits(student_logits, teacher_logits)
    _check_options(divergence, beta, reduction, alpha, labels)
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    n = lead.numel()
    cdt = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype),
                              torch.float32)
    s = student_logits.reshape(n, v)
    t = teacher_logits.reshape(n, v)
    tau_s = _row_values(temperature, "temperature", lead, n, s, cdt, positive=True)
    tau_t = tau_s if teacher_temperature is None else _row_values(
        teacher_temperature, "teacher_temperature", lead, n, s, cdt, positive=True)
    flat_labels = None if labels is None else _flat_labels(labels, lead, v, ignore_index, s)
    with_ce = alpha is not None and not (isinstance(alpha, numbers.Real) and alpha == 1)
    if scale is None:
        c = temperature ** 2 if isinstance(temperature, numbers.Real) else tau_s * tau_s
    elif isinstance(scale, Tensor):
        c = _row_values(scale, "scale", lead, n, s, cdt, positive=False)
    else:                                   # a Python number multiplies as one: no device copy
        c = _number(scale, "scale", positive=False)
    return _Arguments(s, t, lead, n, v, tau_s, tau_t, flat_labels, with_ce, c)


def _combined(div: Tensor, ce: Tensor, c: Scalar, alpha, with_ce: bool) -> Tensor:
    """The per-row losses: c·D, or alpha·c·D + (1 − alpha)·CE."""
    rows = div * c
    if alpha is not None:
        rows = alpha * rows + (1 - alpha) * ce if with_ce else rows
    return rows


def _row_weights(a: _Arguments, alpha):
    """(weight of D, weight of CE) in a row's loss, `_combined`'s factors: (alpha·c, 1 − alpha)
    with the cross-entropy, else (c, 0)."""
    return a.c if alpha is None else alpha * a.c, 1 - alpha if a.with_ce else 0.0


def _count(labels: Optional[Tensor], ignore_index: int, n: int, dtype: torch.dtype):
    """The rows a mean divides by: all (at least 1), or those not ignored (a tensor)."""
    if labels is None:
        return max(n, 1)
    return (labels != ignore_index).sum().clamp(min=1).to(dtype)


def _denominator(labels, ignore_index, n, v, reduction, dtype):
    """What "batchmean" and "mean" divide the sum of the rows by."""
    count = _count(labels, ignore_index, n, dtype)
    return count if reduction == "batchmean" else count * v


def _reduce(rows: Tensor, labels: Optional[Tensor], ignore_index: int, lead: torch.Size,
            v: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / _denominator(labels, ignore_index, rows.numel(), v, reduction, rows.dtype)


class KDLoss(nn.Module):
    """Module form of :func:`fused_kd_loss`; the constructor takes the same keyword arguments.

    ``forward(student_logits, teacher_logits, labels=None)``. A temperature given as a tensor
    is used as is (register it as an ``nn.Parameter`` yourself to learn it).
    """

    def __init__(self, *, temperature: Scalar = 1.0, teacher_temperature: Optional[Scalar] = None,
                 divergence: str = "kl", beta: float = 0.5, scale: Optional[Scalar] = None,
                 alpha: Optional[Scalar] = None, ignore_index: int = -100,
                 reduction: str = "batchmean", grad_in_forward: bool = False):
        super().__init__()
        _check_options(divergence, beta, reduction, None, None)
        self.options = dict(temperature=temperature, teacher_temperature=teacher_temperature,
                            divergence=divergence, beta=beta, scale=scale, alpha=alpha,
                            ignore_index=ignore_index, reduction=reduction,
                            grad_in_forward=grad_in_forward)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None) -> Tensor:
        return fused_kd_loss(student_logits, teacher_logits, labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
