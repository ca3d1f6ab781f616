"""kdops.fused_kd_loss vs the eager composite vs torch.compile of it (pytest-benchmark).

    python -m pytest benchmarks/bench_kd_loss.py            # the issue's CPU shapes
    KDOPS_BENCH_SHAPES=512x1000 python -m pytest benchmarks/bench_kd_loss.py
    KDOPS_BENCH_DIVERGENCES=kl,jsd python -m pytest benchmarks/bench_kd_loss.py

For ``kl`` (the default) the composite is `reference.hinton_kd_loss`: kl_div(log_softmax(s/T),
softmax(t/T), 'batchmean') · T², what most KD code contains; for ``jsd`` (β = 0.5, scale 1,
as TRL and Liger use it) it is `reference.kd_loss`. Modes, all with T = 2 and fp32 logits:
  forward          the loss value
  forward_backward loss and its gradient to the student logits
  second_order     loss, gradient to the student (create_graph) and the gradient of
                   <v, dL/ds> to student and teacher logits (MetaDistil's product), v passed
                   as grad_outputs (not as a product v * dL/ds that would cost an extra
                   [N, V] tensor and its backward in every implementation)
  hvp_forward      dL/ds and its tangent along v, forward over reverse (torch.func.jvp of
                   torch.func.grad): the Hessian-vector product of forward-mode code
torch.compile (inductor) does not differentiate twice, so second_order and hvp_forward compare
kdops with eager only. Each benchmark first checks its result against the reference.

Implementations: kdops (native kernels where built), kdops_portable (the portable PyTorch
implementation forced on CPU; only when the native kernels are there, else it is what kdops
runs), kdops_bf16 (kdops on bf16 logits), eager, compile. Each case also records in
extra_info the peak memory it allocates beyond its inputs, in units of one [N, V] fp32
tensor (Linux: peak RSS, reset before the run).
"""
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

import kdops
from kdops import _library, reference

sys.path.insert(0, str(Path(__file__).parent))
from measure import peak_extra  # noqa: E402

TEMPERATURE = 2.0
DIVERGENCES = os.environ.get("KDOPS_BENCH_DIVERGENCES", "kl").split(",")
JSD = dict(divergence="jsd", beta=0.5, scale=1.0)


def _shapes():
    spec = os.environ.get("KDOPS_BENCH_SHAPES", "2048x32000,256x100")
    return [tuple(int(d) for d in s.split("x")) for s in spec.split(",")]


def _kdops(divergence):
    kw = JSD if divergence == "jsd" else {}
    return lambda s, t: kdops.fused_kd_loss(s, t, temperature=TEMPERATURE, **kw)


def _eager(divergence):
    if divergence == "jsd":
        return lambda s, t: reference.kd_loss(s, t, temperature=TEMPERATURE, **JSD)
    return lambda s, t: reference.hinton_kd_loss(s, t, TEMPERATURE)


NATIVE = kdops.backend_info()["kd_forward"]["cpu"] == "native"
IMPLS = {"kdops": _kdops, "kdops_bf16": _kdops, "eager": _eager,
         "compile": lambda d: torch.compile(_eager(d), dynamic=False)}
if NATIVE:
    IMPLS["kdops_portable"] = _kdops


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
    d_s, d_t = torch.autograd.grad(g, (s, t), grad_outputs=cot)
    return loss.detach(), g.detach(), d_s, d_t


def _hvp_forward(fn, s, t, cot):
    return torch.func.jvp(torch.func.grad(lambda x: fn(x, t)), (s,), (cot,))


MODES = {"forward": _forward, "forward_backward": _forward_backward,
         "second_order": _second_order, "hvp_forward": _hvp_forward}
TWICE = ("second_order", "hvp_forward")
CASES = [(m, i) for m in MODES for i in IMPLS if not (m in TWICE and i == "compile")]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode,impl", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_kd_loss(benchmark, inputs, mode, impl, divergence):
    s, t, cot = inputs
    run, fn = MODES[mode], IMPLS[impl](divergence)
    dtype = torch.bfloat16 if impl == "kdops_bf16" else torch.float32
    context = _library.portable_on_cpu() if impl == "kdops_portable" else contextlib.nullcontext()
    args = (fn, s.to(dtype), t.to(dtype), cot.to(dtype))
    expected = run(_eager(divergence), *(x.to(dtype).double() for x in (s, t, cot)))
    tol = dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    with context:
        for got, want in zip(run(*args), expected):
            torch.testing.assert_close(got.double(), want, **tol)
        benchmark.group = f"{divergence} {mode} {s.shape[0]}x{s.shape[1]}"
        benchmark.extra_info.update(
            mode=mode, impl=impl, divergence=divergence, shape=list(s.shape),
            dtype=str(dtype).removeprefix("torch."),
            threads=torch.get_num_threads(), torch=torch.__version__,
            peak_extra_nv_fp32=peak_extra(run, args, s.numel() * 4))
        benchmark.pedantic(run, args=args, rounds=10 if s.numel() > 1e6 else 50, warmup_rounds=1)
