"""Launchers of the Triton loss kernels, with the op schemas of kdops._loss_ops.

Each function here is the Triton implementation of one op: same arguments, same outputs as
the portable functions in kdops._loss_portable (registered for CUDA by `kdops._triton`).
They allocate the outputs, pick a tile shape and launch one kernel; nothing here syncs with
the host.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor

from .._divergences import KLDivergence, make_divergence
from .._loss_portable import masked_output
from .kd_backward import kd_backward_kernel
from .kd_double_backward import kd_double_backward_kernel
from .kd_forward import kd_forward_kernel

# (elements per tile, warps) per kernel. Rows longer than the short-row tile get one program
# each and are streamed in blocks of the long-row tile; shorter rows share a program, several
# rows per tile. Chosen by timing on an H100 (benchmarks/triton_variants.py; results in
# benchmarks/results/h100-variants-*.json): at V = 100 small tiles with few warps won (512 ×
# 2 warps: forward 0.146 → 0.054 ms, backward 0.047 → 0.034 ms at 65536 × 100 bf16; 512 × 4
# for the double backward, 0.161 → 0.104 ms); at V = 32000 and 128256 no tried alternative
# to the long-row tiles beat them. No float32/bfloat16 variant spills registers on sm_90 but
# the float32 long-row double backward of the reverse KL (8 bytes; float64, the gradcheck
# dtype, spills); tests/compile_triton.py reports registers and spills
# (benchmarks/results/sm90-triton-registers.jsonl). A table, not autotuning: no benchmark
# pass at first call, and the same launch on every run (reproducible results).
LONG_ROWS = {"forward": (2048, 4), "backward": (4096, 8), "double_backward": (2048, 4)}
SHORT_ROWS = {"forward": (512, 2), "backward": (512, 2), "double_backward": (512, 4)}
# Passes after the first walk a long row in the opposite direction (rows.block_cols).
ALTERNATE_PASSES = True


def launch_config(kernel: str, n: int, v: int) -> dict:
    """ROWS, BLOCK_V and num_warps of a kernel for [n, v] logits (V = 100: 4 rows per
    program, 16384 programs for 65536 short rows; V = 128256: one row in 32 to 63 blocks)."""
    block_v = triton.next_power_of_2(v)
    tile, warps = SHORT_ROWS[kernel]
    if block_v > tile:
        tile, warps = LONG_ROWS[kernel]
        return dict(ROWS=1, BLOCK_V=min(block_v, tile), num_warps=warps)
    rows = max(1, min(tile // block_v, triton.next_power_of_2(n)))
    return dict(ROWS=rows, BLOCK_V=block_v, num_warps=warps)


def _kind(divergence: str, beta: float) -> int:
    """0 = KL(pt‖ps), 1 = KL(ps‖pt), 2 = JSD: the portable path's choice of divergence
    (β = 0 and 1 are exactly the KLs), as the kernels' KIND."""
    div = make_divergence(divergence, beta)
    if isinstance(div, KLDivergence):
        return 0 if div.p_is_teacher else 1
    return 2


@functools.lru_cache(maxsize=64)
def _device_scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """β as a one-element device tensor: a float kernel argument would be rounded to float32.

    Cached, so a training loop allocates it once (torch.full fills on the device: no copy
    from the host, no sync)."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _rows_last_dense(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pointers(outputs, stand_in: Tensor):
    """The outputs as kernel pointers, with `stand_in` for the empty ones (outputs the mask
    leaves out are never written, and an empty tensor may have no address)."""
    return [x if x.numel() else stand_in for x in outputs]


def _common(student, teacher, tau_s, tau_t, labels, divergence, beta):
    """(kernel arguments shared by all three kernels, their constexprs, kernel-ready tensors)."""
    s, t = _rows_last_dense(student), _rows_last_dense(teacher)
    n, v = s.shape
    cdt = tau_s.dtype
    beta_t = _device_scalar(float(beta), cdt, s.device)
    args = (s, t, s.stride(0), t.stride(0), tau_s, tau_s.stride(0), tau_t, tau_t.stride(0),
            s if labels is None else labels)
    consts = dict(KIND=_kind(divergence, beta), HAS_LABELS=labels is not None,
                  LOWEST=torch.finfo(cdt).min, ALTERNATE=ALTERNATE_PASSES)
    return args, consts, beta_t, n, v


def _grid(n: int, config: dict):
    return (triton.cdiv(n, config["ROWS"]),)


def kd_forward(student: Tensor, teacher: Tensor, tau_s: Tensor, tau_t: Tensor,
               labels: Optional[Tensor], ignore_index: int, divergence: str, beta: float,
               with_ce: bool):
    args, consts, beta_t, n, v = _common(student, teacher, tau_s, tau_t, labels, divergence,
                                         beta)
    cdt = tau_s.dtype
    d_out = student.new_empty(n, dtype=cdt)
    ce_out = student.new_empty(n, dtype=cdt)
    stats = student.new_empty(6, n, dtype=cdt)
    if n:
        config = launch_config("forward", n, v)
        kd_forward_kernel[_grid(n, config)](
            *args, beta_t, d_out, ce_out, stats, n, v, ignore_index, WITH_CE=with_ce,
            **consts, **config)
    return d_out, ce_out, stats


def kd_backward(grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                tau_s: Tensor, tau_t: Tensor, labels: Optional[Tensor], stats: Tensor,
                ignore_index: int, divergence: str, beta: float, with_ce: bool,
                output_mask: Sequence[bool]):
    need_s, need_t, need_tau_s, need_tau_t = output_mask
    (s, t, s_stride, t_stride, *rest), consts, beta_t, n, v = _common(
        student, teacher, tau_s, tau_t, labels, divergence, beta)
    cdt = tau_s.dtype
    gs = masked_output(need_s, student, (n, v), student.dtype)
    gt = masked_output(need_t, teacher, (n, v), teacher.dtype)
    gts = masked_output(need_tau_s, tau_s, n, cdt)
    gtt = masked_output(need_tau_t, tau_t, n, cdt)
    if n and any(output_mask):
        kind = consts["KIND"]
        means = (kind != 1 and (need_t or need_tau_t)) or (kind != 0 and (need_s or need_tau_s))
        config = launch_config("backward", n, v)
        kd_backward_kernel[_grid(n, config)](
            grad_div, grad_div.stride(0), grad_ce, grad_ce.stride(0), s, t, s_stride, t_stride,
            *rest, stats.contiguous(), beta_t, *_pointers((gs, gt, gts, gtt), s), n, v,
            ignore_index, WITH_CE=with_ce, NEED_S=need_s, NEED_T=need_t, NEED_TAU_S=need_tau_s,
            NEED_TAU_T=need_tau_t, MEANS=means, **consts, **config)
    return gs, gt, gts, gtt


def kd_double_backward(v_student: Optional[Tensor], v_teacher: Optional[Tensor],
                       v_tau_s: Optional[Tensor], v_tau_t: Optional[Tensor],
                       grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                       tau_s: Tensor, tau_t: Tensor, labels: Optional[Tensor], stats: Tensor,
                       ignore_index: int, divergence: str, beta: float, with_ce: bool,
                       output_mask: Sequence[bool]):
    need_gd, need_gce, need_s, need_t, need_tau_s, need_tau_t = output_mask
    (s, t, s_stride, t_stride, *rest), consts, beta_t, n, v = _common(
        student, teacher, tau_s, tau_t, labels, divergence, beta)
    cdt = tau_s.dtype
    outs = (masked_output(need_gd, grad_div, n, cdt), masked_output(need_gce, grad_ce, n, cdt),
            masked_output(need_s, student, (n, v), student.dtype),
            masked_output(need_t, teacher, (n, v), teacher.dtype),
            masked_output(need_tau_s, tau_s, n, cdt), masked_output(need_tau_t, tau_t, n, cdt))
    if n and any(output_mask):
        vs = s if v_student is None else _rows_last_dense(v_student)
        vt = t if v_teacher is None else _rows_last_dense(v_teacher)
        us = tau_s if v_tau_s is None else v_tau_s.contiguous()
        ut = tau_t if v_tau_t is None else v_tau_t.contiguous()
        config = launch_config("double_backward", n, v)
        kd_double_backward_kernel[_grid(n, config)](
            vs, vt, us, ut, vs.stride(0), vt.stride(0), grad_div, grad_div.stride(0), grad_ce,
            grad_ce.stride(0), s, t, s_stride, t_stride, *rest, stats.contiguous(), beta_t,
            *_pointers(outs, s), n, v, ignore_index, WITH_CE=with_ce, HAS_VS=v_student is not None,
            HAS_VT=v_teacher is not None, HAS_US=v_tau_s is not None,
            HAS_UT=v_tau_t is not None, NEED_GD=need_gd, NEED_GCE=need_gce, NEED_S=need_s,
            NEED_T=need_t, NEED_TAU_S=need_tau_s, NEED_TAU_T=need_tau_t, **consts, **config)
    return outs
