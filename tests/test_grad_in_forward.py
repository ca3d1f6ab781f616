"""fused_kd_loss(grad_in_forward=True): the same loss and gradients, computed in the forward;
first order only, with clear errors where it cannot apply."""
import gc
import weakref

import pytest
import torch

import kdops
from cases import DIVERGENCE_IDS, DIVERGENCES, labels_for, logits, positive

pytestmark = pytest.mark.usefixtures("backend")
BACKENDS = ("native", "portable", "triton")


def _loss_and_grads(grad_in_forward, s, t, cotangent, **kw):
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_(t.requires_grad)
    loss = kdops.fused_kd_loss(s, t, grad_in_forward=grad_in_forward, **kw)
    wrt = (s, t) if t.requires_grad else (s,)
    return (loss, *torch.autograd.grad(loss, wrt, cotangent(loss)))


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["teacher_const", "teacher_grad"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("label_mode", [None, "ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_same_loss_and_gradients(divergence, beta, label_mode, reduction, teacher_grad):
    """float64 [2, 3, V] logits, per-sample temperatures: equal to the default mode."""
    s = logits(2, 3, 13, dtype=torch.float64, seed=1)
    t = logits(2, 3, 13, dtype=torch.float64, seed=2).requires_grad_(teacher_grad)
    labels, alpha = labels_for((2, 3), 13, label_mode)
    kw = dict(temperature=positive(2, 1, dtype=torch.float64), divergence=divergence,
              beta=beta, labels=labels, alpha=alpha, reduction=reduction)

    def cotangent(loss):
        return positive(loss.numel(), seed=9, dtype=loss.dtype).reshape(loss.shape)

    got = _loss_and_grads(True, s, t, cotangent, **kw)
    want = _loss_and_grads(False, s, t, cotangent, **kw)
    assert len(got) == len(want) == (3 if teacher_grad else 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_bf16_gradients_in_the_logits_dtype():
    s = logits(4, 37, dtype=torch.bfloat16, seed=3).requires_grad_()
    t = logits(4, 37, dtype=torch.bfloat16, seed=4)
    loss = kdops.fused_kd_loss(s, t, temperature=2.0, grad_in_forward=True)
    (g,) = torch.autograd.grad(loss, s)
    (want,) = torch.autograd.grad(kdops.fused_kd_loss(s, t, temperature=2.0), s)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g, want, rtol=1e-2, atol=1e-5)


def test_teacher_logits_are_not_kept_for_the_backward():
    s = logits(4, 9, seed=5).requires_grad_()
    t = logits(4, 9, seed=6)
    teacher = weakref.ref(t)
    loss = kdops.fused_kd_loss(s, t, grad_in_forward=True)
    del t
    gc.collect()
    assert teacher() is None
    loss.backward()
    assert s.grad is not None


def test_second_order_raises():
    s = logits(4, 9, seed=7).requires_grad_()
    loss = kdops.fused_kd_loss(s, logits(4, 9, seed=8), grad_in_forward=True)
    with pytest.raises(RuntimeError, match="grad_in_forward=False for second order"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("name", ["temperature", "teacher_temperature", "scale", "alpha"])
def test_arguments_that_require_grad_are_refused(name):
    s, t = logits(4, 9, seed=9).requires_grad_(), logits(4, 9, seed=10)
    kw = dict(labels=torch.zeros(4, dtype=torch.long), alpha=0.5)
    kw[name] = torch.tensor(0.5 if name == "alpha" else 2.0, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        kdops.fused_kd_loss(s, t, grad_in_forward=True, **kw)


def test_module_option():
    s, t = logits(4, 9, seed=11).requires_grad_(), logits(4, 9, seed=12)
    loss = kdops.KDLoss(temperature=3.0, grad_in_forward=True)(s, t)
    torch.testing.assert_close(loss, kdops.fused_kd_loss(s, t, temperature=3.0))
    assert "grad_in_forward=True" in repr(kdops.KDLoss(grad_in_forward=True))


def test_torch_func_transforms_run_the_default_mode():
    """Inside torch.func transforms (per-example gradients: vmap of grad, to the student and
    the teacher) the option runs the default mode: the same values as without it."""
    s = logits(3, 4, 9, dtype=torch.float64, seed=13)
    t = logits(3, 4, 9, dtype=torch.float64, seed=14)
    labels, alpha = labels_for((3, 4), 9, "ce")

    def per_example(grad_in_forward):
        def loss(s, t, y):
            return kdops.fused_kd_loss(s, t, temperature=2.0, labels=y, alpha=alpha,
                                       grad_in_forward=grad_in_forward)
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(s, t, labels)

    for got, want in zip(per_example(True), per_example(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.abs().sum() > 0
