"""The floor of an exact MetaDistil step: the network passes no implementation can skip.

    python benchmarks/meta_step_floor.py cifar --rounds 20 --json out.json
    KDOPS_BENCH_DEVICE=cuda python benchmarks/meta_step_floor.py cifar

Whatever computes the teacher's meta-gradient exactly, one MetaDistil step (bench_meta_step.py's
case: pilot on a train batch, teacher meta-update from a quiz batch, the student's real step
against the updated teacher) must run at least these passes:

  teacher      its forward on the train batch with a graph, and the backward of that graph to
               its parameters (the meta-gradient is a vector-Jacobian product through it)
  teacher_new  its forward at the updated weights, without a graph (the real step's targets)
  student      its forward on the train batch and two backwards of that graph to its
               parameters: the pilot's gradient, and the real step's (its cotangent needs the
               updated teacher, so it cannot share the pilot's backward)
  quiz         the pilot student's forward on the quiz batch and its backward to the fast
               weights (the quiz gradient that the meta-gradient carries back)

The student's JVP along the quiz gradient, or whatever replaces it, counts as free here. The
sum of these passes, timed round by round interleaved with the plain create_graph step and
kdops' "jvp" step (so that a noisy host's slow spells fall on all alike), bounds what any exact
implementation can gain over the plain step: plain / floor. Medians over the rounds, and of
each step's phases (`kdops.meta.PhaseTimer`): set beside the passes, they show where a step
spends beyond the floor.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdops import meta

sys.path.insert(0, str(Path(__file__).parent))
from bench_meta_step import IMPLS, _setup, _step_args  # noqa: E402
from measure import DEVICE, DEVICE_NAME, git_sha, synchronize  # noqa: E402

STEPS = ("plain", "kdops_jvp")


def _passes(student, teacher, x, y, xq, yq):
    """The floor's passes, each a callable; the networks' parameters are not changed."""
    theta = [p for p in student.parameters() if p.requires_grad]
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    w = [p for p in teacher.parameters() if p.requires_grad]
    fast = {n: p.detach().clone().requires_grad_() for n, p in zip(names, theta)}

    def teacher_pass():
        t = teacher(x)
        torch.autograd.grad(t, w, torch.ones_like(t))

    def teacher_new_pass():
        with torch.no_grad(), meta.frozen_batch_norm_stats(teacher):
            teacher(x)

    def student_pass():
        s = student(x)
        torch.autograd.grad(s, theta, torch.ones_like(s), retain_graph=True)
        torch.autograd.grad(s, theta, torch.ones_like(s))

    def quiz_pass():
        with meta.frozen_batch_norm_stats(student):
            loss = F.cross_entropy(functional_call(student, fast, (xq,)), yq)
        torch.autograd.grad(loss, list(fast.values()))

    return {"teacher": teacher_pass, "teacher_new": teacher_new_pass, "student": student_pass,
            "quiz": quiz_pass}


def _timed(fn):
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def measure(case: str, rounds: int) -> dict:
    student, teacher, batch = _setup(case)
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    batch = tuple(b.to(DEVICE) for b in batch)
    steps = {name: _step_args(student, teacher, batch) for name in STEPS}
    passes = _passes(*_step_args(student, teacher, batch)[:2], *batch)
    times = {name: [] for name in (*STEPS, *passes, "floor")}
    phases = {name: [] for name in STEPS}
    for k in range(rounds + 1):                      # the first round warms up
        for name, args in steps.items():
            timer = meta.PhaseTimer()
            t = _timed(lambda: IMPLS[name](*args, timer))
            if k:
                times[name].append(t)
                phases[name].append(timer.seconds)
        floor = 0.0
        for name, fn in passes.items():
            t = _timed(fn)
            floor += t
            if k:
                times[name].append(t)
        if k:
            times["floor"].append(floor)
    medians = {name: round(statistics.median(ts) * 1e3, 3) for name, ts in times.items()}
    phase_ms = {name: {k: round(statistics.median(p[k] for p in ps) * 1e3, 3) for k in ps[0]}
                for name, ps in phases.items()}
    return dict(medians_ms=medians, phase_ms=phase_ms,
                plain_over_floor=round(medians["plain"] / medians["floor"], 3),
                plain_over_kdops_jvp=round(medians["plain"] / medians["kdops_jvp"], 3),
                kdops_jvp_over_floor=round(medians["kdops_jvp"] / medians["floor"], 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=["cifar", "digits_mlp"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = measure(args.case, args.rounds)
    for name, ms in result["medians_ms"].items():
        print(f"{name:12s} {ms:10.2f} ms")
    for name, phase_ms in result["phase_ms"].items():
        print(f"{name} by phase (ms): {phase_ms}")
    for key in ("plain_over_floor", "plain_over_kdops_jvp", "kdops_jvp_over_floor"):
        print(f"{key}: {result[key]}")
    if args.json:
        info = dict(case=args.case, rounds=args.rounds, device=DEVICE_NAME,
                    torch=torch.__version__, threads=torch.get_num_threads(),
                    git_sha=git_sha(), **result)
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
