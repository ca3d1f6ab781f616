"""Drop-in replacements for the distillation losses of existing KD code, computed by kdops.

Each adapter keeps its original's call signature and semantics (which dim holds the classes,
what the reduction divides by, which factor multiplies the divergence, which rows a mask
drops), and runs the divergence through `kdops.fused_kd_loss`, so the loss is fused and exact
to second order (MetaDistil- and MKD-style meta-gradients through it included):

    kdops.compat.repdistiller.DistillKL       RepDistiller's distiller_zoo.DistillKL
    kdops.compat.mdistiller.kd_loss          mdistiller's kd_loss (logit standardization too)
    kdops.compat.torchdistill.KDLoss         torchdistill's mid-level KDLoss
    kdops.compat.trl.generalized_jsd_loss    TRL's GKDTrainer.generalized_jsd_loss

Values agree with the originals to floating-point rounding, not bit for bit: the fused
kernels sum each row in another order than log_softmax + kl_div do. With bfloat16 or float16
logits every part of a loss is computed in float32 (the originals compute in the logits'
dtype), and the gradients come back in the logits' dtype. Where an original returns
elementwise terms (``reduction="none"``), the adapter raises: kdops computes per-row sums.
"""
from . import mdistiller, repdistiller, torchdistill, trl

__all__ = ["mdistiller", "repdistiller", "torchdistill", "trl"]
