"""fused_kd_loss against the float64 composite oracle: values, gradients, second order.

Errors are measured as max |x − ref| / max |ref| per quantity (loss, first derivatives, second
derivatives). kdops must be within 2× the error of the same composite run eagerly at the input
dtype, or within FLOOR = 32 float32 eps. In float32 both sit at rounding level, where the max
of a few hundred rounding errors varies by a few × from seed to seed in either direction (over
30 seeds the median ratio kdops/eager is <= 1 for every quantity); FLOOR absorbs that noise.
Where a quantity cancels, its rounding level is far above FLOOR and one eager run is one draw
from a wide spread: at the largest teacher gradient of a JSD whose teacher is confident,
⟨pt, e_t⟩ is subtracted from an e_t 43× larger than the difference, and eager's error there
went from 4.4 to 92 float32 eps over the eight orders of the vocabulary used here (the same
sums, rounded in another order; kdops: 25, or 73 through Triton's interpreter). So eager's
error is taken as its largest over the vocabulary as given and seven shuffled orders
(`ORDERS`).
For bf16/fp16 kdops accumulates in float32 and is far inside the 2× bound.
"""
import pytest
import torch

import kdops
from cases import DIVERGENCE_IDS, DIVERGENCES, labels_for, logits, mask_vocab, positive
from kdops import reference

pytestmark = pytest.mark.usefixtures("backend")
BACKENDS = ("native", "portable", "triton")

FLOOR = 32 * torch.finfo(torch.float32).eps
ORDERS = 8


def _with_grads(fn, s, t, taus=(), v=None):
    """(loss, ∂/∂s, ∂/∂t, ∂/∂τ..., second order ∂⟨v, ∂L/∂s⟩/∂(s, t, τ...)) as float64."""
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    taus = tuple(x.detach().requires_grad_() for x in taus)
    loss = fn(s, t, *taus)
    first = torch.autograd.grad(loss.sum(), (s, t, *taus), create_graph=v is not None)
    out = [loss, *first]
    if v is not None:
        out += torch.autograd.grad((first[0] * v.to(first[0].dtype)).sum(), (s, t, *taus))
    return [x.detach().double() for x in out]


def _errors(got, ref):
    return [((g - r).abs().max() / r.abs().max().clamp(min=1e-30)).item()
            for g, r in zip(got, ref)]


def _compare(s, t, taus=(), v=None, **kw):
    """Assert kdops is as close to the float64 reference as eager at the input dtype is, in
    the vocabulary order that rounds eager's worst (module docstring)."""
    dtype = torch.promote_types(s.dtype, t.dtype)

    def run(loss_fn, cast, order=None):
        logits, options = (s, t, v), kw
        if order is not None:          # the vocabulary shuffled, the outputs put back
            logits = tuple(None if x is None else x[..., order] for x in logits)
            labels = kw.get("labels")
            if labels is not None:
                options = dict(kw, labels=torch.where(
                    labels >= 0, order.argsort()[labels.clamp(min=0)], labels))
        out = _with_grads(lambda a, b, *tt: loss_fn(cast(a), cast(b),
                                                    **_taus(options, tuple(map(cast, tt)))),
                          logits[0], logits[1], taus, logits[2])
        if order is not None:
            out = [x[..., order.argsort()] if x.shape == s.shape else x for x in out]
        return out

    ours = run(kdops.fused_kd_loss, lambda x: x)
    ref = run(reference.kd_loss, lambda x: x.double())
    shuffles = torch.Generator().manual_seed(0)
    orders = [None] + [torch.randperm(s.shape[-1], generator=shuffles)
                       for _ in range(ORDERS - 1)]
    eager = [_errors(run(lambda a, b, **k: reference.kd_loss(a, b, compute_dtype=dtype, **k),
                         lambda x: x.to(dtype) if x.is_floating_point() else x, order), ref)
             for order in orders]
    for i, (e_ours, *e_eager) in enumerate(zip(_errors(ours, ref), *eager)):
        assert e_ours <= max(2 * max(e_eager), FLOOR), (
            f"quantity {i}: relative error {e_ours:.2e}, eager {max(e_eager):.2e}")
    return ours


def _taus(kw, taus):
    if taus:
        kw = dict(kw, temperature=taus[0])
        if len(taus) > 1:
            kw["teacher_temperature"] = taus[1]
    return kw


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
@pytest.mark.parametrize("v", [7, 1271, 32003])
def test_fp32_odd_vocab(divergence, beta, v):
    n = 3 if v == 32003 else 16
    s, t = logits(n, v, seed=1), logits(n, v, seed=2)
    _compare(s, t, v=logits(n, v, seed=3), temperature=2.0, divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_fp32_per_row_temperatures_labels_3d(divergence, beta):
    b, tl, v = 3, 5, 97
    s, t = logits(b, tl, v, seed=4), logits(b, tl, v, seed=5)
    taus = (positive(b, tl, seed=30), positive(b, 1, seed=31))
    labels, _ = labels_for((b, tl), v, "ce")
    for reduction in ("batchmean", "sum", "mean", "none"):
        _compare(s, t, taus, v=logits(b, tl, v, seed=6), divergence=divergence, beta=beta,
                 labels=labels, alpha=0.3, reduction=reduction)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_masked_vocabulary_contributes_nothing(divergence, beta):
    """-inf columns give no NaN and exactly the loss of the vocabulary without them."""
    n, v, masked = 8, 33, [0, 5, 6, 31]
    s, t = logits(n, v, seed=7), logits(n, v, seed=8)
    kept = [j for j in range(v) if j not in masked]
    kw = dict(temperature=2.0, divergence=divergence, beta=beta, reduction="none")
    full = _compare(mask_vocab(s, masked), mask_vocab(t, masked), v=logits(n, v, seed=9), **kw)
    assert all(torch.isfinite(x).all() for x in full)
    for x in full[1:]:
        assert (x[:, masked] == 0).all()
    # The same rows without the masked columns, in float64 so rounding cannot hide a difference.
    s, t = s.double(), t.double()
    masked64 = _with_grads(lambda a, b: kdops.fused_kd_loss(a, b, **kw),
                           mask_vocab(s, masked), mask_vocab(t, masked))
    compact = _with_grads(lambda a, b: kdops.fused_kd_loss(a, b, **kw), s[:, kept], t[:, kept])
    torch.testing.assert_close(masked64[0], compact[0])
    for m, c in zip(masked64[1:], compact[1:]):
        torch.testing.assert_close(m[:, kept], c)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_all_but_one_masked(divergence, beta):
    """A row with one finite entry is a point mass in both: loss and gradients are zero."""
    s, t = logits(4, 9, seed=10), logits(4, 9, seed=11)
    s[0, 1:], t[0, 1:] = float("-inf"), float("-inf")
    out = _compare(s, t, v=logits(4, 9, seed=12), divergence=divergence, beta=beta,
                   reduction="none")
    assert out[0][0] == 0 and (out[1][0] == 0).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_huge_logits(divergence, beta):
    s = logits(6, 50, seed=13, spread=1e4).clamp(-1e4, 1e4)
    t = logits(6, 50, seed=14, spread=1e4).clamp(-1e4, 1e4)
    out = _compare(s, t, v=logits(6, 50, seed=15), temperature=1.0, divergence=divergence,
                   beta=beta)
    assert all(torch.isfinite(x).all() for x in out)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_single_class(divergence, beta):
    out = _with_grads(lambda a, b: kdops.fused_kd_loss(a, b, divergence=divergence, beta=beta),
                      logits(5, 1, seed=16), logits(5, 1, seed=17), v=logits(5, 1, seed=18))
    assert all((x == 0).all() for x in out)


def test_nan_logits_propagate():
    s, t = logits(3, 8, seed=19), logits(3, 8, seed=20)
    s[1, 2] = float("nan")
    rows = kdops.fused_kd_loss(s, t, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_mixed_dtypes():
    """A bf16 teacher with an fp32 student: computed in fp32, gradients in each own dtype."""
    s, t = logits(8, 40, seed=21), logits(8, 40, seed=22).bfloat16()
    s.requires_grad_()
    t.requires_grad_()
    loss = kdops.fused_kd_loss(s, t, temperature=2.0)
    gs, gt = torch.autograd.grad(loss, (s, t))
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32 and gt.dtype == torch.bfloat16
    _compare(s, t, temperature=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_low_precision_within_twice_eager_error(divergence, beta, dtype):
    n, v = 32, 1271
    s, t = logits(n, v, dtype=dtype, seed=23), logits(n, v, dtype=dtype, seed=24)
    taus = (positive(n, seed=32), positive(n, seed=33))
    _compare(s, t, taus, v=logits(n, v, seed=25), divergence=divergence, beta=beta)


def test_output_dtypes_and_shapes():
    s, t = logits(2, 3, 10, dtype=torch.bfloat16), logits(2, 3, 10, dtype=torch.bfloat16, seed=1)
    assert kdops.fused_kd_loss(s, t).dtype == torch.float32
    assert kdops.fused_kd_loss(s, t, reduction="none").shape == (2, 3)
    d = kdops.fused_kd_loss(s.double(), t.double(), reduction="none")
    assert d.dtype == torch.float64 and d.shape == (2, 3)


def test_all_rows_ignored_gives_zero():
    s = logits(4, 6, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = kdops.fused_kd_loss(s, logits(4, 6, seed=1), labels=labels, alpha=0.5)
    (g,) = torch.autograd.grad(loss, s)
    assert loss == 0 and (g == 0).all()


@pytest.mark.parametrize("alpha", [None, 0.5], ids=["kd", "kd+ce"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_empty_batch(alpha, reduction):
    """No rows (an empty last batch, a sequence batch of length 0): a zero loss (or an empty
    one for "none") and empty gradients, to second order, with the cross-entropy term too,
    whose labels tensor is then empty."""
    s = logits(0, 5, dtype=torch.float64, requires_grad=True)
    t = logits(0, 5, dtype=torch.float64, seed=1, requires_grad=True)
    tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = kdops.fused_kd_loss(s, t, temperature=tau, labels=torch.zeros(0, dtype=torch.long),
                               alpha=alpha, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert (loss == 0).all()
    gs, gt, gtau = torch.autograd.grad(loss.sum(), (s, t, tau), create_graph=True)
    assert gs.shape == gt.shape == (0, 5) and gtau == 0
    second = torch.autograd.grad(gs.sum() + gtau, (s, t, tau), allow_unused=True)
    assert second[0].shape == (0, 5) and second[2] == 0


def test_block_size_does_not_change_results(monkeypatch):
    """The row-blocked loop gives the same values for any block size."""
    from kdops import _loss_portable as _portable

    s, t, v = logits(13, 77, seed=26), logits(13, 77, seed=27), logits(13, 77, seed=28)
    kw = dict(temperature=positive(13, seed=34), labels=labels_for((13,), 77, "ce")[0], alpha=0.5,
              divergence="jsd")
    whole = _with_grads(lambda a, b: kdops.fused_kd_loss(a, b, **kw), s, t, v=v)
    monkeypatch.setattr(_portable, "BLOCK_ELEMENTS", 100)
    blocked = _with_grads(lambda a, b: kdops.fused_kd_loss(a, b, **kw), s, t, v=v)
    for x, y in zip(whole, blocked):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_module_matches_function():
    s, t = logits(5, 11), logits(5, 11, seed=1)
    labels = labels_for((5,), 11, "ce")[0]
    mod = kdops.KDLoss(temperature=3.0, divergence="reverse_kl", alpha=0.4)
    assert "reverse_kl" in repr(mod)
    torch.testing.assert_close(
        mod(s, t, labels),
        kdops.fused_kd_loss(s, t, temperature=3.0, divergence="reverse_kl", alpha=0.4,
                            labels=labels), rtol=0, atol=0)


def test_hinton_composite_is_the_default():
    s, t = logits(16, 100), logits(16, 100, seed=1)
    torch.testing.assert_close(kdops.fused_kd_loss(s, t, temperature=4.0),
                               reference.hinton_kd_loss(s, t, 4.0), rtol=1e-6, atol=0)
