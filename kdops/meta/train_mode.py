"""What makes repeated forwards of a training-mode network agree: BatchNorm statistics held,
dropout masks replayed; and the per-phase timer of the meta steps."""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn


_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_batch_norm_stats(module: nn.Module):
    """Train-mode BatchNorm layers of `module` use batch statistics and leave their running
    statistics alone inside this block (torch.func transforms refuse the in-place update).

    The statistics are taken out of the layers' buffer dicts and put back, not set through
    nn.Module's attribute machinery: a GPU step is bound by its host, and a teacher's fifty
    batch norms would otherwise cost it hundreds of checked attribute writes per block."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            saved.append((m, [m._buffers[k] for k in _STATS]))
            m._buffers.update(dict.fromkeys(_STATS))
    try:
        yield
    finally:
        for m, stats in saved:
            m._buffers.update(zip(_STATS, stats))


class _ReplayRng:
    """Captures the RNG state now; `replay()` restores it inside a block (same dropout masks).
    During CUDA graph capture the CUDA generators are left alone and `replay()` raises: setting
    their state while capturing is not known to give a captured forward the same masks."""

    def __init__(self):
        self.cpu = torch.random.get_rng_state()
        self.capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        self.cuda = (torch.cuda.get_rng_state_all()
                     if torch.cuda.is_initialized() and not self.capturing else None)

    @contextlib.contextmanager
    def replay(self):
        if self.capturing:
            raise RuntimeError("kdops.meta: a second forward of the student with the pilot's "
                               "dropout masks (recompute_student, finite differences, a JVP "
                               "by torch.func.jvp) cannot run inside CUDA graph capture")
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.random.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class PhaseTimer:
    """Wall time per phase of meta steps ("pilot", "quiz", "student_jvp" in the graph-free
    modes, "meta_gradient", "teacher_update", "real_step"), accumulated in `seconds`; CUDA is
    synchronized around each phase. Pass one as `timer=` to `meta_gradient`,
    `metadistil_step` or `mkd_step` (benchmarks do)."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        _synchronize()
        start = time.perf_counter()
        yield
        _synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _untimed(name: str):
    return contextlib.nullcontext()
