"""Check an ONNX export against the torch fp32 model it came from.

Two figures per run:
- `max_abs_diff`: the largest |logit difference| over every prompt position (prefill, empty
  past) and every greedy decode step (through each side's KV cache). Both sides are fed
  torch's greedy tokens, so the steps stay aligned even if a near-tie would make them diverge.
- greedy agreement: an independent `OnnxDecoder.generate` run against torch's greedy tokens.
  `greedy_agreement` is the fraction of positions that match; `greedy_prefix` the fraction
  before the first mismatch (averaged over prompts); `per_prompt` has the token counts.

Only `max_abs_diff` decides `passed`; greedy figures are informative (a near-tie can flip a
token with tiny logit differences).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from toolchain.errors import UserError, VerificationError
from toolchain.runtime.onnx_decoder import OnnxDecoder


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return math.inf if math.isnan(d) else d  # a NaN must fail the check, and max() would drop it


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

    worst, matches, prefix_sum, per_prompt = 0.0, 0, 0.0, []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"prompt {prompt!r} tokenizes to nothing")
        prefill, tokens, steps = _torch_greedy(model, ids, greedy_tokens)

        decoder.reset()
        diff = _max_diff(decoder.forward(ids), prefill)
        for tok, ref in zip(tokens, steps):  # feed torch's token, compare the next logits
            diff = max(diff, _max_diff(decoder.forward([tok])[-1], ref))

        # independent greedy run; no stop ids, since torch's run did not stop either
        ours = decoder.generate(ids, greedy_tokens, greedy=True, stop_ids=[])
        same = [a == b for a, b in zip(ours, tokens)]
        prefix = same.index(False) if False in same else len(same)
        matches += sum(same)
        prefix_sum += prefix / greedy_tokens
        worst = max(worst, diff)
        per_prompt.append({"n_tokens": len(ids), "max_abs_diff": diff, "agree": sum(same), "prefix": prefix})

    result = {
        "format": "onnx",
        "quant": "fp32",
        "max_abs_diff": worst,
        "greedy_agreement": matches / (greedy_tokens * len(prompts)),
        "greedy_prefix": prefix_sum / len(prompts),
        "greedy_tokens": greedy_tokens,
        "prompts": len(prompts),
        "per_prompt": per_prompt,
        "passed": bool(worst <= max_abs_diff),
    }
    if not result["passed"]:
        raise VerificationError(
            f"ONNX export differs from torch: max |logit diff| {worst:.3g} > {max_abs_diff:g} "
            f"(greedy agreement {result['greedy_agreement']:.1%}, prefix {result['greedy_prefix']:.1%}, "
            f"{len(prompts)} prompts)",
            result,
        )
    return result
