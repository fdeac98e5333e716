"""Greedy answers to chat prompts from torch, llama.cpp (GGUF) and onnxruntime (ONNX), token for token alike.

Every runtime gets the same token ids: the prompt rendered with the model's own chat template
(Hugging Face tokenizer, generation prompt added) and tokenized once. Decoding is greedy and
stops at the model's stop tokens (its EOS and end-of-turn tokens), so the runtimes differ only in
their arithmetic, and one grader scores them all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def decode_answer(tokenizer, ids: list[int], stops: list[int]) -> str:
    """The answer text: up to the first stop token, special tokens dropped, stripped."""
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def torch_generate(model, prompts: list[list[int]], max_new_tokens: int, stops: list[int]) -> list[list[int]]:
    import torch

    from toolchain.devices.placement import model_device

    dev = model_device(model)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=dev)
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=stops[0] if stops else None,  # batch 1: never used, but generate asks
            )
            out.append(y[0, len(ids) :].tolist())
    return out


def llama_generate(
    gguf_path: str | os.PathLike,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: list[int],
    threads: int = 0,
    stats: list | None = None,
) -> list[list[int]]:
    """Greedy answers; with `stats` (a list), each answer's per-token confidence stats are appended to it."""
    from toolchain.runtime.confidence import token_stats
    from toolchain.runtime.llama import last_logits, open_llama

    n_ctx = max(256, max(map(len, prompts)) + max_new_tokens + 8)
    out = []
    with open_llama(gguf_path, n_ctx=n_ctx, threads=threads, logits_all=False) as llm:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            new: list[int] = []
            seen = []
            while len(new) < max_new_tokens:
                logits = last_logits(llm)
                tok = int(np.argmax(logits))
                new.append(tok)
                if stats is not None:
                    seen.append(token_stats(logits, tok))
                if tok in stops:
                    break
                llm.eval([tok])
            out.append(new)
            if stats is not None:
                stats.append(seen)
    return out


def onnx_generate(
    folder: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int, stops: list[int], threads: int = 0
) -> list[list[int]]:
    from toolchain.runtime.onnx_decoder import OnnxDecoder

    dec = OnnxDecoder(Path(folder), threads=threads)
    return [dec.generate(ids, max_new_tokens, greedy=True, stop_ids=stops) for ids in prompts]
