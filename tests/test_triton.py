"""The Triton loss kernels (kdops/_triton): op by op against the portable implementation, and
float64 gradcheck/gradgradcheck of fused_kd_loss through them.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), on small shapes; a small tile makes V = 37 span several vocabulary
blocks, so the streaming passes are exercised too. test_values.py and test_opcheck.py also
run their whole suites through these kernels (their ``triton`` backend). With a CUDA device
the same comparisons run on the GPU, plus full-size checks against a float64 reference.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import kdops
from cases import DIVERGENCE_IDS, DIVERGENCES, labels_for, logits, mask_vocab, positive
from conftest import INTERPRETED
from kdops import _library, _loss_portable, _triton

pytestmark = pytest.mark.skipif(not _triton.available(), reason="Triton is not installed")

if _triton.available():
    import triton
    import triton.language as tl

    from kdops._triton import rows

    @triton.jit
    def _div_kernel(x_ptr, y_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, rows.div(tl.load(x_ptr + i), tl.load(y_ptr + i)))

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1")


@pytest.fixture
def launch():
    from kdops._triton import launch
    return launch


@pytest.fixture(params=["one_block", "blocks_of_16"])
def tile(request, launch, monkeypatch):
    """Default tiles, or tiles of 16 elements: several vocabulary blocks per row."""
    if request.param == "blocks_of_16":
        for table in ("LONG_ROWS", "SHORT_ROWS"):
            monkeypatch.setattr(launch, table, dict.fromkeys(getattr(launch, table), (16, 4)))
    return request.param


def _op_inputs(n, v, dtype, label_mode, masked):
    """Arguments of the three ops (float64 or float32 compute), -inf columns if `masked`."""
    s, t = logits(n, v, dtype=dtype, seed=11), logits(n, v, dtype=dtype, seed=12)
    if masked:
        s, t = mask_vocab(s, [1, v - 2]), mask_vocab(t, [1, v - 2])
    cdt = torch.promote_types(dtype, torch.float32)
    taus = positive(n, seed=13, dtype=cdt), positive(n, seed=14, dtype=cdt)
    labels, alpha = labels_for((n,), v, label_mode)
    if labels is not None and masked:
        labels[labels == 1] = 0  # a label on a masked column has an infinite cross-entropy
    args = [x.to(DEVICE) for x in (s, t, *taus)]
    return args, None if labels is None else labels.to(DEVICE), alpha is not None


def _all_ops(impl, args, labels, divergence, beta, with_ce, masks, cotangents):
    s, t, ts, tt = args
    cfg = (-100, divergence, beta, with_ce)
    div, ce, stats = impl.kd_forward(s, t, ts, tt, labels, *cfg)
    gd, gce = (positive(len(div), seed=seed, dtype=div.dtype).to(div.device) for seed in (7, 8))
    first = impl.kd_backward(gd, gce, s, t, ts, tt, labels, stats, *cfg, masks[0])
    second = impl.kd_double_backward(*cotangents, gd, gce, s, t, ts, tt, labels, stats, *cfg,
                                     masks[1])
    return (div, ce, stats, *first, *second)


def _compare_with_portable(launch, args, labels, divergence, beta, with_ce, masks, cotangents,
                           rtol, atol):
    got = _all_ops(launch, args, labels, divergence, beta, with_ce, masks, cotangents)
    want = _all_ops(_loss_portable, [x.cpu() for x in args],
                    None if labels is None else labels.cpu(), divergence, beta, with_ce, masks,
                    [None if c is None else c.cpu() for c in cotangents])
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"output {i}: {m}")


@needs_kernels
@pytest.mark.parametrize("label_mode", [None, "mask", "ce"])
@pytest.mark.parametrize("v", [1, 37])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_ops_match_portable_float64(launch, tile, divergence, beta, v, label_mode):
    """Every output of the three ops, all requested, per-row temperatures, -inf columns."""
    n = 5
    args, labels, with_ce = _op_inputs(n, v, torch.float64, label_mode, masked=v > 1)
    cot = (logits(n, v, dtype=torch.float64, seed=15).to(DEVICE),
           logits(n, v, dtype=torch.float64, seed=16).to(DEVICE),
           positive(n, seed=17, dtype=torch.float64).to(DEVICE),
           positive(n, seed=18, dtype=torch.float64).to(DEVICE))
    _compare_with_portable(launch, args, labels, divergence, beta, with_ce,
                           ([True] * 4, [True] * 6), cot, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("cotangents", ["student", "tau_s", "teacher_and_tau_t"])
@pytest.mark.parametrize("masks", ["student_only", "temperatures_only"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)],
                         ids=["kl", "reverse_kl", "jsd0.3"])
def test_partial_outputs_and_cotangents(launch, divergence, beta, masks, cotangents):
    """Outputs left out by the mask and missing cotangents, in float32 with the CE term."""
    n, v = 6, 37
    args, labels, with_ce = _op_inputs(n, v, torch.float32, "ce", masked=True)
    first, second = {
        "student_only": ([True, False, False, False], [False, True, True, False, False, False]),
        "temperatures_only": ([False, False, True, True], [True, False, False, False, True, True]),
    }[masks]
    vs = logits(n, v, seed=19).to(DEVICE)
    u = positive(n, seed=20).to(DEVICE)
    cot = {"student": (vs, None, None, None), "tau_s": (None, None, u, None),
           "teacher_and_tau_t": (None, vs, None, u)}[cotangents]
    _compare_with_portable(launch, args, labels, divergence, beta, with_ce, (first, second),
                           cot, rtol=2e-5, atol=2e-6)


@needs_kernels
def test_strided_and_broadcast_arguments(launch):
    """Row-strided logits, a broadcast temperature and stride-0 cotangents (a sum's gradient)."""
    n, v = 4, 37
    wide = logits(n, 2 * v, dtype=torch.float64, seed=21).to(DEVICE)
    s, t = wide[:, :v], wide[:, v:]
    tau = torch.tensor(1.7, dtype=torch.float64, device=DEVICE).expand(n)
    ones = torch.ones((), dtype=torch.float64, device=DEVICE).expand(n)
    v_s = torch.ones((), dtype=torch.float64, device=DEVICE).expand(n, v)
    for impl in (launch, _loss_portable):
        div, ce, stats = impl.kd_forward(s, t, tau, tau, None, -100, "kl", 0.5, False)
        grads = impl.kd_backward(ones, ones, s, t, tau, tau, None, stats, -100, "kl", 0.5,
                                 False, [True] * 4)
        second = impl.kd_double_backward(v_s, None, None, None, ones, ones, s, t, tau, tau, None,
                                         stats, -100, "kl", 0.5, False, [True] * 6)
        if impl is launch:
            got = (div, *grads, *second)
        else:
            want = (div, *grads, *second)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIVERGENCE_IDS)
def test_gradcheck_and_gradgradcheck_through_triton(divergence, beta):
    """float64, every input requiring grad: logits, per-row τs and τt; CE term, ignored rows."""
    n, v = 4, 5
    inputs = tuple(x.to(DEVICE).requires_grad_() for x in (
        logits(n, v, dtype=torch.float64, seed=3), logits(n, v, dtype=torch.float64, seed=4),
        positive(n, seed=5, dtype=torch.float64), positive(n, seed=6, dtype=torch.float64)))
    labels, alpha = labels_for((n,), v, "ce")
    labels = labels.to(DEVICE)

    def fn(s, t, ts, tt):
        return kdops.fused_kd_loss(s, t, temperature=ts, teacher_temperature=tt,
                                   divergence=divergence, beta=beta, labels=labels, alpha=alpha)

    with contextlib.nullcontext() if CUDA else _library.triton_on_cpu():
        assert gradcheck(fn, inputs)
        assert gradgradcheck(fn, inputs)


@needs_kernels
def test_division_rounds_as_ieee_and_keeps_special_values():
    """rows.div in float32 gives x / y: rounded as IEEE on a GPU (the interpreter has no true
    FMA, so there within 1 ulp), and ±inf, NaN and an overflowing quotient as `/` gives them."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([1.0, 2.0, 7.1, -inf, 0.0, 3e38, nan, 5.0], device=DEVICE)
    y = torch.tensor([3.0, 0.1, 0.7, 2.0, 0.0, 1e-30, 1.0, inf], device=DEVICE)
    out = torch.empty_like(x)
    _div_kernel[(1,)](x, y, out, N=8)
    ulp = 0.0 if CUDA else torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, x / y, rtol=ulp, atol=0.0, equal_nan=True)


def test_launch_config_covers_short_and_long_rows(launch):
    """Short rows share a program (V = 100: a tile of rows), long rows are cut in blocks."""
    for kernel in launch.LONG_ROWS:
        short = launch.launch_config(kernel, 65536, 100)
        assert short["BLOCK_V"] >= 100 and short["ROWS"] >= 4
        long = launch.launch_config(kernel, 8192, 128256)
        assert long["ROWS"] == 1 and long["BLOCK_V"] < 128256
        tiny = launch.launch_config(kernel, 3, 7)
        assert tiny["ROWS"] >= 3 and tiny["BLOCK_V"] >= 7


def test_backend_info_reports_triton_on_cuda():
    info = kdops.backend_info()
    assert all(info[op]["cuda"] == "triton" for op in _triton.OPS), info
    assert info["pilot_sgd_step"]["cuda"] != "triton"


@needs_cuda
@pytest.mark.parametrize("shape,dtype", [((64, 128256), torch.bfloat16),
                                         ((64, 128256), torch.float32),
                                         ((65536, 100), torch.float32)],
                         ids=["64x128256-bf16", "64x128256-fp32", "65536x100-fp32"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.3)], ids=["kl", "jsd0.3"])
def test_full_size_on_gpu_against_float64(shape, dtype, divergence, beta):
    """Loss, gradients and second order within 2x eager's error against float64 (test_values)."""
    from test_values import _compare
    n, v = shape
    s, t = (logits(n, v, dtype=dtype, seed=seed).cuda() for seed in (31, 32))
    taus = (positive(n, seed=33).cuda(),)
    _compare(s, t, taus, v=logits(n, v, seed=34).cuda(), divergence=divergence, beta=beta)


@needs_cuda
def test_64_bit_offsets_on_gpu():
    """N·V ≥ 2^31 elements: the last rows equal the same rows computed on their own."""
    n, v = 16800, 128256
    if torch.cuda.mem_get_info()[0] < 4 * n * v * 2:
        pytest.skip("needs 4 bf16 [N, V] tensors of GPU memory")
    s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    s.requires_grad_()
    rows = kdops.fused_kd_loss(s, t, temperature=2.0, reduction="none")
    (g,) = torch.autograd.grad(rows.sum(), s)
    tail_s = s.detach()[-3:].clone().requires_grad_()
    tail = kdops.fused_kd_loss(tail_s, t[-3:], temperature=2.0, reduction="none")
    (g_tail,) = torch.autograd.grad(tail.sum(), tail_s)
    assert torch.equal(rows[-3:], tail) and torch.equal(g[-3:], g_tail)


@needs_cuda
def test_no_host_sync_on_gpu():
    """Forward, backward and second order with tensor temperatures never wait for the GPU."""
    s = logits(256, 1000).cuda().requires_grad_()
    t = logits(256, 1000).cuda().requires_grad_()
    tau = torch.full((256,), 2.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kdops.fused_kd_loss(s, t, temperature=tau)
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        torch.autograd.grad(g, (s, t, tau), grad_outputs=torch.ones_like(g))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas is a Linux binary")
def test_kernels_compile_for_hopper_without_spills():
    """Every kernel, for the KL and the JSD, compiles for sm_90 (no GPU needed) at the tiles
    of V = 100 and V = 128256, and no variant spills registers to local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "compile_triton.py"), "--kinds", "0,2",
         "--dtypes", "bfloat16"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(reports) == 3 * 2 * 2
    assert all(r["spill_bytes"] == 0 for r in reports), reports
