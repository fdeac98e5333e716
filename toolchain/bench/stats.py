"""Small statistics shared by the runners (no numpy needed by callers)."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict:
    """Median, p95 and spread of per-run values."""
    s = sorted(values)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return {
        "median": statistics.median(s),
        "p95": p95,
        "stddev": statistics.stdev(s) if len(s) > 1 else 0.0,
        "runs": list(values),
    }


def timed_runs(one_run, n_prompt: int, runs: int) -> dict:
    """Run `one_run()` -> (prefill_s, ttft_s, [decode step seconds]) `runs` times; summarise.

    Shared by every runner so all runtimes are measured and reported the same way.
    """
    prefill, ttft, decode, token_ms = [], [], [], []
    for _ in range(runs):
        p, f, lat = one_run()
        prefill.append(n_prompt / p)
        ttft.append(f * 1000)
        decode.append(len(lat) / sum(lat))
        token_ms.extend(x * 1000 for x in lat)
    token_ms.sort()
    return {
        "ttft_ms": summary(ttft),
        "prefill_tps": summary(prefill),
        "decode_tps": summary(decode),
        "token_ms": {"p50": token_ms[len(token_ms) // 2], "p95": token_ms[round(0.95 * (len(token_ms) - 1))]},
    }
