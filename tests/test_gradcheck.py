"""float64 gradcheck and gradgradcheck of fused_kd_loss over every argument combination.

gradgradcheck differentiates kdops::kd_backward through its registered second-order op,
so these tests check the explicit first- and second-order formulas against finite differences,
through both twins of the autograd wiring: the compiled one (native backend) and the Python
one (portable backend, as an install without the extension runs).
"""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import kdops
from cases import (DIVERGENCE_IDS, DIVERGENCES, REDUCTIONS, labels_for, logits, mask_vocab,
                   positive, temperatures)


pytestmark = pytest.mark.usefixtures("backend")

N, V = 4, 5


def _check(fn, inputs):
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("label_mode", [None, "mask", "ce"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("separate_teacher_tau", [False, True], ids=["tau_shared", "tau_sep"])
@pytest.mark.parametrize("tau_mode", ["float", "scalar", "row"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_all_inputs(divergence, beta, tau_mode, separate_teacher_tau, reduction, label_mode):
    s = logits(N, V, dtype=torch.float64, seed=3, requires_grad=True)
    t = logits(N, V, dtype=torch.float64, seed=4, requires_grad=True)
    ts, tt = temperatures(tau_mode, (N,))
    labels, alpha = labels_for((N,), V, label_mode)
    taus = () if tau_mode == "float" else ((ts, tt) if separate_teacher_tau else (ts,))

    def fn(s, t, *taus_in):
        tau_s, tau_t = (ts, tt) if not taus_in else (taus_in + (None,))[:2]
        if not separate_teacher_tau:
            tau_t = None
        return kdops.fused_kd_loss(s, t, temperature=tau_s, teacher_temperature=tau_t,
                                   divergence=divergence, beta=beta, labels=labels,
                                   alpha=alpha, reduction=reduction)

    _check(fn, (s, t, *taus))


@pytest.mark.parametrize("which", ["student", "teacher", "tau_s", "tau_t"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_one_input_at_a_time(divergence, beta, which):
    """Only one input requires grad: the ops compute only the outputs that are needed."""
    s = logits(N, V, dtype=torch.float64, seed=5)
    t = logits(N, V, dtype=torch.float64, seed=6)
    ts, tt = temperatures("row", (N,), requires_grad=False)
    labels, alpha = labels_for((N,), V, "ce")
    args = dict(student=s, teacher=t, tau_s=ts, tau_t=tt)
    x = args[which].clone().requires_grad_()

    def fn(x):
        a = dict(args, **{which: x})
        return kdops.fused_kd_loss(a["student"], a["teacher"], temperature=a["tau_s"],
                                   teacher_temperature=a["tau_t"], divergence=divergence,
                                   beta=beta, labels=labels, alpha=alpha)

    _check(fn, (x,))


@pytest.mark.parametrize("label_mode", [None, "mask"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_one_sided_gradient(divergence, beta, side, label_mode):
    """gradcheck of the gradient to one side's logits as a function of both logits: the
    second-order op with a cotangent on that side only, as MetaDistil's teacher update
    differentiates ⟨v, ∂L/∂s⟩ (the native KL kernels have a row kernel of their own for it)."""
    s = logits(N, V, dtype=torch.float64, seed=7, requires_grad=True)
    t = logits(N, V, dtype=torch.float64, seed=8, requires_grad=True)
    ts, tt = temperatures("row", (N,), requires_grad=False)
    labels, alpha = labels_for((N,), V, label_mode)

    def gradient(s, t):
        loss = kdops.fused_kd_loss(s, t, temperature=ts, teacher_temperature=tt,
                                   divergence=divergence, beta=beta, labels=labels, alpha=alpha)
        (g,) = torch.autograd.grad(loss, s if side == "student" else t, create_graph=True)
        return g

    assert gradcheck(gradient, (s, t))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_three_d_per_sample_tau_scale_alpha_tensors(divergence, beta):
    """[B, T, V] logits, τ per sample ([B, 1]), learnable scale and alpha tensors."""
    b, tlen = 2, 3
    s = logits(b, tlen, V, dtype=torch.float64, seed=7, requires_grad=True)
    t = logits(b, tlen, V, dtype=torch.float64, seed=8, requires_grad=True)
    tau = positive(b, 1, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    labels, _ = labels_for((b, tlen), V, "ce")

    def fn(s, t, tau, scale, alpha):
        return kdops.fused_kd_loss(s, t, temperature=tau, divergence=divergence, beta=beta,
                                   scale=scale, labels=labels, alpha=alpha)

    _check(fn, (s, t, tau, scale, alpha))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_masked_vocabulary(divergence, beta):
    """-inf entries at the same columns of both logits: finite, exact derivatives."""
    s = mask_vocab(logits(N, 7, dtype=torch.float64, seed=9), [1, 4]).requires_grad_()
    t = mask_vocab(logits(N, 7, dtype=torch.float64, seed=10), [1, 4]).requires_grad_()
    ts, tt = temperatures("row", (N,))

    def fn(s, t, ts, tt):
        return kdops.fused_kd_loss(s, t, temperature=ts, teacher_temperature=tt,
                                   divergence=divergence, beta=beta)

    # Finite differences cannot perturb -inf entries, so check the finite ones through a
    # wrapper that writes the perturbable values into the unmasked columns.
    keep = torch.tensor([0, 2, 3, 5, 6])

    def on_finite(sf, tf, ts, tt):
        return fn(s.detach().index_copy(1, keep, sf), t.detach().index_copy(1, keep, tf), ts, tt)

    sf = s.detach()[:, keep].clone().requires_grad_()
    tf = t.detach()[:, keep].clone().requires_grad_()
    _check(on_finite, (sf, tf, ts, tt))
    grads = torch.autograd.grad(fn(s, t, ts, tt), (s, t))
    for g in grads:
        assert torch.isfinite(g).all()
        assert (g[:, [1, 4]] == 0).all()


def test_third_order_raises_clearly():
    s = logits(N, V, dtype=torch.float64, requires_grad=True)
    t = logits(N, V, dtype=torch.float64, seed=1)
    (g,) = torch.autograd.grad(kdops.fused_kd_loss(s, t), s, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), s, create_graph=True)
    with pytest.raises(NotImplementedError, match="third-order"):
        torch.autograd.grad(gg.sum(), s)


class _OpLog(TorchDispatchMode):
    """The output masks of the kdops backward ops that run inside the block."""

    def __init__(self):
        super().__init__()
        self.masks = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name in ("kdops::kd_backward", "kdops::kd_double_backward"):
            self.masks[name] = list(args[-1])
        return func(*args, **(kwargs or {}))


def test_backward_computes_only_the_gradients_asked_for():
    """autograd.grad(loss, s) with the teacher and τ requiring grad too computes the student's
    gradient only, in the first and the second-order op alike."""
    s = logits(N, V, dtype=torch.float64, requires_grad=True)
    t = logits(N, V, dtype=torch.float64, seed=1, requires_grad=True)
    tau = positive(N, dtype=torch.float64, seed=2).requires_grad_()
    with _OpLog() as log:
        (g,) = torch.autograd.grad(kdops.fused_kd_loss(s, t, temperature=tau), s,
                                   create_graph=True)
        torch.autograd.grad((g * g).sum(), t)
    assert log.masks == {"kdops::kd_backward": [True, False, False, False],
                         "kdops::kd_double_backward": [False, False, False, True, False, False]}
