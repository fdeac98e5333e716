"""Budgets a pruned shape must fit: a parameter count, or a target device's memory (the weights
at the quant type that ships there, plus the KV cache at the target's context)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace

from toolchain.errors import UserError
from toolchain.prune.axes import Shape, config_refusal, head_dim, params_of


def bits_per_weight(quant: str) -> float:
    """Bits per weight of a GGUF type (a K-quant mix such as Q4_K_M counted at its base type)."""
    import gguf

    base = re.sub(r"_(S|M|L|XS|XXS)$", "", quant.upper())
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[base]]
    except KeyError:
        raise UserError(f"prune: unknown GGUF type '{quant}' for the memory budget") from None
    return size * 8 / block


def memory_bytes(config, shape: Shape, quant: str, context: int) -> int:
    """Weights at `quant` plus an f16 KV cache (llama.cpp's default) for `context` tokens."""
    kv = 2 * shape.layers * shape.num_key_value_heads * head_dim(config) * context * 2
    return int(params_of(config, shape) * bits_per_weight(quant) / 8) + kv


def _align_down(x: float, align: int) -> int:
    return max(align, int(x // align) * align)


def _widest_within(
    config, layers: int, fits: Callable[[Shape], bool], align: int, width_is_heads: bool, keep_heads: bool = False
):
    """At `layers` blocks, the widest shape (hidden and MLP cut by one ratio) that fits, or None.
    Heads: with `keep_heads` every head stays and the width is a multiple of lcm(align, heads)
    as transformers wants; otherwise the width is a multiple of `align` and keeps the most heads
    it accepts (for qwen2, whose width is its heads, whole KV groups' worth)."""
    full = replace(Shape.of(config), layers=layers)
    hd, kv = head_dim(config), full.num_key_value_heads
    hidden_step = math.lcm(align, full.num_attention_heads) if keep_heads else align

    def at(r: float) -> Shape:
        s = replace(
            full,
            hidden_size=min(full.hidden_size, _align_down(full.hidden_size * r, hidden_step)),
            intermediate_size=min(full.intermediate_size, _align_down(full.intermediate_size * r, align)),
        )
        if keep_heads:
            return s
        if width_is_heads:  # whole KV groups' worth of query heads, the width following them
            heads = max(kv, min(full.num_attention_heads, s.hidden_size // hd // kv * kv))
            return replace(s, num_attention_heads=heads, hidden_size=heads * hd)
        return _fewer_heads_until_accepted(config, s)

    if fits(at(1.0)):
        return at(1.0)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(14):  # bisection on the width ratio
        mid = (lo + hi) / 2
        if fits(at(mid)):
            best, lo = at(mid), mid
        else:
            hi = mid
    return best


def _fewer_heads_until_accepted(config, s: Shape) -> Shape:
    """`s` with the most query heads transformers accepts at its width (llama wants the width a
    multiple of the head count, even with head_dim explicit): whole KV groups, no more query
    heads per group than before, fewer KV groups when no count of the current ones divides the
    width (more KV heads first among equal counts); `s` itself when none is (the caller's check
    says why)."""
    per_group = s.num_attention_heads // s.num_key_value_heads
    options = [(kv * g, kv) for kv in range(s.num_key_value_heads, 0, -1) for g in range(per_group, 0, -1)]
    for heads, kv in sorted(options, reverse=True):
        c = replace(s, num_attention_heads=heads, num_key_value_heads=kv)
        if config_refusal(config, c) is None:
            return c
    return s


def _widest_mlp(config, s: Shape, fits: Callable[[Shape], bool], align: int) -> Shape | None:
    """`s` with the widest MLP (a multiple of `align`, at least `align`) that fits, or None."""
    lo, hi = 1, config.intermediate_size // align  # in units of align
    if not fits(replace(s, intermediate_size=align)):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(replace(s, intermediate_size=mid * align)):
            lo = mid
        else:
            hi = mid - 1
    return replace(s, intermediate_size=min(config.intermediate_size, lo * align))


def _wider_with_narrower_mlp(config, layers: int, fits: Callable[[Shape], bool], align: int, floor: int) -> list[Shape]:
    """Shapes that keep more of the width and attention than the one-ratio cut and take the rest
    from the MLP (Minitron's finding: cutting heads costs more than cutting neurons): for each
    count of query heads a width at `align` accepts, the widest such width down to `floor`,
    with the widest MLP that fits."""
    full = replace(Shape.of(config), layers=layers)
    out: list[Shape] = []
    seen_heads: set[tuple[int, int]] = set()
    for hidden in range(full.hidden_size // align * align, floor, -align):
        s = _fewer_heads_until_accepted(config, replace(full, hidden_size=hidden))
        heads = (s.num_attention_heads, s.num_key_value_heads)
        if heads in seen_heads or config_refusal(config, s) is not None:
            continue
        seen_heads.add(heads)
        c = _widest_mlp(config, s, fits, align)
        if c is not None:
            out.append(c)
    return out


def candidate_shapes(
    config, fits: Callable[[Shape], bool], depth: bool, align: int, width_is_heads: bool = False
) -> list[Shape]:
    """Shapes that fit, from width-only to half the depth: at each depth the widest fitting width
    keeping every head, the widest at `align` with the most heads that width allows (hidden and
    MLP cut by one ratio), and wider ones paying with their MLP (`_wider_with_narrower_mlp`)."""
    n = config.num_hidden_layers
    depths = sorted({n, *(max(2, math.ceil(n * f)) for f in (0.8, 0.65, 0.5))}, reverse=True) if depth else [n]
    out: list[Shape] = []

    def add(s: Shape | None) -> None:
        if s is not None and s not in out and config_refusal(config, s) is None:
            out.append(s)

    for layers in depths:
        if not width_is_heads:
            add(_widest_within(config, layers, fits, align, width_is_heads, keep_heads=True))
        one_ratio = _widest_within(config, layers, fits, align, width_is_heads)
        add(one_ratio)
        if one_ratio is not None and not width_is_heads:
            for s in _wider_with_narrower_mlp(config, layers, fits, align, one_ratio.hidden_size):
                add(s)
    return out
