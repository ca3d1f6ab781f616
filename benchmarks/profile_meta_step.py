"""Where the host time of a MetaDistil step goes, phase by phase (torch.profiler).

    KDOPS_BENCH_DEVICE=cuda python benchmarks/profile_meta_step.py cifar --json out.json

For bench_meta_step.py's implementations (plain and kdops "jvp" by default), after a warm-up
step, profiles `--steps` steps and reports per phase (pilot, quiz, student_jvp for kdops' "jvp"
mode, meta_gradient, teacher_update, real_step), as medians over the steps:
  wall_ms    the phase's time under the profiler (which adds its own per-operator cost)
  ops        operators (aten::, kdops::, the autograd engine's nodes) at top level, not inside
             another operator, on any thread
  op_cpu_ms  their host time, children included
  glue_ms    wall_ms − op_cpu_ms of the calling thread's operators: Python and framework work
             outside operators (the autograd engine's device thread works concurrently)
  gpu_ms     device time of the kernels those operators launched
A phase whose gpu_ms is far under its wall_ms is bound by the host. Then the operators of the
first implementation with the most host time over all its phases (per step).
"""
import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from bench_meta_step import IMPLS, _setup, _step_args  # noqa: E402
from measure import DEVICE, DEVICE_NAME, git_sha, synchronize  # noqa: E402


class _PhaseMarks:
    """A `timer=` for the meta steps that marks each phase in the profile."""

    def __call__(self, name):
        return record_function(f"phase:{name}")


def _operator(event):
    """A host event of an operator: aten::, kdops::, autograd::engine::evaluate_function (a
    kernel's name has "::" too)."""
    return event.device_type == torch.autograd.DeviceType.CPU and "::" in event.name


def _top_level(event):
    """An operator with no operator around it."""
    parent = event.cpu_parent
    while parent is not None:
        if _operator(parent):
            return False
        parent = parent.cpu_parent
    return _operator(event)


def _profile(impl, args, steps):
    """(per phase: the medians over the steps of wall_ms, ops, op_cpu_ms, glue_ms and gpu_ms;
    per operator name: its count and host ms per step, most host time first)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            IMPLS[impl](*args, _PhaseMarks())
            synchronize()
    events = list(prof.events())
    phases = [e for e in events if e.name.startswith("phase:")        # not the GPU's copy
              and e.device_type == torch.autograd.DeviceType.CPU]
    top = [e for e in events if _top_level(e)]
    table = collections.defaultdict(list)
    per_op = collections.defaultdict(lambda: [0, 0.0])
    for ph in phases:
        start, end = ph.time_range.start, ph.time_range.end
        inside = [e for e in top if start <= e.time_range.start < end]
        own = [e for e in inside if e.thread == ph.thread]
        op_cpu = sum(e.cpu_time_total for e in inside) / 1e3
        row = table[ph.name[len("phase:"):]]
        row.append((ph.cpu_time_total / 1e3, len(inside), op_cpu,
                    ph.cpu_time_total / 1e3 - sum(e.cpu_time_total for e in own) / 1e3,
                    sum(e.device_time_total for e in inside) / 1e3))
        for e in inside:
            per_op[e.name][0] += 1
            per_op[e.name][1] += e.cpu_time_total
    keys = ("wall_ms", "ops", "op_cpu_ms", "glue_ms", "gpu_ms")
    summary = {name: {k: round(statistics.median(r[i] for r in rows), 3)
                      for i, k in enumerate(keys)} for name, rows in table.items()}
    ops = {name: {"count": c / steps, "host_ms": round(us / steps / 1e3, 3)}
           for name, (c, us) in sorted(per_op.items(), key=lambda kv: -kv[1][1])}
    return summary, ops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=["cifar", "digits_mlp"])
    parser.add_argument("--impls", default="plain,kdops_jvp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    student, teacher, batch = _setup(args.case)
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    batch = tuple(b.to(DEVICE) for b in batch)
    results = {}
    for impl in args.impls.split(","):
        step_args = _step_args(student, teacher, batch)
        IMPLS[impl](*step_args, _PhaseMarks())            # warm-up
        synchronize()
        results[impl] = _profile(impl, step_args, args.steps)
    for impl, (summary, _) in results.items():
        print(f"{impl}: phase, wall, ops, op_cpu, glue, gpu (ms)")
        for name, row in summary.items():
            print(f"  {name:15s} {row['wall_ms']:8.2f} {row['ops']:5.0f} {row['op_cpu_ms']:8.2f}"
                  f" {row['glue_ms']:8.2f} {row['gpu_ms']:8.2f}")
    first = args.impls.split(",")[0]
    print(f"{first}: the operators with the most host time per step")
    for name, row in list(results[first][1].items())[:args.top]:
        print(f"  {name:45s} {row['count']:6.1f} {row['host_ms']:8.3f} ms")
    if args.json:
        info = dict(case=args.case, steps=args.steps, device=DEVICE_NAME,
                    torch=torch.__version__, threads=torch.get_num_threads(), git_sha=git_sha(),
                    results={impl: dict(phases=s, operators=o) for impl, (s, o) in
                             results.items()})
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
