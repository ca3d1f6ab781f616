"""fused_kd_loss inside torch.func transforms: grad, vmap, their nestings and jacrev(jacrev)
give what torch.autograd gives on the same loss, in float64, on each CPU implementation."""
import pytest
import torch
import torch.func as tf

import kdops

pytestmark = pytest.mark.usefixtures("backend")

N, V, B = 3, 7, 2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    tau = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return s, t, tau


CASES = {
    "kl": dict(divergence="kl"),
    "jsd_labels": dict(divergence="jsd", beta=0.3, alpha=0.6,
                       labels=torch.tensor([1, -100, 4])),
    "reverse_kl_sum": dict(divergence="reverse_kl", reduction="sum"),
}


def _loss(options):
    return lambda s, t, tau: kdops.fused_kd_loss(s, t, temperature=tau, **options)


@pytest.mark.parametrize("case", CASES)
def test_grad_matches_autograd(case):
    f = _loss(CASES[case])
    s, t, tau = _inputs()
    got = tf.grad(f, argnums=(0, 1, 2))(s, t, tau)
    leaves = [x.clone().requires_grad_() for x in (s, t, tau)]
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_grad_of_grad_matches_double_backward(case):
    f = _loss(CASES[case])
    s, t, tau = _inputs()
    v = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def directional(s, t, tau):  # <v, ∂L/∂s>, differentiated again
        return (tf.grad(f)(s, t, tau) * v).sum()

    got = tf.grad(directional, argnums=(0, 1, 2))(s, t, tau)
    leaves = [x.clone().requires_grad_() for x in (s, t, tau)]
    (g,) = torch.autograd.grad(f(*leaves), leaves[0], create_graph=True)
    want = torch.autograd.grad((g * v).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_vmap_folds_the_batch_into_rows():
    f = _loss(dict(reduction="none"))
    ss = torch.stack([_inputs(k)[0] for k in range(B)])
    _, t, tau = _inputs()
    got = tf.vmap(f, in_dims=(0, None, None))(ss, t, tau)
    want = torch.stack([f(x, t, tau) for x in ss])
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_vmap_over_labels_and_temperatures():
    """Per-example losses and gradients with each example's own labels and temperature (the
    usual per-sample-gradient pattern): the value checks of labels and temperatures inspect
    the batched tensors without data-dependent control flow, and still raise."""
    def f(s, t, labels, tau):
        return kdops.fused_kd_loss(s, t, labels=labels, alpha=0.6, temperature=tau,
                                   divergence="jsd", beta=0.3)

    ss = torch.stack([_inputs(k)[0] for k in range(B)])
    ts = torch.stack([_inputs(k)[1] for k in range(B)])
    labels = torch.tensor([[1, -100, 4], [0, 6, -100]])
    taus = torch.tensor([0.7, 2.5], dtype=torch.float64)
    got = tf.vmap(tf.grad(f, argnums=(0, 3)))(ss, ts, labels, taus)
    for k in range(B):
        leaves = [ss[k].clone().requires_grad_(), taus[k].clone().requires_grad_()]
        want = torch.autograd.grad(f(leaves[0], ts[k], labels[k], leaves[1]), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a[k], b, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="labels must lie"):
        tf.vmap(f)(ss, ts, labels.masked_fill(labels == 6, V), taus)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        tf.vmap(f)(ss, ts, labels, -taus)


def test_per_example_gradients_and_jacobians():
    f = _loss(CASES["jsd_labels"])
    ss = torch.stack([_inputs(k)[0] for k in range(B)])
    _, t, tau = _inputs()
    got = tf.vmap(tf.grad(f, argnums=(0, 2)), in_dims=(0, None, None))(ss, t, tau)
    for k in range(B):
        leaves = [ss[k].clone().requires_grad_(), tau.clone().requires_grad_()]
        want = torch.autograd.grad(f(leaves[0], t, leaves[1]), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a[k], b, rtol=1e-12, atol=0)
    # The Hessian to the student logits, row by row of the Jacobian of the gradient.
    s = ss[0]
    hessian = tf.jacrev(tf.jacrev(f))(s, t, tau)
    leaf = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(leaf, t, tau), leaf, create_graph=True)
    for i, j in ((0, 0), (2, 5)):
        (row,) = torch.autograd.grad(g[i, j], leaf, retain_graph=True)
        torch.testing.assert_close(hessian[i, j], row, rtol=1e-12, atol=1e-15)
