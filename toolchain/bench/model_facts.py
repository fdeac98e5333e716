"""What the bench needs to know about a model file, read from its headers (no weights loaded).

For each format: parameter count, weight bytes, the bytes one decode step reads (roofline),
and the shape of the KV cache (memory budget). Imports neither torch nor transformers.

Bytes read per decoded token: every weight matrix is read once per token, except the input
embedding, of which only the token's own row is read. With tied embeddings the same table is
also the output layer, so it is read whole.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from toolchain.formats import Artifact
from toolchain.models.gguf_header import read_gguf_header

# --------------------------------------------------------------------------- GGUF


def bytes_per_token(tensors: list[dict], input_embedding: str | None, output: str | None, vocab: int) -> int:
    """Weight bytes one decode step reads: all tensors, but only one row of an untied input embedding.

    `output` is the output matrix's name, or None when embeddings are tied (the input table is
    the output layer and is read whole).
    """
    total = sum(t["n_bytes"] for t in tensors)
    names = {t["name"]: t for t in tensors}
    if output is not None and output in names and input_embedding in names:
        emb = names[input_embedding]["n_bytes"]
        total -= emb - emb // vocab
    return total


def gguf_facts(path: str | Path) -> dict:
    meta, infos = read_gguf_header(path)
    tensors = [dataclasses.asdict(t) for t in infos]
    arch = meta.get("general.architecture", "llama")
    names = {t["name"] for t in tensors}
    heads = int(meta[f"{arch}.attention.head_count"])
    width = int(meta[f"{arch}.embedding_length"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", width // heads))
    emb = next(t for t in tensors if t["name"] == "token_embd.weight")
    vocab = int(meta.get(f"{arch}.vocab_size", emb["shape"][-1]))
    tied = "output.weight" not in names
    return {
        "arch": arch,
        "size_label": meta.get("general.size_label"),
        "n_params": sum(t["n_elements"] for t in tensors),
        "weights_bytes": sum(t["n_bytes"] for t in tensors),
        "bytes_per_token": bytes_per_token(tensors, "token_embd.weight", None if tied else "output.weight", vocab),
        "bytes_per_token_exact": True,
        "tied_embeddings": tied,
        "n_layers": int(meta[f"{arch}.block_count"]),
        "n_kv_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim_k": head_dim,
        "head_dim_v": int(meta.get(f"{arch}.attention.value_length", head_dim)),
        "kv_bytes_per_elem": 2,  # llama.cpp's default KV cache type is f16 (what the runner uses)
    }


# --------------------------------------------------------------------------- ONNX

_ONNX_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _onnx_tensors(model_file: Path) -> list[dict] | None:
    """Initializers (name, bytes, consumers) via the `onnx` package, or None where it is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    from toolchain.runtime.onnx_decoder import load_graph

    graph = load_graph(model_file).graph
    used_by: dict[str, set] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            # Gather's input 0 is the table it picks rows from
            used_by.setdefault(name, set()).add(node.op_type if (node.op_type != "Gather" or i == 0) else "index")
    out = []
    for init in graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        out.append(
            {
                "name": init.name,
                "shape": list(init.dims),
                "n_elements": n,
                "n_bytes": n * _ONNX_ELEM_BYTES.get(init.data_type, 4),
                "used_by": used_by.get(init.name, set()),
            }
        )
    return out


def onnx_facts(path: str | Path) -> dict:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    model_file = folder / "model.onnx"
    info = json.loads((folder / "model_info.json").read_text())
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}.get(info.get("dtype", "float32"), 4)
    files = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    tensors = _onnx_tensors(model_file)
    if tensors is None:
        # no `onnx` package (device mode): the files' size, i.e. every weight read whole
        n_params, weights, per_token, exact, tied = files // elem, files, files, False, None
    else:
        weights = sum(t["n_bytes"] for t in tensors)
        n_params = sum(t["n_elements"] for t in tensors)
        vocab = int(info["vocab_size"])
        # an embedding table used only by Gather is read one row per token; one that a MatMul
        # also uses (tied embeddings) is read whole
        gathered = [t for t in tensors if t["used_by"] == {"Gather"} and vocab in t["shape"]]
        per_token = weights - sum(t["n_bytes"] - t["n_bytes"] // vocab for t in gathered)
        exact, tied = True, not gathered
    heads = int(info["num_attention_heads"])
    head_dim = int(info.get("head_dim") or int(info["hidden_size"]) // heads)
    return {
        "arch": info.get("model_type", "unknown"),
        "size_label": None,
        "n_params": n_params,
        "weights_bytes": weights,
        "bytes_per_token": per_token,
        "bytes_per_token_exact": exact,
        "tied_embeddings": tied,
        "n_layers": int(info["num_layers"]),
        "n_kv_heads": int(info.get("num_key_value_heads", heads)),
        "head_dim_k": head_dim,
        "head_dim_v": head_dim,
        "kv_bytes_per_elem": elem,  # the exported graph keeps its KV cache in the model dtype
    }


# --------------------------------------------------------------------------- HF safetensors dir

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _safetensors_tensors(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            out.append(
                {
                    "name": name,
                    "shape": t["shape"],
                    "n_elements": n,
                    "dtype": t["dtype"],
                    "n_bytes": t["data_offsets"][1] - t["data_offsets"][0],
                }
            )
    return out


def hf_facts(path: str | Path) -> dict:
    folder = Path(path)
    cfg = json.loads((folder / "config.json").read_text())
    tensors = _safetensors_tensors(folder)
    if not tensors:
        raise ValueError(f"{folder}: no *.safetensors weights")
    names = {t["name"] for t in tensors}
    emb = next((t["name"] for t in tensors if t["name"].endswith("embed_tokens.weight")), None)
    tied = "lm_head.weight" not in names
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    dtype = max(tensors, key=lambda t: t["n_bytes"])["dtype"]  # the weights' dtype: the largest tensor's
    return {
        "arch": cfg.get("model_type", "unknown"),
        "size_label": None,
        "n_params": sum(t["n_elements"] for t in tensors),
        "weights_bytes": sum(t["n_bytes"] for t in tensors),
        "bytes_per_token": bytes_per_token(tensors, emb, None if tied else "lm_head.weight", int(cfg["vocab_size"])),
        "bytes_per_token_exact": emb is not None,
        "tied_embeddings": tied,
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim_k": head_dim,
        "head_dim_v": head_dim,
        "kv_bytes_per_elem": _ST_BYTES.get(dtype, 4),  # torch keeps the KV cache in the weights' dtype
    }


def model_facts(model: Artifact) -> dict:
    """Facts for a model entry {"format": gguf|onnx|hf, "path": ...}."""
    fmt = model["format"]
    if fmt == "gguf":
        return gguf_facts(model["path"])
    if fmt == "onnx":
        return onnx_facts(model["path"])
    if fmt == "hf":
        return hf_facts(model["path"])
    raise ValueError(f"unknown model format {fmt!r}")
