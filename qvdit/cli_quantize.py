"""`qvdit quantize SRC DST`: a diffusers model folder (full precision) -> a quantized folder.

    qvdit quantize ./Wan2.1-T2V-1.3B-Diffusers ./wan-w3a6 --w-bits 3 --a-bits 6      # a pipeline: its transformer/
    qvdit quantize ./my-transformer ./my-transformer-w4a8 --device cuda

SRC is a model folder (config.json with diffusers' `_class_name`, plus weights) or a pipeline folder
(model_index.json; the model is read from `--subfolder`, `transformer` by default). The model is loaded with
`from_pretrained(..., quantization_config=QVDiTConfig(...))` (each selected linear is quantized as its weights stream
in) and written with `save_pretrained`, so `<Class>.from_pretrained(DST)` reloads it with no further argument.
"""
from __future__ import annotations

import json
import os

import torch

from .cli import CLIError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON: {exc}") from None


def resolve_model_folder(src: str, subfolder: str | None) -> tuple[str, type, dict]:
    """(folder holding config.json + weights, diffusers model class, config) for SRC, or CLIError saying why not."""
    if not os.path.exists(src):
        raise CLIError(f"SRC {src!r} does not exist")
    if not os.path.isdir(src):
        raise CLIError(f"SRC {src!r} is a file; give the folder a diffusers model was saved to (save_pretrained)")
    folder = src
    if subfolder:
        folder = os.path.join(src, subfolder)
        if not os.path.isdir(folder):
            raise CLIError(f"SRC {src!r} has no subfolder {subfolder!r}")
    elif not os.path.isfile(os.path.join(src, "config.json")) and os.path.isfile(os.path.join(src, "model_index.json")):
        folder = os.path.join(src, "transformer")
        if not os.path.isdir(folder):
            raise CLIError(f"SRC {src!r} is a pipeline folder without a transformer/ subfolder: pass --subfolder NAME")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"{folder!r} has no config.json: not a diffusers model folder")
    config = _read_json(config_path)
    name = config.get("_class_name")
    if not name:
        raise CLIError(f"{config_path} has no _class_name: not written by a diffusers model's save_pretrained")
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CLIError(f"{config_path}: _class_name {name!r} is not a model class of diffusers {diffusers.__version__}")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise CLIError(f"{folder!r} is already quantized (quant_method {method!r}); give the full-precision folder")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(folder)):
        raise CLIError(f"{folder!r} has a config.json but no weights (*.safetensors or *.bin)")
    return folder, cls, config


def check_destination(dst: str, overwrite: bool) -> None:
    if os.path.isfile(dst):
        raise CLIError(f"DST {dst!r} is a file; give a folder to write the quantized model to")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise CLIError(f"DST {dst!r} exists and is not empty (pass --overwrite to write into it)")


def quantize_folder(src, dst, *, subfolder=None, w_bits=4, a_bits=8, tqe=True, skip=(), include=(),
                    dtype="bfloat16", device="cpu", overwrite=False) -> dict:
    """Quantize SRC into DST; returns a summary dict (also what the command prints)."""
    from . import qlinears, weight_bytes
    from .diffusers_quantizer import QVDiTConfig

    if dtype not in DTYPES:
        raise CLIError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder, cls, _ = resolve_model_folder(src, subfolder)
    check_destination(dst, overwrite)
    try:
        config = QVDiTConfig(w_bits=w_bits, a_bits=a_bits, tqe=tqe, skip=list(skip), include=list(include))
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    print(f"loading {cls.__name__} from {folder} and quantizing to {config.to_quant_config().name} on {device}")
    model = cls.from_pretrained(folder, quantization_config=config, torch_dtype=DTYPES[dtype],
                                device_map=None if device == "cpu" else device)
    layers = qlinears(model)
    q_bytes, bf16_bytes = weight_bytes(model)
    model.save_pretrained(dst)
    summary = {"class": cls.__name__, "source": folder, "destination": dst, "setting": config.to_quant_config().name,
               "quantized_linears": len(layers), "linear_bytes": q_bytes, "linear_bytes_bf16": bf16_bytes,
               "ratio_vs_bf16": q_bytes / bf16_bytes}
    print(f"{len(layers)} linears quantized: {q_bytes / 2**20:.1f} MiB vs {bf16_bytes / 2**20:.1f} MiB in bf16 "
          f"({summary['ratio_vs_bf16']:.3f}x); wrote {dst}")
    print(f"reload with: {cls.__name__}.from_pretrained({dst!r})  (after `import qvdit`)")
    return summary


def _run(args) -> None:
    quantize_folder(args.src, args.dst, subfolder=args.subfolder, w_bits=args.w_bits, a_bits=args.a_bits,
                    tqe=not args.no_tqe, skip=args.skip, include=args.include, dtype=args.dtype,
                    device=args.device, overwrite=args.overwrite)


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a diffusers model folder into a new folder (save_pretrained format)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="diffusers model folder (config.json + weights) or pipeline folder")
    p.add_argument("dst", help="folder to write the quantized model to")
    p.add_argument("--subfolder", default=None, help="model subfolder of a pipeline folder (default: transformer)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits: 3, 4 or 8 (default 4)")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits: 6 or 8 (default 8)")
    p.add_argument("--no-tqe", action="store_true", help="no token-aware quantization estimator")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="keep matching modules in full precision")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="also quantize matching linears (e.g. proj_out)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the full-precision parts (default bfloat16)")
    p.add_argument("--device", default="cpu", help="where to load and quantize (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    p.set_defaults(func=_run)
