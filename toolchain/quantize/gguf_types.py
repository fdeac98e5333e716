"""GGUF quantization types: which ones we write in Python and which go through llama.cpp.

Plain block types (Q8_0, Q4_0, ...) are produced by `gguf.quants` in numpy. K-quants have no
Python quantizer, so they are made from an F16 GGUF by llama.cpp's own `llama_model_quantize`
(through llama-cpp-python), which also applies llama.cpp's per-tensor mix (e.g. Q4_K_M keeps
some tensors at Q6_K) and falls back per tensor when a row is not a multiple of 256.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np

from toolchain.errors import UserError
from toolchain.fileio import atomic_path
from toolchain.formats import PYTHON_TYPES, check_overrides
from toolchain.native_output import captured_native_output

log = logging.getLogger(__name__)


def file_type(name: str):
    import gguf

    return gguf.LlamaFileType[PYTHON_TYPES[name][1] if name in PYTHON_TYPES else f"MOSTLY_{name}"]


def scaled_bytes(data: np.ndarray, scales: np.ndarray, tensor_type: str) -> np.ndarray:
    """Q4_0/Q8_0 blocks of `data` [rows, cols] under given scales [rows, cols / 32] (a student's
    learned scales, quantize.learn_scales), packed as ggml lays them out: the fp16 scale, then
    Q8_0's 32 int8 codes, or Q4_0's 16 bytes (code j + 8 in the low nibble, code j + 16 + 8 in
    the high one). The codes are fake_quant.scaled_codes', the ones the student trained with."""
    import torch

    from toolchain.quantize.fake_quant import scaled_codes
    from toolchain.quantize.weighted import pack_blocks

    codes, d = scaled_codes(torch.from_numpy(data), torch.from_numpy(scales), tensor_type)
    q, scale = codes.numpy().reshape(-1, codes.shape[-1]), d.numpy().reshape(-1)
    if tensor_type == "Q4_0":
        return pack_blocks(scale, (q + 8).astype(np.uint8), "Q4_0").reshape(data.shape[0], -1)
    head = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([head, q.astype(np.int8).view(np.uint8)], axis=-1).reshape(data.shape[0], -1)


def quantize_tensor(
    data: np.ndarray,
    type_name: str,
    tensor_type: str | None = None,
    importance: np.ndarray | None = None,
    scales: np.ndarray | None = None,
):
    """(array, GGMLQuantizationType) for one tensor under a Python-written file type.

    Vectors (norms, biases) stay F32 as llama.cpp's converter keeps them; a matrix whose rows
    do not split into whole quantization blocks falls back to F16. `tensor_type` (a
    per-tensor override, e.g. keep token_embd at Q8_0) replaces the file type's tensor type.
    `importance` (the tensor's importance-matrix column weights) weighs Q4_0/Q4_1/Q5_0/Q5_1 rounding.
    `scales` (a learned-scale student's, [rows, cols / 32]) give a Q4_0/Q8_0 tensor its block scales.
    Q4_K/Q6_K (a quantization-aware student's K-quant file) are our rounding (quantize/kquants.py).
    """
    import gguf
    from gguf.quants import quantize

    from toolchain.quantize.kquants import q4_k_bytes, q6_k_bytes
    from toolchain.quantize.weighted import WEIGHTED_TYPES, quantize_weighted

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1:
        return data, gguf.GGMLQuantizationType.F32
    tensor_type = tensor_type or PYTHON_TYPES[type_name][0]
    if tensor_type == "F32":
        return data, gguf.GGMLQuantizationType.F32
    if tensor_type == "F16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType[tensor_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    if scales is not None and tensor_type in ("Q4_0", "Q8_0"):
        return scaled_bytes(data, scales, tensor_type), qtype
    if tensor_type in ("Q4_K", "Q6_K"):
        pack = q4_k_bytes if tensor_type == "Q4_K" else q6_k_bytes
        return pack(data.reshape(-1, data.shape[-1])).reshape(*data.shape[:-1], -1), qtype
    if importance is not None and tensor_type in WEIGHTED_TYPES and data.ndim == 2:
        return quantize_weighted(data, importance, tensor_type), qtype
    return quantize(data, qtype), qtype


def _tensor_overrides(llama_cpp, overrides: dict[str, str]):
    """A NULL-terminated llama_model_tensor_override array (kept alive by the caller)."""
    import gguf

    arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, t) in enumerate(overrides.items()):
        arr[i].pattern = pattern.encode()
        arr[i].type = int(gguf.GGMLQuantizationType[t])
    arr[len(overrides)].pattern = None
    return arr


def llama_cpp_quantize(
    src_f16: str | os.PathLike,
    dst: str | os.PathLike,
    type_name: str,
    threads: int = 0,
    overrides: dict[str, str] | None = None,
    imatrix: tuple[dict, dict] | None = None,
) -> Path:
    """Quantize an F16/F32 GGUF to a K-quant or IQ type with llama.cpp; written atomically.

    `overrides` ({tensor-name regex: ggml type}) go to llama.cpp's own tensor-type overrides;
    `imatrix` ((importance per tensor, facts) from quantize.imatrix) weighs the rounding, and its
    facts are recorded in the file as llama-quantize records them."""
    from toolchain.formats import NEEDS_IMATRIX
    from toolchain.quantize.imatrix import as_c_array, kv_overrides

    if type_name in NEEDS_IMATRIX and imatrix is None:
        raise UserError(
            f"GGUF type {type_name} needs an importance matrix (too few bits to round without one): "
            "keep export.imatrix on (the default), or pass --imatrix FILE (make one with `toolchain imatrix`)"
        )
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"GGUF type {type_name} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise UserError(f"this llama-cpp-python build does not know GGUF type {type_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or (os.cpu_count() or 1)
    keep_alive = None
    if overrides:
        keep_alive = _tensor_overrides(llama_cpp, check_overrides(overrides, type_name))
        params.tt_overrides = ctypes.cast(keep_alive, type(params.tt_overrides))
    keep_imatrix = None
    if imatrix is not None:
        arr, held = as_c_array(llama_cpp, imatrix[0])
        kvs = kv_overrides(llama_cpp, imatrix[1])
        keep_imatrix = (arr, held, kvs)
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
        params.kv_overrides = ctypes.cast(kvs, type(params.kv_overrides))
    with atomic_path(dst) as tmp:
        with captured_native_output() as log_lines:
            rc = llama_cpp.llama_model_quantize(str(src_f16).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tail = " / ".join(log_lines[-3:])
            raise UserError(f"llama.cpp failed to quantize {src_f16} to {type_name} (return code {rc}): {tail}")
    del keep_alive, keep_imatrix  # the C arrays had to live until llama.cpp returned
    fallbacks = [line for line in log_lines if "fallback" in line and "required" in line]
    if fallbacks:
        # e.g. SmolLM2's 576-wide rows are not multiples of 256, so most K-quant tensors fall back
        log.warning("%s: %s", type_name, fallbacks[-1].split(":", 1)[-1].strip())
    return Path(dst)
