"""Q4_0 and Q5_0 rounding weighted by an importance matrix, for our GGUF writer.

The reference rounding (gguf.quants, ggml's `quantize_row_q4_0_ref`) takes the block's scale
from its largest weight. With an importance matrix llama.cpp instead searches the scale that
minimises sum_j w_j (x_j - d * q_j)^2, w_j = importance_j * sqrt(sigma^2 + x_j^2) (sigma^2 the
row's mean square): 19 candidate scales around the reference one, each scored by its weighted
least-squares error (ggml's `make_qx_quants`). This is the same search, vectorised over blocks
in numpy, so the Python-written Q4_0/Q5_0 files get what llama.cpp's quantizer gives its own.
The codes are laid out exactly as gguf.quants lays them out (tested by dequantizing).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
# file types with a weighted search here -> the code range's half (codes are q + nmax, q in [-nmax, nmax - 1])
WEIGHTED_NMAX = {"Q4_0": 8, "Q5_0": 16}
_MAX_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a block below it is all zeros


def _trial(x: np.ndarray, w: np.ndarray, iscale: np.ndarray, nmax: int):
    q = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
    return q, (w * x * q).sum(-1), (w * q * q).sum(-1)


def weighted_codes(data: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale [blocks] float32, codes [blocks, 32] uint8 in 0 .. 2*nmax-1) for `data` [rows, cols]."""
    rows, cols = data.shape
    x3 = data.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
    sigma2 = (x3.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True) / cols
    w = importance.astype(np.float64).reshape(1, cols // BLOCK, BLOCK) * np.sqrt(sigma2 + x3.astype(np.float64) ** 2)
    x = x3.reshape(-1, BLOCK).astype(np.float64)
    w = w.reshape(-1, BLOCK)
    signed_max = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    live = np.abs(signed_max) >= _MAX_EPS
    top = np.where(live, signed_max, 1.0)
    q, sumlx, suml2 = _trial(x, w, -nmax / top, nmax)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        cand, lx, l2 = _trial(x, w, -(nmax + 0.1 * step) / top, nmax)
        better = (l2 > 0) & (lx * lx > best * l2)
        q = np.where(better[:, None], cand, q)
        scale = np.where(better, lx / np.where(l2 > 0, l2, 1.0), scale)
        best = np.where(better, scale * lx, best)
    scale = np.where(live, scale, 0.0).astype(np.float32)
    codes = (np.where(live[:, None], q, 0) + nmax).astype(np.uint8)
    return scale, codes


def _pack(scale: np.ndarray, codes: np.ndarray, type_name: str) -> np.ndarray:
    d = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    lo, hi = codes[:, : BLOCK // 2], codes[:, BLOCK // 2 :]
    qs = (lo & np.uint8(0x0F)) | ((hi & np.uint8(0x0F)) << np.uint8(4))
    if type_name == "Q4_0":
        return np.concatenate([d, qs], axis=-1)
    qh = np.packbits((codes >> np.uint8(4)).reshape(-1, 1, BLOCK), axis=-1, bitorder="little").reshape(-1, 4)
    return np.concatenate([d, qh, qs], axis=-1)


def quantize_weighted(data: np.ndarray, importance: np.ndarray, type_name: str) -> np.ndarray:
    """`data` [rows, cols] as `type_name` blocks (uint8 [rows, bytes per row]), the rounding
    weighted by `importance` [cols] (an importance matrix's mean squared input per column)."""
    if importance.shape != (data.shape[-1],):
        raise ValueError(f"importance of shape {importance.shape} for rows of {data.shape[-1]}")
    scale, codes = weighted_codes(data, importance, WEIGHTED_NMAX[type_name])
    return _pack(scale, codes, type_name).reshape(data.shape[0], -1)
