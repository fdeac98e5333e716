"""Child process that benchmarks one model and prints one JSON line on stdout.

Each model runs in its own process so peak RSS is that model's alone, and so runtimes'
thread pools (llama.cpp, onnxruntime, torch) never compete inside one process.
Input (stdin, JSON): runtime, model, prompt_ids, short_ids, gen_tokens, runs, threads, cpus, device.
Progress lines go to stderr prefixed with PROGRESS; the parent relays them.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time

PROGRESS = "progress: "
RUNNERS = {
    "llama_cpp": "toolchain.bench.llama_cpp_runner",
    "onnxruntime": "toolchain.bench.onnxruntime_runner",
    "torch": "toolchain.bench.torch_runner",
}


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


def progress(msg: str) -> None:
    print(PROGRESS + msg, file=sys.stderr, flush=True)


def main() -> None:
    from toolchain.bench.contention import ContentionMonitor

    job = json.loads(sys.stdin.read())
    if job.get("cpus"):
        # pin to the target's core count so a 1-thread target really uses one core
        os.sched_setaffinity(0, set(job["cpus"]))
    if job["runtime"] not in RUNNERS:
        raise SystemExit(f"unknown runtime {job['runtime']}")
    runner = importlib.import_module(RUNNERS[job["runtime"]])  # torch is imported only for "torch"
    device = job.get("device", "cpu")
    reason = runner.unavailable(device)
    if reason:
        print(json.dumps({"skipped": reason}))
        return
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = runner.bench(
        job["model"],
        job["prompt_ids"],
        job["gen_tokens"],
        job["runs"],
        job["threads"],
        short_ids=job.get("short_ids"),
        device=device,
        monitor=ContentionMonitor(job.get("cpus")),
        progress=progress,
    )
    result["cpu_per_wall"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_imported"] = "torch" in sys.modules
    print(json.dumps(result))


if __name__ == "__main__":
    main()
