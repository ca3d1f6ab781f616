"""Forward mode through fused_kd_loss: torch.func.jvp, jacfwd, hessian (forward over reverse)
and torch.autograd.forward_ad's dual tensors give, in float64, what the reference composite
gives under the same transforms, on each CPU implementation (and on CUDA through the Triton
kernels where a device is present)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func as tf
from torch.autograd import gradcheck, gradgradcheck

import kdops
from cases import DIVERGENCE_IDS, DIVERGENCES, REDUCTIONS, labels_for, logits, positive
from kdops import reference

BACKENDS = ("native", "portable", "triton")
N, V = 5, 9


def _case(temperatures, label_mode, divergence, beta, reduction, device="cpu", n=N, v=V):
    """(loss of [n, v] (s, t) and (τs, τt) for kdops, the same for the reference, primals,
    tangents)."""
    labels, alpha = labels_for((n,), v, label_mode)
    options = dict(divergence=divergence, beta=beta, reduction=reduction, alpha=alpha,
                   labels=None if labels is None else labels.to(device))
    shape = {"scalar": (), "rows": (n,)}[temperatures]
    primals = (logits(n, v, dtype=torch.float64, seed=1), logits(n, v, dtype=torch.float64, seed=2),
               positive(shape, seed=3, dtype=torch.float64),
               positive(shape, seed=4, dtype=torch.float64))
    tangents = tuple(torch.randn(x.shape, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(10 + k))
                     for k, x in enumerate(primals))

    def loss(impl):
        return lambda s, t, tau_s, tau_t: impl(s, t, temperature=tau_s,
                                               teacher_temperature=tau_t, **options)

    return (loss(kdops.fused_kd_loss), loss(reference.kd_loss),
            tuple(x.to(device) for x in primals), tuple(x.to(device) for x in tangents))


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_mode", [None, "mask", "ce"])
@pytest.mark.parametrize("temperatures", ["scalar", "rows"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_jvp_matches_the_reference(divergence, beta, temperatures, label_mode, reduction):
    """Tangents along the logits and both temperatures at once."""
    ours, ref, primals, tangents = _case(temperatures, label_mode, divergence, beta, reduction)
    got_value, got = tf.jvp(ours, primals, tangents)
    want_value, want = tf.jvp(ref, primals, tangents)
    _close(got_value, want_value)
    _close(got, want)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("label_mode", [None, "ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_dual_tensors_match_torch_func(divergence, beta, label_mode):
    ours, _, primals, tangents = _case("rows", label_mode, divergence, beta, "batchmean")
    with fwAD.dual_level():
        out = ours(*(fwAD.make_dual(x, d) for x, d in zip(primals, tangents)))
        got = fwAD.unpack_dual(out).tangent
    _close(got, tf.jvp(ours, primals, tangents)[1])


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("label_mode", [None, "ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_hessian_matches_reverse_over_reverse(divergence, beta, label_mode):
    """torch.func.hessian is jacfwd(jacrev): the tangent of the gradient (kd_backward's rule)."""
    ours, _, (s, t, tau_s, tau_t), _ = _case("rows", label_mode, divergence, beta, "sum")
    for argnums in (0, 1, 2):
        got = tf.hessian(ours, argnums=argnums)(s, t, tau_s, tau_t)
        want = tf.jacrev(tf.jacrev(ours, argnums=argnums), argnums=argnums)(s, t, tau_s, tau_t)
        _close(got, want)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_hessian_vector_product_matches_reverse_over_reverse(divergence, beta):
    """jvp(grad(loss)) along every input: the gradient to the student logits moves with the
    teacher logits and the temperatures too (what a forward-mode meta-gradient carries)."""
    ours, _, primals, tangents = _case("rows", "ce", divergence, beta, "batchmean")
    got = tf.jvp(tf.grad(ours), primals, tangents)[1]
    jacobians = tf.jacrev(tf.grad(ours), argnums=(0, 1, 2, 3))(*primals)
    want = sum(j.flatten(2) @ d.flatten() if d.dim() else j * d
               for j, d in zip(jacobians, tangents))
    _close(got, want)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("label_mode", [None, "ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_gradcheck_forward_mode(divergence, beta, label_mode):
    """Against finite differences: forward mode (and its vmap, as jacfwd runs it), and the
    tangent of the backward (forward over reverse; reverse over reverse is test_gradcheck's)."""
    ours, _, primals, _ = _case("rows", label_mode, divergence, beta, "batchmean", n=3, v=4)
    inputs = tuple(x.clone().requires_grad_() for x in primals)
    assert gradcheck(ours, inputs, check_forward_ad=True, check_backward_ad=False,
                     check_batched_forward_grad=True)
    assert gradgradcheck(ours, inputs, check_fwd_over_rev=True, check_rev_over_rev=False,
                         check_undefined_grad=False)


@pytest.mark.usefixtures("backend")
def test_jacfwd_matches_jacrev_per_row():
    ours, _, primals, _ = _case("rows", "mask", "jsd", 0.3, "none")
    for argnums in (0, 1, 3):
        _close(tf.jacfwd(ours, argnums=argnums)(*primals),
               tf.jacrev(ours, argnums=argnums)(*primals))


@pytest.mark.usefixtures("backend")
def test_forward_over_forward_is_refused():
    ours, _, (s, t, tau_s, tau_t), _ = _case("rows", None, "kl", 0.5, "sum")
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        tf.jacfwd(tf.jacfwd(ours))(s, t, tau_s, tau_t)


@pytest.mark.usefixtures("backend")
def test_grad_in_forward_carries_the_tangent_of_the_loss():
    """grad_in_forward=True: the loss's tangent (along the student logits and the temperature)
    is the default mode's, and the backward still gives the gradient computed in the forward."""
    s = logits(N, V, dtype=torch.float64, seed=1, requires_grad=True)
    t = logits(N, V, dtype=torch.float64, seed=2)
    d = logits(N, V, dtype=torch.float64, seed=3)
    tau, d_tau = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    tangents = []
    for grad_in_forward in (True, False):
        with fwAD.dual_level():
            loss = kdops.fused_kd_loss(fwAD.make_dual(s, d), t,
                                       temperature=fwAD.make_dual(tau, d_tau),
                                       grad_in_forward=grad_in_forward)
            tangents.append(fwAD.unpack_dual(loss).tangent)
            (grad,) = torch.autograd.grad(loss, s)
        _close(grad, torch.autograd.grad(kdops.fused_kd_loss(s, t, temperature=tau), s)[0])
    _close(*tangents)


@pytest.mark.usefixtures("backend")
def test_float32_tangent_is_close_to_float64():
    ours, _, primals, tangents = _case("rows", "ce", "jsd", 0.3, "batchmean")
    want = tf.jvp(ours, primals, tangents)[1]
    got = tf.jvp(ours, tuple(x.float() for x in primals), tuple(x.float() for x in tangents))[1]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("label_mode", [None, "ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_the_same_on_cuda_through_the_triton_kernels(divergence, beta, label_mode):
    ours, ref, primals, tangents = _case("rows", label_mode, divergence, beta, "batchmean",
                                         device="cuda")
    _close(tf.jvp(ours, primals, tangents)[1], tf.jvp(ref, primals, tangents)[1])
    got = tf.jvp(tf.grad(ours), primals, tangents)[1]
    want = tf.jvp(tf.grad(ref), primals, tangents)[1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_forward_mode_meta_gradient_of_the_temperature(momentum):
    """MKD's hypergradient in forward mode: the quiz loss after a pilot step (kdops'
    pilot_sgd_step on the gradient of fused_kd_loss at temperature τ, inside torch.func.grad),
    differentiated along τ with one jvp, against the same with the reference composites and
    against reverse mode through create_graph."""
    g = torch.Generator().manual_seed(0)
    x, xq = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2))
    y, yq = (torch.randint(0, 5, (8,), generator=g) for _ in range(2))
    theta = (torch.randn(6, 7, generator=g, dtype=torch.float64),
             torch.randn(7, 5, generator=g, dtype=torch.float64))
    buffers = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in theta]
    teacher = torch.randn(8, 5, generator=g, dtype=torch.float64)

    def student(params, inputs):
        return torch.tanh(inputs @ params[0]) @ params[1]

    def quiz_after_pilot(loss, step):
        def f(tau):
            def pilot_loss(params):
                return loss(student(params, x), teacher, temperature=tau, labels=y, alpha=0.5)
            grads = tf.grad(pilot_loss)(theta)
            fast = step(list(theta), list(grads), 0.3, momentum=momentum,
                        momentum_buffers=buffers if momentum else None)
            return torch.nn.functional.cross_entropy(student(fast, xq), yq)
        return f

    tau, one = torch.tensor(2.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    ours = quiz_after_pilot(kdops.fused_kd_loss, kdops.pilot_sgd_step)
    got = tf.jvp(ours, (tau,), (one,))[1]
    want = tf.jvp(quiz_after_pilot(reference.kd_loss, reference.sgd_step), (tau,), (one,))[1]
    leaf = tau.clone().requires_grad_()
    (reverse,) = torch.autograd.grad(ours(leaf), leaf)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got, reverse, rtol=1e-10, atol=1e-14)
