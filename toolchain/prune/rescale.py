"""Keeping what the RMSNorms emit at its scale when hidden channels are cut.

An RMSNorm divides by the root-mean-square over the channels it sees. Cut the residual stream
to the channels that carry most of its energy and that mean grows (the same energy over fewer
channels), so every norm's output on the kept channels shrinks (by ~1/sqrt(2) at half width),
and attention logits, made of two such outputs, shrink twice over. Each norm's weight is
therefore multiplied by the mean over calibration tokens of rms(kept channels) / rms(all), the
factor that restores its output on the kept channels, measured on the unpruned model.

Gemma also scales its embeddings by sqrt(hidden_size), which a narrower config lowers: the
embedding table is scaled back up, and with a tied output layer the final norm down by the same
factor, so the logits are unchanged.
"""

from __future__ import annotations

import math

import torch


def norm_names(model, block_norms: tuple[str, ...]) -> list[str]:
    """The RMSNorms over the model width: each block's, then the final one."""
    n = len(model.model.layers)
    return [f"model.layers.{i}.{name}" for i in range(n) for name in block_norms] + ["model.norm"]


@torch.no_grad()
def norm_ratios(model, calib: torch.Tensor, names: list[str], hidden: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """Per norm: mean over tokens of rms(its input on the `hidden` channels) / rms(its whole input)."""
    sums = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)

    def hook(name):
        def pre(_m, inp):
            sq = inp[0].float().pow(2)
            r = (sq[..., hidden].mean(-1) / sq.mean(-1).clamp_min(1e-30)).sqrt()
            sums[name] += float(r.sum())
            count[name] += r.numel()

        return pre

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(0, len(calib), batch):
            model.model(calib[i : i + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(count[n], 1) for n in names}


@torch.no_grad()
def rescale(model, ratios: dict[str, float], norm_offset: float, embed_factor: float = 1.0) -> dict:
    """Apply the factors to `model` (pruned) in place; returns a summary for the record.
    `norm_offset`: the norm multiplies by (offset + weight), 1 for Gemma. `embed_factor`: the
    embedding table's factor (Gemma's lowered sqrt(hidden) scale), undone at a tied head."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    applied = dict(ratios)
    if embed_factor != 1.0:
        model.model.embed_tokens.weight.mul_(embed_factor)
        if tied:
            applied["model.norm"] = applied.get("model.norm", 1.0) / embed_factor
    for name, s in applied.items():
        w = model.get_submodule(name).weight
        w.copy_((w.float() + norm_offset) * s - norm_offset)
    values = list(ratios.values())
    return {
        "norm_factor_min": round(min(values), 4),
        "norm_factor_mean": round(sum(values) / len(values), 4),
        "norm_factor_max": round(max(values), 4),
        "embed_factor": round(embed_factor, 4),
    }


def embed_factor(arch, full_hidden: int, hidden: int) -> float:
    return math.sqrt(full_hidden / hidden) if arch.embed_scale_follows_width else 1.0
