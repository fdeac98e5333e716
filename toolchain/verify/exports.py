"""Verify every export of a run against the torch model it came from."""

from __future__ import annotations

import logging
import os

from toolchain.config import DataConfig, VerifyConfig
from toolchain.errors import VerificationError
from toolchain.formats import Artifact

log = logging.getLogger(__name__)


def _quality_reference(model, tokenizer, exports: list[Artifact], cfg: VerifyConfig, threads: int, data: DataConfig):
    """(Scored reference, chunks) for the quality table: the F16 (else F32) GGUF, else torch."""
    from toolchain.verify.quality import heldout_chunks, llama_scored, torch_scored

    ggufs = {e["quant"]: e for e in exports if e["format"] == "gguf"}
    if not cfg.quality_tokens or not ggufs:
        return None, None
    add_bos = len(tokenizer("a").input_ids) > len(tokenizer("a", add_special_tokens=False).input_ids)
    chunks = heldout_chunks(
        tokenizer, cfg.quality_tokens, cfg.quality_ctx, add_bos, data.source, data.heldout_fraction, data.seed
    )
    if not chunks:
        return None, None
    for t in ("F16", "F32"):
        if t in ggufs:
            ref = llama_scored(ggufs[t]["path"], chunks, threads)
            ref.label = f"{t} GGUF"
            return ref, chunks
    ref = torch_scored(model, chunks)
    ref.label = "torch fp32"
    return ref, chunks


def verify_exports(
    model_dir: str | os.PathLike,
    exports: list[Artifact],
    cfg: VerifyConfig,
    threads: int = 0,
    data: DataConfig | None = None,
) -> list[dict]:
    """Run the check for each export; collect all results, then fail if any failed.

    Prompts are topped up and the quality table is measured on the held-out text of `data` (the
    run's data settings; default DataConfig()), so nothing checked was trained on.

    One torch reference serves every export (each rounding of it computed once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.models.load import read_meta
    from toolchain.quantize.qat import load_scales
    from toolchain.verify.gguf import verify_gguf, verify_prompts
    from toolchain.verify.onnx import verify_onnx
    from toolchain.verify.reference import Reference

    # the checks measure numbers, not speed: a few threads are ~1.5x faster than one on an idle
    # machine, and more only add synchronisation for a model this small. Pass threads=1 on a
    # machine shared with other work (spinning llama.cpp threads collapse when a core is taken).
    threads = threads or min(4, os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = data or DataConfig()
    prompts = verify_prompts(cfg.prompts, cfg.min_prompts, data)
    qat = read_meta(model_dir).get("qat")
    reference = Reference(model, tokenizer, prompts, cfg.greedy_tokens, qat, load_scales(model_dir, qat))
    quality_ref, chunks = _quality_reference(model, tokenizer, exports, cfg, threads, data)
    limits = {
        "max_ppl_ratio": cfg.max_ppl_ratio,
        "max_mean_kld": cfg.max_mean_kld,
        "min_top1_agreement": cfg.min_top1_agreement,
    }
    results, failures = [], []
    for e in exports:
        try:
            if e["format"] == "gguf":
                r = verify_gguf(
                    model_dir,
                    e["path"],
                    e["quant"],
                    prompts,
                    cfg.greedy_tokens,
                    cfg.max_nmse,
                    cfg.min_greedy_agreement,
                    threads=threads,
                    tokenizer=tokenizer,
                    reference=reference,
                    quality_reference=quality_ref,
                    quality_chunks=chunks,
                    quality_limits=limits,
                )
            else:
                r = verify_onnx(
                    model_dir,
                    os.path.dirname(e["path"]),
                    prompts,
                    cfg.greedy_tokens,
                    cfg.onnx_max_abs_diff,
                    threads=threads,
                    reference=reference,
                    fp16_max_abs_diff=cfg.onnx_fp16_max_abs_diff,
                    min_top1=cfg.onnx_min_top1,
                    max_kl=cfg.onnx_max_kl,
                )
        except VerificationError as err:
            r = {"format": e["format"], "quant": e["quant"], **err.figures, "passed": False}
            failures.append(str(err))
        if e.get("bytes") is not None:
            r.setdefault("bytes", e["bytes"])
        results.append(r)
    if failures:
        remedy = _remedy(results, (qat or {}).get("type"))
        raise VerificationError("verification failed: " + " | ".join(failures) + remedy, {"results": results})
    return results


def _remedy(results: list[dict], trained: str | None) -> str:
    """What to do about a failed GGUF type the student can be trained through (quantize.qat)."""
    from toolchain.formats import QAT_GGUF_TYPES

    failed = [r["quant"] for r in results if r["format"] == "gguf" and not r.get("passed")]
    fixable = [t for t in failed if t in QAT_GGUF_TYPES and t != trained]
    if not fixable:
        return ""
    t = fixable[0]
    return (
        f". To bring {t} within its bound, train the student through its rounding: quantize.qat: {t} "
        f"in a run, or `toolchain quantize --type {t}`"
    )


def summary_lines(results: list[dict]) -> list[str]:
    """One line per checked export, the figures a user reads first."""
    lines = []
    for r in results:
        ties = f"{r['near_ties']} near-ties ({r['near_tie_flips']} flipped)"
        if r["format"] == "gguf":
            lines.append(
                f"{r['quant']}: tokenizer {r['tokenizer_parity']:.0%}, NMSE {r['nmse_max']:.2e}, "
                f"greedy {r['greedy_agreement']:.1%} where clear, {ties}"
            )
        else:
            lines.append(
                f"onnx {r['quant']}: max |dlogit| {r['max_abs_diff']:.2e}, top-1 {r['top1_agreement']:.1%}, "
                f"mean KL {r['mean_kl']:.2e}, greedy {r['greedy_agreement']:.1%} where clear, {ties}"
            )
    return lines
