"""Decode roofline: how fast decoding could go if it were limited only by memory bandwidth.

Batch-1 decoding reads every weight once per token and does ~2 flops per weight byte-ish, so on
CPUs and phones its ceiling is bandwidth / bytes_read_per_token. Comparing a measured decode
rate with that ceiling gives an efficiency; multiplying a target's bandwidth by that
efficiency projects the rate on a device we cannot run on.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

MIB = 2**20


@functools.cache
def probe_bandwidth(threads: int = 1, mb: int = 512, repeats: int = 25) -> float:
    """This machine's memory read bandwidth in GB/s with `threads` readers (cached per process).

    Reduces a `mb` MB buffer (much bigger than any cache) split across `threads` threads; numpy
    releases the GIL inside reductions, so the threads read in parallel. Two kernels (float64
    sum, int64 max: which one keeps up with memory best varies by numpy build and CPU), best of
    `repeats` passes each, the highest figure wins: background load only ever makes a pass
    slower, and a ceiling must not be underestimated.
    """
    import numpy as np

    buf = np.ones(mb * MIB // 8)  # np.ones touches every page, so no page faults are timed
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for kernel, data in ((np.sum, buf), (np.max, buf.view(np.int64))):
            chunks = np.array_split(data, threads)
            list(pool.map(kernel, chunks))  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(kernel, chunks))
                best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def kv_cache_bytes(facts: dict, context: int) -> int:
    """KV cache at `context` tokens: keys and values, every layer and KV head."""
    per_token = facts["n_layers"] * facts["n_kv_heads"] * (facts["head_dim_k"] + facts["head_dim_v"])
    return per_token * context * facts["kv_bytes_per_elem"]


def memory_check(facts: dict, context: int, budget_mb: float) -> dict:
    """Weights + KV cache at the target's context vs its budget (MiB). Runtime buffers are extra."""
    weights_mb = facts["weights_bytes"] / MIB
    kv_mb = kv_cache_bytes(facts, context) / MIB
    needed = weights_mb + kv_mb
    return {
        "fits": needed <= budget_mb,
        "memory_needed_mb": round(needed, 1),
        "weights_mb": round(weights_mb, 1),
        "kv_cache_mb": round(kv_mb, 1),
        "memory_budget_mb": budget_mb,
        "context": context,
    }


def roofline(
    decode_tps: float,
    bytes_per_token: int,
    bandwidth_gbps: float,
    source: str,
    bandwidth_1thread_gbps: float | None = None,
) -> dict:
    """Ceiling and efficiency of a measured decode rate. `source`: "measured" or "target profile";
    `bandwidth_gbps` is at the thread count the model ran with, the 1-thread figure is for reference."""
    ceiling = bandwidth_gbps * 1e9 / bytes_per_token
    return {
        "bandwidth_gbps": round(bandwidth_gbps, 2),
        "bandwidth_source": source,
        "bandwidth_1thread_gbps": None if bandwidth_1thread_gbps is None else round(bandwidth_1thread_gbps, 2),
        "bytes_per_token": bytes_per_token,
        "ceiling_tps": round(ceiling, 2),
        "efficiency": round(decode_tps / ceiling, 4),
    }


def projection(target_bandwidth_gbps: float, bytes_per_token: int, efficiency: float) -> dict:
    """Decode rate projected to a device from its profile bandwidth and the efficiency measured here.

    Assumes the device reaches the same fraction of its profile bandwidth as this machine reaches
    of its measured one. Profile figures for phones and boards are theoretical peaks, which real
    devices do not sustain, so the projection leans optimistic.
    """
    tps = target_bandwidth_gbps * 1e9 / bytes_per_token * efficiency
    formula = (
        f"projected_decode_tps = target_bandwidth / bytes_per_token * efficiency_here = "
        f"{target_bandwidth_gbps:g} GB/s / {bytes_per_token / 1e6:.2f} MB * {efficiency:.3f} = {tps:.1f} tok/s"
    )
    return {
        "label": "projection",
        "decode_tps": round(tps, 2),
        "formula": formula,
        "bandwidth_gbps": target_bandwidth_gbps,
        "efficiency_here": efficiency,
    }
