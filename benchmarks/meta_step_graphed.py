"""The MetaDistil step captured in a CUDA graph: replays against eager steps (CUDA only).

    python benchmarks/meta_step_graphed.py --rounds 40 --json out.json

On a GPU both steps of bench_meta_step.py's CIFAR case (ResNet-56 → ResNet-20, batch 64) are
bound by the host's work per operator (benchmarks/profile_meta_step.py): the GPU idles most of
the step. A CUDA graph replays a captured step's kernels without that work, as training loops
with static shapes do: `kdops.meta.CapturedStep` (the networks and optimizers stay put, each
batch is copied into the captured step's inputs). For plain create_graph code and kdops "jvp",
each wrapped in one: its three eager warm-up calls and the call that captures; the relative
difference of the parameters after three replays and after three eager steps from the same
state (beside the same between two eager runs); then `--rounds` rounds timing an eager step and
a replayed call of each (the batch's copy included), interleaved. Medians in ms, the ratios of
plain's to kdops' time, eager and replayed, and the memory each captured step holds between
calls (MiB allocated after its capture beyond before its warm-up: the graph's pool of the
step's intermediates, gradients, optimizer state).
"""
import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kdops.meta import CapturedStep

sys.path.insert(0, str(Path(__file__).parent))
from bench_meta_step import IMPLS, _setup, _step_args  # noqa: E402
from measure import git_sha  # noqa: E402

STEPS = ("plain", "kdops_jvp")


def _untimed(name):
    return contextlib.nullcontext()


def _captured(impl, args):
    """A CapturedStep of `impl` on `args`' networks and optimizers, warmed up and captured on
    `args`' batch."""
    warmup = 3
    step = CapturedStep(lambda *batch: IMPLS[impl](*args[:4], *batch, _untimed),
                        optimizers=args[2:4], warmup=warmup)
    for _ in range(warmup + 1):                     # the warm-up calls, then the capture
        step(*args[4:])
    return step


def _relative_difference(nets, others):
    """‖θ − θ'‖ / ‖θ'‖ over all parameters of the networks (zero-initialized biases, small
    and dominated by rounding, would swamp a per-tensor maximum)."""
    pairs = [(a, b) for net, other in zip(nets, others)
             for a, b in zip(net.parameters(), other.parameters())]
    return (sum(((a - b) ** 2).sum() for a, b in pairs).sqrt()
            / sum((b ** 2).sum() for _, b in pairs).sqrt()).item()


def _replay_differences(impl, step, args):
    """(after three replays and three eager steps from the same state, the relative difference
    of the parameters; the same between two eager runs, the rounding of the nondeterministic
    kernels)."""
    eager, again = (copy.deepcopy(args[:4]) + args[4:] for _ in range(2))
    for _ in range(3):
        step(*args[4:])
        IMPLS[impl](*eager, _untimed)
        IMPLS[impl](*again, _untimed)
    return (_relative_difference(args[:2], eager[:2]),
            _relative_difference(again[:2], eager[:2]))


def _timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(rounds: int) -> dict:
    student, teacher, batch = _setup("cifar")
    student, teacher = student.cuda(), teacher.cuda()
    batch = tuple(b.cuda() for b in batch)
    runs, differences, held = {}, {}, {}
    for impl in STEPS:
        args = _step_args(student, teacher, batch)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        step = _captured(impl, args)
        torch.cuda.synchronize()
        held[impl] = round((torch.cuda.memory_allocated() - base) / 2 ** 20, 1)
        differences[impl] = _replay_differences(impl, step, args)
        runs[impl] = (args, step)
    times = {f"{impl}/{how}": [] for impl in STEPS for how in ("eager", "graph")}
    for _ in range(rounds):
        for impl, (args, step) in runs.items():
            times[f"{impl}/eager"].append(_timed(lambda: IMPLS[impl](*args, _untimed)))
            times[f"{impl}/graph"].append(_timed(lambda: step(*args[4:])))
    medians = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    return dict(medians_ms=medians, held_mib=held,
                replay_vs_eager={k: f"{g:.2e}" for k, (g, _) in differences.items()},
                eager_vs_eager={k: f"{e:.2e}" for k, (_, e) in differences.items()},
                plain_over_kdops_eager=round(medians["plain/eager"] / medians["kdops_jvp/eager"],
                                             3),
                plain_over_kdops_graph=round(medians["plain/graph"] / medians["kdops_jvp/graph"],
                                             3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("CUDA graphs need a CUDA device")
    result = measure(args.rounds)
    for name, ms in result["medians_ms"].items():
        print(f"{name:18s} {ms:10.3f} ms")
    for key in ("held_mib", "replay_vs_eager", "eager_vs_eager", "plain_over_kdops_eager",
                "plain_over_kdops_graph"):
        print(f"{key}: {result[key]}")
    if args.json:
        info = dict(case="cifar", rounds=args.rounds, device=torch.cuda.get_device_name(),
                    torch=torch.__version__, git_sha=git_sha(), **result)
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
