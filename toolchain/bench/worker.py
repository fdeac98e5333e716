"""Child process that benchmarks one model and prints one JSON line.

Each model runs in its own process so peak RSS is that model's alone, and so runtimes'
thread pools (llama.cpp, onnxruntime, torch) never compete inside one process.
Input (stdin, JSON): runtime, model, prompt_ids, gen_tokens, runs, threads, cpus.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak resident memory since exec.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve, so a child of a
    big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def main() -> None:
    job = json.loads(sys.stdin.read())
    if job.get("cpus"):
        # pin to the target's core count so a 1-thread target really uses one core
        os.sched_setaffinity(0, set(job["cpus"]))
    if job["runtime"] == "llama_cpp":
        from toolchain.bench.llama_cpp_runner import bench
    elif job["runtime"] == "onnxruntime":
        from toolchain.bench.onnxruntime_runner import bench
    else:
        raise SystemExit(f"unknown runtime {job['runtime']}")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = bench(job["model"], job["prompt_ids"], job["gen_tokens"], job["runs"], job["threads"])
    result["cpu_per_wall"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_imported"] = "torch" in sys.modules
    print(json.dumps(result))


if __name__ == "__main__":
    main()
