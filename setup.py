"""Build script. The Python packages install everywhere; the CUDA extension of csrc/ is optional.

It is built only when torch has CUDA, a CUDA toolkit is found, csrc/ holds kernel sources and
QVDIT_BUILD_EXT is not "0". Otherwise it is skipped with a one-line message, and
`backend="cuda"` raises a clear error at run time (the torch and Triton backends still work).
"""
import glob
import os
import sys

from setuptools import setup


def _static_cxx_runtime(linker: list[str]) -> bool:
    """Whether `linker` (the command that links the extension) puts a static copy of libstdc++ into a shared
    object. Some toolchains do (the H200 image's /opt/gcc: its extension had no libstdc++ dependency). That copy's
    iostreams are never initialized beside the shared libstdc++ torch runs with, so the first error message the
    extension formats (TORCH_CHECK -> std::ostringstream << long) crashed the process (BENCHMARKS run ws11)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, so = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as fh:
            fh.write("#include <sstream>\n#include <string>\n"
                     "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        try:
            res = subprocess.run([*linker, "-fPIC", src, "-o", so], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        if res.returncode != 0 or not os.path.exists(so):
            return False
        with open(so, "rb") as fh:
            return b"libstdc++.so" not in fh.read()  # (the dynamic section names its shared libraries)


def _build_ext_class(base):
    class BuildWithSharedRuntime(base):
        """torch's BuildExtension, linking the shared libstdc++ where the linker would copy in a static one."""

        def build_extensions(self):
            linker = list(getattr(self.compiler, "linker_so_cxx", None) or self.compiler.linker_so)
            if _static_cxx_runtime(linker):
                print(f"qvdit: {linker[0]} links libstdc++ statically into shared objects; linking the shared "
                      "libstdc++.so.6 instead (the one torch uses)", file=sys.stderr)
                for ext in self.extensions:
                    ext.extra_link_args = [*ext.extra_link_args, "-Wl,--push-state,--no-as-needed",
                                           "-l:libstdc++.so.6", "-Wl,--pop-state"]
            super().build_extensions()

    return BuildWithSharedRuntime


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
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
