"""The student's JVP of kdops.meta's "jvp" mode: tape and graph against a second forward (pytest-benchmark).

    python -m pytest benchmarks/bench_student_jvp.py
    KDOPS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_student_jvp.py
    KDOPS_BENCH_JVP_BATCH=4 python -m pytest benchmarks/bench_student_jvp.py   # smaller

Network: the CIFAR ResNet-20 student of bench_meta_step.py (batch 64 of 32×32 inputs, train
mode, BatchNorm on batch statistics). Cases:
  forward           its forward with autograd, as the pilot runs it
  forward_recorded  the same forward under a kdops.meta.tangent.TangentTape (what the pilot of
                    "jvp" mode pays for the record)
  replay            TangentTape.jvp: the tangents of the recorded forward along u
  graph_replay      graph_jvp: the same tangents read off the forward's autograd graph (what
                    "jvp" mode runs once a recorded forward showed the graph readable: the
                    pilot's forward then costs the plain forward)
  torch_func_jvp    torch.func.jvp over functional_call: the primal forward again beside the
                    tangents (the fallback, and kdops' "jvp" mode before the tape)
  graph_replay_operators
                    the operators graph_replay calls (recorded once, below the dispatcher),
                    called again from a list: what a reader without per-node Python work would
                    cost; graph_replay minus this is the reader's own overhead
Both replays are checked against torch.func.jvp first, to float32 rounding: with cuDNN's TF32
convolutions off for the check (on by default, they round both to about 1e-3).
"""
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, jvp
from torch.utils._python_dispatch import TorchDispatchMode

from kdops import meta
from kdops.meta.graph_tangent import graph_jvp
from kdops.meta.tangent import TangentTape

sys.path.insert(0, str(Path(__file__).parent))
from measure import DEVICE, DEVICE_NAME, synchronize  # noqa: E402
from param_lists import resnet_cifar  # noqa: E402


@pytest.fixture(scope="module")
def student():
    batch = int(os.environ.get("KDOPS_BENCH_JVP_BATCH", "64"))
    net = resnet_cifar(20, 100, seed=1).to(DEVICE)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    params = list(net.parameters())
    tangents = [torch.randn_like(p) for p in params]
    return net, x, params, tangents


@contextlib.contextmanager
def _without_tf32():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _recorded(net, x, params):
    tape = TangentTape(params)
    with tape:
        out = net(x)
    return tape, out


def _second_forward(net, x, params, tangents):
    names = [n for n, _ in net.named_parameters()]
    return jvp(lambda *ps: functional_call(net, dict(zip(names, ps)), (x,)),
               tuple(p.detach() for p in params), tuple(tangents))[1]


CASES = {
    "forward": lambda net, x, params, tangents, tape, out: net(x),
    "forward_recorded": lambda net, x, params, tangents, tape, out: _recorded(net, x, params),
    "replay": lambda net, x, params, tangents, tape, out: tape.jvp(out, tangents),
    "graph_replay": lambda net, x, params, tangents, tape, out: graph_jvp(out, params, tangents),
    "torch_func_jvp": lambda net, x, params, tangents, tape, out: _second_forward(
        net, x, params, tangents),
}


class _Operators(TorchDispatchMode):
    """Records the operators called inside it, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _operators_of_graph_replay(out, params, tangents):
    with _Operators() as operators:
        graph_jvp(out, params, tangents)

    def replay(*_):
        for func, args, kwargs in operators.calls:
            func(*args, **kwargs)
    return replay


@pytest.mark.parametrize("case", [*CASES, "graph_replay_operators"])
def test_student_jvp(benchmark, student, case):
    net, x, params, tangents = student
    with meta.frozen_batch_norm_stats(net):
        with _without_tf32():
            tape, out = _recorded(net, x, params)
            want = _second_forward(net, x, params, tangents)
            torch.testing.assert_close(tape.jvp(out, tangents), want, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(graph_jvp(out, params, tangents), want, rtol=1e-3,
                                       atol=1e-3)
        tape, out = _recorded(net, x, params)
        run = (_operators_of_graph_replay(out, params, tangents)
               if case == "graph_replay_operators" else CASES[case])

        def timed():
            result = run(net, x, params, tangents, tape, out)
            synchronize()
            return result

        benchmark.group = f"ResNet-20 student, batch {x.shape[0]}"
        benchmark.pedantic(timed, rounds=30 if DEVICE.type == "cuda" else 10, warmup_rounds=2)
    benchmark.extra_info.update(case=case, batch=x.shape[0], device=DEVICE_NAME,
                                threads=torch.get_num_threads(), torch=torch.__version__)
