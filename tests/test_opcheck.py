"""torch.library.opcheck on every kdops op: schema, fake kernel, autograd registration, AOT."""
import pytest
import torch

from kdops import _loss_ops as _ops
from cases import DIVERGENCE_IDS, DIVERGENCES, labels_for, logits, positive


pytestmark = pytest.mark.usefixtures("backend")
BACKENDS = ("native", "portable", "triton")

N, V = 5, 9


def _inputs(dtype, with_labels, requires_grad=False):
    s = logits(N, V, dtype=dtype, seed=1, requires_grad=requires_grad)
    t = logits(N, V, dtype=dtype, seed=2, requires_grad=requires_grad)
    cdt = torch.promote_types(dtype, torch.float32)
    ts = positive(N, seed=3, dtype=cdt).requires_grad_(requires_grad)
    tt = positive(N, seed=4, dtype=cdt).requires_grad_(requires_grad)
    labels = labels_for((N,), V, "ce")[0] if with_labels else None
    return s, t, ts, tt, labels


CONFIGS = [(d, b, dt, lab) for (d, b) in DIVERGENCES for dt in (torch.float32, torch.bfloat16)
           for lab in (False, True)]


def _config_id(c):
    return f"{DIVERGENCE_IDS[DIVERGENCES.index(c[:2])]}-{str(c[2])[6:]}-{'ce' if c[3] else 'nolabels'}"


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_opcheck_all_ops(config):
    divergence, beta, dtype, with_labels = config
    s, t, ts, tt, labels = _inputs(dtype, with_labels, requires_grad=True)
    cfg = (-100, divergence, beta, with_labels)
    torch.library.opcheck(_ops.kd_forward, (s, t, ts, tt, labels, *cfg))
    with torch.no_grad():
        div, ce, stats = _ops.kd_forward(s, t, ts, tt, labels, *cfg)
    g_d = torch.rand_like(div).requires_grad_()
    g_ce = torch.rand_like(ce).requires_grad_()
    for mask in ([True, False, False, False], [True, True, True, True]):
        torch.library.opcheck(_ops.kd_backward, (g_d, g_ce, s, t, ts, tt, labels, stats, *cfg,
                                                 mask))
    plain = [x.detach() for x in (g_d, g_ce, s, t, ts, tt)]
    cot = (logits(N, V, seed=5, dtype=dtype), None, torch.rand(N, dtype=ts.dtype), None)
    torch.library.opcheck(_ops.kd_double_backward,
                          (*cot, *plain, labels, stats, *cfg, [True] * 6))
