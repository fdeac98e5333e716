"""Names every layer shares: the GGUF types we write, the ONNX export's file names and
precisions, the label index losses ignore. Pure names and their validation, no heavy imports,
so config validation and the runtimes can use them without importing a stage.
"""

from __future__ import annotations

import re
from typing import TypedDict

from toolchain.errors import UserError


class _ArtifactKeys(TypedDict):
    format: str  # gguf | onnx | hf
    quant: str  # GGUF type (F16, Q8_0, ...), ONNX precision (fp32, int4, ...) or HF dtype
    path: str  # the .gguf file, the ONNX folder's model.onnx, or the HF directory
    bytes: int  # on disk, external ONNX weights included


class Artifact(_ArtifactKeys, total=False):
    """One model file (or ONNX folder) as the stages hand it on: export -> verify -> bench -> report.

    A plain dict underneath, so it goes into report.json as it is; the keys above are always
    there, these only where the stage that made it knows them."""

    sha256: str  # of the file; for ONNX, of the listing of its files' digests
    seconds: float  # time the export took
    files_sha256: dict[str, str]  # ONNX: each file's digest
    variants: list[Artifact]  # ONNX fp32: the fp16/int8/int4 folders made from it
    exporter: str
    fusions: dict[str, int]
    imatrix: dict  # GGUF: whether the importance matrix was kept, and the KLDs that decided it


# labels at this index carry no loss (prompt tokens, padding): torch's cross_entropy default
IGNORE_INDEX = -100

# the ONNX export's folder: graph, external weights, and the facts a decoder needs
ONNX_MODEL_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
ONNX_INFO_FILE = "model_info.json"
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")

# type name -> (tensor type for 2-D weights, file type written in general.file_type)
PYTHON_TYPES = {
    "F32": ("F32", "ALL_F32"),
    "F16": ("F16", "MOSTLY_F16"),
    "BF16": ("BF16", "MOSTLY_BF16"),
    "Q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "Q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "Q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "Q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "Q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
LLAMA_CPP_TYPES = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_XS", "IQ2_XXS",
)  # fmt: skip
SUPPORTED_TYPES = tuple(PYTHON_TYPES) + LLAMA_CPP_TYPES
# types whose rounding an importance matrix weighs: llama.cpp's, and our writer's Q4_0/Q4_1/Q5_0/Q5_1
# (quantize/weighted.py; Q8_0 has too fine a grid for llama.cpp to weigh it either)
IMATRIX_TYPES = (*LLAMA_CPP_TYPES, "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# types llama.cpp will not make without an importance matrix (too few bits to round blindly)
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")


def check_type(name: str) -> str:
    if name not in SUPPORTED_TYPES:
        raise UserError(f"unknown GGUF type '{name}'; supported: {', '.join(SUPPORTED_TYPES)}")
    return name


# quantization-aware distillation: GGUF file types whose every tensor has an exact torch
# rounding (quantize/fake_quant.py), and the tensor types an override may give them; int4 is
# the ONNX int4 export's 4-bit blocks. Q4_K_M takes llama.cpp's per-tensor mix for the model
# (Q4_K, Q6_K, and its Q5_0/Q8_0 fallbacks for rows that do not split into 256) and is then
# written by our writer with our K-quant rounding (quantize/kquants.py).
QAT_GGUF_TYPES = ("Q4_0", "Q8_0", "Q4_K_M")
QAT_TYPES = (*QAT_GGUF_TYPES, "int4")
FAKE_QUANT_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "F16", "F32")
# GGUF file types trained through llama.cpp's per-tensor mix, and all file types whose QAD
# student keeps its latent weights (the export recomputes the codes)
QAT_MIX_TYPES = ("Q4_K_M",)
QAT_LATENT_TYPES = (*QAT_MIX_TYPES, "int4")

# tensor types a per-tensor override may name in a Python-written file
PYTHON_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def check_overrides(overrides: dict[str, str] | None, type_name: str) -> dict[str, str]:
    """Validate {tensor-name regex: tensor type} (llama-quantize's --tensor-type semantics:
    the first pattern found anywhere in the GGUF tensor name wins)."""
    import gguf

    overrides = dict(overrides or {})
    allowed = (
        PYTHON_TENSOR_TYPES
        if type_name in PYTHON_TYPES
        else tuple(t.name for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32", "I64", "F64"))
    )
    for pattern, t in overrides.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"tensor override pattern '{pattern}' is not a valid regex: {e}") from None
        if t not in allowed:
            where = "written in Python" if type_name in PYTHON_TYPES else "quantized by llama.cpp"
            raise UserError(
                f"tensor override '{pattern}={t}': {type_name} files are {where}; "
                f"allowed tensor types: {', '.join(allowed)}"
            )
    return overrides


def override_for(gguf_name: str, overrides: dict[str, str] | None) -> str | None:
    for pattern, t in (overrides or {}).items():
        if re.search(pattern, gguf_name):
            return t
    return None
