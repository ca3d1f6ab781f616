"""fused_kd_loss on random combinations of its arguments, against the float64 composite oracle.

The other loss tests sweep one axis at a time over fixed inputs. Here each case draws every
axis at once: the leading shape (1-D to 3-D logits, an empty batch now and then), the
vocabulary, the dtypes of each logits tensor (float64, float32, mixed), strided logits, the
divergence and β, each temperature as a float, a 0-dim tensor, a per-row tensor or one that
broadcasts, the scale, labels with ignored rows, alpha as a float or a tensor (0 and 1
included), the reduction, a masked vocabulary column and the logits' spread. Each case checks
the loss, its gradients to the logits and to every tensor argument, and the second-order
product ∂⟨v, ∂L/∂s⟩ to all of them (what MetaDistil differentiates), on every backend. Such a
sweep found that the native kernels refused the cross-entropy term on an empty batch.

Tolerances: float64 cases at 1e-9 relative to each quantity's largest entry; cases with a
float32 tensor at 2e-4 (their rounding, amplified by temperatures down to 0.5 and spreads up to
10); plus 64 eps of the case's largest quantity (at least 1: log-probabilities are of order
1), the rounding of a quantity that cancels to almost nothing (a V = 1 loss, the cross-entropy
of a confident row, the temperature gradient of saturated rows; there the float64
composite is the inexact one: at 80 digits one such gradient is −3.5803e−27, kdops gives
−3.5803e−27 and the composite −1.02e−27). Where the oracle itself is not finite (the
temperature gradients of a masked column: 0 · ∞ in autograd's composite), kdops must be
finite.
"""
import math
import random

import pytest
import torch

import kdops
from kdops import reference

pytestmark = pytest.mark.usefixtures("backend")
BACKENDS = ("native", "portable", "triton")
CASES = 120
TENSOR_ARGS = ("temperature", "teacher_temperature", "scale", "alpha")


def _case(seed: int):
    """(student, teacher, fused_kd_loss keyword arguments, float32 involved) for a seed."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lead = tuple(rng.choice([1, 2, 3, 5]) for _ in range(rng.choice([0, 1, 1, 2])))
    if rng.random() < 0.08:
        lead = lead[:-1] + (0,) if lead else (0,)
    v = rng.choice([1, 2, 3, 7, 16, 33, 130])
    spread = rng.choice([1.0, 3.0, 10.0])
    masked = v > 2 and rng.random() < 0.2
    strided = rng.random() < 0.3

    def logits(dtype):
        shape = lead + (v,)
        x = torch.randn(shape + (2,) if strided else shape, generator=g,
                        dtype=torch.float64) * spread
        x = x[..., 1] if strided else x                   # every other element: stride 2
        if masked:
            x[..., 1] = -math.inf
        return x.to(dtype)

    dtypes = rng.choice([(torch.float64,) * 2, (torch.float32,) * 2,
                         (torch.float32, torch.float64), (torch.float64, torch.float32)])

    def per_row(mode):
        if mode == "float":
            return 0.5 + 3 * rng.random()
        shape = {"scalar": (), "row": lead, "broadcast": lead[:1] + (1,) * (len(lead) - 1)}[mode]
        return 0.5 + 3 * torch.rand(shape, generator=g, dtype=torch.float64)

    divergence = rng.choice(["kl", "reverse_kl", "jsd"])
    kw = dict(divergence=divergence, beta=rng.choice([0.0, 0.3, 1.0]) if divergence == "jsd"
              else 0.5, reduction=rng.choice(["batchmean", "sum", "mean", "none"]),
              temperature=per_row(rng.choice(["float", "scalar", "row", "broadcast"])))
    if rng.random() < 0.5:
        kw["teacher_temperature"] = per_row(rng.choice(["float", "scalar", "row"]))
    kw["scale"] = rng.choice([None, None, 1.7, "row"])
    if kw["scale"] == "row":
        kw["scale"] = torch.rand(lead, generator=g, dtype=torch.float64) + 0.3
    if rng.random() < 0.6:
        labels = torch.randint(0, v, lead, generator=g)
        if masked:                 # a label on the masked class: an infinite cross-entropy
            labels[labels == 1] = 0
        labels.view(-1)[::3] = -100
        kw["labels"] = labels
        kw["alpha"] = rng.choice([None, 0.6, torch.tensor(0.6, dtype=torch.float64), 0.0, 1.0])
    return logits(dtypes[0]), logits(dtypes[1]), kw, torch.float32 in dtypes


def _derivatives(fn, s, t, kw, dtype=None):
    """[loss, first derivatives, second derivatives] as float64, None where not connected.

    Inputs are cast to `dtype` (the oracle's float64) or kept; every floating tensor argument
    is a leaf that requires grad."""
    def leaf(x):
        return (x.detach().to(dtype) if dtype else x.detach().clone()).requires_grad_()

    s, t = leaf(s), leaf(t)
    kw = {k: leaf(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
          for k, x in kw.items()}
    leaves = [s, t] + [kw[k] for k in TENSOR_ARGS if isinstance(kw.get(k), torch.Tensor)]
    loss = fn(s, t, **kw)
    first = torch.autograd.grad(loss.sum(), leaves, create_graph=True, allow_unused=True)
    out = [loss, *first]
    if first[0] is not None and first[0].requires_grad:
        v = torch.linspace(-1, 1, s.numel(), dtype=torch.float64).reshape(s.shape)
        out += torch.autograd.grad((first[0] * v.to(first[0].dtype)).sum(), leaves,
                                   allow_unused=True)
    return [None if x is None else x.detach().double() for x in out]


@pytest.mark.parametrize("seed", range(CASES))
def test_random_configuration(seed):
    s, t, kw, float32 = _case(seed)
    got = _derivatives(kdops.fused_kd_loss, s, t, kw)
    want = _derivatives(reference.kd_loss, s, t, kw, torch.float64)
    rtol = 2e-4 if float32 else 1e-9
    # Rounding floor: quantities that cancel to far below the magnitudes they are computed
    # from (log-probabilities of order 1, the case's largest derivatives) carry their rounding.
    eps = torch.finfo(torch.float32 if float32 else torch.float64).eps
    floor = 64 * eps * max([1.0] + [x[torch.isfinite(x)].abs().max().item() for x in want
                                    if x is not None and torch.isfinite(x).any()])
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:          # not connected on one side: zero on the other
            x = b if a is None else a
            assert x is None or not x.any(), f"quantity {k}: only one side is zero"
            continue
        assert a.shape == b.shape, f"quantity {k}: shape {a.shape} against {b.shape}"
        assert torch.isfinite(a).all(), f"quantity {k}: kdops is not finite"
        finite = torch.isfinite(b)
        a, b = a[finite], b[finite]
        if b.numel():
            error, scale = (a - b).abs().max().item(), b.abs().max().item()
            assert error <= rtol * scale + floor, (
                f"quantity {k}: error {error:.3g} at scale {scale:.3g} (floor {floor:.3g})")
