"""kdops: fused, exact-to-second-order knowledge-distillation losses for PyTorch."""
from ._ops import backend_info
from .loss import KDLoss, fused_kd_loss

__all__ = ["fused_kd_loss", "KDLoss", "backend_info"]
__version__ = "0.1.0"
