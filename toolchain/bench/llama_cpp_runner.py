"""llama.cpp runner: prefill and decode timing through llama-cpp-python's low-level eval.

Imports neither torch nor transformers, so it runs on a device with only llama-cpp-python.
"""

from __future__ import annotations

import time

import numpy as np

from toolchain.bench.stats import timed_runs


def load(model_path: str, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=min(512, n_ctx), logits_all=False, verbose=False)


def _one_run(llm, prompt_ids: list[int], gen_tokens: int):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ttft_s = time.perf_counter() - t0
    lat = []
    for _ in range(gen_tokens):
        t = time.perf_counter()
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        lat.append(time.perf_counter() - t)
    return prefill_s, ttft_s, lat


def bench(model_path: str, prompt_ids: list[int], gen_tokens: int, runs: int, threads: int) -> dict:
    t0 = time.perf_counter()
    llm = load(model_path, len(prompt_ids) + gen_tokens + 8, threads)
    load_s = time.perf_counter() - t0
    try:
        _one_run(llm, prompt_ids, min(gen_tokens, 8))  # warm-up: page in weights, build repacked buffers
        figures = timed_runs(lambda: _one_run(llm, prompt_ids, gen_tokens), len(prompt_ids), runs)
    finally:
        llm.close()
    return {
        "runtime": "llama_cpp",
        "threads": threads,
        "n_prompt": len(prompt_ids),
        "n_gen": gen_tokens,
        "load_s": load_s,
        **figures,
    }


def tokenize(model_path: str, text: str) -> list[int]:
    """Token ids of `text` with the GGUF's own tokenizer (vocabulary only, no weights loaded)."""
    from llama_cpp import Llama

    from toolchain.native_output import captured_native_output

    with captured_native_output():  # a vocab-only load still prints a context warning
        llm = Llama(model_path=model_path, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
