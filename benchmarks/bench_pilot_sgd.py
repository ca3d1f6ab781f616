"""kdops.pilot_sgd_step vs the per-tensor loop vs torch._foreach (pytest-benchmark).

    python -m pytest benchmarks/bench_pilot_sgd.py                  # resnet20 and bert_base
    KDOPS_BENCH_LISTS=resnet20 python -m pytest benchmarks/bench_pilot_sgd.py
    KDOPS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_pilot_sgd.py

Parameter lists (benchmarks/param_lists.py): a CIFAR ResNet-20 (0.28M parameters in 65
tensors) and a BERT-base-shaped list (110M in 199 tensors), fp32, plain SGD with lr = 0.1, as
MetaDistil's pilot update. Modes:
  forward           the new parameters, without autograd
  forward_backward  params and grads require grad (the grads come from a create_graph
                    backward in a real pilot); the step, then the gradient of <cot, p'> to both
                    (torch.autograd.grad: nothing accumulates, so the same leaves serve every
                    round and the timing holds no per-round setup)
Implementations: kdops (native kernels where built), kdops_portable (the portable
torch._foreach implementation, only when the native kernels are there), loop (the per-tensor
`p - lr * g` of MetaDistil, higher and learn2learn: `reference.sgd_step`), foreach
(`torch._foreach_sub(params, torch._foreach_mul(grads, lr))`, differentiable since torch 2.1).
Each case first checks its result against the loop, bit for bit, and records in extra_info the
achieved bandwidth: the bytes that must move (forward: params and grads read, new params
written; forward+backward adds the cotangents read and the grads' gradient written; the
params' gradient is the cotangent itself) over the median time, and its fraction of a
large device-to-device copy measured in the same run (bytes read plus written). On a GPU
it also records the kernels' own time per call and its bandwidth fraction (`kernel_ms`,
`kernel_fraction_of_copy`, from the profiler), and the kernels launched per call: the
host-clock median counts the host's work before the first launch as well.
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
import measure  # noqa: E402
from measure import DEVICE, DEVICE_NAME, synchronize  # noqa: E402
from param_lists import param_list  # noqa: E402

LR = 0.1


def _lists():
    return os.environ.get("KDOPS_BENCH_LISTS", "resnet20,bert_base").split(",")


def _kdops(params, grads):
    return kdops.pilot_sgd_step(params, grads, LR)


def _loop(params, grads):
    return reference.sgd_step(params, grads, LR)


def _foreach(params, grads):
    return torch._foreach_sub(params, torch._foreach_mul(grads, LR))


NATIVE = kdops.backend_info()["pilot_sgd_step"]["cpu"] == "native"
IMPLS = {"kdops": _kdops, "loop": _loop, "foreach": _foreach}
if NATIVE and DEVICE.type == "cpu":
    IMPLS["kdops_portable"] = _kdops


@pytest.fixture(scope="module")
def copy_bandwidth():
    return measure.copy_bandwidth()


@pytest.fixture(scope="module", params=_lists())
def lists(request):
    params, grads = param_list(request.param)
    # Leaves that require grad, as a real pilot's params and create_graph gradients do: the
    # forward_backward mode differentiates them, the forward mode runs under no_grad.
    params = [p.to(DEVICE).requires_grad_() for p in params]
    grads = [g.to(DEVICE).requires_grad_() for g in grads]
    cot = [torch.randn_like(p) for p in params]
    return request.param, params, grads, cot


def _forward(fn, params, grads, cot):
    with torch.no_grad():
        out = fn(params, grads)
    synchronize()
    return out


def _forward_backward(fn, params, grads, cot):
    out = fn(params, grads)
    result = [*out, *torch.autograd.grad(out, params + grads, cot)]
    synchronize()
    return result


MODES = {"forward": _forward, "forward_backward": _forward_backward}
TENSORS_MOVED = {"forward": 3, "forward_backward": 5}   # per element, see the docstring
CASES = [(m, i) for m in MODES for i in IMPLS]


@pytest.mark.parametrize("mode,impl", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_pilot_sgd(benchmark, lists, copy_bandwidth, mode, impl):
    name, params, grads, cot = lists
    run = MODES[mode]
    args = (IMPLS[impl], params, grads, cot)
    context = _library.portable_on_cpu() if impl == "kdops_portable" else contextlib.nullcontext()
    with context:
        for got, want in zip(run(*args), run(_loop, params, grads, cot)):
            assert torch.equal(got, want)
        benchmark.group = f"{mode} {name}"
        numel = sum(p.numel() for p in params)
        big = numel > 1e7
        benchmark.pedantic(run, args=args, rounds=10 if big else 200, warmup_rounds=1)
    moved = TENSORS_MOVED[mode] * sum(p.nbytes for p in params)
    achieved = moved / benchmark.stats.stats.median if benchmark.stats else None
    if DEVICE.type == "cuda":
        seconds, launches = measure.kernel_time(run, args)
        benchmark.extra_info.update(
            kernel_ms=round(seconds * 1e3, 4), kernels_per_call=launches,
            kernel_fraction_of_copy=round(moved / seconds / copy_bandwidth, 3))
    benchmark.extra_info.update(
        mode=mode, impl=impl, params=name, tensors=len(params), numel=numel,
        device=DEVICE_NAME,
        threads=torch.get_num_threads(), torch=torch.__version__, bytes_moved=moved,
        copy_gb_per_s=round(copy_bandwidth / 1e9, 2),
        gb_per_s=round(achieved / 1e9, 2) if achieved else None,
        fraction_of_copy=round(achieved / copy_bandwidth, 3) if achieved else None)
