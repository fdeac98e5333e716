"""Which grid the int4 ONNX export puts each decoder block's weights on, chosen by measurement.

Two grids (quantize/onnx_offsets.py): fitted offsets (scale and float offset per block of 32
by least squares; exact for weights that are a dequantized Q4_1/Q4_K file, as the bundled
SmolLM2 and Gemma-3-270M are) and symmetric (llama.cpp's Q4_0 rounding, zero on the grid).
Neither wins everywhere. Measured in torch on 4 x 128 calibration tokens (KL of the
model with its block matrices on the grid, to itself):

    model                          fitted offsets   symmetric
    SmolLM2-135M-Instruct          0.000            0.332
    Gemma-3-270M                   0.512            1.278
    `make demo`'s distilled student 2.954           0.108

The student's inputs to some matrices have a few very large channels; its weights there are
small, symmetric rounding keeps them small, while a fitted grid (zero not on it) moves them by
up to half a step, which those channels multiply. So the export measures both on the model it
exports and takes the lower (ties: the fit).
"""

from __future__ import annotations

import numpy as np
import torch

GRID_CHOICES = ("fit", "symmetric")
BLOCK = 32


def int4_types(model) -> dict[str, str]:
    """{module name: "int4" or "F32"}: the int4 ONNX export's 4-bit matrices are every linear
    layer of the decoder blocks whose rows split into blocks (the head and the token table go
    to 8 bits there)."""
    head = model.get_output_embeddings()
    types = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            types[name] = "int4" if module.weight.shape[-1] % BLOCK == 0 else "F32"
    return types


def _block_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    names = {n for n, t in int4_types(model).items() if t == "int4"}
    return [(n, m) for n, m in model.named_modules() if n in names and isinstance(m, torch.nn.Linear)]


def _on_grid(weight: torch.Tensor, grid: str) -> torch.Tensor:
    """The values the export stores for an [out, in] weight (blocks run along `in`)."""
    from toolchain.quantize.onnx_offsets import GRIDS, dequantize

    w = weight.detach().float().T.contiguous().numpy()  # [K = in, N = out], the ONNX MatMul's layout
    codes, scale, offset = GRIDS[grid](w, 4, 32)
    return torch.from_numpy(np.ascontiguousarray(dequantize(codes, scale, offset, 4, w.shape[0]).T))


@torch.no_grad()
def grid_errors(model, rows: torch.Tensor) -> dict[str, float]:
    """Mean per-token KL(model || model with its block matrices on each grid) over `rows`."""
    model.eval()
    ref = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
    linears = _block_linears(model)
    kept = {n: m.weight.data.clone() for n, m in linears}
    out = {}
    try:
        for grid in GRID_CHOICES:
            for n, m in linears:
                m.weight.data = _on_grid(kept[n], grid).to(m.weight.dtype)
            q = torch.log_softmax(model(rows, use_cache=False).logits.float(), -1)
            out[grid] = float((ref.exp() * (ref - q)).sum(-1).mean())
    finally:
        for n, m in linears:
            m.weight.data = kept[n]
    return out


def choose_int4_grid(model, rows: torch.Tensor) -> dict:
    """{"grid": the one with the lower KL (ties: fit), "kl": {grid: KL}, "tokens": scored}."""
    kl = grid_errors(model, rows)
    grid = "symmetric" if kl["symmetric"] < kl["fit"] else "fit"
    return {"grid": grid, "kl": {k: round(v, 5) for k, v in kl.items()}, "tokens": int(rows.numel())}
