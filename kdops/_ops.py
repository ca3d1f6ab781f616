"""torch.library definitions of the kdops loss ops: schemas, fake kernels, autograd.

Three ops form a chain, each the derivative of the one before:

    kdops::kd_forward          per-row divergence and cross-entropy, plus row statistics
    kdops::kd_backward         gradients to student, teacher and both temperatures
    kdops::kd_double_backward  the vector-Jacobian product of kd_backward (exact second order)

The portable implementation (`kdops._portable`) is registered as CompositeExplicitAutograd, so
it serves every device; a native kernel registered for a backend key overrides it: the C++ CPU
kernels of the compiled extension `kdops._C` (csrc/cpu) register for CPU when it is imported.
Tensors are rows-flattened: logits [N, V] (any floating dtype), temperatures [N] in the compute
dtype (float64 if either logits tensor is float64, else float32), labels [N] int64 or None.
The statistics output ([6, N]: row max of zs and zt, log Σ exp(z − max) of zs and zt, then
row max and log Σ exp(s − max) of s at T = 1) is
saved for the backward ops, not a differentiable result: their formulas are total derivatives
that already account for it.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from . import _portable

_LIB = torch.library.Library("kdops", "DEF")

_SHARED = ("Tensor student, Tensor teacher, Tensor tau_s, Tensor tau_t, Tensor? labels")
_STATS = "Tensor stats"
_CONFIG = "int ignore_index, str divergence, float beta, bool with_ce"

_LIB.define(f"kd_forward({_SHARED}, {_CONFIG}) -> (Tensor, Tensor, Tensor)")
_LIB.define(
    f"kd_backward(Tensor grad_div, Tensor grad_ce, {_SHARED}, {_STATS}, {_CONFIG}, "
    "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LIB.define(
    "kd_double_backward(Tensor? v_student, Tensor? v_teacher, Tensor? v_tau_s, Tensor? v_tau_t, "
    f"Tensor grad_div, Tensor grad_ce, {_SHARED}, {_STATS}, {_CONFIG}, bool[6] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

for _name in ("kd_forward", "kd_backward", "kd_double_backward"):
    _LIB.impl(_name, getattr(_portable, _name), "CompositeExplicitAutograd")

def _load_native():
    """Import the compiled kernels, which register themselves for their dispatch keys.

    Without them (installed with KDOPS_NO_EXTENSION=1) every op runs the portable
    implementation and `backend_info` says so; an extension that exists but fails to load
    (built against another torch, say) is reported with a warning, never ignored.
    """
    try:
        from . import _C
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}._C":
            raise
        return None
    except ImportError as err:
        warnings.warn(f"kdops: native kernels failed to load, using the portable "
                      f"implementation on every device ({err})", RuntimeWarning, stacklevel=2)
        return None
    return _C


_NATIVE = _load_native()

kd_forward = torch.ops.kdops.kd_forward.default
kd_backward = torch.ops.kdops.kd_backward.default
kd_double_backward = torch.ops.kdops.kd_double_backward.default


@torch.library.register_fake("kdops::kd_forward")
def _(student, teacher, tau_s, tau_t, labels, ignore_index, divergence, beta, with_ce):
    n, cdt = student.shape[0], tau_s.dtype
    return student.new_empty(n, dtype=cdt), student.new_empty(n, dtype=cdt), student.new_empty(
        (6, n), dtype=cdt)


@torch.library.register_fake("kdops::kd_backward")
def _(grad_div, grad_ce, student, teacher, tau_s, tau_t, labels, stats,
      ignore_index, divergence, beta, with_ce, output_mask):
    n = student.shape[0]
    return (
        _portable.masked_output(output_mask[0], student, student.shape, student.dtype),
        _portable.masked_output(output_mask[1], teacher, teacher.shape, teacher.dtype),
        _portable.masked_output(output_mask[2], tau_s, n, tau_s.dtype),
        _portable.masked_output(output_mask[3], tau_t, n, tau_t.dtype),
    )


@torch.library.register_fake("kdops::kd_double_backward")
def _(v_student, v_teacher, v_tau_s, v_tau_t, grad_div, grad_ce, student, teacher, tau_s,
      tau_t, labels, stats, ignore_index, divergence, beta, with_ce, output_mask):
    n = student.shape[0]
    cdt = tau_s.dtype
    return (
        _portable.masked_output(output_mask[0], grad_div, n, cdt),
        _portable.masked_output(output_mask[1], grad_ce, n, cdt),
        _portable.masked_output(output_mask[2], student, student.shape, student.dtype),
        _portable.masked_output(output_mask[3], teacher, teacher.shape, teacher.dtype),
        _portable.masked_output(output_mask[4], tau_s, n, cdt),
        _portable.masked_output(output_mask[5], tau_t, n, cdt),
    )


def _forward_setup(ctx, inputs, output):
    student, teacher, tau_s, tau_t, labels, *config = inputs
    stats = output[2]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(student, teacher, tau_s, tau_t, labels, stats)
    ctx.config = config


def _wanted(ctx, count):
    """needs_input_grad of the first `count` inputs, narrowed to those the running backward
    pass will use: ``torch.autograd.grad(loss, student)`` drops the teacher's gradient, so it
    is not computed (the engine tells which next nodes it will execute). Where the engine
    cannot say (a backward traced by torch.compile), every input that requires grad counts.
    """
    mask = list(ctx.needs_input_grad[:count])
    try:
        nodes = ctx.next_functions
        return [m and nodes[i][0] is not None and torch._C._will_engine_execute_node(nodes[i][0])
                for i, m in enumerate(mask)]
    except (AttributeError, RuntimeError):
        return mask


def _forward_backward(ctx, grad_div, grad_ce, _stats_grad):
    tensors = ctx.saved_tensors
    mask = _wanted(ctx, 4)
    if not any(mask):
        return (None,) * 9
    grads = kd_backward(grad_div, grad_ce, *tensors, *ctx.config, mask)
    return (*(g if m else None for g, m in zip(grads, mask)), None, None, None, None, None)


def _backward_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.config = inputs[8:12]
    ctx.computed = inputs[12]


def _backward_backward(ctx, *cotangents):
    mask = _wanted(ctx, 6)
    if not any(mask):
        return (None,) * 13
    vs = [v if done else None for v, done in zip(cotangents, ctx.computed)]
    grads = kd_double_backward(*vs, *ctx.saved_tensors, *ctx.config, mask)
    return (*(g if m else None for g, m in zip(grads, mask)),) + (None,) * 7


def _third_order(ctx, *grads):
    raise NotImplementedError(
        "kdops: third-order derivatives of fused_kd_loss are not implemented "
        "(kd_double_backward is exact but not itself differentiable)"
    )


torch.library.register_autograd("kdops::kd_forward", _forward_backward,
                                setup_context=_forward_setup)
torch.library.register_autograd("kdops::kd_backward", _backward_backward,
                                setup_context=_backward_setup)
torch.library.register_autograd("kdops::kd_double_backward", _third_order,
                                setup_context=lambda ctx, inputs, output: None)


@contextlib.contextmanager
def portable_on_cpu():
    """Run the kdops ops on CPU with the portable implementation inside this block.

    Registers the portable functions as CPU kernels over the native ones and removes them on
    exit, so tests and benchmarks can compare both implementations in one process.
    """
    lib = torch.library.Library("kdops", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in ("kd_forward", "kd_backward", "kd_double_backward"):
            lib.impl(name, getattr(_portable, name), "CPU")
    try:
        yield
    finally:
        lib._destroy()


def backend_info() -> dict:
    """Which implementation serves each kdops op, per device type.

    Returns ``{"kd_forward": {"cpu": "native", "cuda": "portable"}, ...,
    "cpu_capability": "AVX2"}``: ``"native"`` where a kernel is registered for that device's
    dispatch key, ``"portable"`` where the vectorized PyTorch implementation runs, and the
    SIMD capability the native CPU kernels were dispatched to (None without them; set
    ``ATEN_CPU_CAPABILITY`` before importing torch to choose a lower one, as for ATen).
    """
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    info = {
        op: {dev: "native" if has(f"kdops::{op}", key) else "portable"
             for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}
        for op in ("kd_forward", "kd_backward", "kd_double_backward")
    }
    info["cpu_capability"] = _NATIVE.cpu_capability() if _NATIVE is not None else None
    return info
