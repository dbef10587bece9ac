"""Build script. The Python packages install everywhere; the CUDA extension of csrc/ is optional.

It is built only when torch has CUDA, a CUDA toolkit is found, csrc/ holds kernel sources and
QVDIT_BUILD_EXT is not "0". Otherwise it is skipped with a one-line message, and
`backend="cuda"` raises a clear error at run time (the torch and Triton backends still work).
"""
import glob
import os
import sys

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("QVDIT_BUILD_EXT", "1") == "0":
        print("qvdit: QVDIT_BUILD_EXT=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        print("qvdit: no csrc/ sources, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in the build env: pure-Python install
        print(f"qvdit: torch not importable at build time ({exc}), skipping the CUDA extension", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("qvdit: torch has no CUDA or no CUDA toolkit found, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    arch = os.environ.get("QVDIT_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80")
    ext = CUDAExtension(
        name="qvdit_kernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        # cxx: no -std, so torch adds the standard its headers need (C++17 up to 2.11, C++20 after, which refuses
        # C++17). The kernels behind qvdit_kernels.h include no torch header and stay C++17 (as compile_check.sh
        # builds them).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", *arch.split()]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
