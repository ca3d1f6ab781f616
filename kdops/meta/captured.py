"""`CapturedStep`: a training step on fixed-shape CUDA batches, captured once in a CUDA graph
and replayed.

On a GPU a meta step of CIFAR-sized networks is bound by its host: each of its thousand or
more operators costs the host tens of microseconds, and the GPU idles most of the step
(benchmarks/profile_meta_step.py). A CUDA graph replays the kernels of a captured step without
that work. What a graph holds fixed, and what this class does about each:

- the addresses of the inputs: each call copies its batch into the captured step's own input
  tensors. A batch of other shapes, dtypes or devices (an epoch's last, smaller one) runs the
  step eagerly instead: right, without the graph's speed;
- the Python numbers the step was captured with, such as the optimizers' learning rates and
  momenta (a scheduler changes them between steps): each call compares the hyperparameters of
  `optimizers` with those of the capture and captures again where they differ;
- the tensors it reads and updates in place (parameters, buffers, optimizer state): a call
  that finds the optimizers' parameters or state tensors replaced (`module.to()`,
  `optimizer.load_state_dict`) captures again too. Buffers outside the optimizers (BatchNorm's
  running statistics) are not watched: after replacing them, call `recapture()`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


class CapturedStep:
    """`step(*inputs)`, captured in a CUDA graph at its first call after `warmup` eager ones,
    and replayed from then on.

        step = kdops.meta.CapturedStep(
            functools.partial(kdops.meta.metadistil_step, student, teacher, s_opt, t_opt,
                              temperature=4.0, alpha=0.9),
            optimizers=(s_opt, t_opt))
        for x, y, x_quiz, y_quiz in loader:                 # CUDA tensors
            out = step(x, y, x_quiz, y_quiz)

    Args:
        step: the training step; its positional arguments are the batch (CUDA tensors), and
            it updates networks and optimizers in place (`metadistil_step` and `mkd_step` in
            mode "jvp" or "autograd" do; finite differences, `recompute_student` and an
            optimizer without `capturable=True` where it needs one raise when captured).
        optimizers: the optimizers the step uses: their hyperparameters, parameters and state
            are checked at each call (module docstring).
        warmup: eager calls before the capture (at least 1), run on a side stream as capture
            requires: they make lazily created state (momentum buffers, Triton's compiled
            kernels, cuDNN's plans). They are real steps on the batches they are given.

    A call returns the step's outputs with their tensors copied out of the graph's memory (a
    later replay does not overwrite them). The graph keeps the step's intermediate tensors
    allocated between calls: the peak memory of one step, held.
    """

    def __init__(self, step: Callable, *, optimizers: Sequence[torch.optim.Optimizer] = (),
                 warmup: int = 3):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CapturedStep: warmup must be an int >= 1, got {warmup!r}")
        self._step = step
        self._optimizers = tuple(optimizers)
        self._warmup = warmup
        self._graph = None
        self._inputs: list = []
        self._outputs = None
        self._fingerprint = None

    def recapture(self) -> None:
        """Capture again at the next call (after replacing tensors the step reads, such as a
        network's buffers, that the optimizers do not hold)."""
        self._graph = self._outputs = None
        self._inputs = []

    def __call__(self, *inputs: Tensor):
        for x in inputs:
            if not isinstance(x, Tensor) or not x.is_cuda:
                raise ValueError("CapturedStep: the step's inputs must be CUDA tensors, got "
                                 + (f"one on {x.device}" if isinstance(x, Tensor)
                                    else type(x).__name__))
        if self._warmup:
            self._warmup -= 1
            return self._on_side_stream(inputs)
        if self._graph is not None and [_layout(x) for x in inputs] != [
                _layout(x) for x in self._inputs]:
            return self._step(*inputs)
        if self._graph is None or self._state() != self._fingerprint:
            self._capture(inputs)
        for mine, x in zip(self._inputs, inputs):
            mine.copy_(x)
        self._graph.replay()
        return _copied(self._outputs)

    def _on_side_stream(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, inputs):
        self._graph = None
        self._inputs = [torch.empty_like(x) for x in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._outputs = self._step(*self._inputs)
        self._graph, self._fingerprint = graph, self._state()

    def _state(self):
        """What the graph holds of the optimizers: hyperparameters (a tensor by identity: the
        graph reads its value), the parameters' memory, the state tensors."""
        groups, memory = [], []
        for opt in self._optimizers:
            for group in opt.param_groups:
                groups.append(tuple((k, id(v) if isinstance(v, Tensor) else v)
                                    for k, v in group.items() if k != "params"))
                memory.extend(p.data_ptr() for p in group["params"])
            memory.extend(id(v) for state in opt.state.values() for v in state.values()
                          if isinstance(v, Tensor))
        return groups, memory


def _layout(x: Tensor):
    return x.shape, x.dtype, x.device


def _copied(out):
    """The outputs with each tensor cloned, through dicts, lists and tuples."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _copied(v) for k, v in out.items()}
    if isinstance(out, tuple) and hasattr(out, "_fields"):        # a named tuple
        return type(out)(*(_copied(v) for v in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_copied(v) for v in out)
    return out
