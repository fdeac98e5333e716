"""Benchmark exported models on a target: same prompt tokens for every runtime."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from toolchain.bench.targets import Target
from toolchain.errors import UserError

log = logging.getLogger(__name__)

RUNTIME_BY_FORMAT = {"gguf": "llama_cpp", "onnx": "onnxruntime"}


def prompt_text() -> str:
    from pydoc_data.topics import topics

    return topics["for"] + topics["while"] + topics["if"]  # fixed, long enough for 512+ tokens


def prompt_ids(models: list[dict], n: int) -> list[int]:
    """The first n token ids of a fixed text, tokenized once for every model in the run."""
    text = prompt_text()
    for m in models:
        tok = Path(m["path"]).parent / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(tok)).encode(text, add_special_tokens=False).ids
            break
    else:
        from toolchain.bench.llama_cpp_runner import tokenize

        ids = tokenize(models[0]["path"], text)
    if len(ids) < n:
        raise UserError(f"bench prompt has only {len(ids)} tokens; ask for at most that many")
    return ids[:n]


def _cpus(threads: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[:threads]


def bench_one(model: dict, ids: list[int], gen_tokens: int, runs: int, target: Target) -> dict:
    runtime = RUNTIME_BY_FORMAT[model["format"]]
    threads = target.effective_threads()
    job = {"runtime": runtime, "model": model["path"], "prompt_ids": ids, "gen_tokens": gen_tokens,
           "runs": runs, "threads": threads, "cpus": _cpus(threads)}
    proc = subprocess.run([sys.executable, "-m", "toolchain.bench.worker"], input=json.dumps(job),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"benchmark of {model['path']} ({runtime}) failed: {tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update({"target": target.name, "quant": model["quant"], "format": model["format"],
                   "path": model["path"], "bytes": model.get("bytes")})
    return result


def bench_models(models: list[dict], target: Target, prompt_tokens: int, gen_tokens: int, runs: int,
                 progress=print) -> list[dict]:
    ids = prompt_ids(models, prompt_tokens)
    results = []
    for m in models:
        progress(f"bench {m['format']} {m['quant']} on {target.name} ({target.effective_threads()} threads)")
        results.append(bench_one(m, ids, gen_tokens, runs, target))
    return results
