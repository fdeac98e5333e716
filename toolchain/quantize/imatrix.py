"""Importance matrix: how much each input channel of each matmul weight matters, measured on the
run's own data, in llama.cpp's format, for llama.cpp's quantizer.

For every linear layer, llama.cpp's `llama-imatrix` accumulates the sum of squared input
activations per input column (`<tensor>.in_sum2`) and the number of rows seen (`<tensor>.counts`);
the quantizer weighs each weight's rounding error by in_sum2 / counts. We measure the same
thing in torch with forward hooks on the HF model (the GGUF's tensors are the same matrices; row
permutations, e.g. llama's q/k, leave the input columns as they are) and write it as llama.cpp's
GGUF imatrix file, which its tools read too. A tied output head is `token_embd.weight` there.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from toolchain.errors import UserError
from toolchain.fileio import atomic_path


def collect(model_dir: str | os.PathLike, rows) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean squared input activation per input column} over `rows` [N, L] token ids."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolchain.models.registry import get_arch

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch = get_arch(config.model_type)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        hf = f"{name}.weight"
        gguf_name = "token_embd.weight" if tied and name == "lm_head" else tmap.get_name(hf, try_suffixes=(".weight",))
        if gguf_name is None:
            continue

        def hook(_m, args, key=gguf_name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i in range(len(rows)):
                model(input_ids=rows[i : i + 1])
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sorted(sums)}


def measure(model_dir: str | os.PathLike, rows, dataset: str, out_file: str | os.PathLike) -> tuple[dict, dict]:
    """collect() on `rows`, kept as llama.cpp's imatrix file `out_file`, read back for the quantizer."""
    values = collect(model_dir, rows)
    return read(write(out_file, values, len(rows), int(rows.shape[1]), dataset))


# calibration rows the importance matrix is not measured on, that decide per type whether it helps
JUDGE_ROWS = 4


def measure_holding_out(model_dir: str | os.PathLike, rows, dataset: str, out_file: str | os.PathLike):
    """`measure` on all but the last JUDGE_ROWS rows (fewer, or none, when there are few);
    returns (values, facts, the rows held out as token lists)."""
    n_held = min(JUDGE_ROWS, len(rows) // 2)
    values, facts = measure(model_dir, rows[: len(rows) - n_held], dataset, out_file)
    return values, facts, [[int(t) for t in r] for r in rows[len(rows) - n_held :]]


def write(path: str | os.PathLike, imatrix: dict[str, np.ndarray], chunks: int, chunk_size: int, dataset: str) -> Path:
    """llama.cpp's GGUF imatrix file: per tensor `.in_sum2` (here mean * count) and `.counts`."""
    import gguf

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        n = float(chunks * chunk_size)
        for name, mean_sq in imatrix.items():
            w.add_tensor(f"{name}.in_sum2", (mean_sq * n).astype(np.float32))
            w.add_tensor(f"{name}.counts", np.array([n], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(imatrix as llama.cpp's quantizer takes it: in_sum2 / counts, facts) from a GGUF imatrix file."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise UserError(f"imatrix file not found: {p}")
    try:
        r = gguf.GGUFReader(p)
    except Exception as e:  # not a GGUF at all
        raise UserError(f"{p} is not a GGUF imatrix file ({e}); make one with `toolchain imatrix`") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            cnt = tensors.get(f"{base}.counts")
            if cnt is None or not cnt.size or cnt[0] <= 0:
                raise UserError(f"{p}: {base} has sums but no counts; it is not a complete imatrix file")
            out[base] = sums / float(cnt[0])
    if not out:
        raise UserError(f"{p} holds no importance data (no <tensor>.in_sum2 tensors)")
    field = r.fields.get("imatrix.chunk_count")
    chunks = int(field.contents()) if field is not None else 0
    return out, {"entries": len(out), "chunks": chunks, "file": p.name}


def as_c_array(llama_cpp, imatrix: dict[str, np.ndarray]):
    """A NULL-terminated llama_model_imatrix_data array and what keeps its memory alive."""
    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        name_b = name.encode()
        keep += [data, name_b]
        arr[i].name = name_b
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(imatrix)].name = None
    return arr, keep


def kv_overrides(llama_cpp, facts: dict):
    """The keys llama-quantize writes into a GGUF quantized with an imatrix (empty-key terminated)."""
    items = [
        ("quantize.imatrix.file", "str", facts.get("file", "")),
        ("quantize.imatrix.dataset", "str", facts.get("dataset", "")),
        ("quantize.imatrix.entries_count", "int", facts.get("entries", 0)),
        ("quantize.imatrix.chunks_count", "int", facts.get("chunks", 0)),
    ]
    arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()
    for i, (key, kind, value) in enumerate(items):
        arr[i].key = key.encode()
        if kind == "str":
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = str(value).encode()[:127]
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = int(value)
    arr[len(items)].key = b""
    return arr
