"""ONNX decode/prefill speed per precision vs llama.cpp at the matching bit width, in one run.

SmolLM2 (the bundled teacher) by default: ONNX fp32 / int8 / int4 (MatMulNBits, what
`toolchain export onnx --precisions` writes), the classic `quantize_dynamic` int8 for
reference, and llama.cpp Q8_0 / Q4_0 GGUFs written by toolchain's own exporter, all timed by
the same loop (toolchain.bench.stats: warm-up, then `--runs` runs, contended runs re-run),
on 1 and 2 threads pinned to the first cores. Prints a table, then one JSON line with the
2-thread decode figures (fp32_tps, int8_tps, int4_tps, llama_q8_0_tps, llama_q4_0_tps) and
the targets: int8 faster than fp32, int4 >= 1.5x fp32.

    flock /tmp/toolchain-measure.lock python benchmarks/onnx_speed.py [--model DIR] [--work DIR]

Exports are reused from --work when present (the fp32 export takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ONNX_ROWS = ["fp32", "int8", "int4", "int8_dynamic"]
MATCH = {"int8": "llama_q8_0", "int4": "llama_q4_0", "int8_dynamic": "llama_q8_0"}


def prepare(model_dir: Path, work: Path) -> dict[str, tuple[str, str]]:
    """{row name: (runtime, path)}, exporting what --work does not hold yet."""
    from toolchain.export.gguf import export_gguf, gguf_filename
    from toolchain.export.onnx import export_onnx, precision_dir, quantize_export
    from toolchain.quantize.onnx_quant import to_int8_dynamic

    onnx_dir = work / "onnx"
    if not (onnx_dir / "model.onnx").is_file():
        print(f"exporting {model_dir} to ONNX fp32 (minutes) ...", flush=True)
        export_onnx(model_dir, onnx_dir)
    rows = {"fp32": ("onnxruntime", str(onnx_dir))}
    for p in ("int8", "int4"):
        if not (precision_dir(onnx_dir, p) / "model.onnx").is_file():
            quantize_export(onnx_dir, p)
        rows[p] = ("onnxruntime", str(precision_dir(onnx_dir, p)))
    dyn = work / "onnx-int8_dynamic"
    if not (dyn / "model.onnx").is_file():
        import shutil

        from toolchain.fileio import atomic_dir

        with atomic_dir(dyn) as tmp:
            for f in onnx_dir.iterdir():
                if not f.name.startswith("model.onnx"):
                    shutil.copy2(f, tmp / f.name)
            to_int8_dynamic(onnx_dir / "model.onnx", tmp / "model.onnx")
    rows["int8_dynamic"] = ("onnxruntime", str(dyn))
    gguf_dir = work / "gguf"
    missing = [t for t in ("Q8_0", "Q4_0") if not (gguf_dir / gguf_filename(t)).is_file()]
    if missing:
        export_gguf(model_dir, gguf_dir, missing)
    rows["llama_q8_0"] = ("llama_cpp", str(gguf_dir / gguf_filename("Q8_0")))
    rows["llama_q4_0"] = ("llama_cpp", str(gguf_dir / gguf_filename("Q4_0")))
    return rows


def prompt_ids(onnx_dir: str, n: int) -> list[int]:
    import pydoc_data.topics

    from toolchain.runtime.onnx_decoder import load_tokenizer

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    ids = load_tokenizer(onnx_dir).encode(text, add_special_tokens=False).ids
    return ids[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory (default: the bundled smollm2-135m-instruct)")
    ap.add_argument("--work", default="/tmp/toolchain-onnx-speed", help="where exports are written / reused")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ONNX_ROWS + ["llama_q8_0", "llama_q4_0"]))
    args = ap.parse_args()

    from toolchain.bench import llama_cpp_runner, onnxruntime_runner
    from toolchain.models.load import resolve_model_dir

    model_dir = Path(args.model) if args.model else resolve_model_dir("smollm2-135m-instruct")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {k: v for k, v in prepare(model_dir, work).items() if k in args.rows.split(",")}
    ids = prompt_ids(str(work / "onnx"), args.prompt_tokens)
    runners = {"onnxruntime": onnxruntime_runner.bench, "llama_cpp": llama_cpp_runner.bench}

    results: dict[tuple[str, int], dict] = {}
    cores = sorted(os.sched_getaffinity(0))
    for threads in [int(t) for t in args.threads.split(",")]:
        os.sched_setaffinity(0, set(cores[:threads]))  # same cores for every row
        for name, (runtime, path) in rows.items():
            t0 = time.perf_counter()
            r = runners[runtime](path, ids, args.gen_tokens, args.runs, threads)
            results[(name, threads)] = r
            print(
                f"  {name:13s} {threads} thr: decode {r['decode_tps']['median']:6.1f} tok/s, prefill "
                f"{r['prefill_tps']['median']:7.1f} tok/s, contended runs {r.get('contended_runs', 0)} "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        os.sched_setaffinity(0, set(cores))

    print(
        f"\nSmolLM2 ({model_dir.name}), prompt {len(ids)} tokens, {args.gen_tokens} decoded, median of "
        f"{args.runs} runs\n"
    )
    header = (
        f"{'model':14s} {'thr':>3s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'x fp32':>7s} {'x llama.cpp':>12s}"
    )
    print(header)
    print("-" * len(header))
    for (name, threads), r in results.items():
        dec, pre = r["decode_tps"]["median"], r["prefill_tps"]["median"]
        base = results.get(("fp32", threads))
        vs_fp32 = f"{dec / base['decode_tps']['median']:.2f}" if base and name in ONNX_ROWS else ""
        match = results.get((MATCH.get(name, ""), threads))
        vs_llama = f"{dec / match['decode_tps']['median']:.2f}" if match else ""
        print(f"{name:14s} {threads:3d} {pre:13.1f} {dec:12.1f} {vs_fp32:>7s} {vs_llama:>12s}")

    def tps(name: str) -> float | None:
        r = results.get((name, 2))
        return round(r["decode_tps"]["median"], 2) if r else None

    out = {
        "fp32_tps": tps("fp32"),
        "int8_tps": tps("int8"),
        "int4_tps": tps("int4"),
        "int8_dynamic_tps": tps("int8_dynamic"),
        "llama_q8_0_tps": tps("llama_q8_0"),
        "llama_q4_0_tps": tps("llama_q4_0"),
        "prefill_2t": {n: round(results[(n, 2)]["prefill_tps"]["median"], 1) for n in rows if (n, 2) in results},
        "decode_1t": {n: round(results[(n, 1)]["decode_tps"]["median"], 2) for n in rows if (n, 1) in results},
        "contended_kept": sum(r.get("contended_kept", 0) for r in results.values()),
    }
    if out["fp32_tps"] and out["int8_tps"] and out["int4_tps"]:
        out["int8_vs_fp32"] = round(out["int8_tps"] / out["fp32_tps"], 2)
        out["int4_vs_fp32"] = round(out["int4_tps"] / out["fp32_tps"], 2)
        out["targets_met"] = {
            "int8_faster_than_fp32": out["int8_vs_fp32"] > 1.0,
            "int4_1.5x_fp32": out["int4_vs_fp32"] >= 1.5,
        }
    if out["int8_tps"] and out["llama_q8_0_tps"]:
        out["int8_vs_llama_q8_0"] = round(out["int8_tps"] / out["llama_q8_0_tps"], 2)
    if out["int4_tps"] and out["llama_q4_0_tps"]:
        out["int4_vs_llama_q4_0"] = round(out["int4_tps"] / out["llama_q4_0_tps"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
