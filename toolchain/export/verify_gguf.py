"""Does a GGUF still compute what the torch model computes? Checked in llama.cpp itself.

Three checks, each against the fp32 torch model the GGUF was written from:
- tokenizer parity: llama.cpp's token ids equal the HF tokenizer's on sample text, including
  special tokens and chat-formatted text;
- logits: NMSE = sum((llama - torch)^2) / sum(torch^2) over every position of every prompt;
- greedy continuation: tokens chosen by llama.cpp vs by torch, fed independently.
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


def _torch_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    out, past = [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    same = [x == y for x, y in zip(a, b)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / max(1, len(same)), prefix


def verify_gguf(model_dir: str | os.PathLike, gguf_path: str | os.PathLike, type_name: str, prompts: list[str],
                greedy_tokens: int, max_nmse: dict, min_greedy_agreement: dict, threads: int = 0,
                model=None, tokenizer=None) -> dict:
    """Compare one GGUF with the torch model in model_dir; raise VerificationError on failure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = parity_texts(prompts)
    longest = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    n_ctx = max(512, longest + greedy_tokens + 8)
    with open_llama(gguf_path, n_ctx=n_ctx, threads=threads) as llm:
        # 1. tokenizer parity
        mismatched = []
        for t in texts:
            hf_ids = tokenizer(t, add_special_tokens=False).input_ids
            ll_ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            if list(hf_ids) != list(ll_ids):
                mismatched.append(t[:40])
        # 2. logits per position
        nmse = []
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False).input_ids
            llm.reset()
            llm.eval(ids)
            ll = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].double().numpy()
            v = min(ll.shape[-1], ref.shape[-1])
            nmse.append(float(((ll[:, :v] - ref[:, :v]) ** 2).sum() / (ref[:, :v] ** 2).sum()))
        # 3. greedy continuation
        agree, prefixes, sample = [], [], None
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False).input_ids
            ref = _torch_greedy(model, ids, greedy_tokens)
            got = _llama_greedy(llm, ids, greedy_tokens)
            frac, prefix = _agreement(ref, got)
            agree.append(frac)
            prefixes.append(prefix)
            if sample is None:
                sample = {"prompt": p, "llama_cpp": tokenizer.decode(got), "torch": tokenizer.decode(ref)}

    result = {
        "format": "gguf",
        "quant": type_name,
        "path": str(gguf_path),
        "tokenizer_parity": 1.0 - len(mismatched) / len(texts),
        "tokenizer_texts": len(texts),
        "nmse_mean": float(np.mean(nmse)),
        "nmse_max": float(np.max(nmse)),
        "greedy_agreement": float(np.mean(agree)),
        "greedy_prefix_min": int(min(prefixes)),
        "greedy_tokens": greedy_tokens,
        "prompts": len(prompts),
        "sample": sample,
    }
    limit_nmse = _threshold(max_nmse, type_name)
    limit_agree = _threshold(min_greedy_agreement, type_name)
    failures = []
    if mismatched:
        failures.append(f"tokenizer ids differ on {len(mismatched)}/{len(texts)} texts (first: {mismatched[0]!r})")
    if limit_nmse is not None and result["nmse_max"] > limit_nmse:
        failures.append(f"logit NMSE {result['nmse_max']:.3g} > {limit_nmse:g}")
    if limit_agree is not None and result["greedy_agreement"] < limit_agree:
        failures.append(f"greedy agreement {result['greedy_agreement']:.3f} < {limit_agree:g}")
    result["thresholds"] = {"max_nmse": limit_nmse, "min_greedy_agreement": limit_agree}
    result["passed"] = not failures
    if failures:
        raise VerificationError(f"{Path(gguf_path).name}: " + "; ".join(failures), result)
    return result
