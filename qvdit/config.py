"""`QuantConfig`: what `quantize_` does to a model, validated on construction.

    QuantConfig(w_bits=3, a_bits=6)                        # every selected linear at W3A6, TQE on
    QuantConfig(w_bits=3, a_bits=6,
                overrides={"*.ffn.*": {"w_bits": 8, "a_bits": 8}},   # mixed precision, by glob
                skip=("blocks.0.*",))                                   # kept in full precision

Module names are matched with `fnmatch` against the names of `model.named_modules()`. The first
override pattern that matches wins. Overrides may set `w_bits`, `a_bits` and `tqe`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field

from qvdit_kernels.backends import BACKENDS
from qvdit_kernels.ops import A_BITS, W_BITS

_OVERRIDE_KEYS = {"w_bits": W_BITS, "a_bits": A_BITS, "tqe": (True, False)}


def _check_int(name, value, allowed):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclass(frozen=True)
class LayerQuant:
    """The resolved settings of one linear."""

    w_bits: int
    a_bits: int
    tqe: bool


@dataclass
class QuantConfig:
    """Quantization settings (SPEC 1.3).

    w_bits: weight bits, 3, 4 or 8 (per output channel, min-max RTN).
    a_bits: activation bits, 6 or 8 (per token, dynamic).
    tqe: add Q-VDiT's rank-1 token-aware estimator (alpha, beta, per-frame gate) to each linear;
        beta starts at 0, so an uncalibrated model computes plain RTN.
    backend: kernel backend for the forward ("auto", "torch", "triton", "cuda").
    skip: glob patterns of module names kept in full precision.
    include: glob patterns of linears quantized in addition to the default selection (on a known video
        transformer the default keeps embeddings, adaLN modulation and the final projection in full
        precision; e.g. include=("proj_out",) takes the final projection too). `skip` wins over `include`.
    overrides: glob pattern -> dict of w_bits / a_bits / tqe for the matching modules.
    seed: seed of the alpha initialisation (Kaiming-uniform, as LoRA does).
    """

    w_bits: int = 4
    a_bits: int = 8
    tqe: bool = True
    backend: str = "auto"
    skip: tuple = ()
    include: tuple = ()
    overrides: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        _check_int("w_bits", self.w_bits, W_BITS)
        _check_int("a_bits", self.a_bits, A_BITS)
        _check_bool("tqe", self.tqe)
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {type(self.backend).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for key in ("skip", "include"):
            value = getattr(self, key)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise TypeError(f"{key} must be a tuple of glob patterns, got {type(value).__name__}")
            if not all(isinstance(p, str) for p in value):
                raise TypeError(f"{key} must hold only str glob patterns")
            setattr(self, key, tuple(value))
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a dict, got {type(self.overrides).__name__}")
        for pattern, values in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(values, dict):
                raise TypeError(f"overrides must map str patterns to dicts, got {pattern!r}: {values!r}")
            for key, value in values.items():
                if key not in _OVERRIDE_KEYS:
                    raise ValueError(f"overrides[{pattern!r}] has unknown key {key!r} (allowed: {sorted(_OVERRIDE_KEYS)})")
                if key == "tqe":
                    _check_bool(f"overrides[{pattern!r}]['tqe']", value)
                else:
                    _check_int(f"overrides[{pattern!r}][{key!r}]", value, _OVERRIDE_KEYS[key])
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")

    def skips(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def includes(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)

    def for_module(self, name: str) -> LayerQuant:
        """The settings of the linear called `name` (overrides applied)."""
        values = {"w_bits": self.w_bits, "a_bits": self.a_bits, "tqe": self.tqe}
        for pattern, over in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                values.update(over)
                break
        return LayerQuant(**values)

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}" + ("+TQE" if self.tqe else "")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["include"] = list(self.include)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        d = json.loads(text)
        d["skip"] = tuple(d.get("skip", ()))
        d["include"] = tuple(d.get("include", ()))
        return cls(**d)
