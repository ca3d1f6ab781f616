"""kdops.compat against the losses of the code each adapter replaces, as those codebases write
them (`kdops.reference`: log_softmax, softmax, kl_div, cross_entropy), in float64: values,
gradients to both logits and to a learnable temperature, second order, and float32.
"""
import pytest
import torch

from cases import logits
from kdops import reference
from kdops.compat import mdistiller, repdistiller, torchdistill, trl

# The references compute torchdistill's reduction="mean" with F.kl_div, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
T = 4.0
SHAPES = [(6, 10), (2, 10, 3, 4)]             # [B, C] and [B, C, H, W]: classes on dim 1


def _pair(shape, dtype=torch.float64):
    return (logits(*shape, dtype=dtype, seed=0, requires_grad=True),
            logits(*shape, dtype=dtype, seed=1, requires_grad=True))


def _agree(got_fn, want_fn, inputs, rtol=1e-12):
    """Equal values and equal gradients to every input."""
    got, want = got_fn(*inputs), want_fn(*inputs)
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_repdistiller_distill_kl(shape):
    s, t = _pair(shape)
    _agree(repdistiller.DistillKL(T), lambda a, b: reference.repdistiller_distill_kl(a, b, T),
           (s, t))


def test_repdistiller_learnable_temperature():
    """CTKD learns DistillKL's T: its gradient, T² included, is the composite's."""
    s, t = _pair((6, 10))
    tau = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    _agree(lambda a, b, c: repdistiller.DistillKL(c)(a, b), reference.repdistiller_distill_kl,
           (s, t, tau))


@pytest.mark.parametrize("logit_stand", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mdistiller_kd_loss(shape, logit_stand):
    s, t = _pair(shape)
    _agree(lambda a, b: mdistiller.kd_loss(a, b, T, logit_stand),
           lambda a, b: reference.mdistiller_kd_loss(a, b, T, logit_stand), (s, t))


@pytest.mark.parametrize("ce_kwargs", [{}, {"label_smoothing": 0.1, "ignore_index": -100}],
                         ids=["plain-ce", "smoothed-ce"])
@pytest.mark.parametrize("alpha,beta", [(None, None), (0.0, None), (0.3, None), (0.3, 0.9)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torchdistill_kd_loss(shape, reduction, alpha, beta, ce_kwargs):
    s, t = _pair(shape)
    g = torch.Generator().manual_seed(4)
    targets = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    targets.view(-1)[1] = -100
    loss = torchdistill.KDLoss("fc", "output", "fc", "output", T, alpha=alpha, beta=beta,
                               reduction=reduction, **ce_kwargs)
    for y in (targets, None):
        _agree(lambda a, b: loss({"fc": {"output": a}}, {"fc": {"output": b}}, y),
               lambda a, b: reference.torchdistill_kd_loss(a, b, y, T, alpha, beta, reduction,
                                                          **ce_kwargs),
               (s, t))


@pytest.mark.parametrize("labelled", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_trl_generalized_jsd_loss(beta, reduction, labelled):
    s, t = _pair((3, 5, 11))
    labels = None
    if labelled != "none":
        labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(5))
        labels[0, :2] = -100
        if labelled == "all":
            labels[:] = -100
    if labelled == "all" and reduction == "mean":        # TRL: NaN (mean of nothing); kdops: 0
        assert trl.generalized_jsd_loss(s, t, labels, beta, 2.0, reduction).item() == 0
        return
    _agree(lambda a, b: trl.generalized_jsd_loss(a, b, labels, beta, 2.0, reduction),
           lambda a, b: reference.trl_generalized_jsd_loss(a, b, labels, beta, 2.0, reduction),
           (s, t))


def test_trl_num_items_in_batch():
    s, t = _pair((3, 5, 11))
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(6))
    labels[1, 3:] = -100
    n = torch.tensor(17)
    _agree(lambda a, b: trl.generalized_jsd_loss(a, b, labels, 0.5, 2.0, num_items_in_batch=n),
           lambda a, b: reference.trl_generalized_jsd_loss(a, b, labels, 0.5, 2.0,
                                                           num_items_in_batch=n), (s, t))


def test_trl_labels_only_select_positions():
    """Label values outside the vocabulary (TRL never reads them) are accepted."""
    s, t = _pair((2, 3, 7))
    labels = torch.tensor([[100, -100, 3], [9, 9, -100]])
    want = reference.kd_loss(s, t, divergence="jsd", beta=0.5, scale=1.0,
                             labels=torch.where(labels == -100, -100, 0))
    torch.testing.assert_close(trl.generalized_jsd_loss(s, t, labels), want, rtol=1e-12, atol=0)


# The loss modules are built once, as training code builds them (torch 2.11's torch.compile
# cannot trace an nn.Module's construction inside the compiled function).
_DISTILL_KL = repdistiller.DistillKL(T)
_KD_LOSS = torchdistill.KDLoss("m", "o", "m", "o", T, alpha=0.4)
ADAPTERS = {
    "repdistiller": lambda a, b: _DISTILL_KL(a, b),
    "mdistiller": lambda a, b: mdistiller.kd_loss(a, b, T, logit_stand=True),
    "torchdistill": lambda a, b: _KD_LOSS(
        {"m": {"o": a}}, {"m": {"o": b}}, torch.tensor([1, 0, 2], device=a.device)),
    "trl": lambda a, b: trl.generalized_jsd_loss(
        a, b, torch.tensor([1, -100, 2], device=a.device), 0.3, 2.0),
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_second_order(name):
    """The adapters keep kdops' exact second order (what a meta-gradient through them needs)."""
    s, t = _pair((3, 4))
    assert torch.autograd.gradgradcheck(ADAPTERS[name], (s, t))


@pytest.mark.parametrize("name", ADAPTERS)
def test_compile_fullgraph(name):
    """torch.compile(fullgraph=True) traces each adapter; its backward graph runs kdops' ops."""
    s, t = _pair((3, 4))
    compiled = torch.compile(ADAPTERS[name], fullgraph=True, backend="aot_eager")
    _agree(compiled, ADAPTERS[name], (s, t))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ADAPTERS)
def test_low_precision_logits(name, dtype, device):
    """A float32 loss, computed in float32 from the logits' own values, and gradients in the
    logits' dtype: against float64 on the CPU on the same (rounded) values. On CUDA the fused
    part runs the Triton kernels."""
    s, t = (x.detach().to(device, dtype).requires_grad_() for x in _pair((3, 4)))
    got = ADAPTERS[name](s, t)
    assert got.dtype == torch.float32 and got.device == s.device
    grads = torch.autograd.grad(got, (s, t))
    assert all(g.dtype == dtype and g.device == s.device for g in grads)
    s64, t64 = (x.detach().cpu().double().requires_grad_() for x in (s, t))
    want = ADAPTERS[name](s64, t64)
    torch.testing.assert_close(got.cpu().double(), want.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, (s64, t64))):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-2, atol=1e-4)


def test_bad_arguments_raise():
    s, t = _pair((6, 10))
    with pytest.raises(ValueError, match="classes on dim 1"):
        repdistiller.DistillKL(T)(s[0], t[0])
    with pytest.raises(ValueError, match="classes on dim 1"):
        mdistiller.kd_loss(s[0], t[0], T)
    with pytest.raises(ValueError, match="reduction"):
        torchdistill.KDLoss("m", "o", "m", "o", T, alpha=0.5, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        trl.generalized_jsd_loss(s, t, reduction="none")
    with pytest.raises(TypeError, match="labels"):
        trl.generalized_jsd_loss(s, t, labels=[1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="temperature"):
        repdistiller.DistillKL(-1.0)(s, t)
