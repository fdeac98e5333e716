"""Does a GGUF still compute what the torch model computes? Checked in llama.cpp itself.

Checks, each against the fp32 torch model the GGUF was written from:
- tokenizer parity: llama.cpp's token ids equal the HF tokenizer's on sample text, including
  special tokens and chat-formatted text, with and without the BOS the model adds;
- logits per position: NMSE = sum((llama - torch)^2) / sum(torch^2) over every prompt position;
- logits per decode step: both fed torch's greedy tokens one at a time through their KV caches,
  NMSE over the steps (a wrong cache or rotary offset shows here, not in the prompt pass);
- greedy continuation: tokens chosen by llama.cpp vs by torch, each running free;
- quality on held-out text against a reference (gguf_quality.py): perplexity ratio, mean KLD,
  top-1 agreement, as in llama.cpp's perplexity README.
The torch side is computed once (TorchReference) and reused for every exported type.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from toolchain.errors import UserError, VerificationError


def _threshold(table: dict, type_name: str):
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


@contextlib.contextmanager
def open_llama(gguf_path: str | os.PathLike, n_ctx: int = 1024, threads: int = 0, logits_all: bool = True):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("verifying a GGUF needs llama-cpp-python: pip install llama-cpp-python") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
                    n_threads=threads or (os.cpu_count() or 1), n_batch=n_ctx)
    except ValueError as e:
        raise VerificationError(f"llama.cpp failed to load {path}: {e}") from None
    try:
        yield llm
    finally:
        llm.close()


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


class TorchReference:
    """Torch's ids, prompt logits, greedy tokens and decode-step logits for each prompt."""

    def __init__(self, model, tokenizer, prompts: list[str], greedy_tokens: int):
        import torch

        self.prompts, self.greedy_tokens = list(prompts), greedy_tokens
        self.ids, self.prompt_logits, self.greedy, self.step_logits = [], [], [], []
        with torch.no_grad():
            for p in self.prompts:
                ids = list(tokenizer(p).input_ids)  # with the BOS the model expects, if any
                res = model(torch.tensor([ids]), use_cache=True)
                logits, past = res.logits[0], res.past_key_values
                toks, steps = [int(logits[-1].argmax())], []
                for _ in range(greedy_tokens - 1):
                    res = model(torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
                    past = res.past_key_values
                    steps.append(res.logits[0, -1].float().numpy())
                    toks.append(int(res.logits[0, -1].argmax()))
                self.ids.append(ids)
                self.prompt_logits.append(logits.float().numpy())
                self.greedy.append(toks)
                self.step_logits.append(np.stack(steps) if steps else np.zeros((0, logits.shape[-1]), np.float32))


def verify_prompts(prompts: list[str], min_prompts: int) -> list[str]:
    """The configured prompts, topped up to `min_prompts` with held-out text openings."""
    out = list(prompts)
    if len(out) < min_prompts:
        from toolchain.distill.data import load_documents, split_documents

        _, held = split_documents(load_documents("pydoc"), 0.1, 0)
        paragraphs = [" ".join(p.split()) for doc in held for p in doc.split("\n\n")]
        for text in (p for p in paragraphs if len(p) >= 60):
            if len(out) >= min_prompts:
                break
            text = text[:160]
            out.append(text[: text.rfind(" ")])
    return out


def _nmse(got: np.ndarray, ref: np.ndarray) -> float:
    v = min(got.shape[-1], ref.shape[-1])
    g, r = got[..., :v].astype(np.float64), ref[..., :v].astype(np.float64)
    return float(((g - r) ** 2).sum() / max((r ** 2).sum(), 1e-30))


def _agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    same = [x == y for x, y in zip(a, b)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / max(1, len(same)), prefix


def verify_gguf(model_dir: str | os.PathLike, gguf_path: str | os.PathLike, type_name: str, prompts: list[str],
                greedy_tokens: int, max_nmse: dict, min_greedy_agreement: dict, threads: int = 0,
                model=None, tokenizer=None, reference: TorchReference | None = None,
                quality_reference=None, quality_chunks: list[list[int]] | None = None,
                quality_limits: dict | None = None) -> dict:
    """Compare one GGUF with the torch model in model_dir; raise VerificationError on failure.

    `reference` (a TorchReference for these prompts) saves recomputing torch for every type;
    `quality_reference` (gguf_quality.Scored on `quality_chunks`) adds the quality figures,
    checked against `quality_limits` ({"max_ppl_ratio": {...}, "max_mean_kld": {...},
    "min_top1_agreement": {...}}, each per type with a "default").
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if reference is None or reference.prompts != list(prompts) or reference.greedy_tokens != greedy_tokens:
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        reference = TorchReference(model, tokenizer, prompts, greedy_tokens)
    texts = parity_texts(prompts)
    longest = max(len(tokenizer(t).input_ids) for t in texts)
    n_ctx = max(512, longest + greedy_tokens + 8)
    with open_llama(gguf_path, n_ctx=n_ctx, threads=threads) as llm:
        # 1. tokenizer parity, raw and with the model's own special tokens (BOS) added
        mismatched = []
        for t in texts:
            hf_raw, hf_model = tokenizer(t, add_special_tokens=False).input_ids, tokenizer(t).input_ids
            ll_raw = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            ll_model = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
            if list(hf_raw) != list(ll_raw) or list(hf_model) != list(ll_model):
                mismatched.append(t[:40])
        nmse, step_nmse, agree, forced_agree, prefixes, sample = [], [], [], [], [], None
        for i, p in enumerate(reference.prompts):
            ids, ref_greedy = reference.ids[i], reference.greedy[i]
            # 2. logits per prompt position
            llm.reset()
            llm.eval(ids)
            nmse.append(_nmse(np.asarray(llm.scores[: len(ids)]), reference.prompt_logits[i]))
            # 3. logits per decode step, fed torch's tokens through the KV cache
            steps = []
            for tok in ref_greedy[:-1]:
                llm.eval([tok])
                steps.append(np.array(llm.scores[llm.n_tokens - 1]))
            if steps:
                got = np.stack(steps)
                step_nmse.append(_nmse(got, reference.step_logits[i]))
                forced_agree.append(float(np.mean(got.argmax(-1) == np.asarray(ref_greedy[1:]))))
            # 4. free-running greedy continuation
            got_greedy = _llama_greedy(llm, ids, greedy_tokens)
            frac, prefix = _agreement(ref_greedy, got_greedy)
            agree.append(frac)
            prefixes.append(prefix)
            if sample is None:
                sample = {"prompt": p, "llama_cpp": tokenizer.decode(got_greedy), "torch": tokenizer.decode(ref_greedy)}

    result = {
        "format": "gguf",
        "quant": type_name,
        "path": str(gguf_path),
        "tokenizer_parity": 1.0 - len(mismatched) / len(texts),
        "tokenizer_texts": len(texts),
        "nmse_mean": float(np.mean(nmse)),
        "nmse_max": float(np.max(nmse)),
        "decode_nmse_mean": float(np.mean(step_nmse)) if step_nmse else None,
        "decode_nmse_max": float(np.max(step_nmse)) if step_nmse else None,
        "decode_top1_agreement": float(np.mean(forced_agree)) if forced_agree else None,
        "greedy_agreement": float(np.mean(agree)),
        "greedy_prefix_min": int(min(prefixes)),
        "greedy_tokens": greedy_tokens,
        "prompts": len(reference.prompts),
        "sample": sample,
    }
    limit_nmse = _threshold(max_nmse, type_name)
    limit_agree = _threshold(min_greedy_agreement, type_name)
    failures = []
    if mismatched:
        failures.append(f"tokenizer ids differ on {len(mismatched)}/{len(texts)} texts (first: {mismatched[0]!r})")
    if limit_nmse is not None and result["nmse_max"] > limit_nmse:
        failures.append(f"logit NMSE {result['nmse_max']:.3g} > {limit_nmse:g}")
    if limit_nmse is not None and step_nmse and result["decode_nmse_max"] > limit_nmse:
        failures.append(f"decode-step logit NMSE {result['decode_nmse_max']:.3g} > {limit_nmse:g}")
    if limit_agree is not None and result["greedy_agreement"] < limit_agree:
        failures.append(f"greedy agreement {result['greedy_agreement']:.3f} < {limit_agree:g}")
    result["thresholds"] = {"max_nmse": limit_nmse, "min_greedy_agreement": limit_agree}
    if quality_reference is not None and quality_chunks:
        from toolchain.export.gguf_quality import compare, llama_scored

        q = compare(quality_reference, llama_scored(gguf_path, quality_chunks, threads))
        q["reference"] = getattr(quality_reference, "label", None)
        result["quality"] = q
        limits = quality_limits or {}
        for key, fig, worse in (("max_ppl_ratio", "ppl_ratio", float.__gt__), ("max_mean_kld", "mean_kld", float.__gt__),
                                ("min_top1_agreement", "top1_agreement", float.__lt__)):
            lim = _threshold(limits.get(key) or {}, type_name)
            result["thresholds"][key] = lim
            if lim is not None and worse(float(q[fig]), float(lim)):
                failures.append(f"{fig.replace('_', ' ')} {q[fig]:.4g} {'>' if key.startswith('max') else '<'} {lim:g}")
    result["passed"] = not failures
    if failures:
        raise VerificationError(f"{Path(gguf_path).name}: " + "; ".join(failures), result)
    return result
