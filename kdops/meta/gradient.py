"""The meta-gradient through one pilot step, in the three modes of `kdops.meta`."""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .._pilot_autograd import step_coefficients
from ..loss import fused_kd_loss, loss_and_student_grad
from ..pilot import pilot_sgd_step
from .graph_tangent import graph_jvp, readable
from .tangent import TangentTape, UnsupportedForward
from .train_mode import PhaseTimer, _ReplayRng, _untimed, frozen_batch_norm_stats

MODES = ("jvp", "autograd", "finite_difference")

# Per student, whether `graph_jvp` reads its forwards: learnt from the graph of its first
# recorded forward, and False for good once a graph it was to read is refused. While True, its
# forwards run unrecorded (the record costs tens of microseconds per operator).
_GRAPH_READABLE = weakref.WeakKeyDictionary()


def meta_gradient(student: nn.Module, teacher_logits: Tensor, inputs, labels: Tensor,
                  quiz_inputs, quiz_labels: Tensor, meta_params: Sequence[Tensor], *, lr,
                  mode: str = "jvp", weight_decay=0.0, momentum=0.0, momentum_buffers=None,
                  dampening: float = 0.0, nesterov: bool = False,
                  quiz_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                  fd_eps: float = 1e-3, recompute_student: bool = False,
                  timer: PhaseTimer | None = None, **kd_kwargs) -> dict:
    """∇ L_q(θ') with respect to `meta_params`, θ' one SGD step of `student` on the KD loss.

    Args:
        student: any nn.Module; its trainable parameters are θ. Run in the mode it is in.
        teacher_logits: t(w), the teacher's logits on `inputs`, with its autograd graph to
            the meta-parameters (the teacher's parameters, say).
        inputs, labels: the pilot batch (labels for the CE term of the KD loss; `alpha`
            in `kd_kwargs` weights it, as in `fused_kd_loss`).
        quiz_inputs, quiz_labels: the quiz batch, scored by `quiz_loss(logits, labels)`.
        meta_params: tensors to differentiate: teacher parameters and learnable
            temperatures (passed in `kd_kwargs` as `temperature`/`teacher_temperature`).
        lr, weight_decay, momentum, momentum_buffers, dampening, nesterov: the pilot step,
            as `kdops.pilot_sgd_step` (momentum_buffers: the student optimizer's, or None).
        mode: "jvp", "autograd" or "finite_difference" (module docstring).
        recompute_student: graph-free modes only. False: the pilot's forward of the student
            is kept (its graph for "student_logits" and the JVP) through the quiz. True: it
            is freed after the pilot's backward and run again after the quiz, with the same
            dropout masks and batch statistics: the peak holds one student graph instead of
            two (the pilot's beside the quiz's), for one more forward.
        timer: a `PhaseTimer` to accumulate the time of each phase in, or None.
        kd_kwargs: `fused_kd_loss` arguments (temperature, alpha, divergence, ...).

    Returns a dict: "meta_grads" (one tensor or None per meta-param), "student_logits" (s(θ)
    on `inputs`, with its graph, for a real step that reuses the forward), "pilot_loss",
    "quiz_loss".
    """
    if mode not in MODES:
        raise ValueError(f"meta_gradient: mode must be one of {MODES}, got {mode!r}")
    if recompute_student and mode == "autograd":
        raise ValueError("meta_gradient: recompute_student applies to the graph-free modes; "
                         "mode='autograd' differentiates through the pilot's graph")
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("meta_gradient: the student has no trainable parameters")
    names, theta = [n for n, _ in named], [p for _, p in named]
    meta_params = list(meta_params)
    step = dict(weight_decay=weight_decay, momentum=momentum, momentum_buffers=momentum_buffers,
                dampening=dampening, nesterov=nesterov)
    phase = timer or _untimed
    rng = _ReplayRng()
    if mode == "autograd":
        with phase("pilot"):
            s = student(inputs)
            pilot = fused_kd_loss(s, teacher_logits, labels=labels, **kd_kwargs)
            grads = torch.autograd.grad(pilot, theta, create_graph=True, retain_graph=True)
            fast = pilot_sgd_step(theta, grads, lr, **step)
        with phase("quiz"):
            quiz = _quiz(student, dict(zip(names, fast)), quiz_inputs, quiz_labels, quiz_loss)
        with phase("meta_gradient"):
            meta = torch.autograd.grad(quiz, meta_params, allow_unused=True)
        return dict(meta_grads=list(meta), student_logits=s, pilot_loss=pilot.detach(),
                    quiz_loss=quiz.detach())
    # Graph-free modes: the loss is differentiated on the logits only.
    with phase("pilot"):
        s, tape = _forward(student, inputs, theta, mode == "jvp" and not recompute_student)
        pilot, g_s = loss_and_student_grad(s, teacher_logits, labels=labels, **kd_kwargs)
        grads = torch.autograd.grad(s, theta, g_s.detach(), retain_graph=not recompute_student)
        if recompute_student:
            s = None
        with torch.no_grad():
            fast = pilot_sgd_step([p.detach() for p in theta], grads, lr, **step)
        fast = [p.requires_grad_() for p in fast]
    with phase("quiz"):
        quiz = _quiz(student, dict(zip(names, fast)), quiz_inputs, quiz_labels, quiz_loss)
        u = torch.autograd.grad(quiz, fast)
    with phase("student_jvp"):
        if recompute_student:         # the pilot's forward again: same masks and statistics
            with rng.replay(), frozen_batch_norm_stats(student):
                s, tape = _forward(student, inputs, theta, mode == "jvp")
        z = _student_jvp(student, names, theta, u, inputs, rng, mode, fd_eps, tape, s)
        del tape
    with phase("meta_gradient"):
        # θ' = θ − lr·(K·g + terms free of the meta-parameters): K, the step's factor on g.
        m = None if isinstance(momentum, (int, float)) and momentum == 0 else momentum
        factor = step_coefficients(m, dampening, nesterov, momentum_buffers is not None)[0]
        meta = torch.autograd.grad(g_s, meta_params, grad_outputs=-(lr * factor) * z,
                                   allow_unused=True)
    return dict(meta_grads=list(meta), student_logits=s, pilot_loss=pilot.detach(),
                quiz_loss=quiz.detach())


def _quiz(student, fast, quiz_inputs, quiz_labels, quiz_loss):
    """The quiz loss of the pilot student (running statistics untouched)."""
    with frozen_batch_norm_stats(student):
        return quiz_loss(functional_call(student, fast, (quiz_inputs,)), quiz_labels)


def _forward(student, inputs, theta, jvp_after):
    """(the student's logits on `inputs` with their graph, a `TangentTape` of that forward
    with `theta` as its sources or None). With `jvp_after`, the JVP along θ follows: the
    forward is recorded unless the student's last recorded graph was readable (`graph_jvp`
    then reads this one)."""
    record = jvp_after and not _GRAPH_READABLE.get(student)
    tape = TangentTape(theta) if record else None
    with tape or contextlib.nullcontext():
        return student(inputs), tape


def _student_jvp(student, names, theta, u, inputs, rng, mode, fd_eps, tape, s):
    """z = J_s(θ)·u: the student's logits on `inputs` differentiated along u, forward-mode or
    by central differences, with the pilot forward's dropout masks and batch statistics.

    In "jvp" mode the tangents of the pilot forward: read off its autograd graph
    (`graph_jvp`) where the student's graphs are readable, else replayed from its record
    (`TangentTape`), the first of which tells whether they are (its own graph is then read
    too: the record is the fallback). Where neither serves, torch.func.jvp of a second
    forward; where that fails too, NotImplementedError names "finite_difference"."""
    if mode == "jvp":
        if tape is not None and student not in _GRAPH_READABLE:
            _GRAPH_READABLE[student] = readable(s)
        try:
            if _GRAPH_READABLE[student]:
                try:
                    return graph_jvp(s, theta, u)
                except UnsupportedForward:
                    _GRAPH_READABLE[student] = False
                    if tape is None:
                        raise
            return tape.jvp(s, u)
        except UnsupportedForward as e:
            warnings.warn(f"kdops.meta: the student's JVP runs a second forward with "
                          f"torch.func.jvp, since its pilot forward cannot be replayed: {e}",
                          stacklevel=4)
    primals = tuple(p.detach() for p in theta)

    def logits(*params):
        with rng.replay():
            return functional_call(student, dict(zip(names, params)), (inputs,))

    with frozen_batch_norm_stats(student):
        if mode == "jvp":
            try:
                return jvp(logits, primals, tuple(u))[1]
            except NotImplementedError as e:
                raise NotImplementedError(
                    f"kdops.meta: mode='jvp' has no forward-mode derivative of this student: "
                    f"torch.func.jvp fails too ({str(e).splitlines()[0]}); "
                    f"mode='finite_difference' needs none") from e
        with torch.no_grad():
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in u))
            eps = fd_eps / norm.clamp_min(1e-30)           # a tensor: no host sync
            plus = logits(*(p + (eps * d).to(p.dtype) for p, d in zip(primals, u)))
            minus = logits(*(p - (eps * d).to(p.dtype) for p, d in zip(primals, u)))
            return (plus - minus) / (2 * eps).to(plus.dtype)
