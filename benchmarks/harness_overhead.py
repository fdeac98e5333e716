"""Does toolchain's bench harness slow decoding down? Ours vs a bare llama-cpp-python loop.

Same GGUF, same prompt tokens, same threads and cores. Rounds alternate (ours, bare, ours, bare,
...) so drift in the machine's state hits both sides alike; each side runs in a fresh process
pinned to the same cores (ours through toolchain's bench worker, exactly as `toolchain bench`
runs it; bare through this script's own minimal loop, written without toolchain code).
Prints a table, then one JSON line: ours_tps, bare_tps, ratio (target: ours within 5% of bare).

    python benchmarks/harness_overhead.py [model.gguf] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_GGUF = Path("runs/quickstart/export/model-Q8_0.gguf")


def bare_child(job: dict) -> None:
    """The bare loop: Llama.eval on the prompt, then eval + argmax per token. Prints decode tok/s."""
    import llama_cpp
    import numpy as np

    os.sched_setaffinity(0, set(job["cpus"]))
    ids, n_gen, threads = job["prompt_ids"], job["gen_tokens"], job["threads"]
    llm = llama_cpp.Llama(
        model_path=job["model"],
        n_ctx=len(ids) + n_gen + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=min(512, len(ids) + n_gen + 8),
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    def decode() -> float:
        llm.reset()
        llm.eval(ids)
        tok = next_token()
        t0 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = next_token()
        return n_gen / (time.perf_counter() - t0)

    decode()  # warm-up, as the toolchain worker does one
    print(json.dumps({"decode_tps": decode()}))
    llm.close()


def run_bare(job: dict) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--bare-child"], input=json.dumps(job), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tps"]


def run_ours(job: dict) -> tuple[float, int]:
    from toolchain.bench.run import _run_worker

    r = _run_worker({**job, "runtime": "llama_cpp", "runs": 1, "device": "cpu"}, progress=lambda m: None)
    return r["decode_tps"]["median"], r["contended_runs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_GGUF), help=f"GGUF file (default {DEFAULT_GGUF})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="runs of each side (>= 5), alternating")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_child:
        return bare_child(json.loads(sys.stdin.read()))
    if not Path(args.model).is_file():
        sys.exit(f"GGUF not found: {args.model} (run `make demo` first, or give a path)")
    if args.rounds < 5:
        sys.exit("--rounds must be >= 5")

    from toolchain.bench.run import describe_model, prompt_ids

    ids = prompt_ids([describe_model(args.model)], args.prompt_tokens)
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    job = {
        "model": args.model,
        "prompt_ids": ids,
        "short_ids": ids[:32],
        "gen_tokens": args.gen_tokens,
        "threads": len(cpus),
        "cpus": cpus,
    }
    print(
        f"{Path(args.model).name}: {len(ids)}-token prompt, {args.gen_tokens} decoded tokens, "
        f"{len(cpus)} threads on cores {cpus}; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'round':>5}  {'ours tok/s':>10}  {'bare tok/s':>10}  note")
    ours, bare = [], []
    for i in range(args.rounds):
        o, contended = run_ours(job)
        b = run_bare(job)
        ours.append(o)
        bare.append(b)
        note = f"ours saw contention in {contended} attempt(s)" if contended else ""
        print(f"{i + 1:>5}  {o:>10.1f}  {b:>10.1f}  {note}")
    o_med, b_med = statistics.median(ours), statistics.median(bare)
    ratio = o_med / b_med
    print(
        f"{'median':>5}  {o_med:>10.1f}  {b_med:>10.1f}  ours/bare = {ratio:.3f} "
        f"({'within' if abs(1 - ratio) <= 0.05 else 'NOT within'} 5%); load average {os.getloadavg()[0]:.2f}"
    )
    print(
        json.dumps(
            {
                "ours_tps": round(o_med, 2),
                "bare_tps": round(b_med, 2),
                "ratio": round(ratio, 4),
                "within_5pct": abs(1 - ratio) <= 0.05,
                "threads": len(cpus),
                "rounds": args.rounds,
                "model": args.model,
                "ours_runs": [round(x, 2) for x in ours],
                "bare_runs": [round(x, 2) for x in bare],
            }
        )
    )


if __name__ == "__main__":
    main()
