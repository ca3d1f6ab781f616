"""kdops.loss.loss_and_student_grad: the loss and its gradient to the student logits, to second
order, as fused_kd_loss gives them through autograd (what kdops.meta's pilot step uses)."""
import pytest
import torch
import torch.func as tf

import kdops
from cases import DIVERGENCE_IDS, DIVERGENCES, labels_for, logits, positive
from kdops.loss import loss_and_student_grad

BACKENDS = ("native", "portable", "triton")


def _through_autograd(s, t, **kw):
    s = s.detach().requires_grad_()
    loss = kdops.fused_kd_loss(s, t, **kw)
    (grad,) = torch.autograd.grad(loss, s, create_graph=True)
    return loss, grad


def _check(divergence, beta, temperatures, label_mode, reduction, device="cpu"):
    """float64 [2, 3, V] logits: the loss, the gradient, and the derivatives of ⟨gradient, v⟩
    with respect to the teacher logits, both temperatures, the scale and alpha."""
    def make(x, grad=False):
        return x.to(device).requires_grad_(grad)

    s = make(logits(2, 3, 11, dtype=torch.float64, seed=1))
    t = make(logits(2, 3, 11, dtype=torch.float64, seed=2), True)
    labels, alpha = labels_for((2, 3), 11, label_mode)
    kw = dict(divergence=divergence, beta=beta, reduction=reduction,
              labels=None if labels is None else labels.to(device))
    wrt = [t]
    if temperatures == "float":
        kw.update(temperature=2.0, teacher_temperature=1.5)
    else:
        kw.update(temperature=make(positive(2, 1, seed=4, dtype=torch.float64), True),
                  teacher_temperature=make(positive(2, 3, seed=5, dtype=torch.float64), True))
        wrt += [kw["temperature"], kw["teacher_temperature"]]
    if temperatures == "rows_scale":
        kw["scale"] = make(positive(2, 3, seed=6, dtype=torch.float64), True)
        wrt.append(kw["scale"])
    if alpha is not None:
        kw["alpha"] = make(torch.tensor(alpha, dtype=torch.float64), True)
        wrt.append(kw["alpha"])
    v = make(logits(2, 3, 11, dtype=torch.float64, seed=7))
    got = loss_and_student_grad(s, t, **kw)
    want = _through_autograd(s, t, **kw)
    assert got[0].grad_fn is None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    got_second = torch.autograd.grad((got[1] * v).sum(), wrt)
    want_second = torch.autograd.grad((want[1] * v).sum(), wrt)
    for g, w in zip(got_second, want_second):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("label_mode", [None, "mask", "ce"])
@pytest.mark.parametrize("temperatures", ["float", "rows", "rows_scale"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_loss_gradient_and_its_derivatives_match_autograd(divergence, beta, temperatures,
                                                          label_mode, reduction):
    _check(divergence, beta, temperatures, label_mode, reduction)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("label_mode", [None, "ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_the_same_on_cuda_through_the_triton_kernels(divergence, beta, label_mode):
    _check(divergence, beta, "rows_scale", label_mode, "batchmean", device="cuda")


@pytest.mark.usefixtures("backend")
def test_the_gradient_is_not_differentiated_to_the_student_logits():
    s = logits(4, 7, dtype=torch.float64, seed=1, requires_grad=True)
    t = logits(4, 7, dtype=torch.float64, seed=2, requires_grad=True)
    _, grad = loss_and_student_grad(s, t, temperature=2.0)
    pairing = (grad * logits(4, 7, dtype=torch.float64, seed=3)).sum()
    ds, dt = torch.autograd.grad(pairing, (s, t), allow_unused=True)
    assert ds is None and dt.abs().sum() > 0


@pytest.mark.usefixtures("backend")
def test_a_per_row_loss_is_refused():
    s, t = logits(4, 7, seed=1), logits(4, 7, seed=2)
    with pytest.raises(ValueError, match="reduction='none'"):
        loss_and_student_grad(s, t, reduction="none")


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_the_gradient_in_forward_mode(divergence, beta):
    """Tangents of the gradient along the teacher logits and both temperatures (kd_backward's
    forward-mode rule) are those of the gradient that autograd gives through fused_kd_loss."""
    s = logits(4, 7, dtype=torch.float64, seed=1)
    labels, alpha = labels_for((4,), 7, "ce")
    primals = (logits(4, 7, dtype=torch.float64, seed=2),
               positive(4, seed=3, dtype=torch.float64), positive(4, seed=4, dtype=torch.float64))
    tangents = (logits(4, 7, dtype=torch.float64, seed=5),
                positive(4, seed=6, dtype=torch.float64), positive(4, seed=7, dtype=torch.float64))
    kw = dict(divergence=divergence, beta=beta, labels=labels, alpha=alpha)

    def ours(t, tau_s, tau_t):
        return loss_and_student_grad(s, t, temperature=tau_s, teacher_temperature=tau_t, **kw)[1]

    def through_autograd(t, tau_s, tau_t):
        return tf.grad(lambda x: kdops.fused_kd_loss(x, t, temperature=tau_s,
                                                     teacher_temperature=tau_t, **kw))(s)

    got = tf.jvp(ours, primals, tangents)[1]
    want = tf.jvp(through_autograd, primals, tangents)[1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
