"""What the adapters share: the reductions they accept, and the convention of the CV
distillation codebases (logits [B, C, ...] with the classes on dim 1, divergences reduced as
`torch.nn.KLDivLoss` reduces its elementwise terms)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..loss import fused_kd_loss

REDUCTIONS = ("batchmean", "sum", "mean")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r} (kdops "
                         "computes per-row sums, not the elementwise terms of 'none')")


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32 if it is a 16-bit float (for the parts of a loss that are plain PyTorch,
    so that they are computed in float32 like the fused part)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def classes_last(logits: Tensor, name: str) -> Tensor:
    """[B, C, d1, ...] logits as rows of C classes: [B, d1, ..., C] (a view)."""
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a tensor of shape [B, C, ...] (classes on dim 1), "
                         f"got {shape}")
    return logits.movedim(1, -1)


def soft_kl(student: Tensor, teacher: Tensor, temperature, scale, reduction: str) -> Tensor:
    """scale · KL(softmax(t/T) ‖ softmax(s/T)) over dim 1, reduced as nn.KLDivLoss reduces
    the elementwise terms: "batchmean" divides the sum by B (size(0), not by the number of
    rows of a [B, C, H, W] input), "mean" by the number of elements, "sum" keeps it."""
    check_reduction(reduction)
    total = fused_kd_loss(classes_last(student, "student logits"),
                          classes_last(teacher, "teacher logits"),
                          temperature=temperature, scale=scale, reduction="sum")
    if reduction == "sum":
        return total
    return total / (student.shape[0] if reduction == "batchmean" else student.numel())
