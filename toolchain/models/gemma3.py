"""Gemma 3 (text decoder, e.g. Gemma-3-270M): facts needed to export and prune it.

What differs from llama, and how llama.cpp expects it (its convert_hf_to_gguf.py is the reference):
- RMSNorm computes x * (1 + w) in HF; llama.cpp computes x * w, so every norm weight (block
  norms, the q/k norms and the final norm) is written as w + 1.
- No Q/K row permutation: Gemma uses llama.cpp's NEOX rotary layout, as HF does.
- Sliding-window attention on most layers, full attention on the others, each with its own
  rope base: we write the window, the per-layer pattern (as a bool array, because a pruned
  student no longer has the every-6th-layer pattern llama.cpp would assume) and both bases.
- Attention scale: llama.cpp uses 1/sqrt(head_dim) (except for the 27B), so a config whose
  query_pre_attn_scalar differs is refused instead of exported wrong.
- Embeddings are tied and scaled by sqrt(hidden) inside llama.cpp, as in HF.
- The tokenizer is SentencePiece-style (written as tokenizer model "llama"; see gguf_vocab.py)
  and needs BOS (perplexity 94 without, 6.3 with on the bundled model).
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import UserError
from toolchain.models.arch import ArchSpec

_SUPPORTED_ROPE = ("default", "linear", None)


def text_config(config):
    """The text part of a config: Gemma3ForConditionalGeneration nests it in text_config."""
    return getattr(config, "text_config", None) or config


def _rope(config, layer_type: str, default_theta: float) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    # transformers 5 keeps one entry per layer type; older configs had rope_theta/rope_local_base_freq
    entry = params.get(layer_type, params if "rope_theta" in params else {})
    if not entry:
        legacy = "rope_theta" if layer_type == "full_attention" else "rope_local_base_freq"
        entry = {"rope_type": "default", "rope_theta": getattr(config, legacy, default_theta)}
    if entry.get("rope_type") not in _SUPPORTED_ROPE:
        raise UserError(
            f"Gemma 3 {layer_type} rope_type '{entry.get('rope_type')}' is not supported by the GGUF exporter "
            "(only default and linear)"
        )
    return entry


def layer_is_sliding(config) -> list[bool]:
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:  # older configs: every sliding_window_pattern-th layer is global
        pattern = getattr(cfg, "sliding_window_pattern", 0) or getattr(cfg, "_sliding_window_pattern", 6)
        return [(i + 1) % pattern != 0 for i in range(cfg.num_hidden_layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise UserError(f"Gemma 3 layer_types {unknown} are not supported by the GGUF exporter")
    return [t == "sliding_attention" for t in types]


def _write_hparams(writer, config) -> None:
    import gguf

    cfg = text_config(config)
    head_dim = cfg.head_dim
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise UserError("Gemma 3 configs with attn_logit_softcapping are not supported (llama.cpp ignores it)")
    scalar = getattr(cfg, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        raise UserError(
            f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim}; llama.cpp would scale attention by "
            "1/sqrt(head_dim) and compute a different model"
        )
    full = _rope(cfg, "full_attention", 1_000_000.0)
    local = _rope(cfg, "sliding_attention", 10_000.0)
    if local.get("rope_type") == "linear":
        raise UserError("linear rope scaling on Gemma 3 sliding layers is not supported by llama.cpp")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(full["rope_theta"]))
    writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    sliding = layer_is_sliding(cfg)
    if any(sliding):
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern(sliding)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap:
        writer.add_final_logit_softcapping(float(softcap))
    writer.add_vocab_size(cfg.vocab_size)


def _transform(name: str, data: np.ndarray, config) -> np.ndarray:
    # Gemma3RMSNorm: output * (1.0 + weight); llama.cpp multiplies by the stored weight
    if name.endswith("norm.weight"):
        return data + 1.0
    return data


def _skip(name: str, config) -> bool:
    # rotary inverse frequencies are recomputed by llama.cpp; a tied head is the embedding
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and getattr(text_config(config), "tie_word_embeddings", True)
    )


ARCH = ArchSpec(
    model_type="gemma3_text",
    genai_type="gemma3_text",
    gguf_arch="GEMMA3",
    layers_attr="model.layers",
    write_hparams=_write_hparams,
    transform=_transform,
    skip=_skip,
    block_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    norm_offset=1.0,
    embed_scale_follows_width=True,
)
