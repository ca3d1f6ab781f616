"""torchdistill (yoshitomo-matsubara/torchdistill), the mid-level `KDLoss`, on kdops.

torchdistill builds its losses from a registry by name; register this one under a key of
your own and name that key in the training configuration::

    from torchdistill.losses.registry import register_mid_level_loss
    from kdops.compat.torchdistill import KDLoss
    register_mid_level_loss(KDLoss, key="KDOpsKDLoss")
"""
from __future__ import annotations

from torch import Tensor, nn

from ._common import at_least_float32, check_reduction, soft_kl


class KDLoss(nn.Module):
    """``alpha · CE(s, targets) + beta · T² · KL(softmax(t/T) ‖ softmax(s/T))``, torchdistill's
    KDLoss: the same constructor and forward.

    The KL term is reduced as `nn.KLDivLoss(reduction)` reduces it (see `_common.soft_kl`);
    the cross-entropy is `nn.CrossEntropyLoss(reduction="mean" for "batchmean", **kwargs)` on
    the student logits, as in the original (so ``ignore_index``, ``label_smoothing`` and
    ``weight`` in kwargs apply to it alone), in float32 for 16-bit logits like the KL term.
    Without targets, or with alpha None or 0, the loss is the KL term alone, **without** T²
    and beta, as torchdistill returns it.

    Args:
        student_module_path, student_module_io, teacher_module_path, teacher_module_io: where
            the logits are in the io dicts: ``io_dict[module_path][module_io]``.
        temperature: T, a float or a 0-dim tensor.
        alpha: weight of the cross-entropy.
        beta: weight of the KL term; None means 1 − alpha (torchdistill raises when alpha is
            None too; here the KL term alone is used then, which is what its forward does).
        reduction: "batchmean", "sum" or "mean" ("none" raises ValueError: kdops computes
            per-row sums, not the elementwise terms).
    """

    def __init__(self, student_module_path, student_module_io, teacher_module_path,
                 teacher_module_io, temperature, alpha=None, beta=None,
                 reduction: str = "batchmean", **kwargs):
        super().__init__()
        check_reduction(reduction)
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        self.temperature = temperature
        self.alpha = alpha
        self.beta = (None if alpha is None else 1 - alpha) if beta is None else beta
        self.reduction = reduction
        self.cross_entropy_loss = nn.CrossEntropyLoss(
            reduction="mean" if reduction == "batchmean" else reduction, **kwargs)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs) -> Tensor:
        student = student_io_dict[self.student_module_path][self.student_module_io]
        teacher = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        if self.alpha is None or self.alpha == 0 or targets is None:
            return soft_kl(student, teacher, self.temperature, 1.0, self.reduction)
        soft = soft_kl(student, teacher, self.temperature,
                       self.beta * self.temperature ** 2, self.reduction)
        return self.alpha * self.cross_entropy_loss(at_least_float32(student), targets) + soft
