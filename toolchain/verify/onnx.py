"""Check an ONNX export (any precision) against the torch model it came from.

The torch side is the shared `reference.Reference` (fp16-rounded weights for an fp16 export).
Figures over every prompt position (prefill, empty past) and every decode step (through each
side's KV cache, both fed torch's greedy tokens, so the steps stay aligned where a near-tie
would make them diverge):
- `max_abs_diff`: the largest |logit difference|;
- `top1_agreement`: fraction of positions where both pick the same next token;
- `mean_kl`: mean KL(torch || onnx) of the next-token distributions (nats);
- greedy agreement where torch's choice is clear, near-ties apart (`metrics.greedy_figures`).
`generate_prefix`: the mean fraction of greedy tokens equal to torch's before the first
difference. Up to that difference a free-running decode feeds exactly the forced tokens, so it is
read from the forced decode; `OnnxDecoder.generate` (the loop an app uses) runs on the first
prompt and must reproduce that prefix (`app_loop_prefix`).

What decides `passed` depends on the export's precision (model_info.json):
- fp32: max_abs_diff <= `max_abs_diff` (1e-3); fp16: <= `fp16_max_abs_diff` (2e-2);
- int8 / int4: top1_agreement >= `min_top1[precision]` and mean_kl <= `max_kl[precision]`
  (quantized logits are not meant to be close in absolute terms, their choices are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolchain.errors import UserError, VerificationError
from toolchain.runtime.onnx_decoder import OnnxDecoder
from toolchain.verify.metrics import compare_rows, greedy_figures
from toolchain.verify.reference import LABELS, PromptReference, Reference, rounding_for

DEFAULT_MIN_TOP1 = {"int8": 0.95, "int4": 0.90}
DEFAULT_MAX_KL = {"int8": 0.05, "int4": 0.25}


def _onnx_logits(decoder: OnnxDecoder, ref) -> tuple[np.ndarray, np.ndarray]:
    """The export's prompt logits and the logits choosing each of torch's greedy tokens."""
    decoder.reset()
    prompt = decoder.forward(ref.ids)
    choices = [prompt[-1]] + [decoder.forward([tok])[-1] for tok in ref.greedy[:-1]]
    return prompt, np.stack(choices)


def _same_prefix(ours: list[int], torch_greedy: list[int]) -> int:
    same = [a == b for a, b in zip(ours, torch_greedy)]
    return same.index(False) if False in same else len(same)


def _generate_prefix(decoder: OnnxDecoder, ref) -> int:
    """Tokens of the decoder's own greedy loop (the one an app runs) equal to torch's before the
    first difference (no stop ids: torch's run did not stop either)."""
    return _same_prefix(decoder.generate(ref.ids, len(ref.greedy), greedy=True, stop_ids=[]), ref.greedy)


def describe(r: dict) -> str:
    """Every figure of an ONNX check with its threshold, on one line."""
    t = ", ".join(f"{k} limit {v:g}" for k, v in r.get("thresholds", {}).items())
    return (
        f"max |logit diff| {r['max_abs_diff']:.3g}, top-1 {r['top1_agreement']:.1%}, mean KL {r['mean_kl']:.3g} "
        f"(max {r['max_kl']:.3g}), greedy agreement {r['greedy_agreement']:.3f} over {r['greedy_decisive']} "
        f"clear positions, near-ties {r['near_ties']} ({r['near_tie_flips']} flipped), generate prefix "
        f"{r['generate_prefix']:.1%} ({t}; {r['prompts']} prompts x {r['greedy_tokens']} tokens vs {r['reference']})"
    )


def _torch_reference(
    model_dir: str | os.PathLike, prompts: list[str], greedy_tokens: int, model, tokenizer, reference: Reference | None
) -> Reference:
    """`reference` if it is for these prompts, else one computed from `model_dir` (loading only what is missing)."""
    if reference is not None and reference.matches(prompts, greedy_tokens):
        return reference
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Reference(model, tokenizer, prompts, greedy_tokens)


@dataclass
class _Comparison:
    """The export's figures against torch, pooled over every prompt and kept per prompt."""

    worst: float = 0.0
    top1: list[bool] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    choices: list[np.ndarray] = field(default_factory=list)
    prefixes: list[int] = field(default_factory=list)
    per_prompt: list[dict] = field(default_factory=list)


def _compare(decoder: OnnxDecoder, refs: list[PromptReference]) -> _Comparison:
    c = _Comparison()
    for ref in refs:
        prompt, chose = _onnx_logits(decoder, ref)
        d1, t1, k1 = compare_rows(prompt, ref.prompt_logits)
        d2, t2, k2 = compare_rows(chose[1:], ref.step_logits) if len(ref.step_logits) else (0.0, [], [])
        c.worst = max(c.worst, d1, d2)
        c.top1 += t1 + t2
        c.kls += k1 + k2
        c.choices.append(chose)
        c.prefixes.append(_same_prefix([int(t) for t in chose.argmax(-1)], ref.greedy))
        c.per_prompt.append(
            {
                "n_tokens": len(ref.ids),
                "max_abs_diff": max(d1, d2),
                "generate_prefix": c.prefixes[-1],
                "top1_agreement": float(np.mean(t1 + t2)),
                "mean_kl": float(np.mean(k1 + k2)),
            }
        )
    return c


def _result(
    c: _Comparison, decoder: OnnxDecoder, refs: list[PromptReference], precision: str, rounding: str, greedy_tokens: int
) -> dict:
    return {
        "format": "onnx",
        "quant": precision,
        "reference": LABELS[rounding],
        "max_abs_diff": c.worst,
        "top1_agreement": float(np.mean(c.top1)),
        "mean_kl": float(np.mean(c.kls)),
        "max_kl": float(np.max(c.kls)),
        "positions": len(c.top1),
        **greedy_figures([r.choice_logits for r in refs], c.choices),
        "generate_prefix": float(np.mean([p / greedy_tokens for p in c.prefixes])),
        "app_loop_prefix": _generate_prefix(decoder, refs[0]) / greedy_tokens,
        "first_prompt_prefix": c.prefixes[0] / greedy_tokens,
        "greedy_tokens": greedy_tokens,
        "prompts": len(refs),
        "per_prompt": c.per_prompt,
    }


def _judge(result: dict, precision: str, checks: dict) -> None:
    """Record the thresholds and the verdict in `result`; raise VerificationError if a check fails."""
    result["thresholds"] = {name: limit for name, (_, _, limit) in checks.items()}
    failed = [
        f"{name} {value:.3g} {op} {limit:g}"
        for name, (value, op, limit) in checks.items()
        if not (value <= limit if op == ">" else value >= limit)
    ]
    result["passed"] = not failed
    if failed:
        raise VerificationError(
            f"ONNX {precision} export FAILED: {', '.join(failed)}. Figures: {describe(result)}", result
        )


def verify_onnx(
    model_dir: str | os.PathLike,
    onnx_dir: str | Path,
    prompts: list[str],
    greedy_tokens: int = 32,
    max_abs_diff: float = 1e-3,
    threads: int = 0,
    model=None,
    tokenizer=None,
    fp16_max_abs_diff: float = 2e-2,
    min_top1: dict[str, float] | None = None,
    max_kl: dict[str, float] | None = None,
    reference: Reference | None = None,
) -> dict:
    """Compare `onnx_dir` (from export_onnx) with the torch model in `model_dir`; raise on failure.

    `model` / `tokenizer` (fp32) or a `reference` for these prompts may be passed in to avoid
    loading or computing them again.
    """
    if not prompts:
        raise UserError("verify_onnx needs at least one prompt")
    if greedy_tokens < 1:
        raise UserError(f"greedy_tokens must be >= 1, got {greedy_tokens}")
    reference = _torch_reference(model_dir, prompts, greedy_tokens, model, tokenizer, reference)
    decoder = OnnxDecoder(onnx_dir, threads=threads)
    precision = decoder.info.get("precision", "fp32")
    rounding = rounding_for("onnx", precision)
    refs = reference.get(rounding)
    result = _result(_compare(decoder, refs), decoder, refs, precision, rounding, greedy_tokens)
    checks = _checks(
        result,
        precision,
        max_abs_diff,
        fp16_max_abs_diff,
        {**DEFAULT_MIN_TOP1, **(min_top1 or {})},
        {**DEFAULT_MAX_KL, **(max_kl or {})},
    )
    _judge(result, precision, checks)
    return result


def _checks(
    r: dict, precision: str, max_abs_diff: float, fp16_max_abs_diff: float, min_top1: dict, max_kl: dict
) -> dict:
    """{figure: (value, failing comparison, limit)} for the precision's pass rule; for every
    precision the app's generate loop must reproduce the forced decode's prefix on prompt 1."""
    loop = {"app loop prefix": (r["app_loop_prefix"], "<", r["first_prompt_prefix"])}
    if precision == "fp32":
        return {"max |logit diff|": (r["max_abs_diff"], ">", max_abs_diff), **loop}
    if precision == "fp16":
        return {"max |logit diff|": (r["max_abs_diff"], ">", fp16_max_abs_diff), **loop}
    if precision not in min_top1 or precision not in max_kl:
        raise UserError(
            f"no verification thresholds for ONNX precision '{precision}' "
            "(set verify.onnx_min_top1 and verify.onnx_max_kl for it)"
        )
    return {
        "top-1 agreement": (r["top1_agreement"], "<", min_top1[precision]),
        "mean KL": (r["mean_kl"], ">", max_kl[precision]),
        **loop,
    }
