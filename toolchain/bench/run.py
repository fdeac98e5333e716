"""Benchmark models on targets: the same prompt tokens and decode length for every runtime.

For each (model, target): decide whether it can run (runtime allowed and installed, quant type
allowed, weights + KV cache within the memory budget), run it in a child process pinned to the
target's core count (worker.py), then add the roofline and, for mobile-class targets, the
projection. Rows that cannot run are still rows, saying why (rows.py has the schema).

Imports neither torch nor transformers (device mode): the torch runner is imported by the child,
and only for the torch runtime.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from toolchain.bench import roofline as rl
from toolchain.bench.model_facts import model_facts
from toolchain.bench.rows import add_measurement, base_row, format_row, out_name
from toolchain.bench.worker import PROGRESS
from toolchain.errors import UserError
from toolchain.formats import Artifact
from toolchain.models.artifacts import describe_model  # noqa: F401 (callers import it from here too)
from toolchain.targets import Target

RUNTIME_BY_FORMAT = {"gguf": "llama_cpp", "onnx": "onnxruntime", "hf": "torch"}
# modules a runtime needs, and what to install when one is missing
RUNTIME_NEEDS = {
    "llama_cpp": (("llama_cpp",), "llama-cpp-python"),
    "onnxruntime": (("onnxruntime",), "onnxruntime"),
    "torch": (("torch", "transformers"), "torch transformers"),
}


def prompt_text() -> str:
    from pydoc_data.topics import topics

    return topics["for"] + topics["while"] + topics["if"]  # fixed, ~760 tokens with SmolLM2's tokenizer


def prompt_ids(models: list[Artifact], n: int) -> list[int]:
    """The first n token ids of a fixed text, tokenized once for every model in the run."""
    text = prompt_text()
    for m in models:
        p = Path(m["path"])
        tok = (p if p.is_dir() else p.parent) / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(tok)).encode(text, add_special_tokens=False).ids
            break
    else:
        gguf = next((m for m in models if m["format"] == "gguf"), None)
        if gguf is None:
            raise UserError("no tokenizer.json next to the models and no GGUF to tokenize the bench prompt with")
        from toolchain.bench.llama_cpp_runner import tokenize

        ids = tokenize(gguf["path"], text)
    if len(ids) < n:
        raise UserError(f"bench prompt has only {len(ids)} tokens; ask for at most that many")
    return ids[:n]


def missing_runtime(runtime: str) -> str | None:
    """Why `runtime` cannot be imported here, or None. Checked without importing it."""
    modules, pip = RUNTIME_NEEDS[runtime]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"{runtime} is not installed (no module '{missing[0]}'): pip install {pip}"
    return None


def _cpus(threads: int) -> list[int]:
    return sorted(os.sched_getaffinity(0))[:threads]


def _run_worker(job: dict, progress) -> dict:
    """Run worker.py on `job`; relay its progress lines; its last stdout line is the result."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toolchain.bench.worker"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stderr is not None  # both are pipes
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        tail: list[str] = []
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                progress("    " + line[len(PROGRESS) :].rstrip())
            else:
                tail = (tail + [line.rstrip()])[-20:]
        proc.wait()
        out.seek(0)
        lines = out.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        raise UserError(f"benchmark of {job['model']} ({job['runtime']}) failed: {last}")
    return json.loads(lines[-1])


def _why_not(model: Artifact, runtime: str, target: Target) -> str | None:
    if runtime not in target.runtimes:
        return f"runtime {runtime} is not in target {target.name}'s runtimes ({', '.join(target.runtimes)})"
    if not target.allows_quant(model["quant"]):
        allowed = ", ".join(target.quant_types)
        return f"quant type {model['quant']} is not in target {target.name}'s quant_types ({allowed})"
    return missing_runtime(runtime)


def bench_one(
    model: Artifact,
    ids: list[int],
    short_ids: list[int],
    gen_tokens: int,
    runs: int,
    target: Target,
    progress=print,
    measured: dict | None = None,
) -> dict:
    """One result row for `model` on `target` (see rows.py); runs the model only if it can.

    `measured` maps a run's settings to (target name, worker result): targets that come down to the
    same run here (same model, runtime, device and pinned thread count) share one measurement
    instead of repeating it, and the row says which target it was measured for (`measured_for`).
    """
    runtime = RUNTIME_BY_FORMAT[model["format"]]
    threads = target.effective_threads()
    try:
        facts = model_facts(model)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {model['path']}: {e}") from None
    memory = rl.memory_check(facts, target.context, target.memory_budget_mb)
    row = base_row(model, runtime, target, threads, len(ids), len(short_ids), gen_tokens, facts, memory)
    row["skipped"] = _why_not(model, runtime, target)
    if row["skipped"] or not memory["fits"]:
        return row
    device = "cuda" if target.kind == "cuda" else "cpu"
    job = {
        "runtime": runtime,
        "model": model["path"],
        "prompt_ids": ids,
        "short_ids": short_ids,
        "gen_tokens": gen_tokens,
        "runs": runs,
        "threads": threads,
        "cpus": _cpus(threads),
        "device": device,
    }
    key = json.dumps(job, sort_keys=True)
    if measured is not None and key in measured:
        row["measured_for"], result = measured[key][0], json.loads(measured[key][1])
        progress(f"    same run as on {row['measured_for']} ({threads} threads here): measurement shared")
    else:
        result = _run_worker(job, progress)
        if measured is not None:
            measured[key] = (target.name, json.dumps(result))
        row["measured_for"] = target.name
    if result.get("skipped"):
        row["skipped"] = result["skipped"]
        return row
    add_measurement(row, result)
    decode = row["decode_tps"]["median"]
    if device == "cuda":  # no GPU bandwidth probe: the profile's figure
        row["roofline"] = rl.roofline(decode, facts["bytes_per_token"], target.memory_bandwidth_gbps, "target profile")
    else:
        row["roofline"] = rl.roofline(
            decode, facts["bytes_per_token"], rl.probe_bandwidth(threads), "measured", rl.probe_bandwidth(1)
        )
    if target.kind == "mobile-class":
        row["projection"] = rl.projection(
            target.memory_bandwidth_gbps, facts["bytes_per_token"], row["roofline"]["efficiency"]
        )
    return row


def _bench(
    models: list[Artifact],
    targets: list[Target],
    ids: list[int],
    short_ids: list[int],
    gen_tokens: int,
    runs: int,
    progress,
    out_dir,
) -> list[dict]:
    from toolchain.fileio import write_json

    measured: dict[str, tuple[str, str]] = {}  # job key -> (target name, worker result JSON); see bench_one
    results, n, i = [], len(models) * len(targets), 0
    for target in targets:
        for m in models:
            i += 1
            progress(
                f"bench [{i}/{n}] {RUNTIME_BY_FORMAT[m['format']]} {m['quant']} on {target.name} "
                f"({target.effective_threads()} of {target.threads} threads)"
            )
            row = bench_one(m, ids, short_ids, gen_tokens, runs, target, progress, measured)
            progress("  " + format_row(row))
            if out_dir is not None:
                write_json(Path(out_dir) / out_name(row), row)
            results.append(row)
    return results


def bench_targets(
    models: list[Artifact],
    targets: list[Target],
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    runs: int = 5,
    progress=print,
    out_dir=None,
    short_prompt_tokens: int = 32,
) -> list[dict]:
    """Every model on every target; one row each (also written to `out_dir` when given)."""
    if not models:
        raise UserError("nothing to benchmark: no models given")
    ids = prompt_ids(models, prompt_tokens)
    return _bench(
        models, targets, ids, ids[: min(short_prompt_tokens, prompt_tokens)], gen_tokens, runs, progress, out_dir
    )


def bench_models(
    models: list[Artifact],
    target: Target,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    runs: int = 5,
    progress=print,
    out_dir=None,
    short_prompt_tokens: int = 32,
) -> list[dict]:
    """Every model on one target (the pipeline's and `toolchain bench`'s entry point)."""
    return bench_targets(models, [target], prompt_tokens, gen_tokens, runs, progress, out_dir, short_prompt_tokens)
