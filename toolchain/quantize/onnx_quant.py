"""fp32 ONNX decoder (export/onnx.py) -> fp16, int8 or int4 copies, for onnxruntime apps.

Every precision keeps the fp32 graph's app-facing inputs and outputs (names, fp32 dtypes, the
KV cache layout), so one runtime loop (runtime/onnx_decoder.py) runs them all.

- fp16: every weight and activation in float16, except what onnxruntime's fp16 converter
  must keep in fp32; graph inputs/outputs stay fp32 (Cast nodes at the edges). The CPU
  execution provider has few fp16 kernels and inserts casts around the rest, so fp16 is
  for GPU / NPU / web (WebGPU) apps and for halving the download: it is slower on CPU.
- int8 / int4: weight-only block quantization of the MatMul weights into onnxruntime's
  `MatMulNBits` (bits 8 or 4), symmetric, with `accuracy_level` 4 so the CPU kernel
  quantizes activations to int8 on the fly and uses integer dot products. Measured on
  SmolLM2 (benchmarks/onnx_speed.py), this beats the classic `quantize_dynamic` int8
  (DynamicQuantizeLinear + MatMulInteger), which was no faster than fp32 here.
  The output projection is quantized like the other MatMuls unless `keep_lm_head` is set.
  int4 also block-quantizes the token embedding table (Gather -> GatherBlockQuantized, 4-bit,
  block 32 along the hidden axis): the table is the largest tensor of small-vocabulary-heavy
  models (Gemma-3-270M: 671 of 1075 MB), so int4 without it was hardly smaller than int8.
  Measured on SmolLM2: 201 -> 105 MB, top-1 73.7% -> 73.0%, mean KL 0.376 -> 0.392.
  onnxruntime's quantizer has no 8-bit Gather, so int8 keeps the fp32 table.

Why plain round-to-nearest int4 (measured on SmolLM2, session 3 of issue 6): both bundled models
ship as 4-bit GGUFs (Q4_1, Q4_K_M), so their weights sit on per-block grids with a float
offset. HQQ's float zero points reproduce such a grid (weight error 0.2% vs 8.5% for RTN; top-1
98.3% vs 73.7%), but onnxruntime 1.32's CPU MatMulNBits runs float zero points on a slow path
(6.9 tok/s decode vs 65 for RTN int4 and 27 for fp32). Integer zero points cannot express the
offset: asymmetric RTN (72%) and onnxruntime's k_quant (71%) do no better than symmetric. On
continuous weights HQQ's edge is small (7.7% vs 8.2% error), so it is not offered.
"""

from __future__ import annotations

import logging
from pathlib import Path

from toolchain.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
# block of weights sharing one scale: 32 is llama.cpp's Q4_0/Q8_0 block, so int4/int8 errors
# compare with those GGUF types
BLOCK_SIZE = 32
# accuracy_level 4: int8 activations x n-bit weights with integer dot products on CPU
ACCURACY_LEVEL = 4


def check_precisions(precisions: list[str], where: str = "precisions") -> list[str]:
    """The list without duplicates, or a UserError naming the bad entry."""
    out: list[str] = []
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(f"{where}: unknown ONNX precision '{p}'; choose from {', '.join(PRECISIONS)}")
        if p not in out:
            out.append(p)
    return out


def _lm_head_nodes(model) -> list[str]:
    """Names of the MatMul nodes that produce the graph output `logits` (the output projection)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    # walk back through shape-only ops (Reshape/Cast) to the MatMul
    name, seen = "logits", 0
    while name in producers and seen < 8:
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm"):
            return [node.name]
        name, seen = node.input[0], seen + 1
    return []


def fold_weight_transposes(model) -> int:
    """Replace Transpose(initializer) -> MatMul by a transposed initializer; returns how many.

    With tied embeddings the exporter feeds the output projection as Transpose(embedding
    table): the quantizer only sees MatMuls whose weight is an initializer, so without this
    the largest matrix (vocab x hidden, ~20% of SmolLM2) would stay fp32 and dominate decode
    time. The embedding itself (a Gather) keeps its own fp32 table.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm not in (None, [1, 0]) or len(inits[node.input[0]].dims) != 2:
            continue
        if not all(c.op_type == "MatMul" for c in consumers.get(node.output[0], [])):
            continue
        weight = numpy_helper.to_array(inits[node.input[0]]).T.copy()
        model.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    return len(folded)


def _embedding_gathers(model) -> list[str]:
    """Gather nodes that look up `input_ids` in a constant 2-D table (the token embedding)."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids"
            and len(dims.get(n.input[0], [])) == 2]


def quantize_embedding(model, block_size: int = BLOCK_SIZE):
    """Token embedding -> GatherBlockQuantized (int4, symmetric, blocks along the hidden axis)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    names = _embedding_gathers(model)
    if not names:
        return model
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=4,
                                       op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, nodes_to_include=names,
                                 algo_config=cfg)
    # (it warns that it raises the opset to 21 for the int4 type; onnxruntime >= 1.20 runs it)
    return _process_quietly(quant, logging.ERROR)


def _process_quietly(quant, level: int):
    """Run an onnxruntime weight quantizer with its logger raised to `level`; the quantized model."""
    qlog = logging.getLogger("onnxruntime.quantization")
    old = qlog.level
    qlog.setLevel(level)
    try:
        quant.process()
    finally:
        qlog.setLevel(old)
    return quant.model.model


def _save(model, out_file: Path) -> None:
    import onnx

    out_file.parent.mkdir(parents=True, exist_ok=True)
    data = out_file.name + ".data"
    if (out_file.parent / data).exists():
        (out_file.parent / data).unlink()  # onnx appends to an existing external-data file
    onnx.save_model(model, str(out_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def to_fp16(src_file: Path, out_file: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src_file))
    # keep_io_types: the app feeds/reads fp32 as with every other precision
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    _save(model, out_file)


def _nbits_pass(model, bits: int, block_size: int, accuracy_level: int, symmetric: bool,
                exclude: list[str], include: list[str] | None = None):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                       bits=bits, op_types_to_quantize=("MatMul",))
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=exclude, nodes_to_include=include,
                                 algo_config=cfg)
    # the quantizer logs one INFO line per MatMul
    return _process_quietly(quant, logging.WARNING)


def to_nbits(src_file: Path, out_file: Path, bits: int, block_size: int = BLOCK_SIZE,
             accuracy_level: int = ACCURACY_LEVEL, keep_lm_head: bool = False, head_bits: int | None = None,
             symmetric: bool = True, quantize_embeddings: bool = True) -> None:
    """MatMul weights -> MatMulNBits with `bits`; the output projection with `head_bits`
    (default: the same), or left fp32 with `keep_lm_head`; at 4 bits also the token embedding
    unless `quantize_embeddings` is False."""
    import onnx

    model = onnx.load(str(src_file))
    head = _lm_head_nodes(model)
    if not keep_lm_head:
        fold_weight_transposes(model)
    head_bits = head_bits or bits
    separate_head = keep_lm_head or head_bits != bits
    model = _nbits_pass(model, bits, block_size, accuracy_level, symmetric, exclude=head if separate_head else [])
    if head and not keep_lm_head and head_bits != bits:
        model = _nbits_pass(model, head_bits, block_size, accuracy_level, symmetric, exclude=[], include=head)
    n = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
    if n == 0:
        raise UserError(f"{src_file}: no MatMul with a constant weight to quantize; is this an exported decoder?")
    if bits == 4 and quantize_embeddings:
        model = quantize_embedding(model, block_size)
    _save(model, out_file)


def to_int8_dynamic(src_file: Path, out_file: Path, keep_lm_head: bool = True) -> None:
    """The classic route (kept for comparison in benchmarks/onnx_speed.py): per-channel int8
    MatMul weights with activations quantized per call (DynamicQuantizeLinear + MatMulInteger)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src_file), load_external_data=False)
    exclude = _lm_head_nodes(model) if keep_lm_head else []
    quantize_dynamic(src_file, out_file, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=True)


def quantize_file(src_file: Path, out_file: Path, precision: str, keep_lm_head: bool = False) -> None:
    """Write `out_file` (+ `<name>.data`) in `precision` from the fp32 `src_file`."""
    if precision == "fp16":
        to_fp16(src_file, out_file)
    elif precision in BITS:
        to_nbits(src_file, out_file, BITS[precision], keep_lm_head=keep_lm_head)
    else:
        raise UserError(f"cannot quantize to '{precision}'; choose from fp16, int8, int4")
