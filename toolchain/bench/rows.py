"""The result row: one per (model, runtime, target), the same keys whether it ran or not.

Our own keys (what report.json and the tests read) plus llama-bench's field names where they
mean the same thing, so a row can be read by tools that read `llama-bench -o json`. llama-bench
describes one test per record (pp512 or tg128); a row holds three, so the row-level
avg_ns/avg_ts/samples_* are those of the decode test, and `llama_bench` lists all three as
complete llama-bench records (pp <n_prompt>, pp <n_prompt_short>, tg <n_gen> at depth n_prompt).
"""

from __future__ import annotations

import platform
import statistics
import time

from toolchain.formats import Artifact

# figures a row has only when the model ran; None otherwise
FIGURES = (
    "load_s",
    "ttft_ms",
    "prefill_tps",
    "prefill_short_tps",
    "decode_tps",
    "token_ms",
    "peak_rss_mb",
    "cpu_per_wall",
    "roofline",
    "projection",
    "avg_ns",
    "stddev_ns",
    "avg_ts",
    "stddev_ts",
    "samples_ns",
    "samples_ts",
    "llama_bench",
)


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _params_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def base_row(
    model: Artifact,
    runtime: str,
    target,
    threads: int,
    n_prompt: int,
    n_short: int,
    n_gen: int,
    facts: dict | None,
    memory: dict | None,
) -> dict:
    """Identity, memory check and llama-bench model fields; figures None until the model runs."""
    facts = facts or {}
    row = {
        "runtime": runtime,
        "target": target.name,
        "target_kind": target.kind,
        "format": model["format"],
        "quant": model["quant"],
        "path": model["path"],
        "bytes": model.get("bytes"),
        "threads": threads,
        "target_threads": target.threads,
        "n_prompt": n_prompt,
        "n_prompt_short": n_short,
        "n_gen": n_gen,
        "fits": memory["fits"] if memory else None,
        "memory_needed_mb": memory["memory_needed_mb"] if memory else None,
        "memory": memory,
        "skipped": None,
        "measured_for": None,
        "contended_runs": 0,
        "contended_kept": 0,
        **{k: None for k in FIGURES},
        # llama-bench fields describing the model and the run
        "model_filename": model["path"],
        "model_type": (
            f"{facts['arch']} {facts.get('size_label') or _params_label(facts['n_params'])} {model['quant']}"
            if facts
            else None
        ),
        "model_size": facts.get("weights_bytes"),
        "model_n_params": facts.get("n_params"),
        "n_threads": threads,
        "n_batch": None,
        "n_gpu_layers": None,
        "backends": None,
        "cpu_info": cpu_info(),
        "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return row


def _llama_bench_test(row: dict, n_prompt: int, n_gen: int, n_depth: int, samples_ns: list[int], n_tokens: int) -> dict:
    ts = [n_tokens / (ns / 1e9) for ns in samples_ns]
    rec = {
        k: row.get(k)
        for k in (
            "cpu_info",
            "backends",
            "model_filename",
            "model_type",
            "model_size",
            "model_n_params",
            "n_batch",
            "n_ubatch",
            "n_threads",
            "n_gpu_layers",
            "type_k",
            "type_v",
            "use_mmap",
            "test_time",
        )
    }
    rec.update(
        {
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "n_depth": n_depth,
            "avg_ns": round(statistics.mean(samples_ns)),
            "stddev_ns": round(statistics.stdev(samples_ns)) if len(samples_ns) > 1 else 0,
            "avg_ts": statistics.mean(ts),
            "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "samples_ns": samples_ns,
            "samples_ts": ts,
        }
    )
    return rec


def add_measurement(row: dict, result: dict) -> dict:
    """Merge a worker's result into the row and derive the llama-bench fields."""
    run_ns = result.pop("run_ns")
    row.update(result)
    pp = _llama_bench_test(row, row["n_prompt"], 0, 0, run_ns["prefill"], row["n_prompt"])
    pp_short = _llama_bench_test(row, row["n_prompt_short"], 0, 0, run_ns["prefill_short"], row["n_prompt_short"])
    # our decode follows the long prompt: llama-bench calls that "tg<n_gen> @ d<n_prompt>"
    tg = _llama_bench_test(row, 0, row["n_gen"], row["n_prompt"], run_ns["decode"], row["n_gen"])
    row["llama_bench"] = [pp, pp_short, tg]
    row.update({k: tg[k] for k in ("avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts")})
    return row


def out_name(row: dict) -> str:
    """`<runtime>-<quant>-<target>.json`, the file a row is written to."""
    return f"{row['runtime']}-{row['quant']}-{row['target']}.json"


def format_row(row: dict) -> str:
    """One line for a terminal: figures, or why there are none."""
    head = f"{row['runtime']:11s} {row['quant']:7s} {row['target']:10s}"
    if row.get("skipped"):
        return f"{head} skipped: {row['skipped']}"
    if row.get("fits") is False:
        m = row["memory"]
        return (
            f"{head} does not fit: needs {m['memory_needed_mb']:.0f} MB (weights {m['weights_mb']:.0f} + "
            f"KV {m['kv_cache_mb']:.0f} at context {m['context']}) > budget {m['memory_budget_mb']} MB"
        )
    line = (
        f"{head} prefill {row['prefill_tps']['median']:7.1f} tok/s  decode {row['decode_tps']['median']:6.1f} tok/s"
        f"  RSS {row['peak_rss_mb']:.0f} MB"
    )
    if row.get("roofline"):
        line += f"  ({row['roofline']['efficiency']:.0%} of {row['roofline']['ceiling_tps']:.0f} tok/s ceiling)"
    if row.get("projection"):
        line += f"  projected {row['projection']['decode_tps']:.1f} tok/s"
    if row.get("contended_kept"):
        line += f"  [{row['contended_kept']} contended run(s) kept]"
    return line
