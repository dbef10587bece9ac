"""Quantized checkpoints: `save_quantized(model, path)` / `load_quantized(model, path)` (safetensors).

The file holds the whole `state_dict` of the quantized model (packed weights, scales, zeros, TQE
parameters and every full-precision parameter), so loading into a freshly built model of the same
architecture (random or meta init) reproduces the saved model's outputs bit for bit.

Metadata (strings): `qvdit_format_version`, `qvdit_config` (QuantConfig JSON), `qvdit_layers`
(per quantized linear: shape, bits, TQE, row kind, format, gate size, bias dtype) and
`qvdit_content_sha256` (over every tensor's name, dtype, shape and bytes, in sorted order).
A truncated, corrupted, wrong-version or mismatched file raises `CheckpointError` saying which.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import QuantConfig
from .qlinear import QLinear
from .quantize import _parent, attach_frames, qlinears

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded into this model (the message says why)."""


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _layer_record(q: QLinear) -> dict:
    return {
        "in_features": q.in_features, "out_features": q.out_features, "bias": q.bias is not None,
        "bias_dtype": str(q.bias.dtype).replace("torch.", "") if q.bias is not None else None,
        "w_bits": q.w_bits, "a_bits": q.a_bits, "tqe": q.tqe, "row_kind": q.row_kind, "format": q.format,
        "num_gates": q.gate.numel() if q.tqe else 2, "backend": q.backend,
    }


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the quantized `model` to `path` (one safetensors file)."""
    layers = qlinears(model)
    if not layers:
        raise ValueError("model has no QLinear: quantize it with qvdit.quantize_ before save_quantized")
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach().contiguous()
        if t.data_ptr() in seen and t.numel():  # safetensors refuses shared storage (tied weights)
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t.cpu()
    config = getattr(model, "_qvdit_config", None) or QuantConfig()
    meta = {
        "qvdit_format_version": FORMAT_VERSION,
        "qvdit_config": config.to_json(),
        "qvdit_layers": json.dumps({n: _layer_record(q) for n, q in layers.items()}, sort_keys=True),
        "qvdit_model_class": type(model).__name__,
        "qvdit_content_sha256": content_hash(tensors),
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def _read(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    version = meta.get("qvdit_format_version")
    if version is None:
        raise CheckpointError(f"{path}: not a qvdit checkpoint (no qvdit_format_version in its metadata)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is not supported (this qvdit reads {FORMAT_VERSION!r})")
    if content_hash(tensors) != meta.get("qvdit_content_sha256"):
        raise CheckpointError(f"{path}: content hash mismatch: the tensor data is corrupted")
    return meta, tensors


def _config_diff(a: QuantConfig, b: QuantConfig) -> list[str]:
    return [k for k in a.__dataclass_fields__ if getattr(a, k) != getattr(b, k)]


def load_quantized(model: nn.Module, path: str | os.PathLike, config: QuantConfig | None = None) -> nn.Module:
    """Load a checkpoint written by `save_quantized` into `model` (same architecture, full precision or
    already quantized the same way; random or meta init is fine). In place; returns `model`.

    `config`, when given, must equal the stored config (a guard against loading the wrong file).
    """
    path = os.fspath(path)
    meta, tensors = _read(path)
    stored = QuantConfig.from_json(meta["qvdit_config"])
    if config is not None and config != stored:
        raise CheckpointError(f"{path}: config mismatch: the file holds {stored.name}, fields differ: {_config_diff(config, stored)}")
    layers = json.loads(meta["qvdit_layers"])
    extra = sorted(set(qlinears(model)) - set(layers))
    if extra:
        raise CheckpointError(f"{path}: config mismatch: the model has QLinears the file does not: {extra[:5]}")
    new = []
    for name, rec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: config mismatch: the model has no module {name!r}") from None
        shape_ok = (module.in_features, module.out_features) == (rec["in_features"], rec["out_features"]) \
            if isinstance(module, (nn.Linear, QLinear)) else False
        if not shape_ok:
            raise CheckpointError(f"{path}: config mismatch: {name!r} is not a Linear({rec['in_features']}, {rec['out_features']})")
        if isinstance(module, QLinear):
            if (module.w_bits, module.a_bits, module.tqe) != (rec["w_bits"], rec["a_bits"], rec["tqe"]):
                raise CheckpointError(f"{path}: config mismatch: {name!r} is quantized as {module.layer_quant()}, the file has {rec}")
            continue
        device = module.weight.device
        q = QLinear(rec["in_features"], rec["out_features"], rec["bias"], w_bits=rec["w_bits"], a_bits=rec["a_bits"],
                    tqe=rec["tqe"], backend=rec["backend"], row_kind=rec["row_kind"], num_gates=rec["num_gates"],
                    bias_dtype=getattr(torch, rec["bias_dtype"] or "float32"), device=device, name=name)
        parent, child = _parent(model, name)
        setattr(parent, child, q)
        new.append(q)
    assign = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    try:
        model.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: config mismatch: the model's parameters do not match the file: {exc}") from exc
    attach_frames(model, list(qlinears(model).values()))
    model._qvdit_config = stored
    return model
