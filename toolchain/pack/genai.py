"""genai_config.json: what onnxruntime-genai needs beside an exported ONNX decoder.

Our export already uses the input/output names onnxruntime-genai expects by default
(input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits, present.N.*),
and its KV cache grows with each call (no shared static buffer), so the config names them
and sets `past_present_share_buffer: false`.
"""

from __future__ import annotations

from toolchain.errors import UserError


def genai_config(info: dict, context_length: int, pad_token_id: int | None, generation: dict) -> dict:
    """The config for one exported folder, from its model_info.json and the bundle's defaults."""
    from toolchain.models.registry import get_arch

    genai_type = get_arch(info["model_type"]).genai_type
    if genai_type is None:
        raise UserError(
            f"onnxruntime-genai has no model type for {info['model_type']}; pack without ONNX (--onnx none)"
        )
    eos = list(generation["stop_token_ids"])
    return {
        "model": {
            "bos_token_id": info.get("bos_token_id"),
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": info["head_dim"],
                "hidden_size": info["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": info["num_attention_heads"],
                "num_hidden_layers": info["num_layers"],
                "num_key_value_heads": info["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": pad_token_id if pad_token_id is not None else eos[0],
            "type": genai_type,
            "vocab_size": info["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": generation["temperature"] > 0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": generation["temperature"] if generation["temperature"] > 0 else 1.0,
            "top_k": generation.get("top_k") or (1 if generation["temperature"] == 0 else 50),
            "top_p": generation.get("top_p") or 1.0,
        },
    }
