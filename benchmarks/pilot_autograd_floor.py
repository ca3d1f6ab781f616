"""The autograd engine's floor under a pilot step's forward+backward: nodes that do nothing.

    python benchmarks/pilot_autograd_floor.py --json out.json
    KDOPS_BENCH_DEVICE=cuda python benchmarks/pilot_autograd_floor.py

bench_pilot_sgd.py's forward_backward mode times ``torch.autograd.grad(p', params + grads, cot)``
on the ResNet-20 list (65 tensors): one node with 65 outputs and 130 inputs for kdops. This
script times the same call for two nodes of that shape that compute nothing (outputs allocated
with empty_like, gradients None): an autograd.Function written in Python, and a C++
torch::autograd::Node built here with torch.utils.cpp_extension.load_inline (a C++ compiler
is needed). Whatever the step computes, and in whichever language its autograd is written,
one node for the list cannot beat them; beside them, kdops and the per-tensor loop, all
interleaved round by round. Also timed: `_make_grads`, the Python check of the 65 cotangents
that torch.autograd.grad runs before the engine starts. Each call is timed with the backward
on the engine's device thread (the default) and on the calling thread
(``set_multithreading_enabled(False)``). Medians in microseconds.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import _make_grads
from torch.utils.cpp_extension import load_inline

import kdops
from kdops import reference

sys.path.insert(0, str(Path(__file__).parent))
from measure import DEVICE, DEVICE_NAME, git_sha, synchronize  # noqa: E402
from param_lists import param_list  # noqa: E402

LR = 0.1

_NODE = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/version.h>

using torch::autograd::Node;
using torch::autograd::variable_list;

// Gradients of (params, grads): none, whatever the cotangents.
struct NothingBackward : public Node {
  size_t inputs = 0;
  variable_list apply(variable_list&& cotangents) override { return variable_list(inputs); }
  std::string name() const override { return "NothingBackward"; }
};

std::vector<at::Tensor> nothing(std::vector<at::Tensor> params, std::vector<at::Tensor> grads) {
  std::vector<at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (const auto& p : params) out.push_back(at::empty_like(p));
  }
  std::vector<at::Tensor> inputs(params);
  inputs.insert(inputs.end(), grads.begin(), grads.end());
  if (torch::autograd::compute_requires_grad(inputs)) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 13
    auto node = c10::make_intrusive<NothingBackward>();
#else
    auto node = std::make_shared<NothingBackward>();
#endif
    node->inputs = inputs.size();
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    torch::autograd::set_history(out, node);
  }
  return out;
}
"""


class _Nothing(torch.autograd.Function):
    """p' for every param, computing nothing; no gradients."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(torch.empty_like(p) for p in tensors[:len(tensors) // 2])

    @staticmethod
    def backward(ctx, *cotangents):
        return (None,) * (2 * len(cotangents))


def _implementations(params, grads):
    native = load_inline("kdops_autograd_floor", cpp_sources=_NODE, functions=["nothing"])
    return {
        "kdops": lambda: kdops.pilot_sgd_step(params, grads, LR),
        "loop": lambda: reference.sgd_step(params, grads, LR),
        "nothing_python_function": lambda: _Nothing.apply(*params, *grads),
        "nothing_cpp_node": lambda: native.nothing(params, grads),
    }


def measure(rounds: int) -> dict:
    params, grads = param_list("resnet20")
    params = [p.to(DEVICE).requires_grad_() for p in params]
    grads = [g.to(DEVICE).requires_grad_() for g in grads]
    cot = [torch.randn_like(p) for p in params]
    leaves = params + grads
    cases = {}
    for name, step in _implementations(params, grads).items():
        cases[f"{name}/forward_backward"] = (
            lambda step=step: torch.autograd.grad(step(), leaves, cot, allow_unused=True), True)
        cases[f"{name}/forward_backward_calling_thread"] = (
            lambda step=step: torch.autograd.grad(step(), leaves, cot, allow_unused=True), False)
    stepped = tuple(p * 1 for p in params)
    cases["make_grads"] = (lambda: _make_grads(stepped, tuple(cot), is_grads_batched=False), True)
    times = {name: [] for name in cases}
    for k in range(rounds + 20):                     # 20 rounds of warm-up
        for name, (fn, threads) in cases.items():
            with torch.autograd.set_multithreading_enabled(threads):
                synchronize()
                start = time.perf_counter()
                fn()
                synchronize()
                if k >= 20:
                    times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(ts) * 1e6, 1) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    medians = measure(args.rounds)
    for name, us in medians.items():
        print(f"{name:56s} {us:9.1f} us")
    if args.json:
        info = dict(params="resnet20", tensors=65, rounds=args.rounds, device=DEVICE_NAME,
                    torch=torch.__version__, threads=torch.get_num_threads(),
                    git_sha=git_sha(), medians_us=medians)
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
