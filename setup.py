"""Build script. The Python packages install everywhere; the CUDA extension of csrc/ is optional.

It is built only when torch has CUDA, a CUDA toolkit is found, csrc/ holds kernel sources and
QVDIT_BUILD_EXT is not "0". Otherwise it is skipped with a one-line message, and
`backend="cuda"` raises a clear error at run time (the torch and Triton backends still work).
"""
import glob
import os
import sys

from setuptools import setup


# Link flags that make a shared object depend on the shared C++ runtime (the one torch runs with).
SHARED_CXX_RUNTIME = ["-Wl,--push-state,--no-as-needed", "-l:libstdc++.so.6", "-Wl,--pop-state"]


def _probe_link(driver: list[str], flags: list[str]) -> bytes | None:
    """A small C++ shared object (it formats a long, as every TORCH_CHECK message does) built by the C++ driver
    (e.g. ["ccache", "g++"]) with `flags` after the source, as a link line has them: its bytes, or None when the
    link fails."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, so = os.path.join(d, "probe.cpp"), os.path.join(d, "probe.so")
        with open(src, "w") as fh:
            fh.write("#include <sstream>\n#include <string>\n"
                     "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
        try:
            res = subprocess.run([*driver, "-fPIC", src, *flags, "-o", so], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        if res.returncode != 0 or not os.path.exists(so):
            return None
        with open(so, "rb") as fh:
            return fh.read()


def _static_cxx_runtime(driver: list[str], flags: list[str]) -> bool:
    """Whether the C++ driver, with `flags` (-shared and the extension's library dirs), copies libstdc++ into a
    shared object. The H200 image's toolchain (/opt/gcc) did: its extension named no libstdc++, and that copy's iostreams,
    never initialized beside the shared libstdc++ torch runs with, crashed the process on the first error message
    the extension formatted (TORCH_CHECK -> std::ostringstream << long; BENCHMARKS run ws11)."""
    data = _probe_link(driver, flags)
    return data is not None and b"libstdc++.so" not in data  # (the dynamic section names its shared libraries)


def _build_ext_class(base):
    class BuildWithSharedRuntime(base):
        """torch's BuildExtension, linking the shared libstdc++ explicitly wherever the toolchain finds it, so no
        build depends on what the linker would pick on its own (a static copy, on some toolchains)."""

        def build_extensions(self):
            # (the program distutils links C++ with: compiler_cxx, e.g. "ccache g++", less an `env VAR=..` prefix)
            driver = list(getattr(self.compiler, "compiler_cxx", None) or [os.environ.get("CXX", "c++")])
            while driver and (os.path.basename(driver[0]) == "env" or "=" in driver[0]):
                driver = driver[1:]
            driver = driver or ["c++"]
            cxx = " ".join(driver)
            libdirs = [*(d for ext in self.extensions for d in ext.library_dirs), *(self.compiler.library_dirs or [])]
            flags = ["-shared", *(f"-L{d}" for d in dict.fromkeys(libdirs))]
            if _probe_link(driver, [*flags, *SHARED_CXX_RUNTIME]) is not None:
                if _static_cxx_runtime(driver, flags):
                    print(f"qvdit: {cxx} links libstdc++ statically into shared objects; linking the shared "
                          "libstdc++.so.6 instead (the one torch uses)", file=sys.stderr)
                for ext in self.extensions:
                    ext.extra_link_args = [*ext.extra_link_args, *SHARED_CXX_RUNTIME]
            else:
                print(f"qvdit: {cxx} cannot link libstdc++.so.6 by name; the extension takes the C++ runtime the "
                      "linker picks", file=sys.stderr)
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
