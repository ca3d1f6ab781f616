"""kdops.fused_kd_loss vs the eager composite vs torch.compile of it (pytest-benchmark).

    python -m pytest benchmarks/bench_kd_loss.py            # the issue's CPU shapes
    KDOPS_BENCH_SHAPES=512x1000 python -m pytest benchmarks/bench_kd_loss.py

The composite is `reference.hinton_kd_loss`: kl_div(log_softmax(s/T), softmax(t/T),
'batchmean') · T², what most KD code contains. Modes, all with T = 2 and fp32 logits:
  forward          the loss value
  forward_backward loss and its gradient to the student logits
  second_order     loss, gradient to the student (create_graph) and the gradient of
                   <v, dL/ds> to student and teacher logits (MetaDistil's product)
torch.compile (inductor) does not differentiate twice, so second_order compares kdops with
eager only. Each benchmark first checks its result against the reference.
"""
import os

import pytest
import torch

import kdops
from kdops import reference

TEMPERATURE = 2.0


def _shapes():
    spec = os.environ.get("KDOPS_BENCH_SHAPES", "2048x32000,256x100")
    return [tuple(int(d) for d in s.split("x")) for s in spec.split(",")]


def _kdops(s, t):
    return kdops.fused_kd_loss(s, t, temperature=TEMPERATURE)


def _eager(s, t):
    return reference.hinton_kd_loss(s, t, TEMPERATURE)


_compiled = torch.compile(_eager, dynamic=False)

IMPLS = {"kdops": _kdops, "eager": _eager, "compile": _compiled}


@pytest.fixture(scope="module", params=_shapes(), ids=lambda s: f"{s[0]}x{s[1]}")
def inputs(request):
    n, v = request.param
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g) * 3
    t = torch.randn(n, v, generator=g) * 3
    cot = torch.randn(n, v, generator=g)
    return s, t, cot


def _forward(fn, s, t, cot):
    with torch.no_grad():
        return (fn(s, t),)


def _forward_backward(fn, s, t, cot):
    s = s.detach().requires_grad_()
    loss = fn(s, t)
    loss.backward()
    return loss.detach(), s.grad


def _second_order(fn, s, t, cot):
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    loss = fn(s, t)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    (g * cot).sum().backward()
    return loss.detach(), g.detach(), s.grad, t.grad


MODES = {"forward": _forward, "forward_backward": _forward_backward,
         "second_order": _second_order}
CASES = [(m, i) for m in MODES for i in IMPLS if not (m == "second_order" and i == "compile")]


@pytest.mark.parametrize("mode,impl", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_kd_loss(benchmark, inputs, mode, impl):
    s, t, cot = inputs
    run, fn = MODES[mode], IMPLS[impl]
    expected = run(_eager, s.double(), t.double(), cot.double())
    for got, want in zip(run(fn, s, t, cot), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    benchmark.group = f"{mode} {s.shape[0]}x{s.shape[1]}"
    benchmark.extra_info.update(mode=mode, impl=impl, shape=list(s.shape), dtype="float32",
                                threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.pedantic(run, args=(fn, s, t, cot), rounds=5 if s.numel() > 1e6 else 50,
                       warmup_rounds=1)
