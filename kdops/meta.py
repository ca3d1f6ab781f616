"""Meta-learned distillation: meta-gradients through a pilot step, MetaDistil and MKD steps.

MetaDistil (Zhou et al., 2022) trains the teacher to teach: a *pilot* copy of the student takes
one SGD step on the distillation loss L_p(θ, w) = α·c·D(s(θ), t(w)) + (1 − α)·CE(s(θ), y), the
pilot is scored on a quiz batch, L_q(θ'), and the teacher w follows ∇w L_q(θ'(w)). Then the
real student steps with the updated teacher.

`meta_gradient` computes ∇w L_q(θ'(w)) (and the gradient to learnable temperatures, MKD's
meta-parameters) in one of three ways:

``"jvp"`` (default; DESIGN.md §4): with u = ∇θ' L_q(θ') and z = J_s(θ)·u (one forward-mode JVP
    through the student), ∇w L_q = −lr·K · J_t(w)ᵀ ∂/∂t ⟨∂L_p/∂s, z⟩: the fused second-order
    loss kernel on the logits, then one backward through the teacher. No create_graph through
    any network. Exact for one pilot step of SGD, with weight decay and momentum (K is the
    momentum's factor on the gradient: 1, 1 − dampening, or 1 + m·(1 − dampening) for
    Nesterov; the buffers do not depend on w).
``"autograd"``: create_graph through the student's backward, the fused loss and the fused pilot
    step: the exact reference, at the cost of a second-order graph of the student.
``"finite_difference"``: z ≈ (s(θ + εu) − s(θ − εu)) / 2ε with ε = `fd_eps`/‖u‖ (DistPro's
    trick), for students without forward-mode AD; exact to O(ε²).

`metadistil_step` learns the teacher this way; `mkd_step` learns the temperature
(`kdops.LearnableTemperature`: log-space or CTKD's 1 + 20·sigmoid, one value or one per
sample) with the teacher fixed (MKD, Liu et al., 2022).

Only one pilot step is supported: with several pilot batches the meta-gradient involves the
student's Hessian between steps, which neither "jvp" nor "finite_difference" computes.

Train-mode subtleties: dropout draws the same masks in every forward of the student at θ (the
RNG state is replayed), and BatchNorm uses batch statistics in the JVP, finite-difference and
quiz forwards without touching the running statistics, which the pilot forward updates once.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .loss import fused_kd_loss
from .pilot import pilot_sgd_step
from .temperature import LearnableTemperature

MODES = ("jvp", "autograd", "finite_difference")


@contextlib.contextmanager
def frozen_batch_norm_stats(module: nn.Module):
    """Train-mode BatchNorm layers of `module` use batch statistics and leave their running
    statistics alone inside this block (torch.func transforms refuse the in-place update)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


class _ReplayRng:
    """Captures the RNG state now; `replay()` restores it inside a block (same dropout masks)."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.random.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _step_factor(momentum, dampening, nesterov, momentum_buffers) -> float | Tensor:
    """K: the pilot step's factor on the gradient, θ' = θ − lr·(K·g + terms free of w)."""
    if isinstance(momentum, (int, float)) and momentum == 0:
        return 1.0
    if momentum_buffers is None:
        return 1 + momentum if nesterov else 1.0
    c = 1 - dampening
    return 1 + momentum * c if nesterov else c


def meta_gradient(student: nn.Module, teacher_logits: Tensor, inputs, labels: Tensor,
                  quiz_inputs, quiz_labels: Tensor, meta_params: Sequence[Tensor], *, lr,
                  mode: str = "jvp", weight_decay=0.0, momentum=0.0, momentum_buffers=None,
                  dampening: float = 0.0, nesterov: bool = False,
                  quiz_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                  fd_eps: float = 1e-3, **kd_kwargs) -> dict:
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
        kd_kwargs: `fused_kd_loss` arguments (temperature, alpha, divergence, ...).

    Returns a dict: "meta_grads" (one tensor or None per meta-param), "student_logits" (s(θ)
    on `inputs`, with its graph, for a real step that reuses the forward), "pilot_loss",
    "quiz_loss".
    """
    if mode not in MODES:
        raise ValueError(f"meta_gradient: mode must be one of {MODES}, got {mode!r}")
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("meta_gradient: the student has no trainable parameters")
    names, theta = [n for n, _ in named], [p for _, p in named]
    meta_params = list(meta_params)
    step = dict(weight_decay=weight_decay, momentum=momentum, momentum_buffers=momentum_buffers,
                dampening=dampening, nesterov=nesterov)
    rng = _ReplayRng()
    s = student(inputs)
    if mode == "autograd":
        pilot = fused_kd_loss(s, teacher_logits, labels=labels, **kd_kwargs)
        grads = torch.autograd.grad(pilot, theta, create_graph=True, retain_graph=True)
        fast = pilot_sgd_step(theta, grads, lr, **step)
        quiz = _quiz(student, dict(zip(names, fast)), quiz_inputs, quiz_labels, quiz_loss)
        meta = torch.autograd.grad(quiz, meta_params, allow_unused=True)
        return dict(meta_grads=list(meta), student_logits=s, pilot_loss=pilot.detach(),
                    quiz_loss=quiz.detach())
    # Graph-free modes: the loss is differentiated on the logits only.
    s_leaf = s.detach().requires_grad_()
    pilot = fused_kd_loss(s_leaf, teacher_logits, labels=labels, **kd_kwargs)
    (g_s,) = torch.autograd.grad(pilot, s_leaf, create_graph=True)
    grads = torch.autograd.grad(s, theta, g_s.detach(), retain_graph=True)
    with torch.no_grad():
        fast = pilot_sgd_step([p.detach() for p in theta], grads, lr, **step)
    fast = [p.requires_grad_() for p in fast]
    quiz = _quiz(student, dict(zip(names, fast)), quiz_inputs, quiz_labels, quiz_loss)
    u = torch.autograd.grad(quiz, fast)
    z = _student_jvp(student, names, theta, u, inputs, rng, mode, fd_eps)
    factor = _step_factor(momentum, dampening, nesterov, momentum_buffers)
    meta = torch.autograd.grad(g_s, meta_params, grad_outputs=-(lr * factor) * z,
                               allow_unused=True)
    return dict(meta_grads=list(meta), student_logits=s, pilot_loss=pilot.detach(),
                quiz_loss=quiz.detach())


def _quiz(student, fast, quiz_inputs, quiz_labels, quiz_loss):
    """The quiz loss of the pilot student (running statistics untouched)."""
    with frozen_batch_norm_stats(student):
        return quiz_loss(functional_call(student, fast, (quiz_inputs,)), quiz_labels)


def _student_jvp(student, names, theta, u, inputs, rng, mode, fd_eps):
    """z = J_s(θ)·u: the student's logits on `inputs` differentiated along u, forward-mode or
    by central differences, with the pilot forward's dropout masks and batch statistics."""
    primals = tuple(p.detach() for p in theta)

    def logits(*params):
        with rng.replay():
            return functional_call(student, dict(zip(names, params)), (inputs,))

    with frozen_batch_norm_stats(student):
        if mode == "jvp":
            return jvp(logits, primals, tuple(u))[1]
        with torch.no_grad():
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in u))
            eps = fd_eps / norm.clamp_min(1e-30)           # a tensor: no host sync
            plus = logits(*(p + (eps * d).to(p.dtype) for p, d in zip(primals, u)))
            minus = logits(*(p - (eps * d).to(p.dtype) for p, d in zip(primals, u)))
            return (plus - minus) / (2 * eps).to(plus.dtype)


def sgd_settings(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    """The pilot step that mirrors `optimizer`'s next step on `params`: torch.optim.SGD's lr,
    weight decay, momentum (with its buffers), dampening, Nesterov; plain SGD at the first
    group's lr for any other optimizer."""
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        keys = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize")
        if any(tuple(g[k] for k in keys) != tuple(groups[0][k] for k in keys) for g in groups):
            raise NotImplementedError("kdops.meta: an SGD student optimizer with param groups "
                                      "of different settings is not supported")
        settings = {k: groups[0][k] for k in keys}
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        has = [b is not None for b in buffers]
        if any(has) and not all(has):
            raise NotImplementedError("kdops.meta: some student parameters have momentum "
                                      "buffers and some do not")
        settings["momentum_buffers"] = buffers if all(has) and settings["momentum"] else None
        return settings
    return {"lr": groups[0]["lr"]}


def metadistil_step(student: nn.Module, teacher: nn.Module,
                    student_optimizer: torch.optim.Optimizer,
                    teacher_optimizer: torch.optim.Optimizer, inputs, labels: Tensor,
                    quiz_inputs, quiz_labels: Tensor, *, mode: str = "jvp", pilot_lr=None,
                    quiz_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                    fd_eps: float = 1e-3, **kd_kwargs) -> dict:
    """One MetaDistil step (Algorithm 1 of the paper, as its CV code runs it).

    1. Pilot: the student's KD loss on (inputs, labels) against the teacher, one SGD step of
       a pilot copy (the student optimizer's SGD settings, see `sgd_settings`; `pilot_lr`
       overrides the lr), scored by `quiz_loss` on the quiz batch.
    2. Teacher: its gradients are set to ∇w L_q(θ'(w)) (`meta_gradient`, `mode`) and
       `teacher_optimizer` steps.
    3. Student: the KD loss against the updated teacher, backpropagated through the pilot's
       forward of the student (θ has not changed, so it is not run again), and
       `student_optimizer` steps.

    BatchNorm running statistics move once per step for each network: the student's in the
    pilot forward, the teacher's in its first forward (its second, at the updated weights,
    uses batch statistics without updating them). `kd_kwargs` go to `fused_kd_loss`.

    Returns a dict of detached scalars: "loss" (the real step's), "pilot_loss", "quiz_loss".
    """
    theta = [p for p in student.parameters() if p.requires_grad]
    step = sgd_settings(student_optimizer, theta)
    lr = step.pop("lr") if pilot_lr is None else pilot_lr
    step.pop("lr", None)
    if step.pop("maximize", False):
        raise NotImplementedError("kdops.meta: a maximizing student optimizer")
    teacher_params = [p for p in teacher.parameters() if p.requires_grad]
    out = meta_gradient(student, teacher(inputs), inputs, labels, quiz_inputs, quiz_labels,
                        teacher_params, lr=lr, mode=mode, quiz_loss=quiz_loss, fd_eps=fd_eps,
                        **step, **kd_kwargs)
    teacher_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(teacher_params, out["meta_grads"]):
        p.grad = g
    teacher_optimizer.step()
    with torch.no_grad(), frozen_batch_norm_stats(teacher):
        teacher_logits = teacher(inputs)
    loss = fused_kd_loss(out["student_logits"], teacher_logits, labels=labels, **kd_kwargs)
    student_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    student_optimizer.step()
    return dict(loss=loss.detach(), pilot_loss=out["pilot_loss"], quiz_loss=out["quiz_loss"])


def mkd_step(student: nn.Module, teacher: nn.Module, temperature: LearnableTemperature,
             student_optimizer: torch.optim.Optimizer,
             temperature_optimizer: torch.optim.Optimizer, inputs, labels: Tensor,
             quiz_inputs, quiz_labels: Tensor, *, mode: str = "jvp", pilot_lr=None,
             quiz_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
             fd_eps: float = 1e-3, **kd_kwargs) -> dict:
    """One MKD step: the temperature is the meta-parameter, the teacher is fixed.

    1. τ = temperature(teacher logits); pilot step of the student on the KD loss at τ, quiz.
    2. The temperature's parameters get ∇ L_q(θ'(τ)) (`meta_gradient`, `mode`: the τ terms of
       the same second-order kernel) and `temperature_optimizer` steps.
    3. The student steps on the KD loss at the updated τ, reusing the pilot's forward.

    The scale of the KD term is τ² (the `fused_kd_loss` default, differentiated). Returns a dict
    of detached values: "loss", "pilot_loss", "quiz_loss", "temperature" (the τ used).
    """
    theta = [p for p in student.parameters() if p.requires_grad]
    step = sgd_settings(student_optimizer, theta)
    lr = step.pop("lr") if pilot_lr is None else pilot_lr
    if step.pop("maximize", False):
        raise NotImplementedError("kdops.meta: a maximizing student optimizer")
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    tau = temperature(teacher_logits)
    meta_params = [p for p in temperature.parameters() if p.requires_grad]
    out = meta_gradient(student, teacher_logits, inputs, labels, quiz_inputs, quiz_labels,
                        meta_params, lr=lr, mode=mode, quiz_loss=quiz_loss, fd_eps=fd_eps,
                        temperature=tau, **step, **kd_kwargs)
    temperature_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(meta_params, out["meta_grads"]):
        p.grad = g
    temperature_optimizer.step()
    with torch.no_grad():
        tau = temperature(teacher_logits)
    loss = fused_kd_loss(out["student_logits"], teacher_logits, labels=labels, temperature=tau,
                         **kd_kwargs)
    student_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    student_optimizer.step()
    return dict(loss=loss.detach(), pilot_loss=out["pilot_loss"], quiz_loss=out["quiz_loss"],
                temperature=tau.detach())
