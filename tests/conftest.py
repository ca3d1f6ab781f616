"""Shared fixtures: the CPU implementation the loss and pilot tests run on.

Modules that use the ``backend`` fixture run every test on each CPU implementation their
``BACKENDS`` names (default: native and portable): the native C++ kernels (kdops._C), the
portable PyTorch implementation forced in their place, and, where a module opts in, the
Triton loss kernels through Triton's interpreter. All are checked against the same oracle.
A backend is skipped only where it cannot run: the extension was not built
(KDOPS_NO_EXTENSION=1), Triton is not installed, or a CUDA device is present (the Triton
kernels are then tested on it, in test_triton.py, instead of interpreted).
"""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import kdops  # noqa: E402
from kdops import _library, _triton  # noqa: E402

NATIVE = kdops.backend_info()["kd_forward"]["cpu"] == "native"
INTERPRETED = _triton.available() and os.environ.get("TRITON_INTERPRET") == "1"


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        backends = getattr(metafunc.module, "BACKENDS", ("native", "portable"))
        metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def backend(request):
    if request.param == "native":
        if not NATIVE:
            pytest.skip("kdops._C is not built (installed with KDOPS_NO_EXTENSION=1)")
        context = contextlib.nullcontext()
    elif request.param == "triton":
        if not _triton.available():
            pytest.skip("Triton is not installed")
        if not INTERPRETED:
            pytest.skip("a CUDA device is present: the Triton kernels are tested on it")
        context = _library.triton_on_cpu()
    else:
        context = _library.portable_on_cpu()
    with context:
        yield request.param
