"""Verify every export of a run against the torch model it came from."""

from __future__ import annotations

import os

from toolchain.config import VerifyConfig
from toolchain.errors import VerificationError


def verify_exports(model_dir: str | os.PathLike, exports: list[dict], cfg: VerifyConfig, threads: int = 0) -> list[dict]:
    """Run the check for each export; collect all results, then fail if any failed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.export.verify_gguf import verify_gguf
    from toolchain.export.verify_onnx import verify_onnx

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results, failures = [], []
    for e in exports:
        try:
            if e["format"] == "gguf":
                r = verify_gguf(model_dir, e["path"], e["quant"], cfg.prompts, cfg.greedy_tokens, cfg.max_nmse,
                                cfg.min_greedy_agreement, threads=threads, model=model, tokenizer=tokenizer)
            else:
                r = verify_onnx(model_dir, os.path.dirname(e["path"]), cfg.prompts, cfg.onnx_greedy_tokens,
                                cfg.onnx_max_abs_diff, threads=threads, model=model, tokenizer=tokenizer,
                                fp16_max_abs_diff=cfg.onnx_fp16_max_abs_diff, min_top1=cfg.onnx_min_top1,
                                max_kl=cfg.onnx_max_kl)
        except VerificationError as err:
            r = {"format": e["format"], "quant": e["quant"], **err.figures, "passed": False}
            failures.append(str(err))
        results.append(r)
    if failures:
        raise VerificationError("verification failed: " + " | ".join(failures), {"results": results})
    return results
