"""Block quantization with a float offset per block, in ops onnxruntime's CPU runs fast.

A weight block of 32 is stored as w = (q - 2^(bits-1)) * scale + offset: the 4-bit codes and
the scale go into a symmetric `MatMulNBits` (the fast CPU path), the float offset into a small
side product. For y = x @ W the offset term is sum_b (sum of x over block b) * offset[b, n]:
x @ S (S sums each block, K x K/32, shared by every MatMul that reads the same x) then
@ offset (K/32 x N). These are written as fp32 MatMuls; int4 export (quantize/onnx_quant.py)
then runs them in 8 bits too. This avoids the ~4x slower path onnxruntime 1.32 takes for
MatMulNBits' own float zero points.

Why it matters: SmolLM2 and Gemma-3-270M ship as 4-bit GGUFs (Q4_1, Q4_K_M) whose blocks are
exactly "min + d * q": a float offset and a scale per 32 weights. Integer zero points cannot
express that grid, so plain int4 re-quantization doubled the error (top-1 73% on SmolLM2);
this form can. The grid is fitted by alternating least squares (codes <-> scale/offset), which
recovers such grids and lowers the error of continuous weights too.

Token embeddings: `rewrite_embeddings` gives a table the same form (GatherBlockQuantized plus a
gathered offset row expanded over each block); `gather_from_head` lets a tied table read an
8-bit output projection's codes, which is what int4 export uses.
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

import numpy as np

# alternating-least-squares rounds; the error stops moving after 3-4 on real weights
FIT_ROUNDS = 6


def fit_blocks(w: np.ndarray, bits: int, block: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize `w` [K, N] in blocks of `block` along K, `chunk` columns at a time (bounded memory).

    Returns codes [N, n_blocks, block] (uint8, 0 .. 2^bits-1), scale [N, n_blocks] and
    offset [N, n_blocks] (float32) with w ~= (codes - 2^(bits-1)) * scale + offset.
    K is padded to whole blocks by repeating each column's last value (the padding is never
    multiplied: MatMulNBits and the block sums stop at K).
    """
    parts = [_fit_columns(w[:, i : i + chunk], bits, block) for i in range(0, w.shape[1], chunk)]
    # one array per output of _fit_columns: (codes, scale, offset)
    return cast("tuple[np.ndarray, np.ndarray, np.ndarray]", tuple(np.concatenate(p, axis=0) for p in zip(*parts)))


def _float32_blocks(w: np.ndarray, block: int) -> np.ndarray:
    """[K, N] -> [N, blocks, block] in float32, K padded to whole blocks by repeating the last row."""
    k, n = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.concatenate([w, np.repeat(w[-1:], nb * block - k, axis=0)], axis=0)
    return np.ascontiguousarray(w.astype(np.float32).reshape(nb, block, n).transpose(2, 0, 1))


def minmax_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`fit_blocks`' layout on each block's min/max grid, in float32 with the operations of
    quantize.fake_quant.int4_grid: the codes a student trained through that grid was trained with."""
    v = _float32_blocks(w, block)
    top, mid = np.float32((1 << bits) - 1), np.float32(1 << (bits - 1))
    lo = v.min(-1, keepdims=True)
    scale = (v.max(-1, keepdims=True) - lo) / top
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint((v - lo) / scale), 0, top).astype(np.uint8)
    return codes, scale[..., 0], (lo + mid * scale)[..., 0]


def symmetric_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`fit_blocks`' layout on a symmetric grid with zero on it (offset 0): llama.cpp's Q4_0
    rounding (the signed value of largest magnitude -> the lowest code; ggml's trunc(x/d + 8.5))
    with an fp32 scale, in float32 with the operations of quantize.fake_quant's `int4_sym`.
    Small weights stay small: on a distilled student whose inputs have a few very large
    channels, the fitted offsets' grids (zero not on them) cost held-out KL ~3 where this costs
    ~0.1 (onnx_grid.py chooses by measuring)."""
    v = _float32_blocks(w, block)
    top, mid = np.float32((1 << bits) - 1), np.float32(1 << (bits - 1))
    d = np.take_along_axis(v, np.abs(v).argmax(-1)[..., None], -1) / -mid
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    codes = np.clip(np.trunc(v * inv + (mid + np.float32(0.5))), 0, top).astype(np.uint8)
    return codes, d[..., 0].astype(np.float32), np.zeros(d.shape[:-1], np.float32)


GRIDS = {"fit": fit_blocks, "minmax": minmax_blocks, "symmetric": symmetric_blocks}


def _fit_columns(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, n = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.concatenate([w, np.repeat(w[-1:], nb * block - k, axis=0)], axis=0)
    v = w.astype(np.float64).reshape(nb, block, n).transpose(2, 0, 1)  # [N, nb, block]
    top = (1 << bits) - 1
    lo = v.min(-1)
    s = (v.max(-1) - lo) / top
    s = np.where(s > 0, s, 1.0)
    best_err = np.full(lo.shape, np.inf)
    best_q = np.zeros(v.shape, np.uint8)
    best_s, best_lo = s.copy(), lo.copy()
    for _ in range(FIT_ROUNDS):
        q = np.clip(np.rint((v - lo[..., None]) / s[..., None]), 0, top)
        err = ((lo[..., None] + s[..., None] * q - v) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q[better] = q[better].astype(np.uint8)
        best_s = np.where(better, s, best_s)
        best_lo = np.where(better, lo, best_lo)
        # least squares v ~= lo + s*q for these codes; a block with one code keeps its scale
        qm, vm = q.mean(-1), v.mean(-1)
        var = ((q - qm[..., None]) ** 2).mean(-1)
        cov = ((q - qm[..., None]) * (v - vm[..., None])).mean(-1)
        s = np.where(var > 0, cov / np.where(var > 0, var, 1.0), s)
        s = np.where(s > 0, s, best_s)
        lo = vm - s * qm
    # a block already on a grid whose codes do not reach both ends (llama.cpp's Q4_K picks its
    # scales by search, so min/max is not the grid): the smallest gap between its distinct
    # values is the step; take that grid where every value sits on it within 2^bits codes
    srt = np.sort(v, axis=-1)
    gaps = np.diff(srt, axis=-1)
    span = srt[..., -1] - srt[..., 0]
    gaps = np.where(gaps > 1e-6 * span[..., None], gaps, np.inf)
    step = gaps.min(-1)
    step = np.where(np.isfinite(step), step, 1.0)
    q = np.rint((v - srt[..., :1]) / step[..., None])
    on_grid = (q.max(-1) <= top) & (np.abs(srt[..., :1] + step[..., None] * q - v).max(-1) <= 1e-3 * step)
    err = ((srt[..., :1] + step[..., None] * q - v) ** 2).sum(-1)
    take = on_grid & (err < best_err)
    best_q[take] = q[take].astype(np.uint8)
    best_s = np.where(take, step, best_s)
    best_lo = np.where(take, srt[..., 0], best_lo)
    mid = 1 << (bits - 1)
    offset = best_lo + mid * best_s
    return best_q, best_s.astype(np.float32), offset.astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., block] codes -> [..., block * bits / 8] bytes, low nibble first (MatMulNBits' layout)."""
    if bits == 8:
        return codes.astype(np.uint8)
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    return (lo | (hi << 4)).astype(np.uint8)


def block_sum_matrix(k: int, block: int) -> np.ndarray:
    """S [K, n_blocks] with S[i, i // block] = 1: x @ S is the sum of x over each block."""
    nb = -(-k // block)
    s = np.zeros((k, nb), np.float32)
    s[np.arange(k), np.arange(k) // block] = 1.0
    return s


def dequantize(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The [K, N] matrix the stored form stands for (tests and error figures)."""
    mid = 1 << (bits - 1)
    w = (codes.astype(np.float32) - mid) * scale[..., None] + offset[..., None]  # [N, nb, block]
    return w.reshape(w.shape[0], -1)[:, :k].T


def _block_rows(
    graph, q_name: str, scale: np.ndarray, k: int, ids: str, base: str, out: str, bits: int, block: int
) -> list:
    """Nodes reading rows `ids` of the codes `q_name` ([V, nb, bytes], MatMulNBits' layout) as a
    [B, L, K] tensor `out` through GatherBlockQuantized (its initializers are added to `graph`)."""
    from onnx import helper, numpy_helper

    graph.initializer.extend(
        [
            # GatherBlockQuantized wants scales with the data's rank: [V, nb, 1]
            numpy_helper.from_array(
                np.ascontiguousarray(scale.reshape(scale.shape[0], -1, 1)), f"{q_name}_gather_scales"
            ),
            numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{q_name}_rows_shape"),
        ]
    )
    return [
        # default zero point of uint8 storage is 2^(bits-1), the middle code, as for MatMulNBits
        helper.make_node(
            "GatherBlockQuantized",
            [q_name, ids, f"{q_name}_gather_scales"],
            [f"{base}_blocks"],
            name=f"{base}_Q{bits}",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=2,
            block_size=block,
            bits=bits,
        ),
        helper.make_node("Reshape", [f"{base}_blocks", f"{q_name}_rows_shape"], [out], name=f"{base}_rows_q"),
    ]


def _consumers(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _digest(w: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def rewrite_matmuls(
    model,
    bits: int,
    block: int,
    accuracy_level: int,
    exclude: set[str],
    include: set[str] | None = None,
    fitted: dict | None = None,
    grid: str = "fit",
) -> int:
    """Every MatMul with a 2-D constant weight (in `include` if given, not in `exclude`) ->
    MatMulNBits + offset term.

    `grid`: "fit" (alternating least squares, `fit_blocks`), "symmetric" (`symmetric_blocks`:
    zero on the grid, offsets 0) or "minmax" (`minmax_blocks`, for a student trained through
    that grid: quantize.qat int4).
    Returns how many were rewritten. Nodes are replaced in place, so the graph stays sorted.
    `fitted` (if given) collects {digest of the fp32 weight: (codes name, offsets name, bits)},
    so a tied embedding can reuse the output projection's codes (rewrite_embeddings).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = _consumers(graph)
    # (x, K) -> name of x @ S, shared by q/k/v and gate/up; a second pass (the head) finds its own
    sums: dict[tuple[str, int], str] = {}
    new_nodes, drop, count = [], set(), 0
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (
            w_name not in inits
            or len(inits[w_name].dims) != 2
            or node.name in exclude
            or (include is not None and node.name not in include)
        ):
            new_nodes.append(node)
            continue
        assert w_name is not None  # None is in no graph's initializers
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        k, n = w.shape
        codes, scale, offset = GRIDS[grid](w, bits, block)
        base, x = node.name or w_name, node.input[0]
        q_name, s_name, o_name = f"{w_name}_Q{bits}o", f"{w_name}_Q{bits}o_scales", f"{w_name}_Q{bits}o_offsets"
        if fitted is not None:
            fitted[_digest(w)] = (q_name, o_name, bits)
        graph.initializer.extend(
            [
                numpy_helper.from_array(pack_codes(codes, bits), q_name),
                numpy_helper.from_array(scale, s_name),
                numpy_helper.from_array(np.ascontiguousarray(offset.T), o_name),
            ]
        )
        if (x, k) not in sums:
            sum_w = f"block_sum_{k}x{block}"
            if sum_w not in inits:
                inits[sum_w] = numpy_helper.from_array(block_sum_matrix(k, block), sum_w)
                graph.initializer.append(inits[sum_w])
            sums[(x, k)] = f"{x}_blocksum{block}_{bits}"
            new_nodes.append(helper.make_node("MatMul", [x, sum_w], [sums[(x, k)]], name=f"{base}_blocksum"))
        kw: dict[str, Any] = {"accuracy_level": accuracy_level} if accuracy_level else {}
        new_nodes += [
            helper.make_node(
                "MatMulNBits",
                [x, q_name, s_name],
                [f"{base}_q"],
                name=f"{base}_Q{bits}",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                **kw,
            ),
            helper.make_node("MatMul", [sums[(x, k)], o_name], [f"{base}_offset"], name=f"{base}_offset"),
            helper.make_node("Add", [f"{base}_q", f"{base}_offset"], [node.output[0]], name=f"{base}_add"),
        ]
        uses[w_name] -= 1
        if uses[w_name] == 0:
            drop.add(w_name)
        count += 1
    _replace(graph, new_nodes, drop)
    return count


def rewrite_embeddings(model, names: list[str], bits: int, block: int, fitted: dict | None = None) -> int:
    """Gather(table, input_ids) nodes in `names` -> GatherBlockQuantized (uint8 storage, 4 or 8
    bits, blocks along the hidden axis) + the gathered offset row expanded over each block.

    A table that is also the output projection (tied embeddings, found in `fitted` from
    rewrite_matmuls at the same bits) shares its codes and offsets: MatMulNBits' [vocab, blocks,
    bytes] layout is exactly a block-quantized row table, so the largest tensor of big-vocabulary
    models is stored once (Gemma-3-270M: 168 of 268 M parameters).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = _consumers(graph)
    new_nodes, drop, count = [], set(), 0
    for node in graph.node:
        table = node.input[0] if node.name in names else None
        dims = list(inits[table].dims) if table in inits else []
        if len(dims) != 2 or dims[1] % block:
            new_nodes.append(node)
            continue
        assert table is not None  # None is in no graph's initializers
        _v, k = dims
        table_t = numpy_helper.to_array(inits[table]).astype(np.float32).T
        base, ids = node.name, node.input[1]
        shared = (fitted or {}).get(_digest(table_t))
        if shared is not None and shared[2] == bits:
            q_name, o_name = shared[:2]  # the head's codes [V, nb, bytes] and offsets [nb, V]
            scale = numpy_helper.to_array(inits[q_name + "_scales"])
        else:
            q_name, o_name = f"{table}_Q{bits}o", f"{table}_Q{bits}o_offsets"
            codes, scale, offset = fit_blocks(table_t, bits, block)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(pack_codes(codes, bits), q_name),
                    numpy_helper.from_array(np.ascontiguousarray(offset.T), o_name),
                ]
            )
        graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(block_sum_matrix(k, block).T), f"{q_name}_expand")
        )
        new_nodes += _block_rows(graph, q_name, scale, k, ids, base, f"{base}_q", bits, block)
        new_nodes += [
            # offsets are stored [nb, V] for the head's product; gather columns, then [B, L, nb]
            helper.make_node("Gather", [o_name, ids], [f"{base}_cols"], name=f"{base}_cols", axis=1),
            helper.make_node("Transpose", [f"{base}_cols"], [f"{base}_rows"], name=f"{base}_rows", perm=[1, 2, 0]),
            helper.make_node("MatMul", [f"{base}_rows", f"{q_name}_expand"], [f"{base}_offset"], name=f"{base}_expand"),
            helper.make_node("Add", [f"{base}_q", f"{base}_offset"], [node.output[0]], name=f"{base}_add"),
        ]
        uses[table] -= 1
        if uses[table] == 0:
            drop.add(table)
        count += 1
    _replace(graph, new_nodes, drop)
    return count


def gather_from_head(model, gather: str, head: str, bits: int, block: int) -> bool:
    """Gather node `gather` (a tied embedding) -> GatherBlockQuantized reading the symmetric
    MatMulNBits node `head`'s codes and scales, so the table is not stored a second time in fp32.
    False (graph unchanged) when the head is not such a node."""
    from onnx import numpy_helper

    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    h, g = nodes.get(head), nodes.get(gather)
    if h is None or g is None or h.op_type != "MatMulNBits" or len(h.input) != 3 or h.input[2] not in inits:
        return False  # not there, or with zero points (asymmetric): keep the fp32 table
    k = next(a.i for a in h.attribute if a.name == "K")
    q_name, s_name = h.input[1], h.input[2]
    table = g.input[0]
    rows = _block_rows(
        graph, q_name, numpy_helper.to_array(inits[s_name]), k, g.input[1], g.name, g.output[0], bits, block
    )
    new_nodes = []
    for node in graph.node:
        new_nodes += rows if node.name == gather else [node]
    uses = _consumers(graph)
    _replace(graph, new_nodes, {table} if uses.get(table, 0) == 1 else set())
    return True


def _replace(graph, nodes: list, drop: set[str]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(keep)
