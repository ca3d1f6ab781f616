"""mdistiller (megvii-research/mdistiller), `distillers.KD.kd_loss`, on kdops; with the
logit standardization of "Logit Standardization in Knowledge Distillation" (CVPR 2024), whose
code adds a `logit_stand` flag to the same function.

    from kdops.compat.mdistiller import kd_loss
    loss_kd = self.kd_loss_weight * kd_loss(logits_student, logits_teacher, self.temperature)
"""
from __future__ import annotations

from torch import Tensor

from ..loss import fused_kd_loss
from ._common import at_least_float32, classes_last


def normalize(logit: Tensor) -> Tensor:
    """(z − mean z) / (1e-7 + std z) over the last dim, with the unbiased std; in float32 for
    16-bit logits."""
    logit = at_least_float32(logit)
    mean = logit.mean(dim=-1, keepdim=True)
    return (logit - mean) / (1e-7 + logit.std(dim=-1, keepdim=True))


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, temperature,
            logit_stand: bool = False) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) over the classes (dim 1), averaged over the other
    positions (the batch; the batch and the pixels of [B, C, H, W] logits).

    Args:
        logits_student, logits_teacher: [B, C, ...] logits, any floating dtype.
        temperature: a float or a 0-dim tensor (differentiated when it requires grad).
        logit_stand: standardize both logits first (`normalize`, over the last dim as the
            original does).

    Returns a 0-dim float32 loss (float64 for float64 logits).
    """
    if logit_stand:
        logits_student, logits_teacher = normalize(logits_student), normalize(logits_teacher)
    return fused_kd_loss(classes_last(logits_student, "logits_student"),
                         classes_last(logits_teacher, "logits_teacher"),
                         temperature=temperature, scale=temperature ** 2)
