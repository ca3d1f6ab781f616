"""TRL (huggingface/trl), `GKDTrainer.generalized_jsd_loss`, on kdops.

    from trl.experimental.gkd import GKDTrainer       # trl.GKDTrainer in older releases
    from kdops.compat import trl as kdops_trl
    GKDTrainer.generalized_jsd_loss = staticmethod(kdops_trl.generalized_jsd_loss)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..loss import fused_kd_loss
from ._common import check_reduction


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels=None,
                         beta: float = 0.5, temperature=1.0, reduction: str = "batchmean",
                         num_items_in_batch=None) -> Tensor:
    """β·KL(pt ‖ m) + (1 − β)·KL(ps ‖ m), m = β·pt + (1 − β)·ps, p = softmax(logits / T),
    summed over the vocabulary of each position (no T² factor). β = 0 is the forward KL
    KL(pt ‖ ps), β = 1 the reverse KL KL(ps ‖ pt): the same three cases as TRL.

    Args:
        student_logits, teacher_logits: [..., V] logits ([B, S, V] in TRL), any floating dtype.
        labels: [...] (the leading shape) or None; positions labelled -100 are left out. The
            labels only select positions: their other values are not read.
        beta: β in [0, 1].
        temperature: T, a float or a 0-dim tensor.
        reduction: "batchmean" (with labels: the sum over the kept positions divided by their
            number, at least 1; without: divided by size(0), the batch, not the number of
            positions), "sum", "mean" (the sum divided by the number of kept positions · V,
            at least V: 0 where TRL's mean of no elements is NaN).
        num_items_in_batch: when given, the sum is divided by it whatever the reduction
            (TRL's normalization for gradient accumulation).

    Returns a 0-dim float32 loss (float64 for float64 logits). ``reduction="none"`` raises
    ValueError: kdops computes per-position sums, not TRL's elementwise terms.
    """
    check_reduction(reduction)
    if labels is not None and not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    kept = None if labels is None else torch.where(labels == -100, -100, 0)
    jsd = dict(temperature=temperature, divergence="jsd", beta=beta, scale=1.0, labels=kept)
    if num_items_in_batch is None and labels is not None:
        return fused_kd_loss(student_logits, teacher_logits, reduction=reduction, **jsd)
    total = fused_kd_loss(student_logits, teacher_logits, reduction="sum", **jsd)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(student_logits.shape[0], 1)
    return total / student_logits.numel()
