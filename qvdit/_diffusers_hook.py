"""Register qvdit's diffusers quantizer (quant_method "qvdit") without making `import qvdit` import diffusers.

Importing diffusers' quantizer registry costs about 2 s on the CI CPU, `import qvdit` about 20 ms (measured
with `python -X importtime`). So `install()`, called by `import qvdit`:
- registers at once when `diffusers.quantizers.auto` is already imported;
- otherwise, when diffusers is installed, puts a one-shot finder on `sys.meta_path` that lets diffusers import
  `diffusers.quantizers.auto` as usual and imports `qvdit.diffusers_quantizer` (which registers) right after;
- does nothing when diffusers is not installed.
A failing registration warns instead of breaking diffusers' own import.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

_TARGET = "diffusers.quantizers.auto"


def _register() -> None:
    try:
        importlib.import_module("qvdit.diffusers_quantizer")
    except Exception as exc:  # diffusers API drift must not break `import diffusers`
        warnings.warn(f"qvdit could not register its diffusers quantizer: {type(exc).__name__}: {exc}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif importlib.util.find_spec("diffusers") is not None and \
            not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
