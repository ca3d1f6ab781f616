"""Compile the Triton loss kernels for a Hopper GPU (sm_90) on a machine without one.

    python tests/compile_triton.py                    # every variant, one JSON line each
    python tests/compile_triton.py --kinds 0 --dtypes bfloat16

Triton lowers a kernel to PTX and assembles it with its bundled ptxas without a driver, so
this checks what the interpreter cannot: that each variant the launchers use compiles, and
with how many registers and spills. tests/test_triton.py runs it in a subprocess (the
interpreter must be off, and it is on in the test process).
"""
import argparse
import itertools
import json
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from kdops._triton import launch
from kdops._triton.kd_backward import kd_backward_kernel
from kdops._triton.kd_double_backward import kd_double_backward_kernel
from kdops._triton.kd_forward import kd_forward_kernel

TARGET = GPUTarget("cuda", 90, 32)
# Pointers to logits-shaped tensors take the logits' dtype; labels are int64; the rest
# (temperatures, statistics, per-row outputs, β) are in the compute dtype.
LOGITS_PTRS = {"s_ptr", "t_ptr", "gs_ptr", "gt_ptr", "vs_ptr", "vt_ptr", "d_s_ptr", "d_t_ptr"}
KERNELS = {"forward": kd_forward_kernel, "backward": kd_backward_kernel,
           "double_backward": kd_double_backward_kernel}
FLAGS = {"forward": (), "backward": ("NEED_S", "NEED_T", "NEED_TAU_S", "NEED_TAU_T", "MEANS"),
         "double_backward": ("HAS_VS", "HAS_VT", "HAS_US", "HAS_UT", "NEED_GD", "NEED_GCE",
                             "NEED_S", "NEED_T", "NEED_TAU_S", "NEED_TAU_T")}
TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}


def compile_variant(kernel, kind, dtype, v):
    fn = KERNELS[kernel]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    config = launch.launch_config(kernel, 65536, v)
    constexprs = dict(KIND=kind, HAS_LABELS=True, WITH_CE=True, LOWEST=torch.finfo(cdt).min,
                      ROWS=config["ROWS"], BLOCK_V=config["BLOCK_V"],
                      **dict.fromkeys(FLAGS[kernel], True))
    signature, values = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], values[(i,)] = "constexpr", constexprs[name]
        elif name == "labels_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*" + TYPES[dtype if name in LOGITS_PTRS else cdt]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values),
                              target=TARGET, options=dict(num_warps=config["num_warps"]))
    return dict(kernel=kernel, kind=kind, dtype=TYPES[dtype], v=v, **config,
                **_register_use(compiled.asm["ptx"]))


def _register_use(ptx: str) -> dict:
    """Registers per thread and spilled bytes, from ptxas -v on the kernel's PTX (the
    driver reports them only when it loads a kernel, and there is no driver here)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o",
                              "/dev/null"], capture_output=True, text=True, check=True).stderr
    return dict(registers=int(re.search(r"Used (\d+) registers", out).group(1)),
                spill_bytes=int(re.search(r"(\d+) bytes spill stores", out).group(1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="0,1,2", help="0 = kl, 1 = reverse kl, 2 = jsd")
    parser.add_argument("--dtypes", default="bfloat16,float32,float64")
    parser.add_argument("--vocab", default="100,128256")
    args = parser.parse_args()
    variants = itertools.product(KERNELS, map(int, args.kinds.split(",")),
                                 (getattr(torch, d) for d in args.dtypes.split(",")),
                                 map(int, args.vocab.split(",")))
    for variant in variants:
        print(json.dumps(compile_variant(*variant)), flush=True)


if __name__ == "__main__":
    main()
