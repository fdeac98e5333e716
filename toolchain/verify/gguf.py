"""Does a GGUF still compute what the torch model computes? Checked in llama.cpp itself.

Checks, each against the torch reference that rounds weights as this GGUF type stores them
(`reference.py`):
- tokenizer parity: llama.cpp's token ids equal the HF tokenizer's on sample text, including
  special tokens and chat-formatted text, with and without the BOS the model adds;
- logits per position: NMSE = sum((llama - torch)^2) / sum(torch^2) over every prompt position;
- logits per decode step: fed torch's greedy tokens one at a time through the KV cache, NMSE
  over the steps (a wrong cache or rotary offset shows here, not in the prompt pass);
- greedy agreement at those steps where the reference's choice is clear, near-ties apart
  (`metrics.greedy_figures`), and the free-running greedy prefix;
- quality on held-out text against a reference (`quality.py`): perplexity ratio, mean KLD,
  top-1 agreement, as in llama.cpp's perplexity README.
A failure raises VerificationError whose message carries every figure and threshold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.config import DataConfig
from toolchain.errors import VerificationError
from toolchain.models.load import read_meta
from toolchain.runtime.llama import open_llama
from toolchain.verify.metrics import greedy_figures, nmse
from toolchain.verify.reference import LABELS, PromptReference, Reference, rounding_for


def threshold(table: dict, type_name: str):
    return table.get(type_name, table.get("default"))


def parity_texts(prompts: list[str]) -> list[str]:
    """Prompts plus text that stresses a tokenizer: digits, code, unicode, chat markup."""
    from pydoc_data.topics import topics

    extra = [
        topics[sorted(topics)[3]][:2000],
        "Numbers 1234567 and 3.14159, code: for i in range(10): print(i**2)  # done\n\ttabs",
        "Unicode: café naïve Straße 東京 🚀 — “quotes” ‘single’",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "   leading spaces and trailing   \n\n\nnewlines",
    ]
    return list(prompts) + extra


def verify_prompts(prompts: list[str], min_prompts: int, data: DataConfig | None = None) -> list[str]:
    """The configured prompts, topped up to `min_prompts` with openings of the run's held-out
    text (`data`'s source, fraction and seed: never text the student trained on)."""
    out = list(prompts)
    if len(out) < min_prompts:
        from toolchain.data.corpus import load_documents, split_documents

        data = data or DataConfig()
        _, held = split_documents(load_documents(data.source), data.heldout_fraction, data.seed)
        paragraphs = [" ".join(p.split()) for doc in held for p in doc.split("\n\n")]
        for text in (p for p in paragraphs if len(p) >= 60):
            if len(out) >= min_prompts:
                break
            text = text[:160]
            out.append(text[: text.rfind(" ")])
    return out


def _tokenizer_mismatches(llm, tokenizer, texts: list[str]) -> list[str]:
    bad = []
    for t in texts:
        hf_raw, hf_model = tokenizer(t, add_special_tokens=False).input_ids, tokenizer(t).input_ids
        ll_raw = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
        ll_model = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
        if list(hf_raw) != list(ll_raw) or list(hf_model) != list(ll_model):
            bad.append(t[:40])
    return bad


def _llama_logits(llm, ref) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's prompt logits and the logits choosing each of torch's greedy tokens."""
    llm.reset()
    llm.eval(ref.ids)
    prompt = np.array(llm.scores[: len(ref.ids)])
    choices = [prompt[-1]]
    for tok in ref.greedy[:-1]:
        llm.eval([tok])
        choices.append(np.array(llm.scores[llm.n_tokens - 1]))
    return prompt, np.stack(choices)


def describe(result: dict) -> str:
    """Every figure of a GGUF check with its threshold, on one line."""
    t = result.get("thresholds", {})
    parts = [
        f"tokenizer parity {result['tokenizer_parity']:.0%} of {result['tokenizer_texts']} texts",
        f"prompt NMSE max {result['nmse_max']:.3g} (limit {t.get('max_nmse')})",
        f"decode NMSE max {result['decode_nmse_max']:.3g}" if result.get("decode_nmse_max") is not None else None,
        f"greedy agreement {result['greedy_agreement']:.3f} over {result['greedy_decisive']} clear positions "
        f"(limit {t.get('min_greedy_agreement')}); near-ties {result['near_ties']} "
        f"({result['near_tie_flips']} flipped; margin < 2 x noise {result['logit_noise_p99']:.3g}); "
        f"first difference at token {result['greedy_prefix_min']}",
    ]
    q = result.get("quality")
    if q:
        parts.append(
            f"PPL ratio {q['ppl_ratio']:.4f} (limit {t.get('max_ppl_ratio')}), mean KLD {q['mean_kld']:.4g} "
            f"(limit {t.get('max_mean_kld')}), top-1 {q['top1_agreement']:.1%} (limit {t.get('min_top1_agreement')})"
        )
    parts.append(f"{result['prompts']} prompts x {result['greedy_tokens']} tokens vs {result['reference']}")
    return "; ".join(p for p in parts if p)


def _failures(result: dict, mismatched: list[str]) -> list[str]:
    t = result["thresholds"]
    out = []
    if mismatched:
        out.append(
            f"tokenizer ids differ on {len(mismatched)}/{result['tokenizer_texts']} texts (first: {mismatched[0]!r})"
        )
    lim = t["max_nmse"]
    if lim is not None and result["nmse_max"] > lim:
        out.append(f"prompt NMSE {result['nmse_max']:.3g} > {lim:g}")
    if lim is not None and result["decode_nmse_max"] is not None and result["decode_nmse_max"] > lim:
        out.append(f"decode-step NMSE {result['decode_nmse_max']:.3g} > {lim:g}")
    lim = t["min_greedy_agreement"]
    if lim is not None and result["greedy_agreement"] < lim:
        out.append(f"greedy agreement {result['greedy_agreement']:.3f} < {lim:g}")
    q = result.get("quality") or {}
    for key, fig, worse in (
        ("max_ppl_ratio", "ppl_ratio", float.__gt__),
        ("max_mean_kld", "mean_kld", float.__gt__),
        ("min_top1_agreement", "top1_agreement", float.__lt__),
    ):
        lim = t.get(key)
        if q and lim is not None and worse(float(q[fig]), float(lim)):
            out.append(f"{fig.replace('_', ' ')} {q[fig]:.4g} {'>' if key.startswith('max') else '<'} {lim:g}")
    return out


@dataclass
class _LlamaRun:
    """What llama.cpp made of the parity texts and of the reference prompts."""

    texts: list[str]
    mismatched: list[str]
    prompt_nmse: list[float]
    step_nmse: list[float]
    choices: list[np.ndarray]


def _torch_reference(
    model_dir: str | os.PathLike,
    prompts: list[str],
    greedy_tokens: int,
    model,
    tokenizer,
    reference: Reference | None,
):
    """The tokenizer and a Reference for these prompts, loading or computing only what is missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.quantize.qat import load_scales

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if reference is None or not reference.matches(prompts, greedy_tokens):
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        qat = read_meta(model_dir).get("qat")
        reference = Reference(model, tokenizer, prompts, greedy_tokens, qat, load_scales(model_dir, qat))
    return tokenizer, reference


def _run_llama(
    gguf_path: str | os.PathLike,
    tokenizer,
    prompts: list[str],
    refs: list[PromptReference],
    greedy_tokens: int,
    threads: int,
) -> _LlamaRun:
    texts = parity_texts(prompts)
    longest = max(len(tokenizer(t).input_ids) for t in texts)
    n_ctx = max(512, longest + greedy_tokens + 8)
    with open_llama(gguf_path, n_ctx=n_ctx, threads=threads) as llm:
        mismatched = _tokenizer_mismatches(llm, tokenizer, texts)
        prompt_nmse, step_nmse, choices = [], [], []
        for ref in refs:
            prompt, chose = _llama_logits(llm, ref)
            prompt_nmse.append(nmse(prompt, ref.prompt_logits))
            if len(ref.step_logits):
                step_nmse.append(nmse(chose[1:], ref.step_logits))
            choices.append(chose)
    return _LlamaRun(texts, mismatched, prompt_nmse, step_nmse, choices)


def _result(
    run: _LlamaRun,
    refs: list[PromptReference],
    reference: Reference,
    tokenizer,
    gguf_path: str | os.PathLike,
    type_name: str,
    rounding: str,
    greedy_tokens: int,
    thresholds: dict,
) -> dict:
    step_nmse = run.step_nmse
    return {
        "format": "gguf",
        "quant": type_name,
        "path": str(gguf_path),
        "reference": LABELS[rounding],
        "tokenizer_parity": 1.0 - len(run.mismatched) / len(run.texts),
        "tokenizer_texts": len(run.texts),
        "nmse_mean": float(np.mean(run.prompt_nmse)),
        "nmse_max": float(np.max(run.prompt_nmse)),
        "decode_nmse_mean": float(np.mean(step_nmse)) if step_nmse else None,
        "decode_nmse_max": float(np.max(step_nmse)) if step_nmse else None,
        **greedy_figures([r.choice_logits for r in refs], run.choices),
        "greedy_tokens": greedy_tokens,
        "prompts": len(refs),
        "sample": {
            "prompt": reference.prompts[0],
            "llama_cpp": tokenizer.decode([int(t) for t in run.choices[0].argmax(-1)]),
            "torch": tokenizer.decode(refs[0].greedy),
        },
        "thresholds": thresholds,
    }


def _add_quality(
    result: dict,
    gguf_path: str | os.PathLike,
    type_name: str,
    threads: int,
    quality_reference,
    quality_chunks: list[list[int]],
    quality_limits: dict | None,
) -> None:
    from toolchain.verify.quality import compare, llama_scored

    q = compare(quality_reference, llama_scored(gguf_path, quality_chunks, threads))
    q["reference"] = getattr(quality_reference, "label", None)
    result["quality"] = q
    for key in ("max_ppl_ratio", "max_mean_kld", "min_top1_agreement"):
        result["thresholds"][key] = threshold((quality_limits or {}).get(key) or {}, type_name)


def verify_gguf(
    model_dir: str | os.PathLike,
    gguf_path: str | os.PathLike,
    type_name: str,
    prompts: list[str],
    greedy_tokens: int,
    max_nmse: dict,
    min_greedy_agreement: dict,
    threads: int = 0,
    model=None,
    tokenizer=None,
    reference: Reference | None = None,
    quality_reference=None,
    quality_chunks: list[list[int]] | None = None,
    quality_limits: dict | None = None,
) -> dict:
    """Compare one GGUF with the torch model in model_dir; raise VerificationError on failure.

    `reference` (a Reference for these prompts) saves recomputing torch for every type;
    `quality_reference` (quality.Scored on `quality_chunks`) adds the quality figures, checked
    against `quality_limits` ({"max_ppl_ratio": {...}, "max_mean_kld": {...},
    "min_top1_agreement": {...}}, each per type with a "default").
    """
    tokenizer, reference = _torch_reference(model_dir, prompts, greedy_tokens, model, tokenizer, reference)
    rounding = rounding_for("gguf", type_name, reference.trained_type)
    refs = reference.get(rounding)
    run = _run_llama(gguf_path, tokenizer, prompts, refs, greedy_tokens, threads)
    thresholds = {
        "max_nmse": threshold(max_nmse, type_name),
        "min_greedy_agreement": threshold(min_greedy_agreement, type_name),
    }
    result = _result(run, refs, reference, tokenizer, gguf_path, type_name, rounding, greedy_tokens, thresholds)
    if quality_reference is not None and quality_chunks:
        _add_quality(result, gguf_path, type_name, threads, quality_reference, quality_chunks, quality_limits)
    failures = _failures(result, run.mismatched)
    result["passed"] = not failures
    if failures:
        raise VerificationError(
            f"{Path(gguf_path).name} FAILED: {'; '.join(failures)}. Figures: {describe(result)}", result
        )
    return result
