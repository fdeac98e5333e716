"""Qwen2 / Qwen2.5: a llama-shaped decoder with biases on q/k/v, and rotary in NEOX layout.

llama.cpp's QWEN2 graph applies rotary to the HF row order (rotate_half), so unlike llama
there is no Q/K row permutation; the q/k/v biases map to attn_{q,k,v}.bias. Sliding-window
attention (use_sliding_window, off in released checkpoints) is refused: llama.cpp's QWEN2
graph has none. That graph also sizes attn_q by the model width, so width pruning keeps
hidden_size == heads * head_dim.
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import UserError
from toolchain.models import llama
from toolchain.models.arch import ArchSpec


def write_hparams(writer, config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise UserError(f"{config.model_type} with use_sliding_window=true is not supported by llama.cpp's graph")
    llama._write_hparams(writer, config)


def _transform(name: str, data: np.ndarray, config) -> np.ndarray:
    return data  # NEOX rotary: HF row order is what llama.cpp expects


ARCH = ArchSpec(
    model_type="qwen2",
    genai_type="qwen2",
    gguf_arch="QWEN2",
    layers_attr="model.layers",
    write_hparams=write_hparams,
    transform=_transform,
    skip=llama._skip,
    block_norms=("input_layernorm", "post_attention_layernorm"),
    width_is_heads=True,
)
