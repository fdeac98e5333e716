"""Verification figures of every ONNX precision of a real model (the issue's closing figures).

Exports MODEL to ONNX fp32/fp16/int8/int4 into OUT (skipped when OUT already holds the fp32
export), re-quantizes any precision folder that is missing, then runs toolchain's verify_onnx
with the default VerifyConfig thresholds on each,
printing one JSON object per precision and, last, one JSON object {precision: figures}.

    python benchmarks/onnx_verify_figures.py MODEL_DIR OUT_DIR [PRECISIONS, default fp32,fp16,int8,int4]
    (SmolLM2: ~/.cache/toolchain/gguf-hf/SmolLM2-*; Gemma-3-270M: an HF conversion such as /tmp/gemma-hf)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.config import VerifyConfig
    from toolchain.errors import VerificationError
    from toolchain.export.onnx import export_onnx, precision_dir, quantize_export
    from toolchain.verify.onnx import verify_onnx

    md, out = sys.argv[1], sys.argv[2]
    precisions = sys.argv[3].split(",") if len(sys.argv) > 3 else ["fp32", "fp16", "int8", "int4"]
    t = time.time()
    if not (Path(out) / "model.onnx").is_file():
        r = export_onnx(md, out, ["fp32", "fp16", "int8", "int4"])
        print(
            "export",
            round(time.time() - t),
            "s",
            json.dumps({k: r[k] for k in ("bytes", "exporter", "fusions")}),
            [(v["quant"], v["bytes"]) for v in r["variants"]],
            flush=True,
        )
    for p in [p for p in precisions if p != "fp32"]:  # a precision deleted to be redone (after a quantizer change)
        if not (precision_dir(out, p) / "model.onnx").is_file():
            t = time.time()
            v = quantize_export(out, p)
            print(p, "quantized in", round(time.time() - t), "s,", v["bytes"], "bytes", flush=True)
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(md)
    cfg = VerifyConfig()
    summary = {}
    for p in precisions:
        try:
            v = verify_onnx(
                md,
                precision_dir(out, p),
                cfg.prompts,
                cfg.greedy_tokens,
                cfg.onnx_max_abs_diff,
                threads=2,
                model=model,
                tokenizer=tok,
                fp16_max_abs_diff=cfg.onnx_fp16_max_abs_diff,
                min_top1=cfg.onnx_min_top1,
                max_kl=cfg.onnx_max_kl,
            )
        except VerificationError as e:
            print("FAILED:", e, flush=True)
            v = e.figures
        v.pop("per_prompt", None)
        print(json.dumps(v), flush=True)
        summary[p] = {k: v[k] for k in ("max_abs_diff", "top1_agreement", "mean_kl", "greedy_agreement", "passed")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
