"""Shared fixtures: the CPU implementation the core tests run on.

Modules that use the ``backend`` fixture run every test twice on CPU: with the native C++
kernels (kdops._C) and with the portable PyTorch implementation forced in their place, so both
stay checked against the same oracle. The native run is skipped only where the extension was
not built (installed with KDOPS_NO_EXTENSION=1).
"""
import contextlib

import pytest

import kdops
from kdops import _library

NATIVE = kdops.backend_info()["kd_forward"]["cpu"] == "native"


@pytest.fixture(params=["native", "portable"])
def backend(request):
    if request.param == "native":
        if not NATIVE:
            pytest.skip("kdops._C is not built (installed with KDOPS_NO_EXTENSION=1)")
        context = contextlib.nullcontext()
    else:
        context = _library.portable_on_cpu()
    with context:
        yield request.param
