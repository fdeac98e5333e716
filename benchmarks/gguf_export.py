"""Our GGUF exporter vs llama.cpp's convert_hf_to_gguf.py, and the quality table of every type.

The reference converter is taken from the llama-cpp-python 0.3.36 sdist at run time (pip's
cache usually has it; it is never vendored): `vendor/llama.cpp/convert_hf_to_gguf.py`, its
`conversion/` package and its own `gguf-py`.

1. SmolLM2 HF dir -> F16 and Q8_0 with both tools, each as a fresh process (imports included),
   median of --runs: export time ratio;
2. tensor-by-tensor comparison of both F16 and both Q8_0 files (type, shape, bytes), and the
   metadata keys/values that differ;
3. perplexity on held-out pydoc text (llama.cpp, second half of each chunk scored): our Q8_0
   and theirs vs our F16;
4. quality table (PPL ratio, mean KLD, top-1 vs F16) for every type we write, for SmolLM2 and
   Gemma-3-270M.

Run it as: flock /tmp/toolchain-measure.lock python benchmarks/gguf_export.py
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"


def fetch_reference(work: Path) -> Path:
    """Extract llama.cpp's converter (+ conversion/, gguf-py/) from the sdist into work/."""
    dl = work / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(dl), "-q"],
        check=True,
    )
    tgz = next(dl.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(tgz) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and (
                m.name.endswith("/convert_hf_to_gguf.py")
                or "/vendor/llama.cpp/conversion/" in m.name
                or "/vendor/llama.cpp/gguf-py/" in m.name
            )
        ]
        tar.extractall(work, members=members, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{res.stderr[-2000:]}")
    return took


def export_times(model_dir: Path, ref: Path, out: Path, runs: int) -> dict:
    ours_env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    ref_env = {**os.environ, "PYTHONPATH": str(ref / "gguf-py")}
    times: dict[str, list[float]] = {}
    for r in range(runs):
        for t in ("F16", "Q8_0"):
            d = out / f"ours-{r}"
            times.setdefault(f"ours_{t}", []).append(
                _timed(
                    [
                        sys.executable,
                        "-m",
                        "toolchain",
                        "export",
                        "gguf",
                        str(model_dir),
                        "--out",
                        str(d),
                        "--types",
                        t,
                        "--no-modelfile",
                    ],
                    ours_env,
                )
            )
            times.setdefault(f"ref_{t}", []).append(
                _timed(
                    [
                        sys.executable,
                        str(ref / "convert_hf_to_gguf.py"),
                        str(model_dir),
                        "--outfile",
                        str(out / f"ref-{r}-{t}.gguf"),
                        "--outtype",
                        t.lower(),
                    ],
                    ref_env,
                )
            )
    return {k: statistics.median(v) for k, v in times.items()} | {"all": times}


def compare_files(ours: Path, theirs: Path) -> dict:
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = []
    for name in sorted(set(ta) | set(tb)):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None:
            differ.append(f"{name}: only in {'theirs' if x is None else 'ours'}")
        elif x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            differ.append(
                f"{name}: ours {x.tensor_type.name}{list(x.shape)} vs theirs {y.tensor_type.name}{list(y.shape)}"
            )
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            differ.append(f"{name}: same type and shape, different bytes")

    def fields(r):
        out = {}
        for k, f in r.fields.items():
            if k.startswith("GGUF."):
                continue
            try:
                out[k] = f.contents()
            except Exception:
                out[k] = "?"
        return out

    fa, fb = fields(a), fields(b)
    meta = []
    for k in sorted(set(fa) | set(fb)):
        if k not in fb:
            meta.append(f"{k}: only ours = {_short(fa[k])}")
        elif k not in fa:
            meta.append(f"{k}: only theirs = {_short(fb[k])}")
        elif fa[k] != fb[k]:
            meta.append(f"{k}: ours {_short(fa[k])} vs theirs {_short(fb[k])}")
    return {"tensors": len(ta), "tensors_differing": differ, "metadata_differences": meta}


def _short(v) -> str:
    if isinstance(v, list):
        return f"[{len(v)} items]"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def quality(
    model_dir: Path, out: Path, types: list[str], tokens: int, ctx: int, extra: dict | None = None
) -> list[dict]:
    """Export every type with our tool and measure it against our F16 on held-out text."""
    from transformers import AutoTokenizer

    from toolchain.export.gguf import export_gguf
    from toolchain.verify.quality import compare, heldout_chunks, llama_scored

    recs = export_gguf(model_dir, out, types)
    tok = AutoTokenizer.from_pretrained(model_dir)
    add_bos = len(tok("a").input_ids) > len(tok("a", add_special_tokens=False).input_ids)
    chunks = heldout_chunks(tok, tokens, ctx, add_bos)
    f16 = next(r for r in recs if r["quant"] == "F16")
    # one thread: with two, llama.cpp's spinning workers collapse whenever another process
    # takes a core on this shared machine, and quality does not depend on the thread count
    ref = llama_scored(f16["path"], chunks, threads=1)
    rows = []
    for r in recs + [{"quant": k, "path": str(p), "bytes": p.stat().st_size} for k, p in (extra or {}).items()]:
        q = compare(ref, llama_scored(r["path"], chunks, threads=1))
        print(f"   scored {r['quant']}", file=sys.stderr, flush=True)
        q["reference"] = "our F16 GGUF"
        rows.append({"quant": r["quant"], "bytes": r["bytes"], "seconds": r.get("seconds"), "quality": q})
    return rows


def _timing_and_comparison(work: Path, runs: int):
    from toolchain.models.load import resolve_model_dir

    ref = fetch_reference(work)
    smol = resolve_model_dir("smollm2-135m-instruct")

    print(f"1. export time, SmolLM2-135M HF dir, median of {runs} fresh processes (imports included)")
    t = export_times(smol, ref, work / "timing", runs)
    print("| type | ours s | llama.cpp s | ratio |\n|------|-------:|------------:|------:|")
    for ty in ("F16", "Q8_0"):
        print(
            f"| {ty:<4} | {t[f'ours_{ty}']:6.2f} | {t[f'ref_{ty}']:11.2f} | {t[f'ours_{ty}'] / t[f'ref_{ty}']:5.2f}x |"
        )

    print("\n2. tensor-by-tensor comparison with convert_hf_to_gguf.py")
    cmp = {
        ty: compare_files(work / "timing" / "ours-0" / f"model-{ty}.gguf", work / "timing" / f"ref-0-{ty}.gguf")
        for ty in ("F16", "Q8_0")
    }
    for ty, c in cmp.items():
        print(f"{ty}: {c['tensors']} tensors, {len(c['tensors_differing'])} differ")
        for line in c["tensors_differing"][:10]:
            print(f"   {line}")
    print("metadata differences (F16 files):")
    for line in cmp["F16"]["metadata_differences"]:
        print(f"   {line}")
    return t, cmp


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quality-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--work", help="working directory (default: a temporary one, removed)")
    ap.add_argument(
        "--no-timing",
        action="store_true",
        help="skip parts 1-2 (reference converter timing and comparison): quality tables only",
    )
    args = ap.parse_args()

    from toolchain.formats import SUPPORTED_TYPES
    from toolchain.models.load import resolve_model_dir
    from toolchain.verify.quality import format_table

    tmp = tempfile.TemporaryDirectory(prefix="gguf-bench-") if not args.work else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t, cmp = {}, {}
    if not args.no_timing:
        t, cmp = _timing_and_comparison(work, args.runs)
    tables, ppl = {}, {}
    for name in [m for m in args.models.split(",") if m]:
        model_dir = resolve_model_dir(name)
        ref_q8 = work / "timing" / "ref-0-Q8_0.gguf"
        extra = {"Q8_0 (llama.cpp)": ref_q8} if name.startswith("smollm2") and ref_q8.is_file() else None
        rows = quality(model_dir, work / f"q-{name}", list(SUPPORTED_TYPES), args.quality_tokens, args.ctx, extra)
        tables[name] = rows
        title = (
            f"\n3. quality of every type, {name}, {rows[0]['quality']['tokens_scored']} held-out pydoc tokens scored"
        )
        print(format_table(rows, title))
        ppl[name] = {r["quant"]: r["quality"] for r in rows}
        for line in (p for p in (work / f"q-{name}").glob("*.gguf")):
            line.unlink()

    smol_q = ppl.get("smollm2-135m-instruct", {})
    summary = {
        "ours_s_f16": round(t["ours_F16"], 3) if t else None,
        "ref_s_f16": round(t["ref_F16"], 3) if t else None,
        "ours_s_q8_0": round(t["ours_Q8_0"], 3) if t else None,
        "ref_s_q8_0": round(t["ref_Q8_0"], 3) if t else None,
        "tensors_identical": all(not c["tensors_differing"] for c in cmp.values()) if cmp else None,
        "tensors_differing": {ty: len(c["tensors_differing"]) for ty, c in cmp.items()},
        "metadata_differences": cmp["F16"]["metadata_differences"] if cmp else None,
        "ppl_ratio_q8_0": smol_q.get("Q8_0", {}).get("ppl_ratio"),
        "ref_ppl_ratio_q8_0": smol_q.get("Q8_0 (llama.cpp)", {}).get("ppl_ratio"),
        "mean_kld_q8_0": smol_q.get("Q8_0", {}).get("mean_kld"),
        "ref_mean_kld_q8_0": smol_q.get("Q8_0 (llama.cpp)", {}).get("mean_kld"),
        "quality": {
            m: {q: {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()} for q, d in rows.items()}
            for m, rows in ppl.items()
        },
    }
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
