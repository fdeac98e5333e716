"""fp32 ONNX decoder (export/onnx.py) -> fp16, int8 or int4 copies, for onnxruntime apps.

Every precision keeps the fp32 graph's app-facing inputs and outputs (names, fp32 dtypes, the
KV cache layout), so one runtime loop (runtime/onnx_decoder.py) runs them all.

- fp16: every weight and activation in float16, except what onnxruntime's fp16 converter
  must keep in fp32; graph inputs/outputs stay fp32 (Cast nodes at the edges). The CPU
  execution provider has few fp16 kernels and inserts casts around the rest, so fp16 is
  for GPU / NPU / web (WebGPU) apps and for halving the download: it is slower on CPU.
- int8: weight-only block quantization of the MatMul weights into onnxruntime's `MatMulNBits`
  (8 bits, symmetric, round to nearest), with `accuracy_level` 4 so the CPU kernel quantizes
  activations to int8 on the fly and uses integer dot products. Measured on SmolLM2
  (benchmarks/onnx_speed.py), this beats the classic `quantize_dynamic` int8
  (DynamicQuantizeLinear + MatMulInteger): no faster at decode, and its per-tensor activation
  scales made it diverge (top-1 8%). A tied token embedding reads the output projection's 8-bit
  codes (GatherBlockQuantized), so the vocabulary table is stored once, not again in fp32.
- int4: the transformer blocks' MatMuls in 4 bits with a fitted float offset per block of 32
  (quantize/onnx_offsets.py), the output projection and the token embedding in 8 bits
  (symmetric round-to-nearest, as int8; one copy of the codes when they are tied) - the mix
  llama.cpp's Q4_K_M makes for these models (its Gemma-3-270M file keeps token_embd at Q8_0).
  The head skips the offset term, and the offset terms' own small products run in 8 bits: at
  SmolLM2 top-1 96.9% with an fp32 offset path and offsets on the head, 97.6% this way, and
  decode at 2 threads (one interleaved run) 40.7 tok/s against 43.4 this way (fp32 29.2).
  Measured (benchmarks/onnx_verify_figures.py):

  | int4 variant                                    | SmolLM2 top-1 / KL / MB | Gemma-3-270M top-1 / KL / MB |
  |-------------------------------------------------|-------------------------|------------------------------|
  | round-to-nearest, symmetric, 4-bit head + table | 73.0% / 0.392 / 105     | 84.8% / 0.264 / 275          |
  | fitted offsets, 4-bit head + table              | 88.4% / 0.050 / 126     | 86.8% / 0.125 / 330          |
  | fitted offsets, 8-bit head + table (unshared)   | 97.6% / 0.0039 / 154    | 90.0% / 0.094 / 498          |
  | the same, table shared, grid recovery           | 96.9% / 0.0033 / 123    | 90.6% / 0.083 / 309          |
  | head and offset products 8-bit RTN (default)    | 97.6% / 0.0032 / 112    | 91.3% / 0.081 / 280          |

  (Rows 2-3 come from experiment runs before the fit learnt to recover grids whose codes do not
  span 0..15 - Gemma's Q4_K tensors - and before sharing; rows 4-5 from the benchmark script.)

  Why offsets: both bundled models ship as 4/5-bit GGUFs whose blocks are "min + d * q", a float
  offset per block that integer zero points cannot express (asymmetric RTN and onnxruntime's
  k_quant: 71-72%). MatMulNBits' own float zero points would, but onnxruntime 1.32 runs them on
  a slow CPU path (6.9 tok/s decode against 27 for fp32). Most of Gemma's block weights are Q5_0,
  so 4 bits cannot be exact there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from toolchain.errors import UserError
from toolchain.formats import ONNX_PRECISIONS

log = logging.getLogger(__name__)

PRECISIONS = ONNX_PRECISIONS
BITS = {"int8": 8, "int4": 4}
# block of weights sharing one scale: 32 is llama.cpp's Q4_0/Q8_0 block, so int4/int8 errors
# compare with those GGUF types
BLOCK_SIZE = 32
# accuracy_level 4: int8 activations x n-bit weights with integer dot products on CPU
ACCURACY_LEVEL = 4
# int4's output projection and token embedding (see the module docstring's table)
INT4_HEAD_BITS = 8


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
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Gather"
        and len(n.input) == 2
        and n.input[1] == "input_ids"
        and len(dims.get(n.input[0], [])) == 2
    ]


def quantize_embedding(model, block_size: int = BLOCK_SIZE):
    """Token embedding -> GatherBlockQuantized (int4, symmetric, blocks along the hidden axis)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    names = _embedding_gathers(model)
    if not names:
        return model
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=4, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),)
    )
    quant = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True, nodes_to_include=names, algo_config=cfg
    )
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
    onnx.save_model(
        model,
        str(out_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=1024,
    )


def to_fp16(src_file: Path, out_file: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src_file))
    # keep_io_types: the app feeds/reads fp32 as with every other precision
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    _save(model, out_file)


def _nbits_pass(
    model,
    bits: int,
    block_size: int,
    accuracy_level: int,
    symmetric: bool,
    exclude: list[str],
    include: list[str] | None = None,
):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )
    quant = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=exclude,
        nodes_to_include=include,
        algo_config=cfg,
    )
    # the quantizer logs one INFO line per MatMul
    return _process_quietly(quant, logging.WARNING)


def to_nbits(
    src_file: Path,
    out_file: Path,
    bits: int,
    block_size: int = BLOCK_SIZE,
    accuracy_level: int = ACCURACY_LEVEL,
    keep_lm_head: bool = False,
    head_bits: int | None = None,
    symmetric: bool = True,
    quantize_embeddings: bool = True,
    offsets: bool = False,
    embed_bits: int = 4,
    head_offsets: bool = True,
    grid: str = "fit",
) -> None:
    """MatMul weights -> MatMulNBits with `bits`; the output projection with `head_bits`
    (default: the same), or left fp32 with `keep_lm_head`; at 4 bits also the token embedding
    unless `quantize_embeddings` is False. `offsets`: blocks get a fitted float offset
    (quantize/onnx_offsets.py) instead of onnxruntime's round-to-nearest; `grid` picks how the
    4-bit blocks are fitted (onnx_offsets.rewrite_matmuls)."""
    import onnx

    model = onnx.load(str(src_file))
    head = _lm_head_nodes(model)
    if not keep_lm_head:
        fold_weight_transposes(model)
    if offsets:
        model = _offset_pass(
            model,
            bits,
            block_size,
            accuracy_level,
            head,
            keep_lm_head,
            head_bits or bits,
            embed_bits=embed_bits if quantize_embeddings else None,
            head_offsets=head_offsets,
            grid=grid,
        )
        _save(model, out_file)
        return
    head_bits = head_bits or bits
    separate_head = keep_lm_head or head_bits != bits
    # the tie is checked on the fp32 weights, before quantization; only where it is used
    tied = _tied_embedding(model, head) if head and not keep_lm_head and quantize_embeddings and bits != 4 else None
    model = _nbits_pass(model, bits, block_size, accuracy_level, symmetric, exclude=head if separate_head else [])
    if head and not keep_lm_head and head_bits != bits:
        model = _nbits_pass(model, head_bits, block_size, accuracy_level, symmetric, exclude=[], include=head)
    n = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
    if n == 0:
        raise UserError(f"{src_file}: no MatMul with a constant weight to quantize; is this an exported decoder?")
    if bits == 4 and quantize_embeddings:
        model = quantize_embedding(model, block_size)
    elif tied:
        from toolchain.quantize.onnx_offsets import gather_from_head

        # onnxruntime's quantizer names the node it makes from MatMul X "X_Q<bits>"
        gather_from_head(model, tied, f"{head[0]}_Q{head_bits}", head_bits, block_size)
    _save(model, out_file)


def _tied_embedding(model, head: list[str]) -> str | None:
    """The embedding Gather whose table is the output projection's weight transposed (tied), if any
    (call after fold_weight_transposes, which gives the projection its own initializer)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    w_name = nodes[head[0]].input[1] if head and head[0] in nodes else None
    for name in _embedding_gathers(model):
        table = nodes[name].input[0]
        if (
            w_name in inits
            and list(inits[table].dims) == list(reversed(inits[w_name].dims))
            and (numpy_helper.to_array(inits[w_name]) == numpy_helper.to_array(inits[table]).T).all()
        ):
            return name
    return None


def _offset_pass(
    model,
    bits: int,
    block_size: int,
    accuracy_level: int,
    head: list[str],
    keep_lm_head: bool,
    head_bits: int,
    embed_bits: int | None,
    head_offsets: bool = True,
    grid: str = "fit",
):
    import onnx

    from toolchain.quantize.onnx_offsets import gather_from_head, rewrite_embeddings, rewrite_matmuls

    separate_head = keep_lm_head or head_bits != bits or not head_offsets
    fitted: dict = {}  # lets a tied embedding share the head's codes
    if (
        rewrite_matmuls(
            model, bits, block_size, accuracy_level, set(head) if separate_head else set(), fitted=fitted, grid=grid
        )
        == 0
    ):
        raise UserError("no MatMul with a constant weight to quantize; is this an exported decoder?")
    if head and separate_head and not keep_lm_head and not head_offsets:
        # (the head's fp32 weight and the table are still there: the pass above left the head out)
        tied = _tied_embedding(model, head) if embed_bits == head_bits else None
        # every MatMul still in fp32: the head, and the offset terms' small products (x @ S, the
        # 0/1 block-sum matrix, exact in 8 bits; block sums @ offsets), which then run on the same
        # integer kernel instead of the fp32 one. (onnxruntime's nodes_to_include does not limit
        # the pass to the named nodes, so this is said here rather than left to a side effect.)
        model = _nbits_pass(model, head_bits, block_size, accuracy_level, True, exclude=[])
        if tied:
            gather_from_head(model, tied, f"{head[0]}_Q{head_bits}", head_bits, block_size)
            embed_bits = None
    elif head and separate_head and not keep_lm_head:
        rewrite_matmuls(model, head_bits, block_size, accuracy_level, set(), include=set(head), fitted=fitted)
    if embed_bits:
        rewrite_embeddings(model, _embedding_gathers(model), embed_bits, block_size, fitted=fitted)
    # MatMulNBits and GatherBlockQuantized live in com.microsoft
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def to_int8_dynamic(src_file: Path, out_file: Path, keep_lm_head: bool = True) -> None:
    """The classic route (kept for comparison in benchmarks/onnx_speed.py): per-channel int8
    MatMul weights with activations quantized per call (DynamicQuantizeLinear + MatMulInteger)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src_file), load_external_data=False)
    exclude = _lm_head_nodes(model) if keep_lm_head else []
    quantize_dynamic(
        src_file,
        out_file,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        use_external_data_format=True,
    )


def quantize_file(
    src_file: Path, out_file: Path, precision: str, keep_lm_head: bool = False, int4_grid: str = "fit"
) -> None:
    """Write `out_file` (+ `<name>.data`) in `precision` from the fp32 `src_file`; `int4_grid`
    "minmax" for a student trained through that grid (quantize.qat int4)."""
    if precision == "fp16":
        to_fp16(src_file, out_file)
    elif precision == "int4":
        to_nbits(
            src_file,
            out_file,
            4,
            keep_lm_head=keep_lm_head,
            offsets=True,
            head_bits=INT4_HEAD_BITS,
            embed_bits=INT4_HEAD_BITS,
            head_offsets=False,
            grid=int4_grid,
        )
    elif precision in BITS:
        to_nbits(src_file, out_file, BITS[precision], keep_lm_head=keep_lm_head)
    else:
        raise UserError(f"cannot quantize to '{precision}'; choose from fp16, int8, int4")
