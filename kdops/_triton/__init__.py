"""Triton kernels of the loss ops: kdops' CUDA implementation of kd_forward, kd_backward and
kd_double_backward.

`kdops._library.load_triton` registers them for the CUDA dispatch key when Triton is
installed. Triton itself is imported on the first call (`launch`), not with kdops: import
stays fast, and machines without a GPU never load it. Tests run the same kernels on CPU
tensors through Triton's interpreter (TRITON_INTERPRET=1, see tests/conftest.py).

Layout: `rows` (helpers shared by the kernels), one module per kernel (`kd_forward`,
`kd_backward`, `kd_double_backward`, each with its math above it) and `launch` (the op
implementations: outputs, tile shapes, launches).
"""
from __future__ import annotations

import importlib.util

OPS = ("kd_forward", "kd_backward", "kd_double_backward")


def available() -> bool:
    """Whether Triton is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def implementation(name: str):
    """The Triton implementation of kdops::`name`, importing Triton on its first call."""
    def run(*args):
        from . import launch
        return getattr(launch, name)(*args)

    run.__name__ = run.__qualname__ = f"triton_{name}"
    return run
