"""Loader of the optional compiled CUDA extension `qvdit_kernels._C` (built from csrc/ by setup.py).

Importing this module registers the extension's kernels in the backend registry. It raises ImportError
with a clear message when the extension is not built; `backends.py` turns that into
"backend='cuda' is not available: ..." only when someone asks for the CUDA backend.
"""
try:
    from . import _C  # noqa: F401  (the compiled extension)
except ImportError as exc:  # not built: CPU torch, no toolkit, or QVDIT_BUILD_EXT=0
    raise ImportError(
        "the CUDA extension qvdit_kernels._C is not built (it needs a CUDA torch and a CUDA toolkit at "
        "install time: pip install -e . with QVDIT_BUILD_EXT unset)"
    ) from exc
