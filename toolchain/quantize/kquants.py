"""Q4_K and Q6_K super-blocks (256 weights) computed in torch, and their GGUF bytes.

llama.cpp makes K-quants with a per-block search we do not reproduce, and re-running that
search on weights already on a K grid does not give back their codes. So a student trained
through K-quant rounding (quantize.qat: Q4_K_M) is written by our own writer: `q4_k_codes` /
`q6_k_codes` are both the fake-quant's rounding and the codes the file stores, one function
for both, so the file's weights are the trained ones bit for bit.

Q4_K: 8 sub-blocks of 32, w = d*sc*q - dmin*m with q in 0..15, 6-bit sc and m, fp16 d and
dmin. Each sub-block's scale and offset come from a few clipped ranges of its values (the
least squared error wins), then scale and offset are rounded to 6 bits of the block's largest.
Q6_K: 16 sub-blocks of 16, w = d*sc*q with q in -32..31, int8 sc, fp16 d; the value of
largest magnitude maps to -32 (as Q4_0 does with -8).

The dequantized values are computed with the operations, in the order, of ggml's (and
gguf.quants') dequantization: (d*sc)*q - (dmin*m) in fp32.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
Q4_K_BYTES = 144  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
Q6_K_BYTES = 210  # 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, fp16 d
# fractions of a sub-block's range tried as its Q4_K range (both ends pulled in)
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)


def _clipped_fit(sub: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, clip: float):
    """(squared error, scale, min offset) of a 4-bit grid over the range pulled in by `clip`."""
    mid = (hi + lo) / 2
    a = (mid + (lo - mid) * clip).clamp(max=0)
    scale = (mid + (hi - mid) * clip - a) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((sub - a[..., None]) / safe[..., None]).clamp(0, 15)
    return ((q * scale[..., None] + a[..., None] - sub) ** 2).sum(-1), scale, -a


def _sub_block_fit(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min offset >= 0) per [.., 32] sub-block: the clip of its range with the least
    squared rounding error on a 4-bit grid."""
    lo, hi = sub.amin(-1).clamp(max=0), sub.amax(-1)
    best_err, best_scale, best_min = _clipped_fit(sub, lo, hi, _CLIPS[0])
    for clip in _CLIPS[1:]:
        err, scale, mins = _clipped_fit(sub, lo, hi, clip)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, mins, best_min)
    return best_scale, best_min


def _six_bits(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 super-scale, codes 0..63) for [n, 8] non-negative values."""
    top = values.amax(-1, keepdim=True)
    inv = torch.where(top > 0, 63 / top, torch.zeros_like(top))
    codes = torch.round(values * inv).clamp(0, 63)
    return (top / 63).half(), codes


def q4_k_codes(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(d fp16 [n,1], dmin fp16 [n,1], sc [n,8], m [n,8], q [n,8,32]) of [n, 256] fp32 blocks."""
    sub = x.reshape(-1, 8, 32)
    scale, mins = _sub_block_fit(sub)
    d, sc = _six_bits(scale)
    dmin, m = _six_bits(mins)
    ds = (d.float() * sc)[..., None]
    dm = (dmin.float() * m)[..., None]
    safe = torch.where(ds > 0, ds, torch.ones_like(ds))
    q = torch.where(ds > 0, torch.round((sub + dm) / safe), torch.zeros_like(sub)).clamp(0, 15) + 0.0  # no -0.0 codes
    return d, dmin, sc, m, q


def q4_k_values(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, m, q = q4_k_codes(x)
    return ((d.float() * sc)[..., None] * q - (dmin.float() * m)[..., None]).reshape(x.shape)


def q6_k_codes(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(d fp16 [n,1], sc int [n,16], q [n,16,16] in -32..31) of [n, 256] fp32 blocks."""
    sub = x.reshape(-1, 16, 16)
    idx = sub.abs().argmax(-1, keepdim=True)
    scale = torch.gather(sub, -1, idx).squeeze(-1) / -32
    top = torch.gather(scale, -1, scale.abs().argmax(-1, keepdim=True))
    inv = torch.where(top != 0, -128 / top, torch.zeros_like(top))
    sc = torch.round(inv * scale).clamp(-128, 127) + 0.0  # stored as an int8: no -0.0
    d = torch.where(inv != 0, 1 / inv, torch.zeros_like(inv)).half()
    ds = (d.float() * sc)[..., None]
    safe = torch.where(ds != 0, ds, torch.ones_like(ds))
    q = torch.where(ds != 0, torch.round(sub / safe), torch.zeros_like(sub)).clamp(-32, 31) + 0.0  # no -0.0 codes
    return d, sc, q


def q6_k_values(x: torch.Tensor) -> torch.Tensor:
    d, sc, q = q6_k_codes(x)
    return ((d.float() * sc)[..., None] * q).reshape(x.shape)


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int16).numpy().astype(np.uint8)


def q4_k_bytes(w: np.ndarray) -> np.ndarray:
    """A [rows, cols] matrix as Q4_K: [rows, cols / 256 * 144] uint8, gguf.quants' layout."""
    rows = w.shape[0]
    d, dmin, t_sc, t_m, t_q = q4_k_codes(torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(-1, QK_K))
    sc, m, q = _u8(t_sc), _u8(t_m), _u8(t_q)
    scales = np.empty((sc.shape[0], 12), np.uint8)
    scales[:, :4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2j (low) and 2j+1 (high)
    parts: list[np.ndarray] = [d.numpy().view(np.uint8), dmin.numpy().view(np.uint8), scales, qs]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def q6_k_bytes(w: np.ndarray) -> np.ndarray:
    """A [rows, cols] matrix as Q6_K: [rows, cols / 256 * 210] uint8, gguf.quants' layout."""
    rows = w.shape[0]
    d, sc, q = q6_k_codes(torch.from_numpy(np.ascontiguousarray(w, np.float32)).reshape(-1, QK_K))
    u = _u8(q.reshape(-1, 2, 4, 32) + 32)  # [n, half, group of 32, 32]: 0..63
    lo = u & 0xF
    # per half: 64 bytes, groups 0 and 1 in the low nibbles, 2 and 3 in the high ones
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    ql = ql.reshape(-1, 128)
    hi = u >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    scales = sc.to(torch.int8).numpy().view(np.uint8)
    parts: list[np.ndarray] = [ql, qh, scales, d.numpy().view(np.uint8)]
    return np.concatenate(parts, axis=1).reshape(rows, -1)
