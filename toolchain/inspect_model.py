"""`toolchain inspect PATH`: what a GGUF file, HF directory, ONNX folder or run directory holds."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from toolchain.errors import UserError


def inspect_gguf(path: Path) -> dict:
    from toolchain.models.file_checks import open_gguf

    r = open_gguf(path)
    meta = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            v = f.contents()
        except Exception:  # an unusual field type must not stop the listing
            v = "?"
        if isinstance(v, list) and len(v) > 8:
            v = f"[{len(v)} items]"
        elif isinstance(v, str) and len(v) > 200:
            v = v[:200] + f"... ({len(v)} chars)"
        meta[key] = v
    types = collections.Counter(t.tensor_type.name for t in r.tensors)
    bytes_by_type: collections.Counter[str] = collections.Counter()
    for t in r.tensors:
        bytes_by_type[t.tensor_type.name] += int(t.n_bytes)
    return {
        "kind": "gguf",
        "path": str(path),
        "bytes": path.stat().st_size,
        "architecture": meta.get("general.architecture"),
        "tensors": len(r.tensors),
        "params": int(sum(int(t.n_elements) for t in r.tensors)),
        "tensor_types": dict(types),
        "bytes_by_type": dict(bytes_by_type),
        "metadata": meta,
        # one line per tensor: name, type, shape (ggml order: fastest-varying first), bytes
        "tensor_list": [f"{t.name} {t.tensor_type.name} {list(map(int, t.shape))} {int(t.n_bytes)}" for t in r.tensors],
    }


def inspect_hf(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    meta = path / "toolchain.json"
    return {
        "kind": "hf",
        "path": str(path),
        "config": {k: cfg.get(k) for k in keys},
        "weights_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
        "provenance": json.loads(meta.read_text()) if meta.is_file() else None,
    }


def inspect_onnx(path: Path) -> dict:
    from toolchain.runtime.onnx_decoder import load_graph

    model_file = path / "model.onnx" if path.is_dir() else path
    m = load_graph(model_file)
    info_file = model_file.parent / "model_info.json"
    return {
        "kind": "onnx",
        "path": str(model_file),
        "opset": [o.version for o in m.opset_import],
        "inputs": [i.name for i in m.graph.input],
        "outputs": [o.name for o in m.graph.output],
        "nodes": len(m.graph.node),
        "info": json.loads(info_file.read_text()) if info_file.is_file() else None,
    }


def inspect_bundle(path: Path) -> dict:
    """An app bundle, after checking every file against its manifest (a changed byte: an error)."""
    from toolchain.runtime.bundle import read_manifest

    m = read_manifest(path, verify=True)
    return {
        "kind": "bundle",
        "path": str(path),
        "checksums": f"all {len(m['files'])} files match manifest.json",
        "name": m["name"],
        "models": [
            {k: x[k] for k in ("format", "quant", "path", "bytes", "runtime", "memory", "task_score")}
            for x in m["models"]
        ],
        "generation": m["generation"],
        "provenance": {k: v for k, v in m["provenance"].items() if k != "config"},
        "calibration": m.get("calibration"),
        "bytes": sum(f["bytes"] for f in m["files"]),
    }


def inspect_path(path_str: str) -> dict:
    path = Path(path_str)
    if not path.exists():
        raise UserError(f"path not found: {path}")
    if path.is_dir() and (path / "manifest.json").is_file():
        return inspect_bundle(path)
    if path.is_file() and path.suffix == ".gguf":
        return inspect_gguf(path)
    if path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file()):
        return inspect_onnx(path)
    if path.is_dir() and (path / "config.json").is_file():
        return inspect_hf(path)
    if path.is_dir() and (path / "report.json").is_file():
        return {"kind": "run", **json.loads((path / "report.json").read_text())}
    raise UserError(f"{path}: not a GGUF file, ONNX model, HF model directory or run directory")
