"""RepDistiller (HobbitLong/RepDistiller), `distiller_zoo.DistillKL`, on kdops.

    from kdops.compat.repdistiller import DistillKL      # instead of distiller_zoo's
    criterion_div = DistillKL(opt.kd_T)
"""
from __future__ import annotations

from torch import Tensor, nn

from ._common import soft_kl


class DistillKL(nn.Module):
    """``KL(softmax(y_t/T) ‖ softmax(y_s/T))`` summed over every element, times T², divided
    by the batch size: the distillation term of RepDistiller's training scripts.

    Args:
        T: the temperature, a float or a 0-dim tensor (a learnable one, as CTKD learns it, is
            differentiated, T² included).

    ``forward(y_s, y_t)``: student and teacher logits [B, C, ...], classes on dim 1, any
    floating dtype; returns a 0-dim float32 loss (float64 for float64 logits).
    """

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s: Tensor, y_t: Tensor) -> Tensor:
        return soft_kl(y_s, y_t, self.T, self.T ** 2, "batchmean")
