"""What a model path on disk is: the Artifact record of a .gguf file, an ONNX folder or an HF directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolchain.errors import UserError
from toolchain.formats import Artifact


def describe_model(path: str | os.PathLike) -> Artifact:
    """A model entry {format, quant, path, bytes} for a .gguf file, an ONNX folder or an HF directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        quant = path.stem.split("model-")[-1] if path.stem.startswith("model-") else "unknown"
        return {"format": "gguf", "quant": quant, "path": str(path), "bytes": path.stat().st_size}
    if path.suffix == ".onnx" or (path / "model.onnx").is_file():
        f = path / "model.onnx" if path.is_dir() else path
        size = sum(p.stat().st_size for p in f.parent.glob(f.name + "*"))  # + external weights
        info = f.parent / "model_info.json"  # fp16/int8/int4 exports say so there
        quant = json.loads(info.read_text()).get("precision", "fp32") if info.is_file() else "fp32"
        return {"format": "onnx", "quant": quant, "path": str(f), "bytes": size}
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        dtype = json.loads((path / "config.json").read_text()).get("dtype") or "fp32"
        quant = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        return {"format": "hf", "quant": quant, "path": str(path), "bytes": size}
    raise UserError(
        f"{path}: expected a .gguf file or an ONNX folder (holding model.onnx), "
        "or an HF model directory (config.json + *.safetensors)"
    )


def describe_teacher(teacher, adapter: str | None, finetuned: bool) -> dict:
    """What a run records of its teacher (a loaded model): provenance, size, shape."""
    from toolchain.models.load import count_params

    params = count_params(teacher.model)
    return {
        "name": teacher.meta.get("name"),
        "source": teacher.meta.get("source"),
        "license": teacher.meta.get("license"),
        "params": params,
        "bytes": params * 4,
        "layers": teacher.model.config.num_hidden_layers,
        "adapter": adapter,
        "finetuned": finetuned,
    }
