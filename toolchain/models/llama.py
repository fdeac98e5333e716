"""Llama family (Llama 2/3, SmolLM, Mistral): facts needed to export and prune it."""

from __future__ import annotations

import numpy as np

from toolchain.errors import UserError
from toolchain.models.arch import ArchSpec


def rope_theta(config) -> float:
    # transformers 5 moved rope_theta into rope_parameters
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("model config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer, config) -> None:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise UserError(f"rope_type '{rope_type}' is not supported by the GGUF exporter yet (only 'default')")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))  # always, as llama.cpp's converter does
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF stores Q/K rows as [first halves of all rotary pairs | second halves] per head
    # (rotate_half); llama.cpp expects the two elements of each pair interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transform(name: str, data: np.ndarray, config) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return _permute_rotary(data, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return _permute_rotary(data, config.num_key_value_heads)
    return data


def _skip(name: str, config) -> bool:
    # rotary inverse frequencies are recomputed by llama.cpp; a tied head is the embedding
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)
    )


ARCH = ArchSpec(
    model_type="llama",
    genai_type="llama",
    gguf_arch="LLAMA",
    layers_attr="model.layers",
    write_hparams=_write_hparams,
    transform=_transform,
    skip=_skip,
    block_norms=("input_layernorm", "post_attention_layernorm"),
)
