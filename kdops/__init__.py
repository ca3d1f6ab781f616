"""kdops: fused, exact-to-second-order knowledge-distillation kernels for PyTorch."""
from . import _loss_ops, _pilot_ops  # noqa: F401  (define the ops before the kernels load)
from ._library import backend_info, load_native, load_python_autograd, load_triton
from .loss import KDLoss, fused_kd_loss
from .pilot import pilot_sgd_step, pilot_update
from .temperature import LearnableTemperature
from . import compat, meta

load_native()
load_triton()
load_python_autograd()

__all__ = ["fused_kd_loss", "KDLoss", "pilot_sgd_step", "pilot_update", "LearnableTemperature",
           "meta", "compat", "backend_info"]
__version__ = "0.1.0"
