"""diffusers integration: `QVDiTConfig` and `QVDiTQuantizer`, registered as quant_method "qvdit".

    from diffusers import WanTransformer3DModel
    from qvdit.diffusers_quantizer import QVDiTConfig

    model = WanTransformer3DModel.from_pretrained(path, quantization_config=QVDiTConfig(w_bits=3, a_bits=6),
                                                  torch_dtype=torch.bfloat16)
    model.save_pretrained(out)                       # packed weights + config.json["quantization_config"]
    again = WanTransformer3DModel.from_pretrained(out)   # reload: no quantization_config argument needed

Also `PipelineQuantizationConfig(quant_mapping={"transformer": QVDiTConfig(...)})` for a whole pipeline.

Loading full-precision weights, the quantizer swaps each selected linear for a `QLinear` as soon as its weight
(and bias) have streamed in, so peak memory is the quantized model plus one full-precision linear. Which linears:
the same selection as `qvdit.quantize_` (the model adapter's block linears, `skip`/`include` globs), minus the
model's `_keep_in_fp32_modules`. Loading a saved quantized folder, the QLinears are rebuilt empty from the stored
config and their tensors are taken out of the state dict before diffusers would cast them to `torch_dtype`
(scales, zeros and TQE parameters stay float32, packed codes uint8/int8, bias its own dtype).

Importing this module imports diffusers and registers the classes in
`diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING` / `AUTO_QUANTIZATION_CONFIG_MAPPING`; `import qvdit` arranges that
import for whenever diffusers' quantizer registry is first imported (`qvdit/_diffusers_hook.py`), so the mapping
is there for `from_pretrained` of a saved folder without `import qvdit` paying for diffusers.
"""
from __future__ import annotations

import warnings
from enum import Enum

import torch
from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import FORMAT_VERSION, CheckpointError
from .config import QuantConfig
from .models import find_adapter
from .qlinear import QLinear
from .quantize import _parent, attach_frames, qlinears, select_linears

QUANT_METHOD = "qvdit"
_FIELDS = ("w_bits", "a_bits", "tqe", "backend", "skip", "include", "overrides", "seed")
_QLINEAR_TENSORS = ("w_packed", "w_scale", "w_zero", "bias", "alpha", "beta", "gate")


class QVDiTMethod(str, Enum):
    """diffusers reads `quant_method.value`, so the method is a str Enum (as diffusers' own QuantizationMethod)."""

    QVDIT = QUANT_METHOD


class QVDiTConfig(QuantizationConfigMixin):
    """The diffusers face of `qvdit.QuantConfig`: same fields, same validation, JSON-serializable.

    w_bits 3|4|8, a_bits 6|8, tqe, backend, skip / include (glob patterns of module names), overrides
    (glob -> {w_bits, a_bits, tqe}), seed. `to_quant_config()` gives the QuantConfig.
    """

    def __init__(self, w_bits: int = 4, a_bits: int = 8, tqe: bool = True, backend: str = "auto", skip=(),
                 include=(), overrides: dict | None = None, seed: int = 0, **kwargs):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for QVDiTConfig, got {method!r}")
        if kwargs:
            raise TypeError(f"QVDiTConfig got unexpected arguments {sorted(kwargs)} (fields: {list(_FIELDS)})")
        self.quant_method = QVDiTMethod.QVDIT
        q = QuantConfig(w_bits=w_bits, a_bits=a_bits, tqe=tqe, backend=backend, skip=skip, include=include,
                        overrides=dict(overrides or {}), seed=seed)  # validates every field
        for name in _FIELDS:
            value = getattr(q, name)
            setattr(self, name, list(value) if isinstance(value, tuple) else value)  # lists: JSON round trip

    def to_quant_config(self) -> QuantConfig:
        return QuantConfig(**{name: getattr(self, name) for name in _FIELDS})

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in _FIELDS}
        d["quant_method"] = QUANT_METHOD
        return d

    def to_diff_dict(self) -> dict:  # the mixin's __repr__ asks for it
        return self.to_dict()

    def __eq__(self, other):
        return isinstance(other, QVDiTConfig) and self.to_dict() == other.to_dict()


def _device(target) -> torch.device:
    return torch.device(f"cuda:{target}" if isinstance(target, int) else target)


class QVDiTQuantizer(DiffusersQuantizer):
    """Quantize on load (full-precision checkpoint) or rebuild (a folder saved by `save_pretrained`)."""

    use_keep_in_fp32_modules = True
    requires_calibration = False
    required_packages = None

    def __init__(self, quantization_config: QVDiTConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not isinstance(quantization_config, QVDiTConfig):
            raise TypeError(f"quantization_config must be a QVDiTConfig, got {type(quantization_config).__name__}")
        self.qconfig = quantization_config.to_quant_config()
        self._pending: dict[str, str] = {}  # linear name -> row kind, until its full-precision tensors arrive
        self._rebuilt: dict[str, QLinear] = {}  # empty QLinears waiting for their saved tensors
        self._device_map = None
        self._model = None
        self._bar = None

    # ------------------------------------------------------------------ environment
    def validate_environment(self, *args, **kwargs):
        if kwargs.get("device_map") is not None:
            self._device_map = kwargs["device_map"]

    def _target_device(self, name: str) -> torch.device:
        if self._device_map is None:
            return torch.device("cpu")
        from diffusers.models.model_loading_utils import _determine_param_device  # diffusers.models: import late

        return _device(_determine_param_device(name, self._device_map))

    # ------------------------------------------------------------------ before loading (model on meta)
    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        self._model = model
        keep = set(keep_in_fp32_modules or ())
        chosen = [(n, m) for n, m in select_linears(model, self.qconfig, allow_meta=True)
                  if not keep.intersection(n.split("."))]
        if not chosen:
            raise ValueError(f"QVDiTConfig selected no nn.Linear in {type(model).__name__} (check skip/include)")
        adapter = find_adapter(model)
        if adapter is None and self.qconfig.tqe:
            warnings.warn(f"{type(model).__name__} has no qvdit frame adapter: every nn.Linear is quantized and every "
                          "token uses frame 0's TQE gate", stacklevel=2)
        for name, linear in chosen:
            row_kind = adapter.row_kind(name) if adapter is not None else "video"
            if self.pre_quantized:
                layer = self.qconfig.for_module(name)
                q = QLinear(linear.in_features, linear.out_features, linear.bias is not None, w_bits=layer.w_bits,
                            a_bits=layer.a_bits, tqe=layer.tqe, backend=self.qconfig.backend, row_kind=row_kind,
                            device="meta", name=name)
                parent, child = _parent(model, name)
                setattr(parent, child, q)
                self._rebuilt[name] = q
            else:
                self._pending[name] = row_kind
        if self._pending:
            self._bar = tqdm(total=len(self._pending), desc=f"qvdit {self.qconfig.name}", unit="linear",
                             disable=None, leave=False)
        model.config.quantization_config = self.quantization_config

    # ------------------------------------------------------------------ quantize on load
    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return module_name in self._pending and tensor_name in ("weight", "bias")

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict=None,
                               unexpected_keys=None, **kwargs):
        """Hold the streamed full-precision tensor; once the linear has all of them, swap in its QLinear."""
        module_name, _, tensor_name = param_name.rpartition(".")
        linear = model.get_submodule(module_name)
        linear._parameters[tensor_name] = nn.Parameter(param_value.to(_device(target_device)), requires_grad=False)
        if any(p.is_meta for p in linear.parameters(recurse=False)):
            return
        q = QLinear.from_linear(linear, self.qconfig, name=module_name, row_kind=self._pending.pop(module_name))
        parent, child = _parent(model, module_name)
        setattr(parent, child, q)
        if self._bar is not None:
            self._bar.update()

    # ------------------------------------------------------------------ reload of a saved folder
    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if self.pre_quantized:
            for path in checkpoint_files or ():
                if not str(path).endswith(".safetensors"):
                    continue
                with safe_open(str(path), framework="pt") as f:
                    version = (f.metadata() or {}).get("qvdit_format_version")
                if version is not None and version != FORMAT_VERSION:
                    raise CheckpointError(f"{path}: qvdit format version {version!r} is not supported "
                                          f"(this qvdit reads {FORMAT_VERSION!r})")
        return loaded_keys

    def maybe_update_state_dict(self, state_dict):
        """Take the QLinear tensors out before diffusers casts floating tensors to torch_dtype."""
        if not self._rebuilt:
            return state_dict
        for key in [k for k in state_dict if k.rpartition(".")[0] in self._rebuilt]:
            module_name, _, tensor_name = key.rpartition(".")
            tensor = state_dict.pop(key)
            self._assign(self._rebuilt[module_name], module_name, tensor_name, tensor)
        return state_dict

    def _assign(self, q: QLinear, module_name: str, tensor_name: str, tensor: torch.Tensor):
        key = f"{module_name}.{tensor_name}"
        if tensor_name not in _QLINEAR_TENSORS:
            raise CheckpointError(f"{key}: not a tensor of a qvdit QLinear (expected one of {_QLINEAR_TENSORS})")
        old = getattr(q, tensor_name)
        if old is None:
            raise CheckpointError(f"{key}: the checkpoint has it but the config builds {module_name} without it "
                                  f"(tqe={q.tqe}, bias={q.bias is not None}): config.json does not match the weights")
        # the gate's length is the calibrated frame count + 1, known only from the file
        if tensor_name != "gate" and tuple(tensor.shape) != tuple(old.shape):
            raise CheckpointError(f"{key}: shape {list(tensor.shape)} in the checkpoint, {list(old.shape)} expected")
        if tensor_name in ("w_packed", "w_scale", "w_zero") and tensor.dtype != old.dtype:
            raise CheckpointError(f"{key}: dtype {tensor.dtype} in the checkpoint, {old.dtype} expected")
        value = tensor.to(self._target_device(key))
        if tensor_name in q._parameters:
            q._parameters[tensor_name] = nn.Parameter(value, requires_grad=False)
        else:
            q._buffers[tensor_name] = value

    # ------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._bar is not None:
            self._bar.close()
        if self._pending:
            raise CheckpointError(f"the checkpoint lacks the weights of {len(self._pending)} selected linears, e.g. "
                                  f"{sorted(self._pending)[:3]}")
        empty = [f"{n}.{t}" for n, q in self._rebuilt.items() for t, v in
                 list(q.named_buffers(recurse=False)) + list(q.named_parameters(recurse=False)) if v.is_meta]
        if empty:
            raise CheckpointError(f"the checkpoint lacks {len(empty)} quantized tensors, e.g. {empty[:3]}: it does "
                                  "not match its config.json quantization_config")
        attach_frames(model, list(qlinears(model).values()))
        model._qvdit_config = self.qconfig
        self._rebuilt = {}
        return model

    # ------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        meta = {"qvdit_format_version": FORMAT_VERSION, "qvdit_config": self.qconfig.to_json()}
        return state_dict, (meta if safe_serialization else {})

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False  # calibration trains TQE parameters through qvdit.calibration, not through diffusers

    @property
    def is_compileable(self) -> bool:
        return True


AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QVDiTQuantizer
AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QVDiTConfig
