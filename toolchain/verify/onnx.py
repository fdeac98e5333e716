"""Check an ONNX export (any precision) against the torch fp32 model it came from.

Figures per run, over every prompt position (prefill, empty past) and every decode step
(through each side's KV cache); both sides are fed torch's greedy tokens, so the steps stay
aligned even where a near-tie would make them diverge:
- `max_abs_diff`: the largest |logit difference|;
- `top1_agreement`: fraction of positions where both pick the same next token;
- `mean_kl`: mean KL(torch || onnx) of the next-token distributions (nats).
Then an independent `OnnxDecoder.generate` run against torch's greedy tokens:
`greedy_agreement` is the fraction of positions that match; `greedy_prefix` the fraction
before the first mismatch (averaged over prompts); `per_prompt` has the token counts.

What decides `passed` depends on the export's precision (model_info.json):
- fp32: max_abs_diff <= `max_abs_diff` (1e-3); fp16: <= `fp16_max_abs_diff` (2e-2);
- int8 / int4: top1_agreement >= `min_top1[precision]` and mean_kl <= `max_kl[precision]`
  (quantized logits are not meant to be close in absolute terms, their choices are).
Greedy figures are informative (a near-tie can flip a token with tiny logit differences).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from toolchain.errors import UserError, VerificationError
from toolchain.runtime.onnx_decoder import OnnxDecoder

DEFAULT_MIN_TOP1 = {"int8": 0.95, "int4": 0.90}
DEFAULT_MAX_KL = {"int8": 0.05, "int4": 0.25}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return math.inf if math.isnan(d) else d  # a NaN must fail the check, and max() would drop it


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, list[bool], list[float]]:
    """(max |diff|, top-1 equal per row, KL(ref || ours) per row) for [rows, vocab] logits."""
    ours, ref = np.atleast_2d(ours), np.atleast_2d(ref)
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    kl = np.where(np.isfinite(kl), kl, np.inf)  # a NaN row must fail the check
    return _max_diff(ours, ref), list(ours.argmax(-1) == ref.argmax(-1)), [float(k) for k in kl]


def _torch_greedy(model, ids: list[int], n: int):
    """Torch's prefill logits, its greedy tokens and the logits of each decode step."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0]
        prefill = logits.float().numpy()
        tokens, steps = [int(prefill[-1].argmax())], []
        while len(tokens) < n:
            step = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
            steps.append(step.float().numpy())
            tokens.append(int(steps[-1].argmax()))
    return prefill, tokens, steps


def verify_onnx(
    model_dir: str | Path,
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
) -> dict:
    """Compare `onnx_dir` (from export_onnx) with the torch model in `model_dir`; raise on failure.

    `model` / `tokenizer` may be passed in already loaded (fp32) to avoid loading them again.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not prompts:
        raise UserError("verify_onnx needs at least one prompt")
    if greedy_tokens < 1:
        raise UserError(f"greedy_tokens must be >= 1, got {greedy_tokens}")
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    decoder = OnnxDecoder(onnx_dir, threads=threads)
    precision = decoder.info.get("precision", "fp32")
    reference = "torch fp32"
    if precision == "fp16":
        # the fp16 check is of the export, not of fp16 itself: compare with torch running the
        # same model in fp16 (fp16 weights alone move SmolLM2's logits by ~5e-2 from fp32, in
        # any runtime, so a 2e-2 bound against fp32 would fail every correct fp16 export)
        import copy

        import torch

        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        reference = "torch fp32, fp16-rounded weights"

    worst, matches, prefix_sum, per_prompt = 0.0, 0, 0.0, []
    top1: list[bool] = []
    kls: list[float] = []
    for prompt in prompts:
        # the model's own special tokens: Gemma needs its BOS (without it the reference itself
        # is off-distribution), SmolLM2's tokenizer adds none
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise UserError(f"prompt {prompt!r} tokenizes to nothing")
        prefill, tokens, steps = _torch_greedy(model, ids, greedy_tokens)

        decoder.reset()
        diff, same1, kl = _compare(decoder.forward(ids), prefill)
        for tok, ref in zip(tokens, steps):  # feed torch's token, compare the next logits
            d, t, k = _compare(decoder.forward([tok])[-1], ref)
            diff, same1, kl = max(diff, d), same1 + t, kl + k
        top1 += same1
        kls += kl

        # independent greedy run; no stop ids, since torch's run did not stop either
        ours = decoder.generate(ids, greedy_tokens, greedy=True, stop_ids=[])
        same = [a == b for a, b in zip(ours, tokens)]
        prefix = same.index(False) if False in same else len(same)
        matches += sum(same)
        prefix_sum += prefix / greedy_tokens
        worst = max(worst, diff)
        per_prompt.append({"n_tokens": len(ids), "max_abs_diff": diff, "agree": sum(same), "prefix": prefix,
                           "top1_agreement": float(np.mean(same1)), "mean_kl": float(np.mean(kl))})

    result = {
        "format": "onnx",
        "quant": precision,
        "reference": reference,
        "max_abs_diff": worst,
        "top1_agreement": float(np.mean(top1)),
        "mean_kl": float(np.mean(kls)),
        "max_kl": float(np.max(kls)),
        "positions": len(top1),
        "greedy_agreement": matches / (greedy_tokens * len(prompts)),
        "greedy_prefix": prefix_sum / len(prompts),
        "greedy_tokens": greedy_tokens,
        "prompts": len(prompts),
        "per_prompt": per_prompt,
    }
    checks = _checks(result, precision, max_abs_diff, fp16_max_abs_diff,
                     {**DEFAULT_MIN_TOP1, **(min_top1 or {})}, {**DEFAULT_MAX_KL, **(max_kl or {})})
    result["thresholds"] = {name: limit for name, (_, _, limit) in checks.items()}
    failed = [f"{name} {value:.3g} {op} {limit:g}" for name, (value, op, limit) in checks.items()
              if not (value <= limit if op == ">" else value >= limit)]
    result["passed"] = not failed
    if failed:
        raise VerificationError(
            f"ONNX {precision} export differs from torch: {', '.join(failed)} "
            f"(top-1 {result['top1_agreement']:.1%}, mean KL {result['mean_kl']:.3g}, "
            f"max |logit diff| {worst:.3g}, greedy agreement {result['greedy_agreement']:.1%}, "
            f"prefix {result['greedy_prefix']:.1%}, {len(prompts)} prompts)",
            result,
        )
    return result


def _checks(r: dict, precision: str, max_abs_diff: float, fp16_max_abs_diff: float,
            min_top1: dict, max_kl: dict) -> dict:
    """{figure: (value, failing comparison, limit)} for the precision's pass rule."""
    if precision == "fp32":
        return {"max |logit diff|": (r["max_abs_diff"], ">", max_abs_diff)}
    if precision == "fp16":
        return {"max |logit diff|": (r["max_abs_diff"], ">", fp16_max_abs_diff)}
    if precision not in min_top1 or precision not in max_kl:
        raise UserError(f"no verification thresholds for ONNX precision '{precision}' "
                        "(set verify.onnx_min_top1 and verify.onnx_max_kl for it)")
    return {"top-1 agreement": (r["top1_agreement"], "<", min_top1[precision]),
            "mean KL": (r["mean_kl"], ">", max_kl[precision])}
