"""Assemble report.json from the stage results of a run directory."""

from __future__ import annotations

import platform
import time

from toolchain import __version__

SCHEMA_VERSION = 1


def _bench_row(b: dict) -> dict:
    """A bench result for report.json: everything but the per-sample lists (kept in bench/*.json)."""
    row = {}
    for k, v in b.items():
        if k in ("samples_ns", "samples_ts"):
            continue
        if isinstance(v, dict) and "runs" in v:
            v = {**{m: x for m, x in v.items() if m != "runs"}, "n": len(v["runs"])}
        row[k] = v
    return row


_EXPORT_KEYS = ("format", "quant", "path", "bytes", "sha256", "files_sha256", "imatrix")


def build_report(config: dict, stages: dict, seconds: dict) -> dict:
    student = stages.get("student", {})
    prune = stages.get("prune") or {}
    distill = stages.get("distill", {})
    again = stages.get("prune_again") or {}
    kept_layers = again.get("kept_layers") or prune.get("kept_layers") or student.get("kept_layers")
    exports = []
    onnx = stages.get("export_onnx") or {}
    onnx_all = ([onnx] if onnx.get("path") else []) + list(onnx.get("variants", []))  # fp16/int8/int4 folders
    for e in stages.get("export_gguf", {}).get("files", []) + onnx_all:
        exports.append({k: e[k] for k in _EXPORT_KEYS if k in e})
    verify = {(v["format"], v["quant"]): v for v in stages.get("verify", {}).get("results", [])}
    for e in exports:
        v = verify.get((e["format"], e["quant"]))
        if v:
            e["parity"] = {k: v[k] for k in v if k not in ("format", "quant", "path", "sample")}
            if v.get("sample"):
                e["sample"] = v["sample"]
    return {
        "schema_version": SCHEMA_VERSION,
        "toolchain_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "system": platform.system()},
        "name": config.get("name"),
        "teacher": stages.get("teacher", {}),
        # the shipped student: the distilled one (the initial or pruned shape), or the distilled
        # one cut again and healed (prune.again)
        "student": {
            "params": again.get("params", distill.get("params", student.get("params"))),
            "bytes": again.get("bytes", distill.get("bytes")),
            "layers": len(kept_layers or []),
            "kept_layers": kept_layers,
        },
        "prune": prune,
        "prune_again": again,
        "distill": {k: v for k, v in distill.items() if k not in ("history", "params", "bytes")} if distill else {},
        "quantize": stages.get("quantize") or {},
        "exports": exports,
        "bench": [_bench_row(b) for b in stages.get("bench", {}).get("results", [])],
        "finetune": stages.get("finetune") or {},
        "task": stages.get("eval") or {},
        "bundle": stages.get("pack") or {},
        "stage_seconds": seconds,
    }
