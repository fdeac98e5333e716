"""`toolchain pack RUN_DIR --out BUNDLE`: what an app ships, from a finished run.

The bundle holds the chosen exports (each one verified against the torch model by the run),
the tokenizer and chat template, generation defaults, onnxruntime-genai's `genai_config.json`
beside every ONNX model, an Ollama Modelfile beside the GGUF, a model card (README.md) and
`manifest.json`: every file with its bytes and sha256, the runtimes, memory needed per bench
target, licence and provenance (teacher name + sha256 + licence, data source + sha256 +
licence, toolchain version, the resolved config). `toolchain.runtime.bundle` refuses a bundle
whose files no longer match it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

from toolchain import __version__
from toolchain.errors import UserError
from toolchain.fileio import atomic_dir, atomic_path, write_json, write_text
from toolchain.runtime.bundle import BUNDLE_FORMAT, MANIFEST_DIGEST_FILE, MANIFEST_FILE, sha256_of

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
RUNTIMES = {"gguf": "llama.cpp (llama-cpp-python, Ollama, LM Studio)", "onnx": "onnxruntime / onnxruntime-genai"}


def _stage(run_dir: Path, name: str) -> dict:
    p = run_dir / "stages" / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def run_exports(run_dir: Path) -> list[dict]:
    """Every export a run directory's stage records list: GGUF files, the ONNX folder and its variants."""
    gguf = _stage(run_dir, "export_gguf").get("files", [])
    onnx = _stage(run_dir, "export_onnx")
    return list(gguf) + ([onnx] if onnx.get("path") else []) + list(onnx.get("variants", []))


def choose_exports(run_dir: Path, gguf: list[str] | None, onnx: list[str] | None) -> list[dict]:
    """The exports to pack (all the run verified, or the named ones), each with its verify result."""
    verified = {(r["format"], r["quant"]): r for r in _stage(run_dir, "verify").get("results", [])}
    if not verified:
        raise UserError(f"{run_dir} has no verified exports (stages/verify.json); finish the run first")
    wanted = {"gguf": gguf, "onnx": onnx}
    chosen = []
    exports = run_exports(run_dir)
    for e in exports:
        names = wanted[e["format"]]
        if names is not None and e["quant"] not in names:
            continue
        r = verified.get((e["format"], e["quant"]))
        if r is None or not r.get("passed"):
            raise UserError(f"{e['format']} {e['quant']} of {run_dir} did not pass verification; it is not packed")
        chosen.append({**e, "verify": r})
    for fmt, names in wanted.items():
        missing = set(names or ()) - {e["quant"] for e in chosen if e["format"] == fmt}
        if missing:
            have = sorted(e["quant"] for e in exports if e["format"] == fmt)
            raise UserError(f"{run_dir} has no {fmt} export {', '.join(sorted(missing))} (it has: {have or 'none'})")
    if not chosen:
        raise UserError("nothing to pack: choose at least one GGUF type or ONNX precision")
    return chosen


def _memory_by_target(run_dir: Path, export: dict) -> dict:
    rows = _stage(run_dir, "bench").get("results", [])
    return {
        r["target"]: {"memory_needed_mb": r["memory_needed_mb"], "fits": r["fits"], "peak_rss_mb": r.get("peak_rss_mb")}
        for r in rows
        if r.get("path") == export["path"] and r.get("memory_needed_mb") is not None
    }


def _task_score(run_dir: Path, export: dict) -> dict | None:
    models = _stage(run_dir, "eval").get("models", {})
    m = models.get(f"student {export['format']} {export['quant']}")
    return m["score"] if m else None


def _copy_model(export: dict, dest: Path) -> list[Path]:
    src = Path(export["path"])
    if export["format"] == "gguf":
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)
        return [dest / src.name]
    folder = src.parent if src.is_file() else src
    shutil.copytree(folder, dest)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def generation_defaults(student_dir: Path, config: dict, temperature: float) -> dict:
    """Stops, temperature and answer length an app should use (what the run evaluated with)."""
    from transformers import AutoTokenizer

    from toolchain.data.chat_encoding import stop_token_ids

    tok = AutoTokenizer.from_pretrained(student_dir)
    stops = stop_token_ids(tok, student_dir)
    task = config.get("task") or {}
    return {
        "stop_token_ids": stops,
        "stop_strings": [tok.convert_ids_to_tokens(i) for i in stops],
        "temperature": temperature,
        "max_new_tokens": int(task.get("max_new_tokens") or 256) if task.get("path") else 256,
        "chat_template": "tokenizer/chat_template.jinja" if tok.chat_template else None,
        "add_bos": bool(tok.bos_token) and len(tok("a").input_ids) > len(tok("a", add_special_tokens=False).input_ids),
    }


def _provenance(run_dir: Path, student_dir: Path, config: dict) -> dict:
    from toolchain.models.provenance import public_meta, public_name

    meta_file = student_dir / "toolchain.json"
    meta = public_meta(json.loads(meta_file.read_text())) if meta_file.is_file() else {}
    task = config.get("task") or {}
    data_path = task.get("path") or (config.get("data") or {}).get("source")
    data = {"source": public_name(data_path) if data_path else None, "sha256": None, "license": task.get("license")}
    if data_path and Path(data_path).is_file():
        data["sha256"] = sha256_of(data_path)
    if task.get("source"):
        data["origin"] = task["source"]
    return {
        "teacher": {
            "name": meta.get("distilled_from"),
            "sha256": meta.get("teacher_sha256"),
            "license": meta.get("teacher_license"),
        },
        "data": data,
        "model_license": meta.get("license"),
        "toolchain_version": __version__,
        "run": public_name(run_dir),
        "config": config,
    }


def pack_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    gguf: list[str] | None = None,
    onnx: list[str] | None = None,
    make_zip: bool = False,
    temperature: float = 0.0,
    calibrate: bool = True,
    max_drop: float = 0.01,
    echo=print,
) -> dict:
    """Write the bundle folder `out` (atomically) and, with `make_zip`, `out`.zip; returns the manifest.

    With `calibrate` and a task in the run, the smallest GGUF's fallback threshold is measured on
    the calibration split (student + teacher within `max_drop` of the teacher's accuracy)."""
    import yaml

    run_dir, out = Path(run_dir), Path(out)
    student_dir = run_dir / "student"
    if not (student_dir / "config.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a finished run directory (no student/ or config.yaml)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    exports = choose_exports(run_dir, gguf, onnx)
    t0 = time.perf_counter()
    calibration = None
    ggufs = [e for e in exports if e["format"] == "gguf"]
    if calibrate and ggufs and (config.get("task") or {}).get("path"):
        from toolchain.config import from_dict
        from toolchain.pack.calibration import calibrate_bundle_model

        pick = min(ggufs, key=lambda e: e["bytes"])
        calibration = calibrate_bundle_model(run_dir, from_dict(config), pick, max_drop, echo)
    with atomic_dir(out) as tmp:
        manifest = _fill(tmp, run_dir, student_dir, config, exports, temperature, calibration)
    if make_zip:
        zip_bundle(out)
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    return manifest


def _fill(tmp: Path, run_dir, student_dir, config, exports, temperature, calibration) -> dict:
    from toolchain.pack.card import model_card
    from toolchain.pack.genai import genai_config

    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    for name in TOKENIZER_FILES:
        if (student_dir / name).is_file():
            shutil.copy2(student_dir / name, tok_dir / name)
    generation = generation_defaults(student_dir, config, temperature)
    if generation["chat_template"] and not (tok_dir / "chat_template.jinja").is_file():
        from transformers import AutoTokenizer

        write_text(tok_dir / "chat_template.jinja", AutoTokenizer.from_pretrained(student_dir).chat_template)
    hf_config = json.loads((student_dir / "config.json").read_text())
    context = int(hf_config.get("max_position_embeddings") or 2048)
    models = []
    for e in exports:
        rel = Path(e["format"]) / (e["quant"] if e["format"] == "onnx" else "")
        _copy_model(e, tmp / rel)
        entry = {
            "format": e["format"],
            "quant": e["quant"],
            "runtime": RUNTIMES[e["format"]],
            "path": str(rel / Path(e["path"]).name) if e["format"] == "gguf" else str(rel),
            "bytes": e["bytes"],
            "memory": _memory_by_target(run_dir, e),
            "verify": {k: v for k, v in e["verify"].items() if not isinstance(v, (list, dict))},
            "task_score": _task_score(run_dir, e),
        }
        if e["format"] == "onnx":
            info = json.loads((tmp / rel / "model_info.json").read_text())
            write_json(
                tmp / rel / "genai_config.json", genai_config(info, context, hf_config.get("pad_token_id"), generation)
            )
            entry["genai_config"] = str(rel / "genai_config.json")
        models.append(entry)
    _modelfile(tmp, student_dir, [m for m in models if m["format"] == "gguf"])
    provenance = _provenance(run_dir, student_dir, config)
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": config.get("name"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": hf_config.get("model_type"),
        "context_length": context,
        "special_tokens": {
            "bos_token_id": hf_config.get("bos_token_id"),
            "eos_token_id": generation["stop_token_ids"],
            "pad_token_id": hf_config.get("pad_token_id"),
        },
        "generation": generation,
        "models": models,
        "license": provenance["teacher"]["license"] or provenance["model_license"],
        "provenance": provenance,
        "task": _task_summary(run_dir),
        "calibration": calibration,
    }
    write_text(tmp / "README.md", model_card(manifest))
    return _seal(tmp, manifest)


def _modelfile(tmp: Path, student_dir: Path, ggufs: list[dict]) -> None:
    """An Ollama Modelfile beside the smallest GGUF (FROM a relative path, so the folder moves)."""
    if not ggufs:
        return
    from toolchain.export.ollama import write_modelfile

    pick = min(ggufs, key=lambda m: m["bytes"])
    write_modelfile(student_dir, tmp / pick["path"], tmp / Path(pick["path"]).parent / "Modelfile")


def _task_summary(run_dir: Path) -> dict | None:
    ev = _stage(run_dir, "eval")
    if not ev.get("models"):
        return None
    return {
        "models": {k: v["score"] for k, v in ev["models"].items()},
        "retention": ev.get("retention"),
    }


def _seal(root: Path, manifest: dict) -> dict:
    """List every file with its size and sha256, write manifest.json and its digest."""
    files = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        files.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_of(p)})
    manifest["files"] = files
    write_json(root / MANIFEST_FILE, manifest)
    write_text(root / MANIFEST_DIGEST_FILE, f"{sha256_of(root / MANIFEST_FILE)}  {MANIFEST_FILE}\n")
    return manifest


def zip_bundle(folder: Path) -> Path:
    """`folder`.zip with the bundle under one top folder; weights stored, text compressed."""
    target = folder.with_suffix(".zip")
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w") as z:
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            big = p.suffix in (".gguf", ".data", ".onnx")
            z.write(
                p,
                f"{folder.name}/{p.relative_to(folder).as_posix()}",
                zipfile.ZIP_STORED if big else zipfile.ZIP_DEFLATED,
            )
    return target


def pack_summary(manifest: dict, bundle: Path) -> dict:
    """What a run records of its bundle: where, how many files and bytes, which models, and the
    calibration's figures without its curve."""
    return {
        "path": str(bundle),
        "files": len(manifest["files"]),
        "bytes": sum(f["bytes"] for f in manifest["files"]),
        "models": [f"{x['format']} {x['quant']}" for x in manifest["models"]],
        "calibration": {k: v for k, v in (manifest.get("calibration") or {}).items() if k != "curve"} or None,
    }
