"""GGUF block formats (and the int4 ONNX blocks) computed in torch, value for value, with a
straight-through gradient.

`fake_quantize(w, "Q4_0")` is the weight the GGUF file will hold after our writer quantizes
`w` (gguf.quants, which is bit-exact with ggml's reference rounding): same blocks of 32 along
each row, same fp32 scale arithmetic and rounding, the scale stored as fp16 and multiplied
back (likewise Q5_0 and Q8_0). The values are on the format's grid, so quantizing them again
gives back the same codes: a model trained through this function exports to exactly the
weights it was trained with. Q4_K and Q6_K are our writer's K-quant rounding
(quantize/kquants.py), the same function the file's codes come from.

`int4` is the ONNX int4 export's block: 4-bit codes and an fp32 scale in MatMulNBits plus a
float offset per block of 32, here on the block's min/max grid, computed in fp32 with the same
operations as `quantize.onnx_offsets.minmax_blocks`, which the export then uses for a student
trained through it; `int4_sym` is its symmetric grid (offset 0, Q4_0's rounding with an fp32
scale; `onnx_offsets.symmetric_blocks`), for students on which that grid measures better.
These grids are not idempotent in float (re-fitting their own values can move the scale by an
ulp), so such a student keeps its latent weights and the export recomputes the codes from
them, identically.

Why not torchao's fake-quant: its int4 grid (scale/zero-point per group, its own rounding) is
not a GGUF block, so the codes it trains are not the ones the file stores.
"""

from __future__ import annotations

import torch

from toolchain.formats import FAKE_QUANT_TYPES
from toolchain.quantize.kquants import QK_K, q4_k_values, q6_k_values

BLOCK = 32  # Q4_0 and Q8_0 blocks: 32 weights share one fp16 scale


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero) as gguf.quants computes it, not torch's ties-to-even."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _round_half_away(blocks * inv)
    return codes * d.half().float()


def _symmetric(blocks: torch.Tensor, half: int, fp16_scale: bool = True) -> torch.Tensor:
    # Q4_0 (half 8) and Q5_0 (half 16): the signed value of largest magnitude maps to code 0
    # (-half * d); the first one on ties. The int4 export's symmetric blocks keep d in fp32.
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(blocks, -1, idx) / -half
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.trunc(blocks * inv + (half + 0.5)).clamp(0, 2 * half - 1)
    return (codes - half) * (d.half().float() if fp16_scale else d)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _symmetric(blocks, 8)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _symmetric(blocks, 16)


# types whose block scale can be learned while training (quantize.learn_scales): the signed code
# range of their blocks of 32 (value = code * fp16 scale). Any fp16 scale is a valid block, so
# the file can hold a trained scale exactly; the reference rounding is where training starts.
LEARNED_SCALE_CODES = {"Q4_0": (-8, 7), "Q8_0": (-128, 127)}


def reference_scales(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """[rows, cols / 32] fp32: the scale the reference rounding gives each block of `w`
    (Q4_0: its signed largest-magnitude weight over -8; Q8_0: its largest magnitude over 127)."""
    blocks = w.detach().float().reshape(*w.shape[:-1], -1, BLOCK)
    if type_name == "Q8_0":
        return blocks.abs().amax(dim=-1) / 127
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    return (torch.gather(blocks, -1, idx) / -8).squeeze(-1)


def scaled_codes(w: torch.Tensor, scale: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [rows, cols / 32, 32] in the type's signed range, fp16 scale as fp32 [rows, cols / 32]):
    the block `w` stores under `scale` (the codes are rounded against the fp16 scale the file holds)."""
    lo, hi = LEARNED_SCALE_CODES[type_name]
    with torch.no_grad():
        d = scale.detach().float().half().float()
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        blocks = w.detach().float().reshape(*d.shape, BLOCK)
        return _round_half_away(blocks * inv[..., None]).clamp(lo, hi), d


class _LearnedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, type_name):
        lo, hi = LEARNED_SCALE_CODES[type_name]
        codes, d = scaled_codes(w, scale, type_name)
        x = w.detach().float().reshape(codes.shape) * torch.where(d == 0, torch.zeros_like(d), 1 / d)[..., None]
        ctx.save_for_backward(codes, x)
        ctx.bounds = (lo, hi)
        return (codes * d[..., None]).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        codes, x = ctx.saved_tensors
        lo, hi = ctx.bounds
        g = grad.float().reshape(codes.shape)
        inside = (x >= lo) & (x <= hi)
        grad_w = torch.where(inside, g, torch.zeros_like(g)).reshape(grad.shape).to(grad.dtype)
        grad_scale = (g * torch.where(inside, codes - x, codes)).sum(-1)
        return grad_w, grad_scale, None


def learned_scale_values(w: torch.Tensor, scale: torch.Tensor, type_name: str) -> torch.Tensor:
    """`scaled_codes` times the fp16 scale in the forward pass (exactly the file's values); in the
    backward, LSQ's gradients (Esser et al., "Learned Step Size Quantization"): to `w` where its
    code is not clamped; to `scale`, per weight, code - w / scale within the range and the
    clamped code outside it (the scale's fp16 rounding passes straight through)."""
    return _LearnedScale.apply(w, scale, type_name)


def int4_grid(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15, scale, offset) of [n, 32] blocks: w ~= (codes - 8) * scale + offset."""
    lo = blocks.amin(dim=-1, keepdim=True)
    scale = (blocks.amax(dim=-1, keepdim=True) - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((blocks - lo) / scale).clamp(0, 15)
    return codes, scale, lo + 8 * scale


def _int4(blocks: torch.Tensor) -> torch.Tensor:
    codes, scale, offset = int4_grid(blocks)
    return (codes - 8) * scale + offset


def _int4_sym(blocks: torch.Tensor) -> torch.Tensor:
    # the int4 export's symmetric blocks (onnx_offsets.symmetric_blocks): Q4_0's rounding, fp32 scale
    return _symmetric(blocks, 8, fp16_scale=False)


def quantize_values(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """The values `type_name` stores for `w` (fp32, same shape), computed without gradient."""
    if type_name == "F32":
        return w.detach().float()
    if type_name == "F16":
        return w.detach().half().float()
    fn = _ROUNDINGS.get(type_name)
    if fn is None:
        raise ValueError(f"no fake-quant for {type_name}; choose from {', '.join((*FAKE_QUANT_TYPES, 'int4'))}")
    block = block_size(type_name)
    if w.shape[-1] % block:
        raise ValueError(f"rows of {w.shape[-1]} do not split into blocks of {block} for {type_name}")
    with torch.no_grad():
        x = w.detach().float()
        return fn(x.reshape(-1, block)).reshape(w.shape)


def block_size(type_name: str) -> int:
    """Weights per block along a row: 256 for the K-quants' super-blocks, else 32."""
    return QK_K if type_name in ("Q4_K", "Q6_K") else BLOCK


_ROUNDINGS = {
    "Q4_0": _q4_0,
    "Q5_0": _q5_0,
    "Q8_0": _q8_0,
    "Q4_K": q4_k_values,
    "Q6_K": q6_k_values,
    "int4": _int4,
    "int4_sym": _int4_sym,
}


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, type_name):
        return quantize_values(w, type_name).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """`quantize_values` in the forward pass, the identity in the backward (straight-through)."""
    return _StraightThrough.apply(w, type_name)


# llama.cpp's CPU matmul multiplies a block-quantized weight with its activations rounded to an
# 8-bit partner type (ggml's vec_dot_type): Q8_0 blocks of 32 (fp16 scale) for the 32-weight
# types, Q8_K super-blocks of 256 (fp32 scale) for the K-quants. F16/F32 weights see no rounding.
ACTIVATION_BLOCK = {"Q4_0": 32, "Q5_0": 32, "Q8_0": 32, "Q4_K": QK_K, "Q6_K": QK_K}


def activation_values(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x` as llama.cpp's CPU matmul rounds it (8-bit blocks along the last dimension), up to
    its ties: Q8_0's rounding for blocks of 32, Q8_K's (scale kept in fp32) for 256."""
    with torch.no_grad():
        b = x.detach().float().reshape(-1, block)
        if block == BLOCK:
            return _q8_0(b).reshape(x.shape).to(x.dtype)
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        return (torch.round(b * inv).clamp(-127, 127) * d).reshape(x.shape).to(x.dtype)


def round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """`activation_values` in the forward pass, the identity in the backward."""
    return x + (activation_values(x, block) - x).detach()
