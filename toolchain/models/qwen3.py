"""Qwen3 (dense): Qwen2 without q/k/v biases, plus RMSNorm on queries and keys per head.

The q/k norms (q_norm, k_norm, one weight of head_dim) map to attn_{q,k}_norm and are plain
RMSNorm weights (no +1 offset, unlike Gemma). head_dim is explicit and usually differs from
hidden/heads (e.g. 128 vs 64), so key/value lengths are written. NEOX rotary: no permutation.
"""

from __future__ import annotations

from toolchain.models import llama, qwen2
from toolchain.models.arch import ArchSpec

ARCH = ArchSpec(
    model_type="qwen3",
    genai_type="qwen3",
    gguf_arch="QWEN3",
    layers_attr="model.layers",
    write_hparams=qwen2.write_hparams,
    transform=qwen2._transform,
    skip=llama._skip,
    block_norms=("input_layernorm", "post_attention_layernorm"),
)
