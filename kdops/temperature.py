"""Learnable distillation temperatures: the meta-parameters of MKD (see `kdops.meta.mkd_step`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class LearnableTemperature(nn.Module):
    """A distillation temperature learned as a meta-parameter (MKD), always positive.

    ``parametrization="log"``: τ = exp(ρ), ρ initialised to log(init).
    ``parametrization="ctkd"``: τ = 1 + 20·sigmoid(ρ) (CTKD's bounded range (1, 21)).
    ``per_sample=False``: one τ for the batch (a 0-dim tensor); ``True``: one per sample,
    ρ = a·features + b from the teacher's logits (standardized per row, so the head sees the
    distribution's shape, not its scale), starting at `init` for every sample.

    Call it with the teacher's logits [N, V]; it returns τ (0-dim, or [N]).
    """

    def __init__(self, init: float = 4.0, *, parametrization: str = "log",
                 per_sample: bool = False, num_classes: int | None = None):
        super().__init__()
        if parametrization not in ("log", "ctkd"):
            raise ValueError(f"parametrization must be 'log' or 'ctkd', got {parametrization!r}")
        if parametrization == "ctkd" and not 1.0 < init < 21.0:
            raise ValueError(f"a 'ctkd' temperature lies in (1, 21), got init={init}")
        if parametrization == "log" and init <= 0:
            raise ValueError(f"init must be positive, got {init}")
        if per_sample and num_classes is None:
            raise ValueError("a per-sample temperature needs num_classes (its head's input)")
        self.parametrization = parametrization
        x = (init - 1.0) / 20.0
        rho = torch.log(torch.tensor(init)) if parametrization == "log" else torch.logit(
            torch.tensor(x))
        self.rho = nn.Parameter(rho.clone())
        self.head = nn.Linear(num_classes, 1) if per_sample else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, teacher_logits: Tensor) -> Tensor:
        rho = self.rho
        if self.head is not None:
            z = teacher_logits.detach()
            z = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
            rho = rho + self.head(z.to(rho.dtype)).squeeze(-1)
        return rho.exp() if self.parametrization == "log" else 1 + 20 * torch.sigmoid(rho)
