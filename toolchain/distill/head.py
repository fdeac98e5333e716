"""Split a causal LM into its decoder (-> final hidden states) and a plain linear output layer.

The fused loss (losses.fused_head_loss) makes logits from hidden states chunk by chunk; that is
only the model's own computation when logits are exactly `hidden @ W^T`. Models that post-process
logits (Gemma-2's final soft-capping, Cohere's logit scale, a biased head) keep the ordinary
full-logits path.
"""

from __future__ import annotations

import torch

_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def plain_output_weight(model) -> torch.Tensor | None:
    """The [V, H] output weight if logits = decoder_hidden @ W^T exactly, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING):
        return None
    try:
        model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return head.weight


def final_hidden(model, batch, all_states: bool = False):
    """Decoder output [B*L, H] (after the final norm), without making any logits; with
    all_states, also every block's output (HF `hidden_states`)."""
    out = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, output_hidden_states=all_states
    )
    h = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    return (h, out.hidden_states) if all_states else h
