"""The kdops op library: one torch.library namespace shared by every op family, the loading of
the compiled kernels, and the report of which implementation serves each op.

Each family (`_loss_ops`, `_pilot_ops`) defines its schemas on `LIB` and registers its portable
implementation with `define_portable`, as CompositeExplicitAutograd: it serves every device
until a native kernel registered for a backend key overrides it. The compiled extension
`kdops._C` registers the C++ CPU kernels (csrc/cpu) and, in CUDA builds, the CUDA kernels
(csrc/cuda) when `load_native` imports it, after every family has been defined. It also
registers the loss ops' autograd (every device); a family's Python autograd formulas, given
with `define_autograd`, are registered by `load_python_autograd` only where it does not.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad as _forward_ad

LIB = torch.library.Library("kdops", "DEF")

_PORTABLE = {}
# (op names, function registering their Python autograd formulas on a Library), by family.
_PYTHON_AUTOGRAD = []
# Kernels registered from Python for a dispatch key, by name of their implementation:
# {(op, "CUDA"): "triton", (op, "Autograd"): "python"}. Any other kernel for a key comes from
# the compiled extension.
_PYTHON_KERNELS = {}


def define_portable(name: str, fn) -> None:
    """Register `fn` as the portable (every-device) implementation of kdops::`name`."""
    LIB.impl(name, fn, "CompositeExplicitAutograd")
    _PORTABLE[name] = fn


def define_autograd(ops: tuple, register) -> None:
    """`register(lib)` registers the Python autograd formulas of `ops` on a Library: they serve
    unless the compiled extension brings its own (`load_python_autograd`)."""
    _PYTHON_AUTOGRAD.append((ops, register))


def wanted_groups(ctx, needs, sizes):
    """Whether the running backward pass will use the gradient of any input of each group.

    `needs` are the needs_input_grad flags of the op's tensor inputs in order (lists
    flattened), cut into consecutive groups of `sizes`. ``torch.autograd.grad(loss, student)``
    drops the teacher's gradient, so it is not computed: the engine tells which next nodes it
    will execute (asked until one in the group says yes). Where the engine cannot say (a
    backward traced by torch.compile), every input that requires grad counts.
    """
    spans, at = [], 0
    for size in sizes:
        spans.append(range(at, at + size))
        at += size
    if not torch.compiler.is_compiling():
        try:
            nodes = ctx.next_functions
            will_run = torch._C._will_engine_execute_node
            return [any(needs[i] and nodes[i][0] is not None and will_run(nodes[i][0])
                        for i in span) for span in spans]
        except (AttributeError, RuntimeError):
            pass
    return [any(needs[i] for i in span) for span in spans]


def transformed() -> bool:
    """Whether a torch.func transform is active (not asked while torch.compile traces: the
    compiled graph calls the ops, whose own autograd it traces)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


def dual_level_open() -> bool:
    """Whether a `torch.autograd.forward_ad` dual level is open (torch.func.jvp opens one too):
    the ops' inputs may then carry tangents, which only the autograd.Functions' jvp rules take
    (the compiled autograd has no forward mode). False while torch.compile traces."""
    return _forward_ad._current_level >= 0 and not torch.compiler.is_compiling()


def refuse_forward_over_forward(op: str) -> None:
    """Raise inside a jvp rule that runs under two forward-mode transforms (jacfwd(jacfwd),
    jvp of jvp): torch.func hands autograd.Function jvp rules their saved inputs without the
    outer transform's tangents, so the rule's own derivative would silently miss the terms
    through them (pytorch/pytorch#197867, open)."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    if sum(i.key() == TransformType.Jvp for i in stack) > 1:
        raise NotImplementedError(
            f"kdops: forward-over-forward through {op} (jacfwd(jacfwd(...)), jvp of jvp) is not "
            f"supported: torch.func gives autograd.Function jvp rules their saved inputs without "
            f"the outer tangents; for second order use forward over reverse "
            f"(torch.func.hessian, jvp(grad(...))) or reverse mode")


def wanted_grads(ctx, needs):
    """`needs` narrowed input by input (see `wanted_groups`)."""
    return wanted_groups(ctx, needs, [1] * len(needs))


_NATIVE = None


def load_native():
    """Import the compiled kernels, which register themselves for their dispatch keys.

    Without them (installed with KDOPS_NO_EXTENSION=1) every op runs the portable
    implementation and `backend_info` says so; an extension that exists but fails to load
    (built against another torch, say) is reported with a warning, never ignored.
    """
    global _NATIVE
    try:
        from . import _C
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}._C":
            raise
        return
    except ImportError as err:
        warnings.warn(f"kdops: native kernels failed to load, using the portable "
                      f"implementation on every device ({err})", RuntimeWarning, stacklevel=2)
        return
    _NATIVE = _C


def load_python_autograd():
    """Register the Python autograd formulas of every family the compiled extension gives no
    autograd kernel of its own (all of them without the extension)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for ops, register in _PYTHON_AUTOGRAD:
        if not all(has(f"kdops::{op}", "Autograd") for op in ops):
            register(LIB)
            _PYTHON_KERNELS.update({(op, "Autograd"): "python" for op in ops})


def load_triton():
    """Register the Triton loss kernels as the CUDA implementation, when Triton is installed.

    Without Triton the loss ops run their portable implementation on CUDA, and
    `backend_info` says so."""
    from . import _triton
    if not _triton.available():
        return
    for name in _triton.OPS:
        LIB.impl(name, _triton.implementation(name), "CUDA")
        _PYTHON_KERNELS[(name, "CUDA")] = "triton"


@contextlib.contextmanager
def _overriding(*registrations):
    """Inside this block, kernels that each `register(lib)` registers on a fresh Library take
    over from whatever served their dispatch keys; they are removed on exit."""
    lib = torch.library.Library("kdops", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for register in registrations:
            register(lib)
    try:
        yield
    finally:
        lib._destroy()


def _kernels(key: str, kernels: dict):
    """A registration of `kernels` ({op name: function}) for a dispatch key."""
    def register(lib):
        for name, fn in kernels.items():
            lib.impl(name, fn, key)
    return register


def portable_on_cpu():
    """Run kdops on CPU inside this block as an install without the compiled extension runs
    it: every op's portable implementation and the Python autograd formulas. Tests and
    benchmarks compare it with the native kernels and autograd in one process this way."""
    python_autograd = [register for ops, register in _PYTHON_AUTOGRAD
                       if (ops[0], "Autograd") not in _PYTHON_KERNELS]
    return _overriding(_kernels("CPU", _PORTABLE), *python_autograd)


def triton_on_cpu():
    """Run the loss ops on CPU through their Triton kernels inside this block.

    Only meaningful under Triton's interpreter (TRITON_INTERPRET=1 set before the first
    kernel call): that is how the Triton kernels are tested on machines without a GPU."""
    from . import _triton
    return _overriding(_kernels("CPU", {name: _triton.implementation(name)
                                        for name in _triton.OPS}))


def backend_info() -> dict:
    """Which implementation serves each kdops op, per device type.

    Returns ``{"kd_forward": {"cpu": "native", "cuda": "triton", "autograd": "native"}, ...,
    "cpu_capability": "AVX2"}``: ``"native"`` where a compiled kernel (kdops._C) serves that
    device's dispatch key, ``"triton"`` where a Triton kernel does, ``"portable"`` where the
    PyTorch implementation runs; ``"autograd"`` says whether the op's derivative is wired
    in C++ (``"native"``) or in Python (``"python"``: the loss ops without the extension,
    and the pilot step, whose autograd.Function carries torch.func rules); and the SIMD
    capability the native CPU loss kernels were dispatched to (None without them; set
    ``ATEN_CPU_CAPABILITY`` before importing torch to choose a lower one, as for ATen).
    """
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    info = {
        op: {dev: _PYTHON_KERNELS.get((op, key), "native") if has(f"kdops::{op}", key)
             else "portable"
             for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}
        for op in _PORTABLE
    }
    for op, where in info.items():
        where["autograd"] = ("native" if has(f"kdops::{op}", "Autograd")
                             and (op, "Autograd") not in _PYTHON_KERNELS else "python")
    info["cpu_capability"] = _NATIVE.cpu_capability() if _NATIVE is not None else None
    return info
