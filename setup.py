"""Build of kdops' native kernels (the package metadata lives in pyproject.toml).

The CPU extension ``kdops._C`` is compiled from the sources listed in csrc/sources.txt (the
list CMakeLists.txt reads too) with torch.utils.cpp_extension and ninja. As in ATen, a source
named ``*_avx2.cpp`` or ``*_avx512.cpp`` is compiled with that capability's flags, and the
kernels pick a capability at run time. The CUDA kernels (csrc/cuda/*.cu) are compiled in too
when the toolchain allows it: a CUDA build of torch and nvcc (CUDA_HOME); otherwise the build
says why it skips them, and CUDA tensors run the portable implementation. Set
TORCH_CUDA_ARCH_LIST to choose the GPU architectures (sm_70 or newer: the kernels pass their
tensor lists in large kernel parameters). torch is needed at build time, so install with
``pip install --no-build-isolation .``; ``KDOPS_NO_EXTENSION=1`` installs the portable
implementation only.
"""
import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

# Flags of ATen's x86 capabilities (cmake/Codegen.cmake in PyTorch), by source-name suffix.
CAPABILITY_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")
# Sources whose rounding must follow the C++ expressions exactly: no floating-point contraction
# (the pilot step rounds `lr * g` before subtracting it, as the per-tensor loop does; the loss
# kernels keep contraction, which makes them about 15% faster).
EXACT_SOURCES = {"csrc/cpu/pilot_sgd.cpp"}


# The C++ runtime by its shared object, ahead of the compiler driver's own -lstdc++: on an
# H100 machine's image (torch 2.11, its compiler /opt/gcc/bin/g++ 13.3) the link put a static
# copy of libstdc++ into kdops._C, and that second copy beside torch's crashed wherever an
# error message formats a number (tests/test_native.py checks for one copy).
SHARED_CXX_RUNTIME = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def source_flags(source: str) -> list:
    """Compiler flags of one source beyond the extension's own (CMakeLists.txt: the same)."""
    flags = ["-ffp-contract=off"] if source in EXACT_SOURCES else []
    for suffix, capability in CAPABILITY_FLAGS.items():
        if source.endswith(suffix) and X86:
            flags += capability
    return flags


def cuda_sources() -> list:
    """The CUDA sources, or [] (with the reason printed) where they cannot be built."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        print("kdops: torch is a CPU build: building without the CUDA kernels (csrc/cuda)",
              file=sys.stderr)
        return []
    if CUDA_HOME is None:
        print("kdops: WARNING: torch is a CUDA build but nvcc was not found (set CUDA_HOME): "
              "building WITHOUT the CUDA kernels; CUDA tensors will run the portable "
              "implementation", file=sys.stderr)
        return []
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


def extensions():
    if os.environ.get("KDOPS_NO_EXTENSION") == "1":
        print("kdops: KDOPS_NO_EXTENSION=1, installing without native kernels "
              "(every op runs the portable implementation)", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class Build(BuildExtension):
        """Compiles sources with flags of their own first, then the rest as usual."""

        def build_extension(self, ext):
            special = [s for s in ext.sources if source_flags(s)]
            ext.sources = [s for s in ext.sources if s not in special]
            for source in special:
                cxx = ext.extra_compile_args["cxx"] + source_flags(source)
                ext.extra_objects += self.compiler.compile(
                    [source], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": cxx} if self.use_ninja else cxx, depends=ext.depends)
            super().build_extension(ext)

    sources = (ROOT / "csrc" / "sources.txt").read_text().split()
    cuda = cuda_sources()
    ext = (CUDAExtension if cuda else CppExtension)(
        "kdops._C",
        sources + cuda + ["csrc/python_module.cpp"],
        include_dirs=[str(ROOT / "csrc")],
        # OpenMP as torch's CPU builds use it: at::parallel_for is a header template that
        # runs serially in code compiled without it. nvcc never contracts the pilot kernels'
        # __fmul_rn-style intrinsics; --fmad=false keeps any other expression exact too.
        extra_compile_args={"cxx": ["-O3", "-fopenmp"],
                            "nvcc": ["-O3", "--fmad=false"]},
        extra_link_args=["-fopenmp", *SHARED_CXX_RUNTIME],
    )
    return [ext], {"build_ext": Build}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
