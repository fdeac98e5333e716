"""onnxruntime runner: prefill and decode timing of an exported ONNX decoder (OnnxDecoder).

Imports neither torch nor transformers, so it runs on a device with only onnxruntime.
Timing follows llama_cpp_runner.py: a warm-up run, then per run one prefill of the prompt and
`gen_tokens` single-token greedy decode steps (EOS is not a stop: every run does the same work).
"""

from __future__ import annotations

import time

import numpy as np

from toolchain.bench.stats import timed_runs
from toolchain.runtime.onnx_decoder import OnnxDecoder


def _one_run(dec: OnnxDecoder, prompt_ids: list[int], gen_tokens: int):
    dec.reset()
    t0 = time.perf_counter()
    logits = dec.forward(prompt_ids)
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(logits[-1]))
    ttft_s = time.perf_counter() - t0
    lat = []
    for _ in range(gen_tokens):
        t = time.perf_counter()
        tok = int(np.argmax(dec.forward([tok])[-1]))
        lat.append(time.perf_counter() - t)
    return prefill_s, ttft_s, lat


def bench(model_path: str, prompt_ids: list[int], gen_tokens: int, runs: int, threads: int) -> dict:
    """`model_path`: model.onnx or its folder (with model_info.json)."""
    if not prompt_ids or gen_tokens < 1 or runs < 1:
        raise ValueError("bench needs a non-empty prompt, gen_tokens >= 1 and runs >= 1")
    t0 = time.perf_counter()
    dec = OnnxDecoder(model_path, threads=threads)
    load_s = time.perf_counter() - t0
    _one_run(dec, prompt_ids, gen_tokens)  # warm-up: page-in, and the arena grows to full length once
    figures = timed_runs(lambda: _one_run(dec, prompt_ids, gen_tokens), len(prompt_ids), runs)
    return {
        "runtime": "onnxruntime",
        "threads": threads,
        "n_prompt": len(prompt_ids),
        "n_gen": gen_tokens,
        "load_s": load_s,
        **figures,
    }
