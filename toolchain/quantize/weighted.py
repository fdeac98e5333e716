"""Q4_0, Q4_1, Q5_0 and Q5_1 rounding weighted by an importance matrix, for our GGUF writer.

The reference rounding (gguf.quants, ggml's `quantize_row_q4_0_ref`) takes the block's scale
from its largest weight (and, for the _1 types, its offset from the smallest). With an
importance matrix llama.cpp instead searches the values that minimise
sum_j w_j (x_j - dequantized_j)^2, w_j = importance_j * sqrt(sigma^2 + x_j^2) (sigma^2 the row's
mean square): for Q4_0/Q5_0 19 candidate scales around the reference one, each given its
weighted least-squares scale (ggml's `make_qx_quants`); for Q4_1/Q5_1 37 candidate code
assignments, each given its weighted least-squares scale and offset (`make_qkx3_quants`).

These are the same searches, vectorised over blocks in numpy and computed as ggml computes
them: in float32, each sum accumulated element after element. The candidates' errors are often
within float32 rounding of each other (the offset types' least-squares solve cancels), so a
search in float64 picks another candidate for about a third of Q4_1 blocks; in float32 the
files' bytes equal llama.cpp's (tests/quantize/test_weighted.py). The codes are laid out exactly
as gguf.quants lays them out (tested by dequantizing).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
# symmetric types -> the code range's half (codes are q + nmax, q in [-nmax, nmax - 1])
WEIGHTED_NMAX = {"Q4_0": 8, "Q5_0": 16}
# types with an offset -> the largest code (codes 0 .. nmax, value = d * code + m)
WEIGHTED_OFFSET_NMAX = {"Q4_1": 15, "Q5_1": 31}
WEIGHTED_TYPES = (*WEIGHTED_NMAX, *WEIGHTED_OFFSET_NMAX)
_MAX_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: a block below it is all zeros
F32 = np.float32


def _sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis one element after another, in float32 (ggml's loop order)."""
    acc = terms[..., 0].copy()
    for i in range(1, terms.shape[-1]):
        acc += terms[..., i]
    return acc


def _blocks_and_weights(data: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weights' blocks [blocks, 32] and llama.cpp's per-weight error weights, float32."""
    rows, cols = data.shape
    x = np.ascontiguousarray(data, dtype=F32)
    sigma2 = _sum(x * x) / F32(cols)
    xb = x.reshape(rows, cols // BLOCK, BLOCK)
    w = importance.astype(F32).reshape(1, cols // BLOCK, BLOCK) * np.sqrt(sigma2[:, None, None] + xb * xb)
    return xb.reshape(-1, BLOCK), w.reshape(-1, BLOCK)


def _symmetric_trial(x: np.ndarray, w: np.ndarray, iscale: np.ndarray, nmax: int):
    q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
    return q, _sum(w * x * q), _sum(w * q * q)


def weighted_codes(data: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale [blocks] float32, codes [blocks, 32] uint8 in 0 .. 2*nmax-1) for `data` [rows, cols]
    (ggml's make_qx_quants with importance weights, as quantize_row_q4_0_impl calls it)."""
    x, w = _blocks_and_weights(data, importance)
    signed_max = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    live = np.abs(signed_max) >= _MAX_EPS
    top = np.where(live, signed_max, F32(1))
    q, sumlx, suml2 = _symmetric_trial(x, w, F32(-nmax) / top, nmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in [s for s in range(-9, 10) if s]:
            cand, lx, l2 = _symmetric_trial(x, w, -(F32(nmax) + F32(0.1) * F32(step)) / top, nmax)
            better = (l2 > 0) & (lx * lx > best * l2)
            q = np.where(better[:, None], cand, q)
            scale = np.where(better, lx / l2, scale).astype(F32)
            best = np.where(better, scale * lx, best).astype(F32)
    scale = np.where(live, scale, F32(0)).astype(F32)
    codes = (np.where(live[:, None], q, 0) + nmax).astype(np.uint8)
    return scale, codes


def _offset_error(x, w, scale, offset, codes) -> np.ndarray:
    diff = scale[:, None] * codes + offset[:, None] - x
    return _sum(w * (diff * diff))


def offset_codes(data: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset [blocks] float32, codes [blocks, 32] uint8 in 0 .. nmax) for `data`
    [rows, cols]: the value is scale * code + offset, offset <= 0 (ggml's make_qkx3_quants with
    rmin -0.9, rdelta 0.05, 36 steps, squared error, as quantize_row_q4_1_impl calls it)."""
    x, w = _blocks_and_weights(data, importance)
    top = x.max(-1)
    offset = np.minimum(x.min(-1), F32(0))
    live = top > offset
    sum_w, sum_x = _sum(w), _sum(w * x)

    def assign(numerator):
        # as ggml does, each candidate is placed from the best offset found so far
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = numerator / np.where(live, top - offset, F32(1))
        return iscale, np.clip(np.rint(iscale[:, None] * (x - offset[:, None])), 0, nmax).astype(F32)

    iscale, codes = assign(F32(nmax))
    scale = F32(1) / iscale
    best = _offset_error(x, w, scale, offset, codes)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(37):
            _, cand = assign(F32(-0.9) + F32(0.05) * F32(step) + F32(nmax))
            wl = w * cand
            sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * cand), _sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            s = (sum_w * sum_xl - sum_x * sum_l) / det
            m = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = m > 0  # the offset may only lower values: refit the scale alone through zero
            s = np.where(positive, sum_xl / sum_l2, s).astype(F32)
            m = np.where(positive, F32(0), m).astype(F32)
            err = _offset_error(x, w, s, m, cand)
            better = live & (det > 0) & (err < best)
            codes = np.where(better[:, None], cand, codes)
            scale = np.where(better, s, scale).astype(F32)
            offset = np.where(better, m, offset).astype(F32)
            best = np.where(better, err, best).astype(F32)
    scale = np.where(live, scale, F32(0)).astype(F32)
    codes = np.where(live[:, None], codes, 0).astype(np.uint8)
    return scale, offset, codes


def pack_blocks(scale: np.ndarray, codes: np.ndarray, type_name: str, offset: np.ndarray | None = None) -> np.ndarray:
    d = [scale.astype(np.float16).view(np.uint8).reshape(-1, 2)]
    if offset is not None:
        d.append(offset.astype(np.float16).view(np.uint8).reshape(-1, 2))
    lo, hi = codes[:, : BLOCK // 2], codes[:, BLOCK // 2 :]
    qs = (lo & np.uint8(0x0F)) | ((hi & np.uint8(0x0F)) << np.uint8(4))
    if type_name in ("Q4_0", "Q4_1"):
        return np.concatenate([*d, qs], axis=-1)
    qh = np.packbits((codes >> np.uint8(4)).reshape(-1, 1, BLOCK), axis=-1, bitorder="little").reshape(-1, 4)
    return np.concatenate([*d, qh, qs], axis=-1)


def quantize_weighted(data: np.ndarray, importance: np.ndarray, type_name: str) -> np.ndarray:
    """`data` [rows, cols] as `type_name` blocks (uint8 [rows, bytes per row]), the rounding
    weighted by `importance` [cols] (an importance matrix's mean squared input per column)."""
    if importance.shape != (data.shape[-1],):
        raise ValueError(f"importance of shape {importance.shape} for rows of {data.shape[-1]}")
    if type_name in WEIGHTED_OFFSET_NMAX:
        scale, offset, codes = offset_codes(data, importance, WEIGHTED_OFFSET_NMAX[type_name])
        return pack_blocks(scale, codes, type_name, offset).reshape(data.shape[0], -1)
    scale, codes = weighted_codes(data, importance, WEIGHTED_NMAX[type_name])
    return pack_blocks(scale, codes, type_name).reshape(data.shape[0], -1)
