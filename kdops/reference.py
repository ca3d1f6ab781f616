"""Plain PyTorch composites of the kdops losses: the oracle for tests, the baseline for benches.

These are written the way users write distillation losses (log_softmax, kl_div-style sums,
cross_entropy) and are differentiated by autograd, to any order. They are deliberately
independent of kdops' ops. ``kd_loss`` has the full semantics of :func:`kdops.fused_kd_loss`
(and guards ``-inf``-masked entries so they contribute exactly zero, with finite gradients);
``hinton_kd_loss`` is the textbook one-liner most KD code contains. ``sgd_step`` is the
per-tensor differentiable SGD update of MetaDistil, higher and learn2learn, the oracle of
:func:`kdops.pilot_sgd_step`. The last four are the losses of existing KD codebases as each
writes them (classes on dim 1 for the CV ones, elementwise terms then a mask for TRL): the
oracles of the adapters in :mod:`kdops.compat` and their baselines in the benchmarks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def hinton_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') · T²`` over [B, V] logits."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean") * temperature ** 2


def kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_j p_j (log p_j − log q_j) per row, with 0 · log 0 = 0 (gradients stay finite)."""
    p = logp.exp()
    return (p * torch.where(p == 0, 0.0, logp - logq)).sum(-1)


def divergence_rows(logps: Tensor, logpt: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row D for log-probabilities of student and teacher ([R, V] -> [R])."""
    if divergence == "kl" or (divergence == "jsd" and beta == 0):
        return kl_rows(logpt, logps)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl_rows(logps, logpt)
    # TRL's generalized JSD: the mixture in log space through logsumexp. Entries masked in
    # both are taken out of the logsumexp, whose gradient there would be 0 · NaN.
    both = torch.isneginf(logps) & torch.isneginf(logpt)
    mix = torch.stack([logps + math.log(1 - beta), logpt + math.log(beta)])
    log_m = torch.where(both, -math.inf, torch.logsumexp(torch.where(both, 0.0, mix), dim=0))
    return beta * kl_rows(logpt, log_m) + (1 - beta) * kl_rows(logps, log_m)


def _per_row(x, lead, n, dtype):
    if isinstance(x, Tensor):
        return x.to(dtype).broadcast_to(lead).reshape(n, 1)
    return x


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature=1.0,
            teacher_temperature=None, divergence="kl", beta=0.5, scale=None, labels=None,
            alpha=None, ignore_index=-100, reduction="batchmean",
            compute_dtype=None) -> Tensor:
    """Composite twin of :func:`kdops.fused_kd_loss` (same arguments and semantics).

    ``compute_dtype=None`` computes in float32 or wider, like kdops; pass the logits' own
    low-precision dtype to get what plain eager code computes in bf16/fp16.
    """
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    n = lead.numel()
    dtype = compute_dtype or torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.reshape(n, v).to(dtype)
    t = teacher_logits.reshape(n, v).to(dtype)
    tau_s = _per_row(temperature, lead, n, dtype)
    tau_t = tau_s if teacher_temperature is None else _per_row(teacher_temperature, lead, n,
                                                                dtype)
    d = divergence_rows(F.log_softmax(s / tau_s, -1), F.log_softmax(t / tau_t, -1),
                        divergence, beta)
    c = tau_s ** 2 if scale is None else _per_row(scale, lead, n, dtype)
    loss = (c * d[:, None]).squeeze(-1) if isinstance(c, Tensor) else c * d
    weight = torch.ones(n, dtype=dtype, device=s.device)
    if labels is not None:
        flat = labels.reshape(n)
        weight = (flat != ignore_index).to(dtype)
        if alpha is not None:
            ce = F.cross_entropy(s, flat, ignore_index=ignore_index, reduction="none")
            loss = alpha * loss + (1 - alpha) * ce
    loss = torch.where(weight > 0, loss, 0.0)
    if reduction == "none":
        return loss.reshape(lead)
    if reduction == "sum":
        return loss.sum()
    rows = weight.sum().clamp(min=1)
    return loss.sum() / rows if reduction == "batchmean" else loss.sum() / (rows * v)


def sgd_step(params, grads, lr, *, weight_decay=0.0, momentum=0.0, momentum_buffers=None,
             dampening=0.0, nesterov=False, maximize=False) -> list:
    """One differentiable SGD step written tensor by tensor, as higher's DifferentiableSGD does.

    torch.optim.SGD's order (weight decay, then momentum, then the step); every product is a
    separate rounded op (``p - lr * g``, never a fused multiply-add). Inputs are untouched.
    """
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        d = -g if maximize else g
        if not _is_zero(weight_decay):
            d = d + weight_decay * p
        if not _is_zero(momentum):
            if momentum_buffers is None:
                buf = d
            else:
                buf = momentum * momentum_buffers[i] + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        out.append(p - lr * d)
    return out


def _is_zero(x) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _kl_classes_dim1(s: Tensor, t: Tensor, temperature, reduction: str) -> Tensor:
    return F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                    reduction=reduction)


def repdistiller_distill_kl(y_s: Tensor, y_t: Tensor, T) -> Tensor:
    """RepDistiller's DistillKL: the KL summed over all elements, · T² / batch size."""
    return _kl_classes_dim1(y_s, y_t, T, "sum") * T ** 2 / y_s.shape[0]


def mdistiller_kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature,
                       logit_stand: bool = False) -> Tensor:
    """mdistiller's kd_loss: per-position KL over dim 1, averaged, · T²; with logit_stand the
    logits are first standardized over the last dim (unbiased std, 1e-7 added to it)."""
    if logit_stand:
        logits_student, logits_teacher = (
            (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))
            for z in (logits_student, logits_teacher))
    kl = _kl_classes_dim1(logits_student, logits_teacher, temperature, "none")
    return kl.sum(1).mean() * temperature ** 2


def torchdistill_kd_loss(student: Tensor, teacher: Tensor, targets, temperature, alpha=None,
                         beta=None, reduction: str = "batchmean", **ce_kwargs) -> Tensor:
    """torchdistill's KDLoss: alpha·CE + beta·T²·KLDivLoss(reduction), beta = 1 − alpha by
    default; the KL term alone, without T² or beta, when alpha is None or 0 or no targets."""
    soft = _kl_classes_dim1(student, teacher, temperature, reduction)
    if alpha is None or alpha == 0 or targets is None:
        return soft
    ce = F.cross_entropy(student, targets,
                         reduction="mean" if reduction == "batchmean" else reduction,
                         **ce_kwargs)
    return alpha * ce + (1 - alpha if beta is None else beta) * temperature ** 2 * soft


def trl_generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels=None,
                             beta: float = 0.5, temperature=1.0, reduction: str = "batchmean",
                             num_items_in_batch=None) -> Tensor:
    """TRL's GKDTrainer.generalized_jsd_loss: elementwise terms of β·KL(pt‖m) + (1−β)·KL(ps‖m)
    (forward KL at β = 0, reverse at β = 1), positions labelled -100 dropped, then reduced:
    batchmean = sum / kept positions (at least 1), or / size(0) without labels."""
    ls = F.log_softmax(student_logits / temperature, -1)
    lt = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        jsd = (beta * F.kl_div(lm, lt, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True))
    kept = jsd if labels is None else jsd[labels != -100]
    if num_items_in_batch is not None:
        return kept.sum() / num_items_in_batch
    if reduction == "batchmean":
        count = kept.shape[0] if labels is not None else jsd.shape[0]
        return kept.sum() / max(count, 1)
    return kept.sum() if reduction == "sum" else kept.mean()
