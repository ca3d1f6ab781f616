"""A full MetaDistil step: kdops (jvp, autograd) vs the plain create_graph code (pytest-benchmark).

    python -m pytest benchmarks/bench_meta_step.py                  # cifar and digits_mlp
    KDOPS_BENCH_META=digits_mlp python -m pytest benchmarks/bench_meta_step.py
    KDOPS_BENCH_DEVICE=cuda python -m pytest benchmarks/bench_meta_step.py
    python benchmarks/bench_meta_step.py cifar --rounds 40 --json out.json   # interleaved

Cases: "cifar", a CIFAR ResNet-56 teacher and ResNet-20 student (He et al.; batch 64 of random
32×32 inputs, 100 classes, train mode with BatchNorm), and "digits_mlp", the MLPs of
`python -m kdops.demo` on the digits data. One step = pilot update on a train batch, the
teacher's meta-update from a quiz batch, the student's real step with the updated teacher
(SGD, lr 0.1, τ = 4, α = 0.5). Implementations:
  kdops_jvp       kdops.meta.metadistil_step(mode="jvp"): graph-free meta-gradient
  kdops_jvp_recompute  the same with recompute_student=True: the student's pilot graph is
                  freed before the quiz and its forward run again (lower peak memory)
  kdops_autograd  kdops.meta.metadistil_step(mode="autograd"): create_graph through kdops' ops
  plain           what MetaDistil-style code does: RepDistiller's DistillKL (F.kl_div) + CE,
                  create_graph, `p - lr * g` per tensor, and a second student forward for the
                  real step
The pytest-benchmark suite times the implementations one after the other; run as a script, it
interleaves them instead (one step of each in turn, `--rounds` times), so that a slow spell of a
noisy host falls on all of them alike, and writes the medians to a JSON file.

Each case records in extra_info the mean seconds of each phase of a step over the timed rounds
(pilot, quiz, student_jvp in kdops' graph-free modes, meta_gradient, teacher_update,
real_step; the timer synchronizes CUDA) and one
step's peak memory beyond its inputs (MiB: the CUDA allocator's peak on a GPU, peak RSS on a
Linux CPU).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdops import meta, reference

sys.path.insert(0, str(Path(__file__).parent))
from measure import DEVICE, DEVICE_NAME, git_sha, peak_extra, synchronize  # noqa: E402
from param_lists import resnet_cifar  # noqa: E402

LR, TEMPERATURE, ALPHA = 0.1, 4.0, 0.5


def _cases():
    return os.environ.get("KDOPS_BENCH_META", "cifar,digits_mlp").split(",")


def _setup(case):
    """(student, teacher, (x, y, x_quiz, y_quiz)) for a case, freshly initialized."""
    g = torch.Generator().manual_seed(0)
    if case == "cifar":
        student, teacher = resnet_cifar(20, 100, seed=1), resnet_cifar(56, 100, seed=2)
        x, xq = torch.randn(64, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g)
        y, yq = torch.randint(0, 100, (64,), generator=g), torch.randint(0, 100, (64,), generator=g)
        return student, teacher, (x, y, xq, yq)
    if case == "digits_mlp":
        from kdops import demo

        (x, y), (xq, yq), _ = demo.load_digits(torch.device("cpu"))
        return (demo.mlp([64, 24, 10], seed=2), demo.mlp([64, 256, 256, 10], seed=1),
                (x[:64], y[:64], xq[:64], yq[:64]))
    raise ValueError(f"unknown case {case!r}")


def plain_step(student, teacher, s_opt, t_opt, x, y, xq, yq, timer):
    with timer("pilot"):
        t = teacher(x)
        s = student(x)
        loss = (ALPHA * reference.repdistiller_distill_kl(s, t, TEMPERATURE)
                + (1 - ALPHA) * F.cross_entropy(s, y))
        named = list(student.named_parameters())
        grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=True)
        fast = {n: p - LR * g for (n, p), g in zip(named, grads)}
    with timer("quiz"), meta.frozen_batch_norm_stats(student):
        quiz = F.cross_entropy(functional_call(student, fast, (xq,)), yq)
    with timer("meta_gradient"):
        t_grads = torch.autograd.grad(quiz, list(teacher.parameters()))
    with timer("teacher_update"):
        for p, g in zip(teacher.parameters(), t_grads):
            p.grad = g
        t_opt.step()
    with timer("real_step"):
        with torch.no_grad(), meta.frozen_batch_norm_stats(teacher):
            t = teacher(x)
        s = student(x)
        loss = (ALPHA * reference.repdistiller_distill_kl(s, t, TEMPERATURE)
                + (1 - ALPHA) * F.cross_entropy(s, y))
        s_opt.zero_grad()
        loss.backward()
        s_opt.step()


def kdops_step(mode, recompute_student=False):
    def step(student, teacher, s_opt, t_opt, x, y, xq, yq, timer):
        meta.metadistil_step(student, teacher, s_opt, t_opt, x, y, xq, yq, mode=mode,
                             recompute_student=recompute_student, temperature=TEMPERATURE,
                             alpha=ALPHA, timer=timer)
    return step


IMPLS = {"kdops_jvp": kdops_step("jvp"), "kdops_jvp_recompute": kdops_step("jvp", True),
         "kdops_autograd": kdops_step("autograd"), "plain": plain_step}


@pytest.fixture(scope="module", params=_cases())
def case(request):
    student, teacher, batch = _setup(request.param)
    return (request.param, student.to(DEVICE), teacher.to(DEVICE),
            tuple(x.to(DEVICE) for x in batch))


def _step_args(student, teacher, batch):
    """The arguments of a step (timer aside): copies of the networks, their optimizers."""
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    return (student, teacher, torch.optim.SGD(student.parameters(), lr=LR),
            torch.optim.SGD(teacher.parameters(), lr=0.01), *batch)


def _prepared(impl, student, teacher, batch):
    """(a step's arguments, one step's peak extra memory in MiB) for `impl`, after a warm-up
    step checked against the plain code's."""
    args = _step_args(student, teacher, batch)
    reference = copy.deepcopy(args[:2])
    IMPLS[impl](*args, meta.PhaseTimer())                  # warm-up
    _check_against_plain(reference, batch, *args[:2])
    return args, peak_extra(IMPLS[impl], (*args, meta.PhaseTimer()), 2 ** 20, DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_metadistil_step(benchmark, case, impl):
    name, student, teacher, batch = case
    step = IMPLS[impl]
    args, peak = _prepared(impl, student, teacher, batch)
    timer = meta.PhaseTimer()
    rounds = 5 if name == "cifar" and DEVICE.type == "cpu" else 30
    benchmark.group = f"metadistil step {name}"
    benchmark.pedantic(_synchronized(step), args=(*args, timer), rounds=rounds, warmup_rounds=0)
    benchmark.extra_info.update(
        impl=impl, case=name, threads=torch.get_num_threads(), torch=torch.__version__,
        device=DEVICE_NAME,
        peak_extra_mib=peak,
        phase_seconds={k: round(v / rounds, 5) for k, v in timer.seconds.items()})


def _synchronized(step):
    def run(*args):
        step(*args)
        synchronize()
    return run


def _check_against_plain(reference, batch, student, teacher):
    """One step from the same state gives the plain code's parameters (to float32 rounding;
    the running statistics differ: the plain code runs the student forward twice)."""
    ref_student, ref_teacher, *rest = _step_args(*reference, batch)
    plain_step(ref_student, ref_teacher, *rest, meta.PhaseTimer())
    for ref, got in ((ref_student, student), (ref_teacher, teacher)):
        for (name, a), b in zip(ref.named_parameters(), got.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def interleaved(name, rounds):
    """(per implementation: the median and interquartile range of a step's time, the median of
    each phase, and one step's peak memory beyond its inputs, the rounds interleaved; the
    batch size)."""
    student, teacher, batch = _setup(name)
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    batch = tuple(x.to(DEVICE) for x in batch)
    runs = {impl: _prepared(impl, student, teacher, batch) for impl in IMPLS}
    times = {impl: [] for impl in IMPLS}
    phases = {impl: [] for impl in IMPLS}
    for _ in range(rounds):
        for impl, (args, _) in runs.items():
            timer = meta.PhaseTimer()
            synchronize()
            start = time.perf_counter()
            IMPLS[impl](*args, timer)
            synchronize()
            times[impl].append(time.perf_counter() - start)
            phases[impl].append(timer.seconds)
    results = {}
    for impl, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        results[impl] = dict(
            median_ms=round(statistics.median(ts) * 1e3, 3), iqr_ms=round((q[2] - q[0]) * 1e3, 3),
            phase_ms={k: round(statistics.median(p[k] for p in phases[impl]) * 1e3, 3)
                      for k in phases[impl][0]},
            peak_extra_mib=runs[impl][1])
    return results, batch[0].shape[0]


def main():
    parser = argparse.ArgumentParser(description="MetaDistil steps, the implementations "
                                     "interleaved round by round")
    parser.add_argument("case", choices=["cifar", "digits_mlp"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results, batch = interleaved(args.case, args.rounds)
    for impl, r in results.items():
        print(f"{impl:22s} {r['median_ms']:9.2f} ms  iqr {r['iqr_ms']:7.2f}  "
              f"peak {r['peak_extra_mib']} MiB  {r['phase_ms']}")
    if args.json:
        info = dict(case=args.case, rounds=args.rounds, device=DEVICE_NAME,
                    torch=torch.__version__, threads=torch.get_num_threads(),
                    git_sha=git_sha(),
                    batch=batch, temperature=TEMPERATURE, alpha=ALPHA, lr=LR, results=results)
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
