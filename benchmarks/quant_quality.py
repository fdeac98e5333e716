"""4-bit GGUF quality: llama.cpp's default, our importance matrix, and quantization-aware
distillation, each against the F16 file.

For each model (the bundled SmolLM2-135M-Instruct, and any HF directory given with --model):
the F16 GGUF is the reference; Q4_0, Q4_K_M and IQ4_XS are made by llama.cpp's quantizer from
it as llama.cpp does by default, and again with the importance matrix toolchain measures in
torch on calibration text (the training side of the corpus; the scored text is its held-out
side). Then the model distils from itself (its fp32 weights as the teacher, forward KL on the
training side) for --qad-steps steps through Q4_0's exact rounding, with the tensor types
llama.cpp's Q4_0 gives the model (the tied token table at Q8_0, as llama.cpp keeps it when its
rows do not split into Q6_K's 256), and our writer stores that Q4_0 file. Figures: PPL ratio,
mean KLD and top-1 agreement vs the F16 file on held-out tokens, and file bytes.

Prints the table, then one JSON line (keys per model: <type>_kld, <type>_imatrix_kld,
<type>_bytes, q4_0_qad_kld, q4_0_qad_bytes).

    .venv/bin/python benchmarks/quant_quality.py [--model DIR ...] [--tokens 4096] [--rows 64]
        [--qad-steps 100] [--qad-lr 1e-4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("Q4_0", "Q4_K_M", "IQ4_XS")


def _qad(model_dir: Path, work: Path, steps: int, lr: float, overrides: dict) -> tuple[Path, dict]:
    """The model distilled from itself through Q4_0's rounding; (its directory, the run's figures)."""
    from toolchain.config import DataConfig, DistillConfig
    from toolchain.models.load import load_model
    from toolchain.quantize.qat import qat_distill

    cfg = DistillConfig(
        steps=steps, batch_size=4, lr=lr, warmup_steps=4, alpha=0.0, temperature=1.0, divergence_ratio=0,
        checkpoint_every=steps,
    )  # fmt: skip
    out = work / "qad"
    res = qat_distill(
        load_model(str(model_dir)), model_dir, out, DataConfig(seq_len=256), cfg, work / "qad.work", "Q4_0",
        overrides, progress=False,
    )  # fmt: skip
    figures = {"steps": steps, "lr": lr, "tokens_per_s": res.get("tokens_per_s")}
    figures.update(kl_before=res["before"]["kl"], kl_after=res["after"]["kl"])
    return out, figures


def _gguf_types(path: Path) -> dict[str, int]:
    from collections import Counter

    from toolchain.models.file_checks import open_gguf

    return dict(Counter(t.tensor_type.name for t in open_gguf(path).tensors))


def _measure(model_dir: Path, work: Path, tokens: int, ctx: int, rows: int, qad_steps: int, qad_lr: float) -> dict:
    from transformers import AutoTokenizer

    from toolchain.config import DataConfig
    from toolchain.export.gguf import write_gguf
    from toolchain.quantize import imatrix as I
    from toolchain.quantize.gguf_types import llama_cpp_quantize
    from toolchain.student import calibration_rows
    from toolchain.verify.quality import compare, heldout_chunks, llama_scored

    tok = AutoTokenizer.from_pretrained(model_dir)
    f16 = write_gguf(model_dir, work / "model-F16.gguf", "F16")
    chunks = heldout_chunks(tok, tokens, ctx, add_bos=False)
    ref = llama_scored(f16, chunks)
    calib = calibration_rows(tok, DataConfig(seq_len=256), None, rows)
    t0 = time.perf_counter()
    values = I.collect(model_dir, calib)
    imatrix = I.read(I.write(work / "imatrix.gguf", values, len(calib), calib.shape[1], "pydoc (train side)"))
    out = {"imatrix_seconds": round(time.perf_counter() - t0, 1), "tokens_scored": None, "rows": {}}
    for t in TYPES:
        for label, im in (("default", None), ("imatrix", imatrix)):
            path = llama_cpp_quantize(f16, work / f"model-{t}-{label}.gguf", t, imatrix=im)
            q = compare(ref, llama_scored(path, chunks))
            out["tokens_scored"] = q["tokens_scored"]
            out["rows"][f"{t} {label}"] = {**q, "bytes": path.stat().st_size}
            print(f"  {model_dir.name} {t} {label}: KLD {q['mean_kld']:.4f}", flush=True)
    if qad_steps:
        # llama.cpp's Q4_0 file for this model, tensor type by tensor type, so the bytes compare
        default_q4 = work / "model-Q4_0-default.gguf"
        overrides = {"token_embd": _tensor_type(default_q4, "token_embd.weight")}
        t0 = time.perf_counter()
        qad_dir, out["qad"] = _qad(model_dir, work, qad_steps, qad_lr, overrides)
        out["qad"]["seconds"] = round(time.perf_counter() - t0, 1)
        path = write_gguf(qad_dir, work / "model-Q4_0-qad.gguf", "Q4_0", overrides=overrides)
        out["qad"]["types"], out["qad"]["default_types"] = _gguf_types(path), _gguf_types(default_q4)
        q = compare(ref, llama_scored(path, chunks))
        out["rows"]["Q4_0 qad"] = {**q, "bytes": path.stat().st_size}
        print(f"  {model_dir.name} Q4_0 qad: KLD {q['mean_kld']:.4f} ({out['qad']})", flush=True)
    return out


def _tensor_type(path: Path, name: str) -> str:
    from toolchain.models.file_checks import open_gguf

    return next(t.tensor_type.name for t in open_gguf(path).tensors if t.name == name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="more HF model directories (e.g. a student)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--rows", type=int, default=64, help="calibration rows of 256 tokens for the imatrix")
    p.add_argument("--qad-steps", type=int, default=100, help="quantization-aware distillation steps (0: none)")
    p.add_argument("--qad-lr", type=float, default=1e-4)
    args = p.parse_args(argv)

    from toolchain.models.load import resolve_model_dir

    t0 = time.perf_counter()
    models = [Path(resolve_model_dir("smollm2-135m-instruct")), *map(Path, args.model)]
    results, summary = {}, {}
    for m in models:
        with tempfile.TemporaryDirectory(prefix="quant-quality-") as work:
            results[m.name] = r = _measure(m, Path(work), args.tokens, args.ctx, args.rows, args.qad_steps, args.qad_lr)
        key = "smollm2" if m == models[0] else m.name
        for t in TYPES:
            k = t.lower()
            summary[f"{key}_{k}_kld"] = r["rows"][f"{t} default"]["mean_kld"]
            summary[f"{key}_{k}_imatrix_kld"] = r["rows"][f"{t} imatrix"]["mean_kld"]
            summary[f"{key}_{k}_bytes"] = r["rows"][f"{t} default"]["bytes"]
        if "Q4_0 qad" in r["rows"]:
            summary[f"{key}_q4_0_qad_kld"] = r["rows"]["Q4_0 qad"]["mean_kld"]
            summary[f"{key}_q4_0_qad_bytes"] = r["rows"]["Q4_0 qad"]["bytes"]
            summary[f"{key}_qad"] = r["qad"]

    print(
        f"\nvs each model's F16 GGUF on held-out pydoc text ({results[models[0].name]['tokens_scored']} tokens scored)"
    )
    print(f"{'model':<28} {'type':<8} {'made by':<8} {'MB':>7} {'PPL ratio':>10} {'mean KLD':>9} {'top-1':>7}")
    for name, r in results.items():
        for label, q in r["rows"].items():
            t, how = label.split()
            print(f"{name[:28]:<28} {t:<8} {how:<8} {q['bytes'] / 1e6:>7.1f} "
                  f"{q['ppl_ratio'] - 1:>+9.2%} {q['mean_kld']:>9.4f} {q['top1_agreement']:>7.1%}")  # fmt: skip
    # the keys the issue names, for the bundled model
    s = summary
    print(json.dumps({
        "q4_0_qad_kld": s.get("smollm2_q4_0_qad_kld"),
        "q4_0_kld": s["smollm2_q4_0_kld"],
        "q4_0_imatrix_kld": s["smollm2_q4_0_imatrix_kld"],
        "q4_k_m_kld": s["smollm2_q4_k_m_kld"],
        "q4_k_m_imatrix_kld": s["smollm2_q4_k_m_imatrix_kld"],
        "iq4_xs_kld": s["smollm2_iq4_xs_kld"],
        "iq4_xs_imatrix_kld": s["smollm2_iq4_xs_imatrix_kld"],
        "q4_0_bytes": s["smollm2_q4_0_bytes"],
        "q4_k_m_bytes": s["smollm2_q4_k_m_bytes"],
        **s,
        "seconds": round(time.perf_counter() - t0, 1),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
