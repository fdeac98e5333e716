"""Prune one model to one shape: depth first (the angular rule of `toolchain.student`), then
width by importance measured on the depth-pruned model, because what a block's channels are
worth depends on which blocks remain."""

from __future__ import annotations

import torch

from toolchain.errors import UserError
from toolchain.models.registry import get_arch
from toolchain.prune.axes import Keep, Shape, config_refusal, head_dim, sliced_model
from toolchain.prune.importance import IMPORTANCE, Scores


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def select(scores: Scores, shape: Shape) -> Keep:
    """The highest-scoring structures for `shape`; query heads are chosen inside kept KV groups."""
    keep = Keep(_top(scores.hidden, shape.hidden_size))
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    for b in scores.blocks:
        groups = _top(b["kv"], shape.num_key_value_heads)
        full_group = len(b["heads"]) // len(b["kv"])
        heads = torch.cat([g * full_group + _top(b["heads"].view(-1, full_group)[g], per_group) for g in groups])
        keep.blocks.append({"kv": groups, "heads": heads, "mlp": _top(b["mlp"], shape.intermediate_size)})
    return keep


def _kept_share(scores: Scores, keep: Keep) -> dict[str, float]:
    """Share of the measured importance the kept structures hold, per axis (a summary for the record)."""

    def share(total: torch.Tensor, kept: torch.Tensor) -> float:
        return round(float(kept.sum() / total.sum().clamp_min(1e-30)), 4)

    out = {"hidden": share(scores.hidden, scores.hidden[keep.hidden])}
    for axis in ("heads", "mlp"):
        total = torch.stack([b[axis].sum() for b in scores.blocks]).sum()
        kept = torch.stack([b[axis][k[axis]].sum() for b, k in zip(scores.blocks, keep.blocks)]).sum()
        out[axis] = share(total, kept)
    return out


def prune_model(
    model,
    calib: torch.Tensor,
    shape: Shape,
    importance: str = "activation",
    seed: int = 0,
    rescale_norms: bool = True,
    cache: dict | None = None,
):
    """(pruned model, record): `model` cut to `shape`; `model` itself is left as it was. With
    `rescale_norms`, a narrower width keeps its norms' outputs at their scale (prune/rescale.py).
    `cache` (a dict the caller keeps for one model and calib) holds each depth's blocks and
    importance, so shapes of the same depth measure them once."""
    from toolchain.student import choose_layers, with_layers

    arch = get_arch(model.config.model_type)
    if not arch.block_norms:
        raise UserError(f"architecture '{model.config.model_type}' has no pruning rule yet")
    full = Shape.of(model.config)
    shape.check_within(full)
    hd = head_dim(model.config)
    if arch.width_is_heads and shape.hidden_size != shape.num_attention_heads * hd:
        raise UserError(
            f"prune: {model.config.model_type} needs hidden_size == num_attention_heads * head_dim "
            f"({shape.num_attention_heads} * {hd} = {shape.num_attention_heads * hd}, got {shape.hidden_size}): "
            "llama.cpp sizes its attention by the model width; prune heads and width together"
        )
    refusal = config_refusal(model.config, shape)
    if refusal:
        raise UserError(f"prune: transformers refuses the shape {vars(shape)}: {refusal}")
    if importance not in IMPORTANCE:
        raise UserError(f"prune.importance must be one of {', '.join(IMPORTANCE)}, got '{importance}'")
    if shape.layers < min(2, full.layers):
        raise UserError("prune: layers must be >= 2 (the first and last blocks are always kept)")
    cache = {} if cache is None else cache
    key = (shape.layers, importance, seed)
    if key not in cache:
        kept_layers = list(range(full.layers))
        if shape.layers < full.layers:
            kept_layers = choose_layers(model, calib, shape.layers)
        cache[key] = (kept_layers, with_layers(model, kept_layers) if shape.layers < full.layers else model, None)
    kept_layers, model, scores = cache[key]
    record: dict = {"importance": importance, "from": vars(full), "to": vars(shape), "kept_layers": kept_layers}
    if Shape.of(model.config) == shape:
        return model, record
    if scores is None:
        kwargs = {"seed": seed} if importance == "random" else {}
        scores = IMPORTANCE[importance](model, calib, arch.block_norms, **kwargs)
        cache[key] = (kept_layers, model, scores)
    keep = select(scores, shape)
    record["kept_importance"] = _kept_share(scores, keep)
    record["kept_kv_heads"] = [b["kv"].tolist() for b in keep.blocks]
    pruned = sliced_model(model, keep, shape, arch.block_norms)
    if rescale_norms and shape.hidden_size < full.hidden_size:
        from toolchain.prune.rescale import embed_factor, norm_names, norm_ratios, rescale

        ratios = norm_ratios(model, calib, norm_names(model, arch.block_norms), keep.hidden)
        factor = embed_factor(arch, full.hidden_size, shape.hidden_size)
        record["rescale"] = rescale(pruned, ratios, arch.norm_offset, factor)
    return pruned, record
