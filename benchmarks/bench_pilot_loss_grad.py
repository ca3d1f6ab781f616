"""The pilot's loss gradient, two ways (pytest-benchmark).

    python -m pytest benchmarks/bench_pilot_loss_grad.py
    KDOPS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_pilot_loss_grad.py

What kdops.meta's pilot step needs from the KD loss: its gradient g to the student logits,
then the derivative of ⟨g, v⟩ with respect to the teacher logits (the meta-gradient's way back
to the teacher). Both cases do both, on bench_meta_step.py's loss (64 × 100 logits, labels, T = 4,
alpha = 0.9):
  create_graph        fused_kd_loss, then torch.autograd.grad(create_graph=True) through it
                      (kdops.meta before loss_and_student_grad)
  student_grad        kdops.loss.loss_and_student_grad: one kd_backward call whose autograd is
                      the double backward
At this size the GPU waits on the host: the medians are the host's work per step.
"""
import sys
from pathlib import Path

import pytest
import torch

import kdops
from kdops.loss import loss_and_student_grad

sys.path.insert(0, str(Path(__file__).parent))
from measure import DEVICE, DEVICE_NAME, synchronize  # noqa: E402

KD = dict(temperature=4.0, alpha=0.9)


def _create_graph(s, t, labels):
    s = s.detach().requires_grad_()
    loss = kdops.fused_kd_loss(s, t, labels=labels, **KD)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    return loss, g


def _student_grad(s, t, labels):
    return loss_and_student_grad(s, t, labels=labels, **KD)


CASES = {"create_graph": _create_graph, "student_grad": _student_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_pilot_loss_grad(benchmark, case):
    g = torch.Generator().manual_seed(0)
    s, t, v = (torch.randn(64, 100, generator=g).to(DEVICE) for _ in range(3))
    labels = torch.randint(0, 100, (64,), generator=g).to(DEVICE)
    t.requires_grad_()

    def pilot(name):
        loss, grad = CASES[name](s, t, labels)
        (dt,) = torch.autograd.grad(grad, t, v)
        return loss.detach(), grad.detach(), dt

    for got, want in zip(pilot(case), pilot("create_graph")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    def step():
        out = pilot(case)
        synchronize()
        return out

    benchmark.group = "pilot loss gradient, 64 x 100"
    benchmark.extra_info.update(case=case, device=DEVICE_NAME, torch=torch.__version__)
    benchmark.pedantic(step, rounds=200, warmup_rounds=10)
