"""Plain PyTorch composites of the kdops losses: the oracle for tests, the baseline for benches.

These are written the way users write distillation losses (log_softmax, kl_div-style sums,
cross_entropy) and are differentiated by autograd, to any order. They are deliberately
independent of kdops' ops. ``kd_loss`` has the full semantics of :func:`kdops.fused_kd_loss`
(and guards ``-inf``-masked entries so they contribute exactly zero, with finite gradients);
``hinton_kd_loss`` is the textbook one-liner most KD code contains. ``sgd_step`` is the
per-tensor differentiable SGD update of MetaDistil, higher and learn2learn, the oracle of
:func:`kdops.pilot_sgd_step`.
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
