"""MetaDistil and MKD training steps on top of `meta_gradient`."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loss import fused_kd_loss
from ..temperature import LearnableTemperature
from .gradient import meta_gradient
from .train_mode import PhaseTimer, _untimed, frozen_batch_norm_stats


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


def _pilot_settings(student, optimizer, pilot_lr):
    """(lr, the other pilot_sgd_step arguments) of the pilot that mirrors the student's step."""
    step = sgd_settings(optimizer, [p for p in student.parameters() if p.requires_grad])
    lr = step.pop("lr")
    if step.pop("maximize", False):
        raise NotImplementedError("kdops.meta: a maximizing student optimizer")
    return (lr if pilot_lr is None else pilot_lr), step


def metadistil_step(student: nn.Module, teacher: nn.Module,
                    student_optimizer: torch.optim.Optimizer,
                    teacher_optimizer: torch.optim.Optimizer, inputs, labels: Tensor,
                    quiz_inputs, quiz_labels: Tensor, *, mode: str = "jvp", pilot_lr=None,
                    quiz_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                    fd_eps: float = 1e-3, recompute_student: bool = False,
                    timer: PhaseTimer | None = None, **kd_kwargs) -> dict:
    """One MetaDistil step (Algorithm 1 of the paper, as its CV code runs it).

    1. Pilot: the student's KD loss on (inputs, labels) against the teacher, one SGD step of
       a pilot copy (the student optimizer's SGD settings, see `sgd_settings`; `pilot_lr`
       overrides the lr), scored by `quiz_loss` on the quiz batch.
    2. Teacher: its gradients are set to ∇w L_q(θ'(w)) (`meta_gradient`, `mode`) and
       `teacher_optimizer` steps.
    3. Student: the KD loss against the updated teacher, backpropagated through the pilot's
       forward of the student (θ has not changed, so it is not run again; with
       `recompute_student` it is, once, after the quiz: see `meta_gradient`), and
       `student_optimizer` steps.

    BatchNorm running statistics move once per step for each network: the student's in the
    pilot forward, the teacher's in its first forward (its second, at the updated weights,
    uses batch statistics without updating them). `kd_kwargs` go to `fused_kd_loss`.

    Returns a dict of detached scalars: "loss" (the real step's), "pilot_loss", "quiz_loss".
    """
    lr, step = _pilot_settings(student, student_optimizer, pilot_lr)
    phase = timer or _untimed
    teacher_params = [p for p in teacher.parameters() if p.requires_grad]
    with phase("pilot"):
        teacher_logits = teacher(inputs)
    out = meta_gradient(student, teacher_logits, inputs, labels, quiz_inputs, quiz_labels,
                        teacher_params, lr=lr, mode=mode, quiz_loss=quiz_loss, fd_eps=fd_eps,
                        recompute_student=recompute_student, timer=timer, **step, **kd_kwargs)
    with phase("teacher_update"):
        teacher_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(teacher_params, out["meta_grads"]):
            p.grad = g
        teacher_optimizer.step()
    with phase("real_step"):
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
             fd_eps: float = 1e-3, recompute_student: bool = False, **kd_kwargs) -> dict:
    """One MKD step: the temperature is the meta-parameter, the teacher is fixed.

    1. τ = temperature(teacher logits); pilot step of the student on the KD loss at τ, quiz.
    2. The temperature's parameters get ∇ L_q(θ'(τ)) (`meta_gradient`, `mode`: the τ terms of
       the same second-order kernel) and `temperature_optimizer` steps.
    3. The student steps on the KD loss at the updated τ, reusing the pilot's forward (or its
       recomputation, `recompute_student`: see `meta_gradient`).

    The scale of the KD term is τ² (the `fused_kd_loss` default, differentiated). Returns a dict
    of detached values: "loss", "pilot_loss", "quiz_loss", "temperature" (the τ used).
    """
    lr, step = _pilot_settings(student, student_optimizer, pilot_lr)
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    tau = temperature(teacher_logits)
    meta_params = [p for p in temperature.parameters() if p.requires_grad]
    out = meta_gradient(student, teacher_logits, inputs, labels, quiz_inputs, quiz_labels,
                        meta_params, lr=lr, mode=mode, quiz_loss=quiz_loss, fd_eps=fd_eps,
                        recompute_student=recompute_student, temperature=tau, **step,
                        **kd_kwargs)
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
