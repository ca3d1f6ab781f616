"""The native CPU kernels (kdops._C): really the ones used, independent of the thread count and
of the CPU capability, equal to the portable implementation in mixed dtypes, and free of
[N, V] temporaries. The core suites (gradcheck, values, opcheck) run on them too, through the
``backend`` fixture of conftest.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import kdops
from kdops import _library
from kdops import _loss_ops as kd_ops
from cases import logits, mask_vocab, positive

from conftest import NATIVE

pytestmark = pytest.mark.skipif(not NATIVE, reason="kdops._C is not built (KDOPS_NO_EXTENSION=1)")

DIVS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _all_ops(s, t, tau_s, tau_t, labels, divergence, beta, cot):
    """Outputs of forward, backward and second-order backward with every input differentiated."""
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    tau_s, tau_t = tau_s.detach().requires_grad_(), tau_t.detach().requires_grad_()
    loss = kdops.fused_kd_loss(s, t, temperature=tau_s, teacher_temperature=tau_t,
                               divergence=divergence, beta=beta, labels=labels,
                               alpha=None if labels is None else 0.7, reduction="sum")
    grads = torch.autograd.grad(loss, (s, t, tau_s, tau_t), create_graph=True)
    phi = (grads[0] * cot).sum() + (grads[1] * cot).sum() + grads[2].sum() + grads[3].sum()
    return [loss, *grads, *torch.autograd.grad(phi, (s, t, tau_s, tau_t))]


def test_backend_info_reports_native():
    info = kdops.backend_info()
    for op in ("kd_forward", "kd_backward", "kd_double_backward"):
        assert info[op]["cpu"] == "native"
        assert info[op]["autograd"] == "native"
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")


def _loss_nodes(loss):
    """Names of the autograd nodes of a loss's graph."""
    names, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(node.name())
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def test_compiled_autograd_is_the_one_that_runs():
    """The loss ops' graph nodes are the compiled ones (csrc/kd_loss_autograd.cpp); the portable
    backend runs the Python formulas, as an install without the extension does."""
    s = logits(3, 5, requires_grad=True)
    t = logits(3, 5, seed=1)
    native = _loss_nodes(kdops.fused_kd_loss(s, t))
    assert any("KdForward" in name for name in native)
    assert not any("kd_forward" in name for name in native)
    with _library.portable_on_cpu():
        portable = _loss_nodes(kdops.fused_kd_loss(s, t))
    assert any("GeneratedBackwardFor_kdops_kd_forward" in name for name in portable)
    assert not any("KdForward" in name for name in portable)


def test_native_kernels_are_the_ones_that_run():
    s, t = logits(6, 40, seed=0), logits(6, 40, seed=1)
    cot = torch.randn(6, 40)

    def aten_ops():
        with torch.profiler.profile() as prof:
            _all_ops(s, t, positive(6, seed=2), positive(6, seed=3), None, "kl", 0.5, cot)
        return {e.name for e in prof.events()}

    native = aten_ops()
    assert {"kdops::kd_forward", "kdops::kd_backward", "kdops::kd_double_backward"} <= native
    assert not {"aten::exp", "aten::_log_softmax"} & native
    with _library.portable_on_cpu():
        assert {"aten::exp", "aten::_log_softmax"} & aten_ops()


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_bitwise_independent_of_thread_count(divergence, beta):
    n, v = 96, 1001  # several tasks per thread: rows split differently with 1 and 2 threads
    s, t = logits(n, v, seed=5) * 3, logits(n, v, seed=6) * 3
    tau_s, tau_t = positive(n, seed=7), positive(n, seed=8)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(9))
    cot = torch.randn(n, v, generator=torch.Generator().manual_seed(10))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_all_ops(s, t, tau_s, tau_t, labels, divergence, beta, cot))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                    (torch.float32, torch.float64)],
                         ids=["bf16+fp32", "fp16", "fp32+fp64"])
def test_mixed_dtypes_match_portable(divergence, beta, dtypes):
    n, v = 7, 1271
    masked = [3, 100, v - 1]
    s = mask_vocab(logits(n, v, seed=11).to(dtypes[0]), masked)
    t = mask_vocab(logits(n, v, seed=13).to(dtypes[1]), masked)
    cdt = torch.promote_types(torch.promote_types(*dtypes), torch.float32)
    tau_s, tau_t = positive(n, seed=14, dtype=cdt), positive(n, seed=15, dtype=cdt)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(16))
    labels[2] = -100
    cot = torch.randn(n, v, generator=torch.Generator().manual_seed(17))
    native = _all_ops(s, t, tau_s, tau_t, labels, divergence, beta, cot)
    with _library.portable_on_cpu():
        portable = _all_ops(s, t, tau_s, tau_t, labels, divergence, beta, cot)
    _assert_match(native, portable, cdt)


def _assert_match(native, portable, compute_dtype):
    """Native outputs equal the portable ones to the compute dtype's rounding (plus two ulps of
    a 16-bit output's own dtype), relative to each output's largest entry; none is NaN."""
    for a, b in zip(native, portable):
        assert a.dtype == b.dtype and not a.isnan().any()
        tol = 1e-12 if compute_dtype == torch.float64 else 2e-5
        scale = b.double().abs().max().clamp(min=1)
        eps = torch.finfo(b.dtype).eps if b.dtype in (torch.bfloat16, torch.float16) else 0
        assert (a.double() - b.double()).abs().max() <= (tol + 2 * eps) * scale


@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_ignore_the_memory_after_them(divergence, beta, dtype):
    """A row's last, partial vector is loaded whole where the tensor goes on after the row: the
    lanes past its end (the next row's values, here NaN or inf) must not reach its results,
    which equal those of the row alone (loaded value by value), bit for bit."""
    s, t, cot = (logits(2, 13, dtype=dtype, seed=k) for k in range(3))
    tau = positive(2, dtype=torch.float32)
    alone = _all_ops(s[:1], t[:1], tau[:1], tau[:1], None, divergence, beta, cot[:1])[1:]
    for value in (float("nan"), float("inf")):
        s2, t2, cot2 = (torch.cat([x[:1], torch.full_like(x[1:], value)]) for x in (s, t, cot))
        followed = _all_ops(s2, t2, tau, tau, None, divergence, beta, cot2)[1:]
        for a, b in zip(alone, followed):
            assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_sided_second_order_matches_portable(divergence, dtype):
    """MetaDistil's product: d/d(s, t) of ⟨v, ∂L/∂y⟩, the first gradient taken on the side whose
    distribution is Q only (the student under forward KL, the teacher under reverse KL). The KL
    kernels compute it with a two-pass row kernel of its own; it agrees with the portable
    implementation, with masked entries, ignored rows and per-row temperatures."""
    n, v = 9, 1003
    masked = [0, 500, v - 1]
    s = mask_vocab(logits(n, v, seed=31), masked).to(dtype)
    t = mask_vocab(logits(n, v, seed=32), masked).to(dtype)
    tau_s, tau_t = positive(n, seed=33), positive(n, seed=34)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(35))
    labels[4] = -100
    cot = torch.randn(n, v, generator=torch.Generator().manual_seed(36)).to(dtype)

    def products():
        x, y = s.detach().requires_grad_(), t.detach().requires_grad_()
        loss = kdops.fused_kd_loss(x, y, temperature=tau_s, teacher_temperature=tau_t,
                                   divergence=divergence, labels=labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, x if divergence == "kl" else y, create_graph=True)
        return [g, *torch.autograd.grad(g, (x, y), grad_outputs=cot)]

    native = products()
    with _library.portable_on_cpu():
        portable = products()
    _assert_match(native, portable, torch.float32)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sixteen_bit_logits_read_as_their_float32_values(divergence, half):
    """The KL kernels convert 16-bit logits (and cotangents) vector by vector as they load them:
    every output of the three ops is bitwise that of the same values upcast to float32 first
    (logit gradients then rounded to the logits' dtype), with a partial last vector, labels,
    an ignored row and masked entries."""
    n, v = 5, 1003
    s = mask_vocab(logits(n, v, seed=21), [0, 500]).to(half)
    t = mask_vocab(logits(n, v, seed=22), [0, 500]).to(half)
    tau_s, tau_t = positive(n, seed=23), positive(n, seed=24)
    labels = torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(25))
    labels[3] = -100
    cot = torch.randn(n, v, generator=torch.Generator().manual_seed(26)).to(half)
    g_div, g_ce, u = positive(n, seed=27), positive(n, seed=28), positive(n, seed=29)
    config = (labels, -100, divergence, 0.5, True)

    def ops(s, t, cot):
        div, ce, stats = kd_ops.kd_forward(s, t, tau_s, tau_t, *config)
        grads = kd_ops.kd_backward(g_div, g_ce, s, t, tau_s, tau_t, labels, stats, *config[1:],
                                   [True] * 4)
        second = kd_ops.kd_double_backward(cot, cot, u, u, g_div, g_ce, s, t, tau_s, tau_t,
                                           labels, stats, *config[1:], [True] * 6)
        return (div, ce, stats, *grads, *second)

    with torch.no_grad():
        direct, upcast = ops(s, t, cot), ops(s.float(), t.float(), cot.float())
    for a, b in zip(direct, upcast):
        assert torch.equal(a, b.to(a.dtype))


CAPABILITY_SCRIPT = """
import json, torch, kdops
torch.manual_seed(0)
s, t = torch.randn(9, 517) * 3, torch.randn(9, 517) * 3
s, t, tau = s.requires_grad_(), t.requires_grad_(), torch.tensor(2.0, requires_grad=True)
out = []
for div in ("kl", "reverse_kl", "jsd"):
    loss = kdops.fused_kd_loss(s, t, temperature=tau, divergence=div)
    g = torch.autograd.grad(loss, (s, t, tau), create_graph=True)
    second = torch.autograd.grad((g[0] ** 2).sum(), (s, t, tau))
    (g_s,) = torch.autograd.grad(loss, s, create_graph=True)
    one_sided = torch.autograd.grad((g_s ** 2).sum(), (s, t))
    out += [x.detach().flatten().tolist() for x in (loss.reshape(1), *g, *second, *one_sided)]
print(json.dumps({"capability": kdops.backend_info()["cpu_capability"], "out": out}))
"""


def _run_with_capability(capability):
    env = dict(os.environ)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_capabilities_agree():
    best = _run_with_capability(None)
    if best["capability"] == "DEFAULT":
        pytest.skip("this CPU has no SIMD capability beyond DEFAULT to compare with")
    default = _run_with_capability("default")
    assert default["capability"] == "DEFAULT"
    for a, b in zip(best["out"], default["out"]):
        a, b = torch.tensor(a), torch.tensor(b)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


MEMORY_SCRIPT = """
import json, re, torch, kdops
n, v = 512, 8192
s, t, cot = torch.randn(n, v), torch.randn(n, v), torch.randn(n, v)

def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def peak(fn):
    fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    fn()
    return (rss("VmHWM") - base) / (n * v * 4)

def forward():
    with torch.no_grad():
        kdops.fused_kd_loss(s, t, temperature=2.0)

def forward_backward():
    x = s.detach().requires_grad_()
    kdops.fused_kd_loss(x, t, temperature=2.0).backward()

def second_order():
    x, y = s.detach().requires_grad_(), t.detach().requires_grad_()
    (g,) = torch.autograd.grad(kdops.fused_kd_loss(x, y, temperature=2.0), x, create_graph=True)
    (g * cot).sum().backward()

print(json.dumps({f.__name__: peak(f) for f in (forward, forward_backward, second_order)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_no_row_by_vocab_temporaries():
    # A fixed mmap threshold makes glibc return every freed [N, V] buffer to the system, so
    # the peak RSS above the baseline counts exactly the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])  # in units of one [N, V] fp32
    assert peaks["forward"] < 0.25                # per-row outputs and a few rows of scratch
    assert peaks["forward_backward"] < 1.05       # the gradient
    # the gradient g, its cotangent g * cot's backward makes, d/ds and d/dt
    assert peaks["second_order"] < 4.05


def test_import_without_the_extension_wires_python_autograd():
    """kdops imported where kdops._C is missing (a KDOPS_NO_EXTENSION=1 install) runs the
    portable kernels with the Python autograd formulas, exact to second order."""
    script = (
        "import sys; sys.modules['kdops._C'] = None\n"
        "import json, torch, kdops\n"
        "from torch.autograd import gradcheck, gradgradcheck\n"
        "g = torch.Generator().manual_seed(0)\n"
        "s, t = (torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)\n"
        "        for _ in range(2))\n"
        "tau = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)\n"
        "fn = lambda s, t, tau: kdops.fused_kd_loss(s, t, temperature=tau, divergence='jsd')\n"
        "ok = gradcheck(fn, (s, t, tau)) and gradgradcheck(fn, (s, t, tau))\n"
        "print(json.dumps([kdops.backend_info()['kd_backward'], ok]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    info, ok = json.loads(out.splitlines()[-1])
    assert info == {"cpu": "portable", "cuda": info["cuda"], "autograd": "python"}
    assert ok


def test_kernel_errors_carry_their_message():
    """A check inside the C++ kernels reaches Python as a RuntimeError with its message,
    numbers formatted (a kdops._C holding its own static copy of libstdc++ crashed here)."""
    params, grads = [torch.randn(3, 4)], [torch.randn(3, 4).double()]
    lr = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="tensors of position 0 must share"):
        torch.ops.kdops.pilot_sgd_step(params, grads, None, lr, None, None, 0.0, False, False,
                                       [False, False, False])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ is Linux's runtime")
def test_extension_uses_the_process_libstdcxx():
    """kdops._C resolves the C++ runtime to the shared libstdc++ that torch uses, not to a
    copy linked into it: two copies in one process share no locale state."""
    import ctypes

    from kdops import _C

    symbol = "_ZNSt6locale7classicEv"    # std::locale::classic()
    ours = ctypes.cast(getattr(ctypes.CDLL(_C.__file__), symbol), ctypes.c_void_p).value
    shared = ctypes.cast(getattr(ctypes.CDLL("libstdc++.so.6"), symbol), ctypes.c_void_p).value
    assert ours == shared
