"""4-bit GGUF quality: llama.cpp's default, our importance matrix, and quantization-aware
distillation, each against the F16 file.

For each model (the bundled SmolLM2-135M-Instruct, and any HF directory given with --model): the
F16 GGUF is the reference; Q4_0, Q4_K_M and IQ4_XS are made by llama.cpp's quantizer from it as
llama.cpp does by default, and again with the importance matrix toolchain measures in torch on
calibration text (the training side of the corpus; the scored text is its held-out side). The
"run" row is what a toolchain run ships for that type: the pipeline's judge scores both files
against the F16 on 4 calibration rows the importance matrix was not measured on and keeps the
closer one (named in brackets). Then the model distils from itself (its fp32 weights as the
teacher, forward KL on the training side) for --qad-steps steps through Q4_0's exact rounding
(each block's scale learned too, from the importance-weighted search or the reference rounding,
whichever the model measures closer on 4 calibration rows, as a run does by default;
--learn-scales none for the reference grid), with the tensor types llama.cpp's Q4_0 gives the
model (the tied token table at Q8_0, as llama.cpp keeps it when its rows do not split into
Q6_K's 256), and our writer stores that Q4_0 file; likewise through Q4_K_M (llama.cpp's
per-tensor mix for the model: Q4_K, Q6_K and its fallbacks for rows that do not split into 256,
the K-quants in our rounding, which our writer stores). Figures: PPL ratio, mean KLD and
top-1 agreement vs the F16 file on held-out tokens, and file bytes.

The ONNX int4 export (fitted offsets; head and token table in 8 bits) is scored the same way
(onnxruntime, against the same F16 GGUF), and again after the model distils from itself
through the int4 grid that export measures as better for it, whose codes it then stores exactly.

Prints the table, then one JSON line (keys per model: <type>_kld, <type>_imatrix_kld,
<type>_qad_kld and _bytes of each).

    .venv/bin/python benchmarks/quant_quality.py [--model DIR ...] [--tokens 4096] [--rows 64]
        [--types Q4_0,Q4_K_M,IQ4_XS] [--qad Q4_0,Q4_K_M,int4] [--qad-steps 100] [--int4-qad-steps N]
        [--qad-lr 1e-4] [--learn-scales none|reference|imatrix|measured]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TYPES = ("Q4_0", "Q4_K_M", "IQ4_XS")


def _qad(
    model_dir: Path, out: Path, qat: str, steps: int, lr: float, overrides: dict, learn_scales: str = "none"
) -> tuple[Path, dict]:
    """The model distilled from itself through `qat`'s rounding; (its directory, the run's figures)."""
    from toolchain.config import DataConfig, DistillConfig
    from toolchain.export.gguf import qat_tensor_types
    from toolchain.models.load import load_model
    from toolchain.quantize.qat import qat_distill

    cfg = DistillConfig(
        steps=steps, batch_size=4, lr=lr, warmup_steps=4, alpha=0.0, temperature=1.0, divergence_ratio=0,
        checkpoint_every=steps,
    )  # fmt: skip
    t0 = time.perf_counter()
    res = qat_distill(
        load_model(str(model_dir)), model_dir, out, DataConfig(seq_len=256), cfg, out.with_suffix(".work"), qat,
        overrides, progress=False, gguf_types=qat_tensor_types(model_dir, qat, overrides),
        learn_scales=learn_scales != "none", scale_start=learn_scales,
    )  # fmt: skip
    figures = {"steps": steps, "lr": lr, "tokens_per_s": res.get("tokens_per_s")}
    if qat != "int4":
        figures["learn_scales"] = learn_scales
        figures["scale_start"] = res.get("scale_start")  # the measured choice, if any
    figures.update(kl_before=res["before"]["kl"], kl_after=res["after"]["kl"])
    # the held-out KL along the way: how far from done the run stopped
    evals = [(h["step"], next(iter(h["eval"].values()))) for h in res.get("history", []) if h.get("eval")]
    figures["kl_curve"] = [(step, round(e["kl"], 4)) for step, e in evals]
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    return out, figures


def _gguf_types(path: Path) -> dict[str, int]:
    from collections import Counter

    from toolchain.models.file_checks import open_gguf

    return dict(Counter(t.tensor_type.name for t in open_gguf(path).tensors))


class _Rows:
    """One model's rows: each file scored against the model's F16 GGUF on the held-out chunks."""

    def __init__(self, model_dir: Path, ref, chunks):
        self.name, self.ref, self.chunks, self.rows = model_dir.name, ref, chunks, {}

    def add(self, label: str, scored, nbytes: int, **extra) -> None:
        from toolchain.verify.quality import compare

        q = compare(self.ref, scored)
        self.rows[label] = {**q, "bytes": nbytes, **extra}
        print(f"  {self.name} {label}: KLD {q['mean_kld']:.4f} {extra or ''}", flush=True)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))


def _measure(model_dir: Path, work: Path, args) -> dict:
    from transformers import AutoTokenizer

    from toolchain.config import DataConfig
    from toolchain.export.gguf import export_gguf, write_gguf
    from toolchain.quantize import imatrix as I
    from toolchain.quantize.gguf_types import llama_cpp_quantize
    from toolchain.student import calibration_rows
    from toolchain.verify.quality import heldout_chunks, kld_judge, llama_scored

    tok = AutoTokenizer.from_pretrained(model_dir)
    f16 = write_gguf(model_dir, work / "model-F16.gguf", "F16")
    chunks = heldout_chunks(tok, args.tokens, args.ctx, add_bos=False)
    rows = _Rows(model_dir, llama_scored(f16, chunks), chunks)
    # the imatrix from --rows calibration rows; the pipeline's judge scores on JUDGE_ROWS more
    calib = calibration_rows(tok, DataConfig(seq_len=256), None, args.rows + I.JUDGE_ROWS)
    values, facts, judged = I.measure_holding_out(model_dir, calib, "pydoc (train side)", work / "imatrix.gguf")
    imatrix = (values, facts)
    judge = kld_judge(judged)
    for t in args.types:
        paths = {}
        for label, im in (("default", None), ("imatrix", imatrix)):
            paths[label] = llama_cpp_quantize(f16, work / f"model-{t}-{label}.gguf", t, imatrix=im)
            rows.add(f"{t} {label}", llama_scored(paths[label], chunks), paths[label].stat().st_size)
        # what a run ships: the imatrix file where the judge finds it closer to the F16, else the plain one
        choice = judge(f16, paths["imatrix"], paths["default"])
        kept = "imatrix" if choice["imatrix_kld"] <= choice["plain_kld"] else "default"
        rows.rows[f"{t} run"] = {**rows.rows[f"{t} {kept}"], "kept": kept, "judge": choice}
    out: dict = {"tokens_scored": len(rows.ref.targets), "rows": rows.rows, "qad": {}}
    if "Q4_0" in args.qad:
        # llama.cpp's Q4_0 file for this model, tensor type by tensor type, so the bytes compare
        default_q4 = llama_cpp_quantize(f16, work / "model-Q4_0-default.gguf", "Q4_0")
        overrides = {"token_embd": _tensor_type(default_q4, "token_embd.weight")}
        qad_dir, figures = _qad(
            model_dir, work / "qad-q4_0", "Q4_0", args.qad_steps, args.qad_lr, overrides, args.learn_scales
        )
        path = write_gguf(qad_dir, work / "model-Q4_0-qad.gguf", "Q4_0", overrides=overrides)
        figures.update(types=_gguf_types(path), default_types=_gguf_types(default_q4))
        out["qad"]["Q4_0"] = figures
        rows.add("Q4_0 qad", llama_scored(path, chunks), path.stat().st_size)
    if "Q4_K_M" in args.qad:
        # llama.cpp's Q4_K_M mix for this model; its K-quant tensors in our rounding, trained through
        qad_dir, figures = _qad(
            model_dir, work / "qad-q4_k_m", "Q4_K_M", args.qad_steps, args.qad_lr, {}, args.learn_scales
        )
        (rec,) = export_gguf(qad_dir, work / "qad-q4_k_m-export", ["Q4_K_M"])
        path = Path(rec["path"])
        default_k = work / "model-Q4_K_M-default.gguf"
        figures.update(types=_gguf_types(path), default_types=_gguf_types(default_k) if default_k.is_file() else None)
        out["qad"]["Q4_K_M"] = figures
        rows.add("Q4_K_M qad", llama_scored(path, chunks), path.stat().st_size)
    if args.onnx_int4:
        _int4_rows(model_dir, work, args, rows, out)
    return out


def _int4_rows(model_dir: Path, work: Path, args, rows: _Rows, out: dict) -> None:
    """ONNX int4 as the export makes it (fitted offsets), and after QAD through its min/max grid."""
    from toolchain.export.onnx import export_onnx, precision_dir
    from toolchain.verify.quality import onnx_scored

    export_onnx(model_dir, work / "onnx", ["fp32", "int4"])
    int4 = precision_dir(work / "onnx", "int4")
    rows.add("int4 onnx", onnx_scored(int4, rows.chunks), _dir_bytes(int4))
    if "int4" in args.qad:
        steps = args.int4_qad_steps or args.qad_steps
        qad_dir, out["qad"]["int4"] = _qad(model_dir, work / "qad-int4", "int4", steps, args.qad_lr, {})
        export_onnx(qad_dir, work / "onnx-qad", ["fp32", "int4"])
        int4 = precision_dir(work / "onnx-qad", "int4")
        rows.add("int4 onnx-qad", onnx_scored(int4, rows.chunks), _dir_bytes(int4))


def _tensor_type(path: Path, name: str) -> str:
    from toolchain.models.file_checks import open_gguf

    return next(t.tensor_type.name for t in open_gguf(path).tensors if t.name == name)


def _summary(key: str, r: dict) -> dict:
    """<key>_<row>_kld and _bytes per row (e.g. smollm2_q4_k_m_imatrix_kld), and the QAD runs."""
    out: dict = {}
    for label, q in r["rows"].items():
        kind, how = label.split()
        stem = f"{key}_{kind.lower()}" + ("" if how in ("default", "onnx") else f"_{how.replace('onnx-', '')}")
        out[f"{stem}_kld"], out[f"{stem}_bytes"] = q["mean_kld"], q["bytes"]
    out[f"{key}_qad"] = r["qad"]
    return out


def _print_table(results: dict) -> None:
    first = next(iter(results.values()))
    print(f"\nvs each model's F16 GGUF on held-out pydoc text ({first['tokens_scored']} tokens scored)")
    print(f"{'model':<28} {'type':<8} {'made by':<16} {'MB':>7} {'PPL ratio':>10} {'mean KLD':>9} {'top-1':>7}")
    for name, r in results.items():
        for label, q in r["rows"].items():
            t, how = label.split()
            how = f"run ({q['kept']})" if "kept" in q else how
            print(f"{name[:28]:<28} {t:<8} {how:<16} {q['bytes'] / 1e6:>7.1f} "
                  f"{q['ppl_ratio'] - 1:>+9.2%} {q['mean_kld']:>9.4f} {q['top1_agreement']:>7.1%}")  # fmt: skip
    for name, r in results.items():
        for qat, f in r["qad"].items():
            learned = f.get("learn_scales") not in (None, "none")
            start = (f.get("scale_start") or {}).get("chosen") or f.get("learn_scales")
            scales = f", block scales learned from the {start} start" if learned else ""
            print(f"{name[:28]} QAD {qat}: {f['steps']} steps at lr {f['lr']}{scales}, held-out KL to itself "
                  f"{f['kl_before']:.4f} -> {f['kl_after']:.4f}, {f['seconds']:.0f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="more HF model directories (e.g. a student)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--rows", type=int, default=64, help="calibration rows of 256 tokens for the imatrix")
    p.add_argument("--types", default=",".join(TYPES), help="GGUF types by llama.cpp, with and without the imatrix")
    p.add_argument(
        "--qad", default="Q4_0,Q4_K_M,int4", help="quantization-aware distillation runs (Q4_0, Q4_K_M, int4; '' none)"
    )
    p.add_argument("--qad-steps", type=int, default=100)
    p.add_argument("--int4-qad-steps", type=int, default=0, help="steps of the int4 QAD (0: --qad-steps)")
    p.add_argument("--qad-lr", type=float, default=1e-4)
    p.add_argument(
        "--learn-scales", choices=["none", "reference", "imatrix", "measured"], default="measured",
        help="QAD also trains each Q4_0/Q8_0 block's scale, from the start named (the pipeline's: measured)",
    )  # fmt: skip
    p.add_argument("--no-onnx-int4", dest="onnx_int4", action="store_false", help="skip the ONNX int4 rows")
    p.add_argument("--no-bundled", dest="bundled", action="store_false", help="only the --model directories")
    args = p.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    args.qad = [t for t in args.qad.split(",") if t]

    from toolchain.models.load import resolve_model_dir

    t0 = time.perf_counter()
    bundled = [Path(resolve_model_dir("smollm2-135m-instruct"))] if args.bundled else []
    results, summary = {}, {}
    for m in [*bundled, *map(Path, args.model)]:
        with tempfile.TemporaryDirectory(prefix="quant-quality-") as work:
            results[m.name] = _measure(m, Path(work), args)
        summary.update(_summary("smollm2" if m in bundled else m.name, results[m.name]))
    _print_table(results)
    # the keys the issue names (the bundled model's; null where it was not run), then every figure
    named = (
        "q4_0",
        "q4_0_imatrix",
        "q4_0_qad",
        "q4_k_m",
        "q4_k_m_imatrix",
        "q4_k_m_qad",
        "iq4_xs",
        "iq4_xs_imatrix",
        "int4",
        "int4_qad",
    )
    keys = {f"{k}_kld": summary.get(f"smollm2_{k}_kld") for k in named}
    keys.update(q4_0_bytes=summary.get("smollm2_q4_0_bytes"), q4_k_m_bytes=summary.get("smollm2_q4_k_m_bytes"))
    print(json.dumps({**keys, **summary, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
