"""The one timing loop every runner goes through, and the statistics it reports.

A runner only opens a session (reset / feed / argmax / close); this module times it, so every
runtime is measured the same way: the same prompt tokens, the same greedy decode length, the same
warm-up, percentile rule and contention handling.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Protocol


class Session(Protocol):
    """What a runner opens (llama_cpp_runner, onnxruntime_runner, torch_runner)."""

    info: dict  # runtime facts for the result row: backends, n_batch, n_gpu_layers, runtime_version

    def reset(self) -> None: ...  # forget the KV cache (start a new sequence)
    def feed(self, ids: list[int]) -> None: ...  # run the model on ids after the cached tokens
    def argmax(self) -> int: ...  # greedy next token from the last position's logits
    def close(self) -> None: ...


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank on the sorted values (one rule for every figure)."""
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def summary(values: list[float]) -> dict:
    """Median, p95 and spread of per-run values."""
    s = sorted(values)
    return {
        "median": statistics.median(s),
        "p95": percentile(s, 0.95),
        "stddev": statistics.stdev(s) if len(s) > 1 else 0.0,
        "runs": list(values),
    }


def one_run(sess: Session, long_ids: list[int], short_ids: list[int], gen_tokens: int) -> dict:
    """Prefill the long prompt, decode `gen_tokens` greedily (EOS is no stop: every run does the
    same work), then prefill the short prompt on a fresh cache. Seconds of each part."""
    sess.reset()
    t0 = time.perf_counter()
    sess.feed(long_ids)
    t1 = time.perf_counter()
    tok = sess.argmax()
    t2 = time.perf_counter()
    lat = []
    for _ in range(gen_tokens):
        t = time.perf_counter()
        sess.feed([tok])
        tok = sess.argmax()
        lat.append(time.perf_counter() - t)
    sess.reset()
    t = time.perf_counter()
    sess.feed(short_ids)
    short_s = time.perf_counter() - t
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "lat": lat, "short_s": short_s}


def measure(
    sess: Session,
    long_ids: list[int],
    short_ids: list[int],
    gen_tokens: int,
    runs: int,
    monitor,
    retries: int = 2,
    progress: Callable[[str], None] = lambda m: None,
) -> dict:
    """A warm-up run, then `runs` timed runs; a run that saw other processes on our cores is
    re-run up to `retries` times (the last attempt is kept either way and counted)."""
    if not long_ids or not short_ids or gen_tokens < 1 or runs < 1:
        raise ValueError("bench needs non-empty prompts, gen_tokens >= 1 and runs >= 1")
    # warm-up: page the weights in, let allocators and repacked weight buffers reach full size
    one_run(sess, long_ids, short_ids, gen_tokens)
    samples, contended_runs, contended_kept = [], 0, 0
    for i in range(runs):
        for attempt in range(retries + 1):
            monitor.start()
            r = one_run(sess, long_ids, short_ids, gen_tokens)
            other_s, contended = monitor.stop()
            contended_runs += contended
            tps = len(r["lat"]) / sum(r["lat"])
            note = f", other processes used {other_s:.2f} CPU s on our cores" if contended else ""
            if contended and attempt < retries:
                progress(f"run {i + 1}/{runs}: decode {tps:.1f} tok/s{note}: re-running")
                continue
            contended_kept += contended
            progress(f"run {i + 1}/{runs}: decode {tps:.1f} tok/s{note}")
            samples.append(r)
            break
    return summarise(samples, len(long_ids), len(short_ids)) | {
        "contended_runs": contended_runs,
        "contended_kept": contended_kept,
    }


def summarise(samples: list[dict], n_long: int, n_short: int) -> dict:
    token_ms = sorted(x * 1000 for r in samples for x in r["lat"])
    return {
        "ttft_ms": summary([r["ttft_s"] * 1000 for r in samples]),
        "prefill_tps": summary([n_long / r["prefill_s"] for r in samples]),
        "prefill_short_tps": summary([n_short / r["short_s"] for r in samples]),
        "decode_tps": summary([len(r["lat"]) / sum(r["lat"]) for r in samples]),
        "token_ms": {"p50": percentile(token_ms, 0.5), "p95": percentile(token_ms, 0.95)},
        # per-run totals in ns, for the llama-bench-style records (rows.py)
        "run_ns": {
            "prefill": [round(r["prefill_s"] * 1e9) for r in samples],
            "prefill_short": [round(r["short_s"] * 1e9) for r in samples],
            "decode": [round(sum(r["lat"]) * 1e9) for r in samples],
        },
    }


def run_bench(
    runtime: str,
    open_session,
    model_path: str,
    prompt_ids: list[int],
    gen_tokens: int,
    runs: int,
    threads: int,
    short_ids: list[int] | None = None,
    device: str = "cpu",
    monitor=None,
    progress: Callable[[str], None] = lambda m: None,
) -> dict:
    """Open a session with `open_session(model_path, threads, n_ctx, device)`, time it, close it.

    The body of every runner's `bench()`. `short_ids` defaults to the first 32 prompt tokens.
    """
    from toolchain.bench.contention import ContentionMonitor

    short_ids = list(short_ids) if short_ids else list(prompt_ids[:32])
    t0 = time.perf_counter()
    sess = open_session(model_path, threads, len(prompt_ids) + gen_tokens + 8, device)
    load_s = time.perf_counter() - t0
    try:
        figures = measure(
            sess, list(prompt_ids), short_ids, gen_tokens, runs, monitor or ContentionMonitor(), progress=progress
        )
    finally:
        sess.close()
    return {
        "runtime": runtime,
        "threads": threads,
        "n_prompt": len(prompt_ids),
        "n_prompt_short": len(short_ids),
        "n_gen": gen_tokens,
        "load_s": load_s,
        **sess.info,
        **figures,
    }
